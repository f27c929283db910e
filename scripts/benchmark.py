"""Parameter counts (and, with the performance work, timings) of a configured model.

    python scripts/benchmark.py model=tpavi backbone=pvt_v2_b5 params_only=true
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import avs  # noqa: E402,F401
from avs.engine.params import format_parameter_report, parameter_report  # noqa: E402


@hydra.main(version_base="1.3", config_path="../configs", config_name="benchmark")
def main(cfg: DictConfig) -> None:
    report = parameter_report(cfg)
    print(format_parameter_report(report, f"model={cfg.model.name} backbone={cfg.backbone.name} (trainable, M)"))
    if cfg.params_only:
        print(json.dumps({"params": report["groups"], "total": report["total_trainable_excl_audio"],
                          "inference": report["inference_excl_audio"]}))
        return
    raise SystemExit("timing benchmarks are not implemented yet: use params_only=true")


if __name__ == "__main__":
    main()
