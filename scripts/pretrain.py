"""Train the CPU proxy's pretrained stand-ins (visual backbone, tiny audio encoder) on procedural tasks.

    python scripts/pretrain.py                         # both, into paths.weights_dir
    python scripts/pretrain.py tasks=[visual] visual.epochs=2 out_dir=/tmp/w

Each task writes `<file>.pth` (a state dict the normal config path loads) and `<file>.json` (the
manifest: command, seed, config, data hash, held-out accuracy, wall time, torch version).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

import avs  # noqa: E402,F401  (registers config resolvers)
from avs.errors import ConfigError, plain_errors, run_plain  # noqa: E402
from avs.pretrain import deterministic, pretrain_audio, pretrain_visual  # noqa: E402
from avs.script_args import check_overrides  # noqa: E402
from avs.utils.simd import ensure as ensure_simd  # noqa: E402

log = logging.getLogger("avs.pretrain")
TASKS = {"visual": pretrain_visual, "audio": pretrain_audio}


def run(cfg: DictConfig) -> dict[str, dict]:
    """Run every task of `cfg.tasks` -> {task: manifest}."""
    tasks = list(cfg.tasks)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise ConfigError(f"tasks: expected a non-empty list from {sorted(TASKS)}, got {tasks}")
    out = {}
    for task in tasks:
        node = OmegaConf.to_container(cfg[task], resolve=True)
        with deterministic(cfg.get("num_threads")):
            out[task] = TASKS[task](node, cfg.out_dir, int(cfg.seed))
        rec = out[task]
        acc = rec.get("heldout_accuracy", rec.get("heldout_exact_match"))
        chance = rec.get("chance_accuracy", rec.get("chance_exact_match"))
        print(
            f"{task}: held-out accuracy {acc:.3f} (chance {chance:.3f}) in {rec['wall_time_s']:.0f} s -> "
            f"{Path(cfg.out_dir) / rec['weights_file']}"
        )
    return out


@hydra.main(version_base="1.3", config_path="../configs", config_name="pretrain")
@plain_errors
def main(cfg: DictConfig) -> None:
    ensure_simd(cfg.simd)  # may start the script again with the SIMD variables set
    run(cfg)


if __name__ == "__main__":
    run_plain(lambda: check_overrides(sys.argv[1:], "scripts/pretrain.py", "pretrain", open_nodes=()))
    main()
