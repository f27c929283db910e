"""One line per sitting of the proxy runner: when it ran, on what, what it made, and its wall time.

A sitting is one invocation of scripts/proxy_benchmark.py that made or checked runs. Its line goes to
`proxy_sittings.jsonl` beside the results file (docs/results/), so a table's time ("the methods table in
at most 2 h on 2 cores", docs/reproducing.md) is read from the repository, not from a terminal. The wall
seconds run from the runner's start (checks, data) to the end of its last run, as a user waits for them;
`selection` says which runs were asked for, `made` and `checks` how many were trained (checks: recorded
runs made again and compared, avs.proxy.recorded).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

SITTINGS_FILE = "proxy_sittings.jsonl"
SELECTION_KEYS = ("only", "only_subsets", "only_seeds")


def sitting_line(cfg: DictConfig, outcome: Any, started: float) -> dict[str, Any]:
    """The line of one sitting, written at its end: `outcome` is the runner's ProxyOutcome, `started` its
    start (time.time())."""
    from avs.engine.records import git_commit
    from avs.pretrain import machine_kind
    from avs.utils import simd

    return {
        "protocol_version": cfg.get("version"),
        "start": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(started)),
        # both ends by the wall clock (as `date` reads it), the seconds by the monotonic clock: a clock step
        # during a sitting (NTP) shows as the two disagreeing, not as a wrong duration
        "end": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()),
        "seconds": round(outcome.seconds, 1),
        "selection": {k: list(cfg.get(k) or []) for k in SELECTION_KEYS},
        "recheck": bool(cfg.get("recheck")),
        "made": len(outcome.made),
        "checks": len(outcome.checks),
        "kept": len(outcome.kept),
        "recorded": len(outcome.recorded),
        "failed": len(outcome.failed),
        "workers": int(cfg.workers),
        "threads": int(cfg.threads),
        "simd": cfg.simd,
        "machine_kind": machine_kind(),
        "cpu_level": simd.cpu_level(),
        "commit": git_commit(),
    }


def write_sitting(results: Path, line: Mapping[str, Any]) -> Path:
    """Append `line` to `proxy_sittings.jsonl` beside the results file -> its path."""
    from avs.proxy.results import append_beside

    return append_beside(results, SITTINGS_FILE, line)


def read_sittings(results: Path) -> list[dict[str, Any]]:
    """The sitting lines beside `results` (none when there is no file)."""
    from avs.proxy.results import read_rows

    return read_rows(results.parent / SITTINGS_FILE)
