"""Frame / GT / prediction / variance grids and a t-SNE of latent codes for a checkpoint on a split (docs/demo.md).

python scripts/visualize.py checkpoint=outputs/train/runs/<run>/checkpoints/best.ckpt split=test num_samples=8
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import avs  # noqa: E402,F401
from avs.errors import plain_errors, run_plain  # noqa: E402
from avs.evaluation.outputs import script_out_dir  # noqa: E402
from avs.inference.visualize import visualize_split  # noqa: E402
from avs.script_args import check_overrides  # noqa: E402

log = logging.getLogger("avs.visualize")


@hydra.main(version_base="1.3", config_path="../configs", config_name="visualize")
@plain_errors
def main(cfg: DictConfig) -> None:
    out_dir = script_out_dir(cfg.out_dir)
    result = visualize_split(cfg, out_dir)
    print(f"{len(result.grids)} grids: {out_dir / 'grids'}")
    if result.latents:
        print(f"latent codes: {result.latents}")
    print(f"t-SNE: {result.tsne}" if result.tsne else f"t-SNE skipped: {result.tsne_skipped}")


if __name__ == "__main__":
    run_plain(
        lambda: check_overrides(
            sys.argv[1:], "scripts/visualize.py", "visualize", from_checkpoint=True, open_nodes=["data"]
        )
    )
    main()
