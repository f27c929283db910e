"""Speed, memory and parameter benchmark of a configured model (docs/performance.md).

python scripts/benchmark.py model=tpavi backbone=pvt_v2_b5 params_only=true   # parameter counts only
python scripts/benchmark.py model=tpavi backbone=pvt_v2_b5                   # full CPU fp32 run
python scripts/benchmark.py model=avsbg quick=true compare=[motion]          # seconds-long smoke run
python scripts/benchmark.py model=ecmvae device=cuda                         # on a GPU
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import avs  # noqa: E402,F401
from avs.engine.params import format_parameter_report, parameter_report  # noqa: E402
from avs.errors import plain_errors, run_plain  # noqa: E402
from avs.script_args import check_overrides  # noqa: E402

log = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parents[1]


def default_json_path(cfg: DictConfig) -> Path:
    """benchmarks/<model>_<backbone>_<size>.json under the repository."""
    return REPO / "benchmarks" / f"{cfg.model.name}_{cfg.backbone.name}_{int(cfg.image_size)}.json"


@hydra.main(version_base="1.3", config_path="../configs", config_name="benchmark")
@plain_errors
def main(cfg: DictConfig) -> None:
    if cfg.params_only:
        report = parameter_report(cfg)
        print(format_parameter_report(report, f"model={cfg.model.name} backbone={cfg.backbone.name} (trainable, M)"))
        print(
            json.dumps(
                {
                    "params": report["groups"],
                    "total": report["total_trainable_excl_audio"],
                    "inference": report["inference_excl_audio"],
                }
            )
        )
        return
    from avs.benchmark import apply_quick, format_report, run_benchmark
    from avs.utils.io import atomic_write_text

    if cfg.quick:
        cfg = apply_quick(cfg)
    res = run_benchmark(cfg)
    print(format_parameter_report(res["params"], f"model={cfg.model.name} backbone={cfg.backbone.name} (trainable, M)"))
    print(format_report(res))
    paths = [default_json_path(cfg)] if cfg.save_default else []
    if cfg.out:
        paths.append(Path(str(cfg.out)))
    text = json.dumps(res, indent=1, sort_keys=False)
    for p in paths:
        p.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(p, text + "\n")
        log.info("wrote %s", p)
        print(f"wrote {p}")


if __name__ == "__main__":
    run_plain(
        lambda: check_overrides(
            sys.argv[1:], "scripts/benchmark.py", "benchmark", open_nodes=["model", "backbone", "audio"]
        )
    )
    main()
