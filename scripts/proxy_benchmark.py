"""Run the CPU proxy benchmark (configs/proxy_benchmark.yaml; docs/reproducing.md, "Proxy benchmark").

    python scripts/proxy_benchmark.py                       # every run; finished runs are kept
    python scripts/proxy_benchmark.py only=[tpavi,avsbg] only_seeds=[1,2]
    python scripts/proxy_benchmark.py dry_run=true          # the plan: paths, stand-ins vs pins, commands
    python scripts/proxy_benchmark.py toy=true out_dir=/tmp/proxy_toy
    python scripts/proxy_benchmark.py reproduce=ms3/tpavi:1  # rerun one recorded run, recorded vs now

Then the tables and the plot:
    python scripts/tables.py outputs/proxy_benchmark --proxy --plot docs/images/proxy_methods.png
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

import avs  # noqa: E402,F401  (registers config resolvers)
from avs.config import PROJECT_ROOT  # noqa: E402
from avs.errors import plain_errors  # noqa: E402
from avs.proxy import run_protocol  # noqa: E402
from avs.proxy.reproduce import reproduce  # noqa: E402
from avs.utils.simd import ensure as ensure_simd  # noqa: E402

log = logging.getLogger("avs.proxy_benchmark")


@hydra.main(version_base="1.3", config_path="../configs", config_name="proxy_benchmark")
@plain_errors
def main(cfg: DictConfig) -> None:
    ensure_simd(cfg.simd)  # the runner and every child at the protocol's SIMD level (may restart the script)
    if cfg.toy:
        cfg.extra_overrides = list(cfg.toy_overrides)
    if cfg.get("results_file") is None and not cfg.toy:  # toy runs are never recorded in the repository
        cfg.results_file = str(PROJECT_ROOT / "docs" / "results" / "proxy_runs.jsonl")
    out_dir = Path(cfg.out_dir).expanduser()
    if cfg.get("reproduce"):
        results = cfg.get("results_file") or str(PROJECT_ROOT / "docs" / "results" / "proxy_runs.jsonl")
        raise SystemExit(0 if reproduce(cfg, out_dir, Path(results)) else 1)
    outcome = run_protocol(cfg, out_dir)
    print(
        f"proxy benchmark in {out_dir}: {len(outcome.made)} runs made, {len(outcome.kept)} kept, "
        f"{len(outcome.recorded)} recorded (not made), {len(outcome.failed)} failed; {outcome.seconds / 60:.1f} min"
    )
    if outcome.stopped:
        print(f"stopped: {outcome.stopped}", file=sys.stderr)
    for name, why in outcome.failed.items():
        print(f"failed: {name}: {why}", file=sys.stderr)
    if outcome.failed:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
