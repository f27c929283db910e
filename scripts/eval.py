"""Evaluate a checkpoint on a split under every metric protocol; write markdown, csv and json tables.

    python scripts/eval.py checkpoint=outputs/train/runs/<run>/checkpoints/best.ckpt split=test
    python scripts/eval.py checkpoint=<run>/checkpoints/best.ckpt data.root=/path/to/AVSBench-object

The model and data config come from the checkpoint: `data.<key>=` changes one key of it, `data=<group>`
replaces it but keeps the checkpoint's image size and frames unless `data.image_size` / `data.num_frames`
are given too. The model cannot be changed here (`model=`, `+backbone=`, ... are refused: the checkpoint
fixes it), synthetic data is never generated (a data.root without it is refused), and an override
nothing would read is refused by name. Errors print as plain lines with the exit code of their kind
(README, "Exit codes").
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import avs  # noqa: E402,F401
from avs.config import CONFIG_DIR  # noqa: E402
from avs.config_checks import hints_on_rejection  # noqa: E402
from avs.engine import distributed as D  # noqa: E402
from avs.errors import plain_errors, run_plain  # noqa: E402
from avs.evaluation.checkpoint import data_overrides, eval_title, evaluate_checkpoint  # noqa: E402
from avs.evaluation.outputs import script_out_dir  # noqa: E402
from avs.evaluation.report import markdown_table  # noqa: E402
from avs.script_args import check_overrides  # noqa: E402
from avs.utils.allocator import configure as configure_allocator  # noqa: E402

log = logging.getLogger("avs.eval")


@hydra.main(version_base="1.3", config_path="../configs", config_name="eval")
@plain_errors
def main(cfg: DictConfig) -> None:
    configure_allocator(cfg.runtime.allocator)  # process-wide, before the model and data are built
    out_dir = script_out_dir(cfg.output_dir)
    result = evaluate_checkpoint(cfg, out_dir)
    if result.get("paths"):  # rank 0 (or the single process) writes and prints
        print(markdown_table(result["metrics"], title=f"{eval_title(cfg)}: {cfg.checkpoint}"))
        print(f"tables: {', '.join(str(p) for p in result['paths'].values())}")


def run() -> None:
    """Entry point: `data.<key>=` alone changes the checkpoint's data config; override hints on a rejected
    command line; under torchrun every rank agrees on one run dir."""
    run_plain(
        lambda: check_overrides(sys.argv[1:], "scripts/eval.py", "eval", from_checkpoint=True, open_nodes=["data"])
    )
    user_args = data_overrides(sys.argv[1:])
    sys.argv[1:] = user_args
    sys.argv += D.hydra_overrides(user_args, CONFIG_DIR)
    try:
        with hints_on_rejection(user_args, config_name="eval"):
            main()
    finally:
        D.cleanup()


if __name__ == "__main__":
    run()
