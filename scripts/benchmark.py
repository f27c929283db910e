"""Speed, memory and parameter benchmark of a configured model (docs/performance.md).

python scripts/benchmark.py model=tpavi backbone=pvt_v2_b5 params_only=true   # parameter counts only
python scripts/benchmark.py model=tpavi backbone=pvt_v2_b5                   # full CPU fp32 run
python scripts/benchmark.py model=avsbg quick=true compare=[motion]          # seconds-long smoke run
python scripts/benchmark.py model=ecmvae device=cuda                         # on a GPU
python scripts/benchmark.py model=ecmvae profile=true                        # per-part time and GFLOP table
python scripts/benchmark.py profile=true profile_models=[tpavi,ecmvae,avsbg,ecmvae_bg]
python scripts/benchmark.py model=tpavi demo=true                            # demo frames/s and its shares
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
from avs.errors import ConfigError, plain_errors, run_plain  # noqa: E402
from avs.script_args import check_overrides  # noqa: E402
from avs.utils.allocator import configure as configure_allocator  # noqa: E402

log = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parents[1]


def default_json_path(cfg: DictConfig) -> Path:
    """benchmarks/<model>_<backbone>_<size>[_profile|_demo].json under the repository."""
    models = "-".join(str(m) for m in cfg.get("profile_models") or []) if cfg.get("profile") else ""
    suffix = "_profile" if cfg.get("profile") else "_demo" if cfg.get("demo") else ""
    return REPO / "benchmarks" / f"{models or cfg.model.name}_{cfg.backbone.name}_{int(cfg.image_size)}{suffix}.json"


def profile_configs(cfg: DictConfig) -> list[tuple[str, DictConfig]]:
    """(model name, config) of each model of `profile_models` (composed with this run's other overrides),
    or the configured model alone."""
    from avs.benchmark import apply_quick

    names = [str(m) for m in cfg.get("profile_models") or []]
    if not names:
        return [(str(cfg.model.name), apply_quick(cfg) if cfg.quick else cfg)]
    from hydra import compose
    from hydra.core.hydra_config import HydraConfig
    from hydra.errors import MissingConfigException

    overrides = [o for o in HydraConfig.get().overrides.task if not o.split("=", 1)[0].lstrip("+~") == "model"]
    out = []
    for name in names:
        try:
            c = compose("benchmark", overrides=[*overrides, f"model={name}"])
        except MissingConfigException:
            raise ConfigError(
                f"profile_models: no model config {name!r} (expected configs/model/{name}.yaml)"
            ) from None
        out.append((name, apply_quick(c) if c.quick else c))
    return out


def write_json(cfg: DictConfig, res: dict) -> None:
    from avs.utils.allocator import state as allocator_state
    from avs.utils.io import atomic_write_text

    res = {**res, "allocator": allocator_state()}  # runtime.allocator: what this process's allocator runs with
    paths = [default_json_path(cfg)] if cfg.save_default else []
    if cfg.out:
        paths.append(Path(str(cfg.out)))
    text = json.dumps(res, indent=1, sort_keys=False)
    for p in paths:
        p.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(p, text + "\n")
        log.info("wrote %s", p)
        print(f"wrote {p}")


@hydra.main(version_base="1.3", config_path="../configs", config_name="benchmark")
@plain_errors
def main(cfg: DictConfig) -> None:
    configure_allocator(cfg.runtime.allocator)  # process-wide, before any model is built (spawned children too)
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
    from avs.benchmark.run import check_quick_overrides

    if cfg.quick:
        from hydra.core.hydra_config import HydraConfig

        check_quick_overrides(list(HydraConfig.get().overrides.task))
    if cfg.profile and cfg.demo:
        raise ConfigError("profile=true and demo=true: a run measures one of them; set the other to false")
    if cfg.profile:
        from avs.benchmark.profile import format_profile_report, run_profile

        res = run_profile(profile_configs(cfg))
        print(format_profile_report(res))
        return write_json(cfg, res)
    if cfg.demo:
        from avs.benchmark.demo import format_demo_report, run_demo_benchmark

        res = run_demo_benchmark(apply_quick(cfg) if cfg.quick else cfg)
        print(format_demo_report(res))
        return write_json(cfg, res)
    if cfg.quick:
        cfg = apply_quick(cfg)
    res = run_benchmark(cfg)
    print(format_parameter_report(res["params"], f"model={cfg.model.name} backbone={cfg.backbone.name} (trainable, M)"))
    print(format_report(res))
    write_json(cfg, res)


if __name__ == "__main__":
    run_plain(
        lambda: check_overrides(
            sys.argv[1:], "scripts/benchmark.py", "benchmark", open_nodes=["model", "backbone", "audio"]
        )
    )
    main()
