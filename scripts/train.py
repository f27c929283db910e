"""Train any configured model; at the end evaluate the best (val-selected) checkpoint on test once.

    python scripts/train.py experiment=quickstart
    python scripts/train.py model=tpavi data=ms3 backbone=pvt_v2_b5
    python scripts/train.py -m experiment=quickstart seed=1,2,3
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

import avs  # noqa: E402,F401  (registers config resolvers)
from avs.engine.report import markdown_table  # noqa: E402
from avs.engine.trainer import Trainer  # noqa: E402

log = logging.getLogger("avs.train")


@hydra.main(version_base="1.3", config_path="../configs", config_name="train")
def main(cfg: DictConfig) -> float | None:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    trainer = Trainer(cfg, run_dir)
    result = trainer.fit()
    if result.get("interrupted"):
        return None
    best = trainer.best
    print(f"\nrun dir: {run_dir}")
    if best.get("val"):
        print(markdown_table(best["val"], title=f"val (best epoch {best['epoch']}, step {best['step']})"))
    if result.get("test"):
        print(markdown_table(result["test"], title=f"test ({cfg.data.name}, {cfg.model.name}, {cfg.backbone.name})"))
    return float(best["metric"]) if best.get("metric") is not None else None


if __name__ == "__main__":
    main()
