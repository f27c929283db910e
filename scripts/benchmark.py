"""Parameter counts and timings of a configured model.

    python scripts/benchmark.py model=tpavi backbone=pvt_v2_b5 params_only=true
    python scripts/benchmark.py            # parameters + metric throughput (1,000 frames of 224x224)
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
    from avs.engine.bench import metrics_throughput

    m = metrics_throughput(num_frames=int(cfg.metrics_frames), size=int(cfg.metrics_size))
    print(f"metrics: {m['frames']} frames of {m['size']}x{m['size']} in {m['seconds']:.3f} s "
          f"-> {m['frames_per_s']:.0f} frames/s (update + all three protocols, median of 3)")
    print(json.dumps({"params": report["groups"], "metrics": m}))


if __name__ == "__main__":
    main()
