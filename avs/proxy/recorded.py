"""Continue a protocol from its tracked results file in a new out dir (`continue_recorded`).

A protocol takes longer than one sitting on a small machine, and an out dir (with the checkpoints) does
not always survive to the next. The tracked results file does. With `continue_recorded: true` a run that
has a line there under the protocol's version is not made again, with two exceptions (and `recheck: true`
makes every selected recorded run again, each as a check: a re-sitting that times a recorded table and
compares every number):

* a recorded run that a pending run starts from (`init_from`: an MS3 run whose S4 run is recorded but
  whose checkpoint is not in this out dir) is made again, for its checkpoint;
* for every model (`model=` of a cell's overrides) the sitting trains, one recorded run of that model that
  starts from nothing is made again, first, as a check: the first such run among the selected runs, else
  the first of the whole protocol (a selection such as `only_seeds` of seeds not yet recorded holds no
  recorded run, and its runs must not join the table unchecked). A model needs no check when a recorded
  run of it is made again anyway (first bullet) or is already finished in this out dir. One check per
  model, not one per sitting: a change of rounding in one model's code (say the motion module) leaves the
  others' runs, and so a check of another model, exactly as recorded.

Every such rerun is a check: its numbers must equal the recorded line's, exactly (the same code, SIMD
level and thread count give the same bytes; docs/reproducing.md, "Proxy benchmark"). A rerun that
reproduces leaves the recorded line as it is; one that does not stops the benchmark (no further run
starts), because the table would mix two computations. Either way the comparison is written to
`proxy_reproductions.jsonl` beside the results file, as `reproduce=` does.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from avs.proxy.protocol import ProxyRun
from avs.proxy.results import append_beside, compare, find_row, numbers, unrecorded

REPRODUCTIONS_FILE = "proxy_reproductions.jsonl"
MACHINE_KEYS = ("commit", "machine_kind", "cpu_level", "simd", "threads")


def model_of(run: ProxyRun) -> str:
    """The `model=` override of a run's cell ("" when it has none): the code a check must cover."""
    return next((o.split("=", 1)[1] for o in run.overrides if o.startswith("model=")), "")


def plan(
    todo: Sequence[ProxyRun],
    rows: list[dict[str, Any]],
    version: Any,
    every: Sequence[ProxyRun] = (),
    done: frozenset[str] = frozenset(),
    recheck: bool = False,
) -> tuple[list[ProxyRun], dict[str, dict[str, Any]], list[str]]:
    """(runs to make, checks first; {run name: recorded line} of the reruns that are checks; names skipped).

    `every`: the protocol's runs before any selection; `done`: the names finished in this out dir;
    `recheck`: every selected recorded run is made again as a check (a re-sitting of recorded runs).
    """
    pool = [*todo, *(r for r in every if r not in todo)]  # the selection first
    lines = {r.name: find_row(rows, r.subset, r.cell, r.seed, version) for r in pool}
    recorded = {r.name: lines[r.name] for r in todo if lines[r.name] is not None}
    needed = {r.after for r in todo if r.name not in recorded and r.after}
    keep = {r.name for r in todo if recheck or r.name not in recorded or r.name in needed}
    made = [r for r in todo if r.name in keep]
    checks = {name: row for name, row in recorded.items() if name in keep}
    covered = {model_of(r) for r in made if r.name in checks}
    covered |= {model_of(r) for r in pool if r.name in done and lines[r.name] is not None}
    first: list[ProxyRun] = []
    for model in dict.fromkeys(model_of(r) for r in made if r.name not in checks):
        if model in covered:
            continue
        check = next((r for r in pool if model_of(r) == model and lines[r.name] is not None and r.after is None), None)
        if check is not None:
            first.append(check)
            checks[check.name] = lines[check.name]
            covered.add(model)
    made = [*first, *(r for r in made if r not in first)]
    return made, checks, [r.name for r in todo if r.name not in keep and r.name not in checks]


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
    line["seconds"] = [recorded.get("seconds"), now.get("seconds")]  # wall seconds, not compared
    for key in MACHINE_KEYS:
        line[key] = [recorded.get(key), now.get(key)]  # recorded, now
    line["when"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    return line


def write_reproduction(results: Path, line: Mapping[str, Any]) -> Path:
    """Append `line` to `proxy_reproductions.jsonl` beside the results file."""
    return append_beside(results, REPRODUCTIONS_FILE, line)
