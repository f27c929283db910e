"""The order in which the proxy runner starts its ready runs.

The protocol's order is seed-major (avs.proxy.protocol.expand): a stopped sitting leaves whole seeds. Within
one seed and subset, the runner starts the run whose chain (the run and the runs that start from its
checkpoint, `init_from`) is expected to take longest first, so the last runs of a sitting do not leave a
worker idle behind a long S4 -> MS3 chain. The expected seconds of a cell on a subset are the median
`seconds` of its lines in the results file, this protocol version's when it has some, else any version's;
a cell without a timed line counts 0 and keeps its place among the others. The order changes when a run
starts, never what it computes (each run is its own process with its own seed and threads).
"""

from __future__ import annotations

import heapq
import itertools
import math
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

from avs.proxy.protocol import ProxyRun

Expected = dict[tuple[str, str], float]


def expected_seconds(rows: Sequence[dict[str, Any]], version: Any) -> Expected:
    """{(subset, cell): median wall seconds} of the timed lines, version `version`'s where it has any."""
    timed: dict[tuple[str, str], dict[bool, list[float]]] = {}
    for row in rows:
        seconds = row.get("seconds")
        if isinstance(seconds, (int, float)) and seconds > 0:
            mine = row.get("protocol_version") == version
            timed.setdefault((row["subset"], row["cell"]), {True: [], False: []})[mine].append(float(seconds))
    return {key: statistics.median(by[True] or by[False]) for key, by in timed.items()}


def longest_chains_first(runs: Sequence[ProxyRun], expected: Expected) -> list[ProxyRun]:
    """`runs` with each block of consecutive runs of one seed and subset sorted by expected chain seconds,
    longest first (stable: equal or unknown chains keep their order); the blocks keep their order."""
    following: dict[str, float] = {}
    for run in runs:
        if run.after is not None:
            following[run.after] = following.get(run.after, 0.0) + expected.get((run.subset, run.cell), 0.0)

    def chain(run: ProxyRun) -> float:
        return expected.get((run.subset, run.cell), 0.0) + following.get(run.name, 0.0)

    ordered: list[ProxyRun] = []
    for _, block in itertools.groupby(runs, key=lambda r: (r.seed, r.subset)):
        ordered += sorted(block, key=chain, reverse=True)
    return ordered


def replay(runs: Sequence[ProxyRun], seconds: Mapping[str, float], workers: int) -> float:
    """The wall seconds the runner takes for `runs` (in start order) with `workers` slots, when each run
    takes `seconds[run.name]`: as avs.proxy.runner does, a freed slot takes the first ready run, and a run
    is ready once the run it starts from (`after`, when among `runs`) has ended."""
    names = {r.name for r in runs}
    ended: dict[str, float] = {}
    waiting, running, now = list(runs), [], 0.0  # running: a heap of (end time, start number, run)
    started = itertools.count()
    while waiting or running:
        ready = [r for r in waiting if r.after not in names or ended.get(r.after, math.inf) <= now]
        for run in ready[: max(0, workers - len(running))]:
            waiting.remove(run)
            heapq.heappush(running, (now + seconds[run.name], next(started), run))
        if not running:
            raise ValueError(f"{[r.name for r in waiting]} wait for runs that are not in the replay")
        now, _, run = heapq.heappop(running)
        ended[run.name] = now
    return now
