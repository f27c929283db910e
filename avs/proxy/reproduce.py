"""Rerun one recorded proxy run and print recorded vs now for every number it records.

    python scripts/proxy_benchmark.py reproduce=ms3/tpavi:1

The run is made afresh in `<out_dir>/reproduce/<subset>/<cell>/seed<k>` with the protocol's overrides,
the same `paths.*`, the pinned stand-ins and the same follow-ups (a run that starts from another, by
the protocol's `init_from`, starts from that run's checkpoint in `<out_dir>`), then compared with its line in the
results file (`results_file`, default docs/results/proxy_runs.jsonl) under the protocol's version.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

from omegaconf import DictConfig

from avs.errors import AVSError, ConfigError, ExitCode
from avs.proxy.protocol import expand, protocol_node
from avs.proxy.results import compare, find_row, read_rows
from avs.utils import simd

_TARGET = re.compile(r"^(?P<subset>[^/:]+)/(?P<cell>[^/:]+):(?P<seed>\d+)$")


class ReproduceFailed(AVSError, RuntimeError, code=ExitCode.RUN_FAILED):
    """The rerun did not finish (its log names why)."""


def parse_target(text: str) -> tuple[str, str, int]:
    """`<subset>/<cell>:<seed>` -> (subset, cell, seed); ConfigError naming the key otherwise."""
    match = _TARGET.match(str(text))
    if match is None:
        raise ConfigError(f"reproduce={text!r}: expected <subset>/<cell>:<seed>, e.g. reproduce=ms3/tpavi:1")
    return match["subset"], match["cell"], int(match["seed"])


def reproduce(cfg: DictConfig, out_dir: Path, results: Path) -> bool:
    """Rerun the run `cfg.reproduce` names, print recorded vs now -> True when every number is the same."""
    from avs.proxy import runner

    subset, cell, seed = parse_target(cfg.reproduce)
    simd.check(cfg.simd, "scripts/proxy_benchmark.py")
    protocol = protocol_node(cfg)
    recorded = find_row(read_rows(results), subset, cell, seed, protocol.get("version"))
    if recorded is None:
        raise ConfigError(
            f"reproduce={cfg.reproduce}: {results} has no line for {subset}/{cell}/seed{seed} "
            f"under protocol version {protocol.get('version')}"
        )
    where = out_dir / "reproduce"
    # a run that starts from another (init_from) starts from the recorded run's checkpoint in out_dir
    runs = expand(protocol, where, runner.path_overrides(cfg), init_root=out_dir)
    runs = runner.name_persistence([r for r in runs if (r.subset, r.cell, r.seed) == (subset, cell, seed)])
    if not runs:
        raise ConfigError(f"reproduce={cfg.reproduce}: the protocol has no such run")
    run = runs[0]
    runner.check_sources([run])
    if run.run_dir.exists():
        runner._set_aside(run.run_dir)
    standins = runner.check_runs(runs, protocol.get("standins"))
    where.mkdir(parents=True, exist_ok=True)
    runner.prepare_data(protocol, runs, where)
    (where / "logs").mkdir(exist_ok=True)
    start = time.perf_counter()
    end = runner._run_one(run, int(cfg.threads), where / "logs", cfg)
    if end.code != 0 or not runner.finished(run.run_dir) or end.followup_error:
        raise ReproduceFailed(
            f"{run.name}: rerun failed ({end.followup_error or f'exit code {end.code}'}); log in {where / 'logs'}"
        )
    runner._record_results(cfg, run, standins, where, tracked=False)
    from avs.proxy.results import RESULTS_FILE

    now = find_row(read_rows(where / RESULTS_FILE), subset, cell, seed, protocol.get("version"))
    lines, same = compare(recorded, now)
    from avs.proxy.recorded import reproduction, write_reproduction

    written = write_reproduction(results, reproduction(recorded, now))
    print(f"{run.name}: recorded ({results}) vs now ({run.run_dir}, {time.perf_counter() - start:.0f} s)")
    for line in lines:
        print("  " + line)
    print(("every number is the same" if same else "some numbers differ") + f" (recorded in {written})")
    return same
