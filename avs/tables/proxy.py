"""The CPU proxy benchmark's numbers: read a protocol directory, reduce seeds, test paper claims, check targets.

A protocol directory (written by the proxy benchmark runner) holds `protocol.yaml` (seeds, subsets,
cells, methods, claims, targets, metric), `ceilings.json` (visual-only ceilings in %, per subset and
split) and one run dir per subset, cell and seed: `<subset>/<cell>/seed<k>/` with the trainer's
`metrics.json`, and for latent cells `latent_kl.jsonl` and sometimes `uncertainty.json`. A run that
has not finished has no metrics.json: it is left out of the statistics and listed by `missing_runs`.

Statistics are over seeds: mean, sample std and the 95% Student-t interval of the mean. A claim
"a better than b" is tested per subset on the paired differences a_k - b_k of the seeds both cells have.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from omegaconf import DictConfig, OmegaConf

from avs.errors import ConfigError
from avs.proxy.protocol import RUNS_FILE, cell_seeds, cell_subsets
from avs.tables.build import metric_value
from avs.tables.runs import TableError, load_runs

PROTOCOL_FILE = "protocol.yaml"
CEILINGS_FILE = "ceilings.json"
UNCERTAINTY_FILE = "uncertainty.json"
LATENT_KL_FILE = "latent_kl.jsonl"  # avs.engine.diagnostics writes it; not imported here, which would load torch
SPLIT = "test"
METRIC_PROTOCOL = "per_frame"
CONFIDENCE = 0.95

ACTIVE_KL = 0.01  # nats: a latent dimension whose final KL on val is not above this carries next to nothing
KL_CODE = "kl:"  # results key prefix of one code's final KL, e.g. "kl:s_v"

Results = dict[tuple[str, str], dict[int, dict[str, float | None]]]
KLCurves = dict[tuple[str, str], dict[int, dict[str, list[tuple[int, float]]]]]


class ProtocolNotFound(TableError, FileNotFoundError):
    """The directory given as a proxy benchmark output has no protocol.yaml."""


# ----------------------------------------------------------------------------- Student t
def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularised incomplete beta function (modified Lentz evaluation)."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        even = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        odd = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        for num in (even, odd):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta function I_x(a, b) for a, b > 0 and 0 <= x <= 1."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    front = math.exp(log_front)
    if x < (a + 1.0) / (a + b + 2.0):  # the continued fraction converges fast on this side
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with `df` degrees of freedom."""
    if df <= 0:
        raise ValueError(f"degrees of freedom must be positive, got {df}")
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The t with P(T <= t) = p (Student's t, `df` degrees of freedom), by bisection on `t_cdf`."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"probability must be in (0, 1), got {p}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        lo, hi = hi, 2.0 * hi
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


# ----------------------------------------------------------------------------- statistics
@dataclass
class Stats:
    """Mean, sample std, 95% t-interval of the mean and minimum of n values (None where undefined)."""

    n: int
    mean: float | None = None
    std: float | None = None
    lo: float | None = None
    hi: float | None = None
    min: float | None = None


def describe(values: Sequence[float]) -> Stats:
    """Stats of `values`: std and interval need n >= 2 (mean ± t_{0.975, n-1} · s / √n)."""
    vals = [float(v) for v in values]
    if not vals:
        return Stats(0)
    mean = statistics.fmean(vals)
    if len(vals) < 2:
        return Stats(1, mean, None, None, None, vals[0])
    std = statistics.stdev(vals)
    half = t_quantile(0.5 + CONFIDENCE / 2.0, len(vals) - 1) * std / math.sqrt(len(vals))
    return Stats(len(vals), mean, std, mean - half, mean + half, min(vals))


def verdict(stats: Stats) -> str:
    """ "holds" when the interval of a - b lies above 0, "reversed" below 0, otherwise "unresolved"."""
    if stats.lo is not None and stats.lo > 0:
        return "holds"
    if stats.hi is not None and stats.hi < 0:
        return "reversed"
    return "unresolved"


# ----------------------------------------------------------------------------- loading
def _required(protocol: DictConfig, key: str, path: Path) -> Any:
    if protocol.get(key) is None:
        raise ConfigError(f"{path}: `{key}` is missing")
    return protocol[key]


def _check_names(protocol: DictConfig, path: Path) -> None:
    """Every cell named by methods, claims and targets exists; a cell's subsets are protocol subsets."""
    cells, subsets = protocol.cells, protocol.subsets
    for name, cell in cells.items():
        for s in cell.get("subsets") or []:
            if s not in subsets:
                raise ConfigError(f"{path}: cells.{name}.subsets names {s!r}, not one of subsets {list(subsets)}")
    named = [("methods", m) for m in protocol.methods]
    named += [("targets.kl_cells", c) for c in protocol.targets.get("kl_cells") or []]
    for i, claim in enumerate(protocol.claims):
        named += [(f"claims[{i}].{side}", claim.get(side)) for side in ("a", "b")]
    for key, name in named:
        if name not in cells:
            raise ConfigError(f"{path}: {key} names cell {name!r}, which is not in cells ({', '.join(cells)})")


def _read_protocol(out: Path) -> DictConfig:
    path = out / PROTOCOL_FILE
    if not out.is_dir():
        raise ProtocolNotFound(f"proxy benchmark dir {out} does not exist")
    if not path.is_file():
        raise ProtocolNotFound(f"no {PROTOCOL_FILE} in {out} (is it a proxy benchmark output dir?)")
    try:
        protocol = OmegaConf.load(path)
    except Exception as exc:  # noqa: BLE001  (any YAML or OmegaConf parse error)
        raise TableError(f"{path}: not readable YAML ({exc})") from exc
    if not isinstance(protocol, DictConfig):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    for key in ("seeds", "subsets", "cells"):
        _required(protocol, key, path)
    for key, default in (("methods", []), ("claims", []), ("targets", {}), ("metric", "miou")):
        if protocol.get(key) is None:
            protocol[key] = default
    _check_names(protocol, path)
    return protocol


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise TableError(f"{path}: not readable JSON ({exc})") from exc


def read_jsonl(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) of every non-empty line of a JSON-lines file, in file order (empty when the file
    is not there); a line that is not a JSON object is a TableError naming the file and line."""
    if not path.is_file():
        return []
    records = []
    for i, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TableError(f"{path}: line {i} is not JSON ({exc})") from exc
        if not isinstance(record, dict):
            raise TableError(f"{path}: line {i} is not a JSON object")
        records.append((i, record))
    return records


def read_latent_kl(path: Path) -> list[dict[str, Any]]:
    """The lines of a latent_kl.jsonl in file order (empty when the file is not there)."""
    return [record for _, record in read_jsonl(path)]


def code_totals(record: dict[str, Any], path: Path) -> dict[str, float] | None:
    """KL per code (nats, summed over dimensions) of one latent_kl.jsonl line; None if it has only a grand total."""
    total, kl = record.get("total"), record.get("kl")
    if isinstance(total, dict):
        return {str(code): float(v) for code, v in total.items()}
    if isinstance(kl, dict):
        return {str(code): float(sum(v)) for code, v in kl.items()}
    if isinstance(total, (int, float)):
        return None
    raise TableError(f"{path}: a line has neither `total` nor `kl`")


class FinalKL(NamedTuple):
    """The last validation of a latent_kl.jsonl: total KL, KL per code (nats) and the active dimensions."""

    total: float
    codes: dict[str, float]
    active: int | None  # None when the line has no per-dimension KL


def final_kl(path: Path, threshold: float = ACTIVE_KL) -> FinalKL | None:
    """The last line's KL; `active` counts the dimensions (over all codes) whose KL exceeds `threshold` nats."""
    records = read_latent_kl(path)
    if not records:
        return None
    last = records[-1]
    codes = code_totals(last, path)
    total = float(last["total"]) if codes is None else float(sum(codes.values()))
    kl = last.get("kl")
    active = sum(float(d) > threshold for v in kl.values() for d in v) if isinstance(kl, dict) else None
    return FinalKL(total, codes or {}, active)


def final_total_kl(path: Path) -> float | None:
    """Total KL (nats, summed over codes and dimensions) of the last line of a latent_kl.jsonl, None if absent."""
    final = final_kl(path)
    return None if final is None else final.total


def expected_runs(protocol: DictConfig) -> Iterator[tuple[str, str, int]]:
    """(subset, cell, seed) of every run the protocol asks for."""
    for cell in protocol.cells:
        for subset in cell_subsets(protocol, cell):
            for seed in cell_seeds(protocol, cell):
                yield subset, cell, int(seed)


def _latent_values(run_dir: Path) -> dict[str, float | None]:
    """Final KL (total, active dimensions, "kl:<code>") and the uncertainty AUROCs of one run dir."""
    final = final_kl(run_dir / LATENT_KL_FILE)
    values: dict[str, float | None] = {"kl": None, "active_dims": None}
    if final is not None:
        values["kl"] = final.total
        values["active_dims"] = None if final.active is None else float(final.active)
        values.update({KL_CODE + code: v for code, v in final.codes.items()})
    record = _read_json(run_dir / UNCERTAINTY_FILE) if (run_dir / UNCERTAINTY_FILE).is_file() else {}
    if not isinstance(record, dict):
        raise TableError(f"{run_dir / UNCERTAINTY_FILE}: expected a JSON object")
    for key in ("auroc", "auroc_entropy"):
        values[key] = None if record.get(key) is None else float(record[key])
    return values


def _read_run(run_dir: Path, metrics: Sequence[str]) -> dict[str, float | None] | None:
    """A finished run's test metrics and mIoU SE (%), final KL and AUROCs; None when it has no test metrics yet."""
    mpath = run_dir / "metrics.json"
    if not mpath.is_file():
        return None
    run = load_runs([mpath])[0]
    values: dict[str, float | None] = {}
    for m in metrics:
        values[m] = metric_value(run.record, SPLIT, METRIC_PROTOCOL, m, run.path)
        if values[m] is None:
            return None  # trained, but not tested (an interrupted run)
    se = run.record[SPLIT][METRIC_PROTOCOL].get("miou_se")  # older runs lack it
    values["miou_se"] = None if se is None else 100.0 * float(se)
    from avs.tables.proxy_listening import LISTEN_FILE, listening_values

    listen = _read_json(run_dir / LISTEN_FILE) if (run_dir / LISTEN_FILE).is_file() else None
    return {**values, **_latent_values(run_dir), **listening_values(listen)}


def load_protocol(out_dir: str | Path, version: Any = None) -> tuple[DictConfig, Results]:
    """Read a proxy benchmark dir -> (protocol, results).

    A results file (`.jsonl`) may hold several protocol versions: `version` picks one (default: the highest);
    a benchmark dir has one, so `version` must be None or its own.

    The protocol gains `ceilings` from ceilings.json (empty when the file is not there yet).
    results maps (subset, cell) -> {seed: {"miou", "fscore", <metric>, "miou_se", "kl", "active_dims",
    "kl:<code>" per latent code, "auroc", "auroc_entropy"}} for the finished runs only (metrics and
    the clip-level SE of the mIoU in %, KL in nats, AUROC in [0, 1], None where a run lacks the file
    or key); see `missing_runs` for the rest.
    """
    out = Path(out_dir)
    if out.is_file() and out.suffix == ".jsonl":  # a results file (docs/results/proxy_runs.jsonl)
        from avs.tables.proxy_results import load_results_file

        return load_results_file(out, version)
    protocol = _read_protocol(out)
    if version is not None and str(protocol.get("version")) != str(version):
        raise ValueError(f"{out}: its protocol is version {protocol.get('version')}, not {version}")
    ceilings = out / CEILINGS_FILE
    if ceilings.is_file():
        protocol.ceilings = _read_json(ceilings)
    elif protocol.get("ceilings") is None:
        protocol.ceilings = {}
    metrics = list(dict.fromkeys(["miou", "fscore", str(protocol.metric)]))
    results: Results = {}
    for subset, cell, seed in expected_runs(protocol):
        values = _read_run(out / subset / cell / f"seed{seed}", metrics)
        runs = results.setdefault((subset, cell), {})
        if values is not None:
            runs[seed] = values
    return protocol, results


def missing_runs(protocol: DictConfig, results: Results) -> list[tuple[str, str, int]]:
    """(subset, cell, seed) of the runs the protocol asks for that have no test metrics (yet)."""
    return [(s, c, k) for s, c, k in expected_runs(protocol) if k not in results.get((s, c), {})]


# ----------------------------------------------------------------------------- cost
class RunCosts(NamedTuple):
    """Wall seconds of the timed runs per (subset, cell), and how many runs shared the machine."""

    seconds: dict[tuple[str, str], list[float]]
    workers: int | None  # from the newest runs.jsonl line that says; None when no line does
    # this version's sittings (avs/proxy/sittings.py: one line per runner invocation that made runs)
    sittings: tuple[dict[str, Any], ...] = ()


def run_times(out_dir: str | Path) -> tuple[dict[str, float], int | None]:
    """runs.jsonl -> ({run name: wall seconds}, workers). A run's time is its last successful training task
    (which includes the follow-ups run in the same worker) plus the follow-up-only tasks recorded after it;
    failed tasks are not counted."""
    path = Path(out_dir) / RUNS_FILE
    times: dict[str, float] = {}
    workers = None
    for i, record in read_jsonl(path):
        name, seconds = record.get("run"), record.get("seconds")
        if not isinstance(name, str) or not isinstance(seconds, (int, float)):
            raise TableError(f"{path}: line {i} needs a `run` name and its `seconds`")
        seconds = float(seconds)
        if record.get("workers") is not None:
            workers = int(record["workers"])
        if record.get("exit_code") != 0:
            continue
        if record.get("task", "train") == "train":  # the first runner version wrote no task
            times[name] = seconds  # a run made again replaces its earlier time
        elif name in times:
            times[name] += seconds
    return times, workers


def result_times(path: Path, version: Any) -> tuple[dict[str, float], int | None]:
    """A results file's lines of protocol `version` -> ({run name: wall seconds}, workers), from the lines
    that record them (`seconds`, `workers`: the runner writes both since they were added)."""
    times: dict[str, float] = {}
    workers = None
    for _, row in read_jsonl(path):
        if row.get("protocol_version") != version or not isinstance(row.get("seconds"), (int, float)):
            continue
        times[f"{row.get('subset')}/{row.get('cell')}/seed{row.get('seed')}"] = float(row["seconds"])
        workers = int(row["workers"]) if row.get("workers") is not None else workers
    return times, workers


def load_costs(out_dir: str | Path, protocol: DictConfig) -> RunCosts:
    """The wall seconds of every timed run of the protocol, grouped by (subset, cell): from the out dir's
    runs.jsonl, or from the lines of a results file (`out_dir` is then that file; its version's sittings,
    proxy_sittings.jsonl beside it, come with them)."""
    path = Path(out_dir)
    times, workers = result_times(path, protocol.get("version")) if path.is_file() else run_times(out_dir)
    seconds: dict[tuple[str, str], list[float]] = {}
    for subset, cell, seed in expected_runs(protocol):
        t = times.get(f"{subset}/{cell}/seed{seed}")
        if t is not None:
            seconds.setdefault((subset, cell), []).append(t)
    sittings: tuple[dict[str, Any], ...] = ()
    if path.is_file():
        from avs.proxy.sittings import read_sittings

        sittings = tuple(x for x in read_sittings(path) if x.get("protocol_version") == protocol.get("version"))
    return RunCosts(seconds, workers, sittings)


class CostEstimate(NamedTuple):
    """Σ over the runs of some cells of their cell's fastest wall time; runs of untimed cells are not in it."""

    seconds: float
    runs: int
    untimed: int


def cost_estimate(protocol: DictConfig, costs: RunCosts, cells: Sequence[str]) -> CostEstimate:
    """What the runs of `cells` cost on the machine that timed them, one after another (divide by the workers
    for runs side by side). Each run counts the fastest timed run of its cell: the runs of a cell do the same
    work, and other load on the machine only adds time."""
    total, runs, untimed = 0.0, 0, 0
    for subset, cell, _ in expected_runs(protocol):
        if cell not in cells:
            continue
        timed = costs.seconds.get((subset, cell))
        if timed:
            total, runs = total + min(timed), runs + 1
        else:
            untimed += 1
    return CostEstimate(total, runs, untimed)


def cell_stats(results: Results, subset: str, cell: str, key: str) -> Stats:
    """Stats over the seeds of one cell for `key` (a key of the results, e.g. "miou" or "kl"); seeds without it
    are left out."""
    runs = results.get((subset, cell), {})
    return describe([v[key] for _, v in sorted(runs.items()) if v.get(key) is not None])


def latent_codes(results: Results, subset: str | None = None, cell: str | None = None) -> list[str]:
    """The latent codes with a final KL in the finished runs (of one cell and subset if given), first seen first."""
    codes: dict[str, None] = {}
    for (s, c), runs in results.items():
        if (subset is None or s == subset) and (cell is None or c == cell):
            for values in runs.values():
                codes.update((k[len(KL_CODE) :], None) for k in values if k.startswith(KL_CODE))
    return list(codes)


# ----------------------------------------------------------------------------- claims
@dataclass
class ClaimResult:
    """The paired difference a - b (metric points) of one claim on one subset, over the seeds both cells have."""

    name: str
    a: str
    b: str
    subset: str
    paired: dict[int, float]  # seed k -> d_k = a_k - b_k, in seed order
    stats: Stats
    verdict: str

    @property
    def seeds(self) -> list[int]:
        return list(self.paired)

    @property
    def differences(self) -> list[float]:
        return list(self.paired.values())


def paired_difference(results: Results, subset: str, a: str, b: str, metric: str) -> tuple[dict[int, float], Stats]:
    """d_k = a_k - b_k for every seed k present in both cells (in seed order), and the stats over them."""
    runs_a, runs_b = results.get((subset, a), {}), results.get((subset, b), {})
    d = {k: runs_a[k][metric] - runs_b[k][metric] for k in sorted(set(runs_a) & set(runs_b))}
    return d, describe(list(d.values()))


def claim_differences(protocol: DictConfig, results: Results) -> list[ClaimResult]:
    """Every claim on every subset both of its cells run on (restricted to the claim's `subsets` if given)."""
    metric = str(protocol.metric)
    out = []
    for claim in protocol.claims:
        a, b = str(claim.a), str(claim.b)
        only = claim.get("subsets")
        for subset in cell_subsets(protocol, a):
            if subset not in cell_subsets(protocol, b) or (only is not None and subset not in only):
                continue
            d, stats = paired_difference(results, subset, a, b, metric)
            name = str(claim.get("name") or f"{a} vs {b}")
            out.append(ClaimResult(name, a, b, subset, d, stats, verdict(stats)))
    return out


# ----------------------------------------------------------------------------- targets
class TargetCheck(NamedTuple):
    """One target on one cell/subset: what was measured and whether it is met (None: cannot be checked yet)."""

    target: str
    where: str
    measured: str
    ok: bool | None


def _of_expected(n: int, protocol: DictConfig, cell: str) -> str:
    expected = len(cell_seeds(protocol, cell))
    return "" if n == expected else f" ({n} of {expected} seeds)"


def _ceiling_check(protocol: DictConfig, results: Results, subset: str, cell: str) -> TargetCheck:
    name = "every seed above the visual-only ceiling (test)"
    where = f"{cell} / {subset}"
    ceiling = (protocol.ceilings.get(subset) or {}).get(SPLIT)
    runs = results.get((subset, cell), {})
    if ceiling is None:
        return TargetCheck(name, where, f"no {SPLIT} ceiling for {subset} in {CEILINGS_FILE}", None)
    if not runs:
        return TargetCheck(name, where, "no finished runs", None)
    metric = str(protocol.metric)
    below = [k for k, v in sorted(runs.items()) if v[metric] <= ceiling]
    worst = min(v[metric] for v in runs.values())
    text = f"min {worst:.2f} vs ceiling {float(ceiling):.2f}"
    if below:
        text = f"seed{'s' if len(below) > 1 else ''} {', '.join(map(str, below))} not above; " + text
    return TargetCheck(name, where, text + _of_expected(len(runs), protocol, cell), not below)


def _std_check(protocol: DictConfig, results: Results, subset: str, cell: str, limit: float) -> TargetCheck:
    stats = cell_stats(results, subset, cell, str(protocol.metric))
    name = f"seed std ≤ {limit:g} points"
    where = f"{cell} / {subset}"
    if stats.std is None:
        return TargetCheck(name, where, f"n={stats.n}: no std", None)
    return TargetCheck(name, where, f"{stats.std:.2f}" + _of_expected(stats.n, protocol, cell), stats.std <= limit)


def _audio_checks(protocol: DictConfig, results: Results) -> list[TargetCheck]:
    """Each method with a `<method>_no_audio` cell: audio must help, resolved at 95% (the interval above 0)."""
    checks = []
    for m in protocol.methods:
        b = f"{m}_no_audio"
        if b not in protocol.cells:
            continue
        for subset in cell_subsets(protocol, m):
            if subset not in cell_subsets(protocol, b):
                continue
            _, stats = paired_difference(results, subset, m, b, str(protocol.metric))
            word = verdict(stats)
            if stats.mean is None:
                measured = "no paired seeds"
            elif stats.lo is None:
                measured = f"{stats.mean:+.2f} (n={stats.n}: no interval)"
            else:
                measured = f"{stats.mean:+.2f} [{stats.lo:+.2f}, {stats.hi:+.2f}] n={stats.n}: {word}"
            ok = None if stats.lo is None else word == "holds"
            checks.append(TargetCheck("audio claim resolved (with > without audio)", f"{m} / {subset}", measured, ok))
    return checks


def _kl_checks(protocol: DictConfig, results: Results, floor: float) -> list[TargetCheck]:
    checks = []
    for cell in protocol.targets.get("kl_cells") or []:
        for subset in cell_subsets(protocol, cell):
            stats = cell_stats(results, subset, cell, "kl")
            name = f"mean total KL (val) ≥ {floor:g} nats"
            where = f"{cell} / {subset}"
            if stats.mean is None:
                checks.append(TargetCheck(name, where, f"no {LATENT_KL_FILE} in the finished runs", None))
                continue
            measured = f"{stats.mean:.3f}" + _of_expected(stats.n, protocol, cell)
            checks.append(TargetCheck(name, where, measured, stats.mean >= floor))
    return checks


def check_targets(protocol: DictConfig, results: Results) -> list[TargetCheck]:
    """The protocol's targets measured on the data: ceiling and seed std for every methods-table cell,
    the audio claim of every method with a no-audio cell, the per-seed listening margins of every
    method (avs/tables/proxy_listening.py), the total KL of the kl_cells."""
    targets = protocol.targets
    table = [(subset, cell) for cell in protocol.methods for subset in cell_subsets(protocol, cell)]
    checks = [_ceiling_check(protocol, results, subset, cell) for subset, cell in table]
    if targets.get("max_seed_std") is not None:
        checks += [_std_check(protocol, results, s, c, float(targets.max_seed_std)) for s, c in table]
    checks += _audio_checks(protocol, results)
    from avs.tables.proxy_listening import every_seed_checks

    checks += every_seed_checks(protocol, results)
    if targets.get("min_total_kl") is not None:
        checks += _kl_checks(protocol, results, float(targets.min_total_kl))
    return checks
