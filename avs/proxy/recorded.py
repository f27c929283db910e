"""Continue a protocol from its tracked results file in a new out dir (`continue_recorded`).

A protocol takes longer than one sitting on a small machine, and an out dir (with the checkpoints) does
not always survive to the next. The tracked results file does. With `continue_recorded: true` a run that
has a line there under the protocol's version is not made again, with two exceptions:

* a recorded run that a pending run starts from (`init_from`: an MS3 run whose S4 run is recorded but
  whose checkpoint is not in this out dir) is made again, for its checkpoint;
* when no recorded run would be made again, the first recorded run that starts from nothing is, as a
  check: the first among the selected runs, else the first of the whole protocol (a selection such as
  `only_seeds` of seeds not yet recorded holds no recorded run, and its runs must not join the table
  unchecked). No check is made when a recorded run is already finished in this out dir (the out dir
  made it, as a check or as the run that was recorded).

Every such rerun is a check: its numbers must equal the recorded line's, exactly (the same code, SIMD
level and thread count give the same bytes; docs/reproducing.md, "Proxy benchmark"). A rerun that
reproduces leaves the recorded line as it is; one that does not stops the benchmark (no further run
starts), because the table would mix two computations. Either way the comparison is written to
`proxy_reproductions.jsonl` beside the results file, as `reproduce=` does.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from avs.proxy.protocol import ProxyRun
from avs.proxy.results import compare, find_row, numbers, unrecorded

REPRODUCTIONS_FILE = "proxy_reproductions.jsonl"
MACHINE_KEYS = ("commit", "machine_kind", "cpu_level", "simd", "threads")


def plan(
    todo: Sequence[ProxyRun],
    rows: list[dict[str, Any]],
    version: Any,
    every: Sequence[ProxyRun] = (),
    done: frozenset[str] = frozenset(),
) -> tuple[list[ProxyRun], dict[str, dict[str, Any]], list[str]]:
    """(runs to make, in order; {run name: recorded line} of the reruns that are checks; names skipped).

    `every`: the protocol's runs before any selection; `done`: the names finished in this out dir.
    """
    recorded = {}
    for run in todo:
        row = find_row(rows, run.subset, run.cell, run.seed, version)
        if row is not None:
            recorded[run.name] = row
    if not recorded:
        return _check_outside_selection(todo, rows, version, every, done)
    needed = {r.after for r in todo if r.name not in recorded and r.after}
    keep = {r.name for r in todo if r.name not in recorded or r.name in needed}
    if not keep & set(recorded):  # nothing recorded is made again: check one that starts from nothing
        first = next((r for r in todo if r.name in recorded and r.after is None), None)
        if first is not None:
            keep.add(first.name)
    made = [r for r in todo if r.name in keep]
    checks = {name: row for name, row in recorded.items() if name in keep}
    return made, checks, [r.name for r in todo if r.name not in keep]


def _check_outside_selection(
    todo: Sequence[ProxyRun],
    rows: list[dict[str, Any]],
    version: Any,
    every: Sequence[ProxyRun],
    done: frozenset[str],
) -> tuple[list[ProxyRun], dict[str, dict[str, Any]], list[str]]:
    """No selected run is recorded: the first recorded run of the whole protocol that starts from nothing
    is made first, as the check (none when the out dir already finished a recorded run)."""
    lines = {r.name: find_row(rows, r.subset, r.cell, r.seed, version) for r in every}
    if any(lines[name] is not None for name in done if name in lines):
        return list(todo), {}, []
    first = next((r for r in every if lines[r.name] is not None and r.after is None), None)
    if first is None:
        return list(todo), {}, []
    return [first, *todo], {first.name: lines[first.name]}, []


def reproduction(recorded: Mapping[str, Any], now: Mapping[str, Any]) -> dict[str, Any]:
    """The line that says whether a rerun gave its recorded numbers, and on what."""
    _, same = compare(recorded, now)
    old, new = dict(numbers(recorded)), dict(numbers(now))
    line: dict[str, Any] = {k: recorded.get(k) for k in ("protocol_version", "subset", "cell", "seed")}
    line["same"] = same
    line["differing"] = {
        k: [old.get(k), new.get(k)]
        for k in sorted(set(old) | set(new))
        if old.get(k) != new.get(k) and not unrecorded(k, recorded)
    }
    line["test_miou"] = [(recorded.get("test") or {}).get("miou"), (now.get("test") or {}).get("miou")]
    for key in MACHINE_KEYS:
        line[key] = [recorded.get(key), now.get(key)]  # recorded, now
    line["when"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    return line


def write_reproduction(results: Path, line: Mapping[str, Any]) -> Path:
    """Append `line` to `proxy_reproductions.jsonl` beside the results file."""
    path = results.parent / REPRODUCTIONS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fh.write(json.dumps(dict(line), sort_keys=True) + "\n")
    return path
