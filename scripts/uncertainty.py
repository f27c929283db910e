"""AUROC of a latent model's per-pixel errors against its predicted variance (is the uncertainty map useful?).

python scripts/uncertainty.py checkpoint=outputs/.../checkpoints/best.ckpt [split=test] [eval.num_samples=16]

Prints one line and writes the record as JSON to `out=` (default: `<run dir>/uncertainty.json`, the run
dir holding checkpoints/). K = 8 prior samples unless eval.num_samples is given; `seed=` (default 0)
makes two calls give the same numbers. `data.<key>=` changes one key of the checkpoint's data config,
`data=<group>` replaces it (as in scripts/eval.py). Config: configs/uncertainty.yaml.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import avs  # noqa: E402,F401
from avs.config_checks import hints_on_rejection  # noqa: E402
from avs.errors import plain_errors, run_plain  # noqa: E402
from avs.evaluation.checkpoint import data_overrides, eval_data_config  # noqa: E402
from avs.evaluation.uncertainty import summary_line, write_uncertainty  # noqa: E402
from avs.script_args import check_overrides  # noqa: E402


def _data_override(cfg: DictConfig) -> DictConfig | None:
    """The command line's data config applied to the checkpoint's (None: the checkpoint's as stored)."""
    if cfg.get("data") is None:
        return None
    from avs.engine.checkpoint import load_checkpoint
    from avs.evaluation.checkpoint import config_from_checkpoint

    stored = config_from_checkpoint(load_checkpoint(cfg.checkpoint), cfg.checkpoint)
    return eval_data_config(cfg, stored.data)


@hydra.main(version_base="1.3", config_path="../configs", config_name="uncertainty")
@plain_errors
def main(cfg: DictConfig) -> None:
    record = write_uncertainty(
        cfg.checkpoint,
        split=str(cfg.split),
        num_samples=int(cfg.eval.num_samples),
        out=cfg.get("out"),
        seed=int(cfg.seed),
        device=cfg.device,
        data=_data_override(cfg),
        batch_size=cfg.get("batch_size"),
        threshold=float(cfg.threshold),
    )
    print(summary_line(record))


def run() -> None:
    """Entry point: `data.<key>=` alone changes the checkpoint's data config (as in scripts/eval.py)."""
    argv = sys.argv[1:]
    run_plain(
        lambda: check_overrides(
            argv, "scripts/uncertainty.py", "uncertainty", from_checkpoint=True, open_nodes=["data"]
        )
    )
    user_args = data_overrides(argv)
    sys.argv[1:] = user_args
    with hints_on_rejection(user_args, config_name="uncertainty"):
        main()


if __name__ == "__main__":
    run()
