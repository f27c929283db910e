"""Evaluate a checkpoint on a split under every metric protocol; write markdown, csv and json tables.

    python scripts/eval.py checkpoint=outputs/train/runs/<run>/checkpoints/best.ckpt split=test
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import avs  # noqa: E402,F401
from avs.errors import plain_errors  # noqa: E402
from avs.engine.outputs import script_out_dir  # noqa: E402
from avs.config import CONFIG_DIR  # noqa: E402
from avs.engine import distributed as D  # noqa: E402
from avs.engine.evaluate import evaluate_checkpoint  # noqa: E402
from avs.engine.report import markdown_table  # noqa: E402

log = logging.getLogger("avs.eval")


@hydra.main(version_base="1.3", config_path="../configs", config_name="eval")
@plain_errors
def main(cfg: DictConfig) -> None:
    out_dir = script_out_dir(cfg.output_dir)
    result = evaluate_checkpoint(cfg, out_dir)
    if result.get("paths"):  # rank 0 (or the single process) writes and prints
        print(markdown_table(result["metrics"], title=f"{cfg.split}: {cfg.checkpoint}"))
        print(f"tables: {', '.join(str(p) for p in result['paths'].values())}")


def run() -> None:
    """Entry point; under torchrun every rank agrees on one run dir."""
    sys.argv += D.hydra_overrides(sys.argv[1:], CONFIG_DIR)
    try:
        main()
    finally:
        D.cleanup()


if __name__ == "__main__":
    run()
