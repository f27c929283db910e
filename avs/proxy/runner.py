"""Run a proxy protocol: data and ceilings first, then every run in a few worker processes.

Each run is ``scripts/train.py <overrides> hydra.run.dir=<run dir>`` in a child process with
``threads`` torch threads (several one-thread runs side by side use a small CPU better than one
run with all cores). A run whose dir already holds a finished metrics.json is kept; an unfinished
one is moved aside and run again. A failed run is reported by name at the end (non-zero exit).
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from avs.config import PROJECT_ROOT, compose_config
from avs.engine.rundir import CHECKPOINT_DIR, LAST_CKPT
from avs.proxy.passes import LISTENING_FILE, followup_commands, record_overrides
from avs.proxy.protocol import (
    CEILINGS_FILE,
    PROTOCOL_FILE,
    RUNS_FILE,
    ProxyRun,
    check_same_protocol,
    expand,
    protocol_node,
)
from avs.proxy.results import RESULTS_FILE, check_snapshot, run_row, update_rows, write_protocol_snapshot
from avs.proxy.standins import PIN_KEY, check_pinned, sha256_file, weight_files
from avs.utils import simd
from avs.utils.io import atomic_write_text

log = logging.getLogger(__name__)

TRAIN_SCRIPT = PROJECT_ROOT / "scripts" / "train.py"
PATH_KEYS = ("data_dir", "avsbench_root", "weights_dir", "log_dir")


@dataclass
class RunEnd:
    """How one worker task ended: the training's exit code, the wall time and a failed follow-up."""

    run: ProxyRun
    code: int
    seconds: float
    followup_error: str | None = None


@dataclass
class ProxyOutcome:
    """What one invocation did: runs made, kept (already finished) and failed, and the wall time."""

    made: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    recorded: list[str] = field(default_factory=list)  # not made: their lines are in the results file
    # recorded runs made again (for a checkpoint, or as a check) -> their recorded lines (avs.proxy.recorded)
    checks: dict[str, dict] = field(default_factory=dict)
    stopped: str | None = None  # why no further run starts (a check that did not reproduce)


def finished(run_dir: Path) -> bool:
    """True when the run wrote its final metrics.json with a test evaluation."""
    path = run_dir / "metrics.json"
    if not path.is_file():
        return False
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return bool(record.get("test"))


def compose_train(overrides: Sequence[str]) -> DictConfig:
    """The training config these overrides give (no run dir made)."""
    return compose_config("train", overrides)


def path_overrides(cfg: DictConfig) -> tuple[str, ...]:
    """The invocation's resolved `paths.*` as overrides of every child run (command line and AVS_* alike)."""
    paths = cfg.get("paths")
    if paths is None:
        return ()
    return tuple(f"paths.{k}={paths[k]}" for k in PATH_KEYS if paths.get(k) is not None)


def name_persistence(runs: Sequence[ProxyRun]) -> list[ProxyRun]:
    """A subset whose Sounding Shapes data persist sources (data.synthetic.persistence > 0) gets its
    own data root: `_p<persistence>` is added to data.synthetic.name (the default name does not
    carry the knob, and two roots of one name would regenerate each other)."""
    names: dict[str, str | None] = {}
    out = []
    for run in runs:
        if run.subset not in names:
            data = compose_train(run.overrides).data
            syn = data.get("synthetic")
            p = float(syn.get("persistence", 0.0) or 0.0) if syn is not None else 0.0
            names[run.subset] = f"data.synthetic.name={syn.name}_p{p:g}" if p > 0 else None
        extra = names[run.subset]
        out.append(replace(run, overrides=(*run.overrides[:-1], extra, run.overrides[-1])) if extra else run)
    return out


def check_runs(runs: Sequence[ProxyRun], pins: Any = None) -> dict[tuple[str, str], dict[str, str]]:
    """Every (subset, cell) config is checked (values, files, pinned stand-ins) before the first run
    starts -> {(subset, cell): {stand-in file name: sha256}}."""
    from avs.config_checks import ConfigError, check_config, check_files

    found: dict[tuple[str, str], dict[str, str]] = {}
    for run in runs:
        if (run.subset, run.cell) in found:
            continue
        cfg = compose_train(run.checkable_overrides())
        where = f"cell {run.cell} on {run.subset}"
        try:
            check_config(cfg)
            check_files(cfg)
        except ConfigError as exc:
            raise type(exc)(f"{where}: {exc}") from exc
        found[(run.subset, run.cell)] = check_pinned(pins, weight_files(cfg), where)
    return found


def prepare_data(protocol: DictConfig, runs: Sequence[ProxyRun], out_dir: Path) -> dict[str, dict[str, float]]:
    """Generate every subset's Sounding Shapes root once (before workers start) and record its ceilings."""
    from avs.data.synthetic import compute_ceilings, ensure_synthetic

    ceilings: dict[str, dict[str, float]] = {}
    seen: set[str] = set()
    for run in runs:
        if run.subset in seen:
            continue
        seen.add(run.subset)
        cfg = compose_train(run.overrides)
        if cfg.data.get("synthetic") is None:
            ceilings[run.subset] = {}
            continue
        root = ensure_synthetic(cfg.data, progress=True)
        ceilings[run.subset] = {
            split: round(float(compute_ceilings(root, cfg.data.synthetic.subset, split)["visual_only_ceiling"]), 4)
            for split in ("val", "test")
            if int(cfg.data.synthetic.clips[split]) > 0
        }
    atomic_write_text(out_dir / CEILINGS_FILE, json.dumps(ceilings, indent=2) + "\n")
    return ceilings


def _command(run: ProxyRun, cfg: DictConfig | None = None) -> list[str]:
    """The training command of `run`; the run writes its listening and uncertainty records itself
    (record_overrides)."""
    cmd = [sys.executable, str(TRAIN_SCRIPT), *run.overrides, f"hydra.run.dir={run.run_dir}", "trainer.progress=false"]
    return cmd + record_overrides(cfg, run)


def _log_path(log_dir: Path, run: ProxyRun) -> Path:
    return log_dir / f"{run.subset}_{run.cell}_seed{run.seed}.log"


def _run_one(run: ProxyRun, threads: int, log_dir: Path, cfg: DictConfig, train: bool = True) -> RunEnd:
    """Train (unless `train` is False: a finished run missing a record), then, in this worker's slot, the
    standalone pass of each record a finished training did not write (followup_commands; the training's
    own hooks write them: record_overrides)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    log_path = _log_path(log_dir, run)
    start = time.perf_counter()
    code = 0
    if train:
        with open(log_path, "w") as fh:
            cmd = _command(run, cfg)
            code = subprocess.call(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=PROJECT_ROOT)
    followup_error = None
    if code == 0 and finished(run.run_dir):
        for cmd in followup_commands(cfg, run, missing_only=True):
            with open(log_path, "a") as fh:
                fh.write(f"\n$ {' '.join(cmd)}\n")
                fh.flush()
                extra = subprocess.call(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=PROJECT_ROOT)
            if extra != 0:
                name = cmd[2] if cmd[1] == "-m" else Path(cmd[1]).name
                followup_error = f"{name} exit code {extra}; log {log_path}"
                break
    return RunEnd(run, code, time.perf_counter() - start, followup_error)


def _record(path: Path, run: ProxyRun, code: int, seconds: float, task: str, workers: int, threads: int) -> None:
    ended = time.strftime("%Y-%m-%dT%H:%M:%S")
    line = {"run": run.name, "task": task, "exit_code": code, "seconds": round(seconds, 1), "ended": ended}
    line.update(workers=workers, threads=threads)  # how many tasks shared the machine, and their torch threads
    with open(path, "a") as fh:
        fh.write(json.dumps(line) + "\n")


def _set_aside(run_dir: Path) -> None:
    """An unfinished run dir is renamed (kept for inspection), never deleted."""
    k = 1
    while (target := run_dir.with_name(f"{run_dir.name}.unfinished{k}")).exists():
        k += 1
    run_dir.rename(target)
    log.warning("%s: unfinished run moved to %s; running it again", run_dir, target.name)


def _drop_last_checkpoint(run_dir: Path) -> None:
    last = run_dir / CHECKPOINT_DIR / LAST_CKPT
    if last.is_file():
        last.unlink()


def _selected(cfg: DictConfig, runs: list[ProxyRun]) -> list[ProxyRun]:
    """The runs `only` (cells), `only_subsets` and `only_seeds` keep; a name or seed the protocol does not
    have is refused. They select runs and leave the protocol (and its snapshots) as it is."""
    from avs.config_checks import ConfigError

    selections = (
        ("only", {r.cell for r in runs}, lambda r: r.cell),
        ("only_subsets", {r.subset for r in runs}, lambda r: r.subset),
        ("only_seeds", {r.seed for r in runs}, lambda r: r.seed),
    )
    for key, have, _ in selections:
        unknown = sorted(set(cfg.get(key) or []) - have)
        if unknown:
            raise ConfigError(f"{key}: {unknown} not in the protocol (it has {sorted(have)})")
    for key, _, attr in selections:
        chosen = set(cfg.get(key) or [])
        runs = [r for r in runs if not chosen or attr(r) in chosen]
    return runs


def _sort_runs(cfg: DictConfig, runs: Sequence[ProxyRun], outcome: ProxyOutcome) -> tuple[list, list]:
    """(runs to train, finished runs missing a follow-up's output); unfinished dirs are set aside."""
    todo, followup_only = [], []
    for run in runs:
        if finished(run.run_dir):
            outcome.kept.append(run.name)
            if followup_commands(cfg, run, missing_only=True):
                followup_only.append(run)
        else:
            if run.run_dir.exists():
                _set_aside(run.run_dir)
            todo.append(run)
    return todo, followup_only


def run_protocol(cfg: DictConfig, out_dir: Path) -> ProxyOutcome:
    """Write protocol.yaml, make the data, run what is not finished (with its follow-ups), record
    each finished run's line in the results files. `dry_run`: print the plan, write nothing."""
    start, started = time.perf_counter(), time.time()
    protocol = protocol_node(cfg)
    every = name_persistence(expand(protocol, out_dir, path_overrides(cfg)))
    runs = _in_start_order(cfg, _selected(cfg, every), out_dir)
    outcome = ProxyOutcome()
    if cfg.get("recheck") and (not cfg.continue_recorded or results_path(cfg) is None):
        from avs.config_checks import ConfigError

        raise ConfigError(
            "recheck=true compares reruns with the results file's lines: it needs continue_recorded=true "
            f"and a results_file (got continue_recorded={cfg.continue_recorded}, results_file={results_path(cfg)})"
        )
    if results_path(cfg) is not None:  # before the dry run too: it shows what a sitting would do
        check_snapshot(results_path(cfg), protocol)
    if cfg.get("dry_run"):
        print_plan(
            cfg, protocol, runs, out_dir, _recorded_plan(cfg, [r for r in runs if not finished(r.run_dir)], every)
        )
        outcome.seconds = time.perf_counter() - start
        return outcome
    simd.check(cfg.simd, "scripts/proxy_benchmark.py")
    check_sources([r for r in runs if not finished(r.run_dir)])
    out_dir.mkdir(parents=True, exist_ok=True)
    check_same_protocol(out_dir, protocol)
    atomic_write_text(out_dir / PROTOCOL_FILE, OmegaConf.to_yaml(protocol))
    todo, followup_only = _sort_runs(cfg, runs, outcome)
    todo, outcome.checks, outcome.recorded = _recorded_plan(cfg, todo, every)
    unrecorded = _unrecorded(cfg, [r for r in runs if r.name in outcome.kept and r not in followup_only], out_dir)
    standins = check_runs([*todo, *followup_only, *unrecorded], protocol.get(PIN_KEY)) or {}
    # the data of a check from outside the selection too
    ceilings = prepare_data(protocol, [*runs, *(r for r in todo if r not in runs)], out_dir)
    if results_path(cfg) is not None:
        write_protocol_snapshot(results_path(cfg), protocol, ceilings)
    for run in unrecorded:  # a finished run without its results line (e.g. a lost results file) gets it
        _record_results(cfg, run, standins, out_dir)
    log_dir = out_dir / "logs"
    log_dir.mkdir(exist_ok=True)
    _execute(cfg, todo, followup_only, log_dir, outcome, standins)
    outcome.seconds = time.perf_counter() - start
    if results_path(cfg) is not None and (outcome.made or outcome.failed):
        from avs.proxy.sittings import sitting_line, write_sitting

        write_sitting(results_path(cfg), sitting_line(cfg, outcome, started))
    return outcome


def _in_start_order(cfg: DictConfig, runs: list[ProxyRun], out_dir: Path) -> list[ProxyRun]:
    """The selected runs in the order they start: within a seed and subset, the longest expected chain
    first, timed by the results file's lines (avs/proxy/schedule.py); the protocol's order otherwise."""
    from avs.proxy.results import read_rows
    from avs.proxy.schedule import expected_seconds, longest_chains_first

    rows = read_rows(results_path(cfg) or out_dir / RESULTS_FILE)
    return longest_chains_first(runs, expected_seconds(rows, cfg.get("version")))


def _recorded_plan(
    cfg: DictConfig, todo: list[ProxyRun], every: list[ProxyRun]
) -> tuple[list[ProxyRun], dict[str, dict], list[str]]:
    """`continue_recorded`: (runs to make, recorded runs made again as checks, recorded runs not made);
    `every`: the protocol's runs before the selection (the check may lie outside it)."""
    if not cfg.continue_recorded or results_path(cfg) is None:
        return todo, {}, []
    from avs.proxy.recorded import plan
    from avs.proxy.results import read_rows

    done = frozenset(r.name for r in every if finished(r.run_dir))
    return plan(todo, read_rows(results_path(cfg)), cfg.get("version"), every, done, bool(cfg.get("recheck")))


def _unrecorded(cfg: DictConfig, runs: Sequence[ProxyRun], out_dir: Path) -> list[ProxyRun]:
    """The finished `runs` that the out dir's or the tracked results file has no line for (each file read once)."""
    from avs.proxy.results import find_row, read_rows

    files = [read_rows(f) for f in (out_dir / RESULTS_FILE, results_path(cfg)) if f]
    version = cfg.get("version")
    return [r for r in runs if any(find_row(rows, r.subset, r.cell, r.seed, version) is None for rows in files)]


def print_plan(
    cfg: DictConfig, protocol: DictConfig, runs: Sequence[ProxyRun], out_dir: Path, recorded: tuple = ((), {}, ())
) -> None:
    """The dry run: where everything goes, the stand-ins against their pins, every command (`recorded`:
    _recorded_plan's answer for the unfinished runs). Reads only."""
    made, checks, skipped = recorded
    runs = [*(r for r in made if r not in runs), *runs]  # a check from outside the selection comes first
    from avs.config_checks import check_config

    paths = cfg.get("paths") or {}
    print(f"out_dir: {out_dir}")
    for key in PATH_KEYS:
        print(f"paths.{key}: {paths.get(key)}")
    print(f"results file: {results_path(cfg)}")
    pins = dict(protocol.get(PIN_KEY) or {})
    files: dict[Path, str] = {}
    for run in {(r.subset, r.cell): r for r in runs}.values():  # one config per cell and subset
        train_cfg = compose_train(run.checkable_overrides())
        check_config(train_cfg)
        files.update({path: key for key, path in weight_files(train_cfg)})
    for path, key in sorted(files.items()):
        found = sha256_file(path) if path.is_file() else "missing"
        status = "ok" if pins.get(path.name) == found else "would be refused"
        print(f"stand-in {key}={path}: pinned {pins.get(path.name)}, found {found} ({status})")
    for run in runs:
        if finished(run.run_dir):
            print(f"kept {run.name}")
            cmds = followup_commands(cfg, run, missing_only=True)
        elif run.name in skipped:
            print(f"recorded {run.name} (its line is in the results file; not made)")
            continue
        else:
            if run.name in checks:
                print(f"# recorded {run.name}, made again; its numbers must equal the recorded ones:")
            if run.after:
                print(f"# after {run.after} has finished (its best.ckpt is this run's model.init_from):")
            print(shlex.join(_command(run, cfg)))  # quoted as a shell reads it
            cmds = []
        for cmd in cmds:
            print(shlex.join(cmd))


def results_path(cfg: DictConfig) -> Path | None:
    """The tracked results file the runs' lines also go to (None: only `<out_dir>/proxy_runs.jsonl`)."""
    value = cfg.get("results_file")
    return None if value in (None, "") else Path(str(value)).expanduser()


def _record_results(
    cfg: DictConfig, run: ProxyRun, standins: dict, out_dir: Path, tracked: bool = True, end: RunEnd | None = None
) -> dict:
    """Write the run's line into `<out_dir>/proxy_runs.jsonl` and (`tracked`) the tracked results file
    -> the line. `end`: the worker task that made it, whose wall seconds (training and follow-ups) and
    number of runs side by side the line records (the tables' cost reads them)."""
    row = _results_row(cfg, run, standins)
    if end is not None:
        row.update(seconds=round(end.seconds, 1), workers=max(1, int(cfg.workers)))
    for path in (out_dir / RESULTS_FILE, results_path(cfg) if tracked else None):
        if path is not None:
            update_rows(path, [row])
    return row


def _results_row(cfg: DictConfig, run: ProxyRun, standins: dict) -> dict:
    """The results line of a finished run (avs.proxy.results.run_row with this invocation's head)."""
    from avs.pretrain import machine_kind

    cell = cfg.cells[run.cell]
    head = {
        "protocol_version": cfg.get("version"),
        "subset": run.subset,
        "cell": run.cell,
        "seed": run.seed,
        "method": str(cell.get("label", run.cell)),
        "standins": standins.get((run.subset, run.cell), {}),
        "threads": int(cfg.threads),
        "simd": cfg.simd,  # the level the runs were pinned to (machine_kind: what torch dispatched to)
        "machine_kind": machine_kind(),
        "cpu_level": simd.cpu_level(),  # the CPU's own widest level
    }
    return run_row(run.run_dir, head, run.run_dir / LISTENING_FILE)


def _execute(
    cfg: DictConfig,
    todo: Sequence[ProxyRun],
    followup_only: Sequence[ProxyRun],
    log_dir: Path,
    outcome: ProxyOutcome,
    standins: dict | None = None,
) -> None:
    """Run the tasks in `workers` slots; a run that starts from another (`after`) waits until that one has
    finished, and is reported failed without running when it did not."""
    workers = max(1, int(cfg.workers))
    bar = tqdm(total=len(todo) + len(followup_only), desc="proxy runs", unit="run", disable=not cfg.progress)
    threads = int(cfg.threads)
    waiting = list(todo)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        running = {pool.submit(_run_one, r, threads, log_dir, cfg, False) for r in followup_only}
        while running or waiting:
            if outcome.stopped:  # a check did not reproduce: what has not started is not started
                for r in waiting:
                    outcome.failed[r.name] = "not run: the benchmark stopped (a rerun did not reproduce)"
                bar.update(len(waiting))
                waiting = []
                if not running:
                    break
            ready, dropped = _release(waiting, todo, outcome)
            bar.update(len(dropped))
            # the first ready runs in start order (_in_start_order), as many as there are free slots (a run
            # queued in the pool ahead of time would overtake the later-ready runs of an earlier seed)
            start = ready[: max(0, workers - len(running))]
            waiting = [r for r in waiting if r not in dropped and r not in start]
            running |= {pool.submit(_run_one, r, threads, log_dir, cfg) for r in start}
            if not running:
                if waiting:
                    raise RuntimeError(f"proxy runner: {[r.name for r in waiting]} wait for runs that never start")
                continue
            done = next(as_completed(running))
            running.discard(done)
            end = done.result()
            _finish(cfg, end, end.run in followup_only, log_dir, outcome, standins, workers)
            bar.set_postfix_str(f"{end.run.name} {end.seconds:.0f}s")
            bar.update(1)
    bar.close()


def _release(waiting: list[ProxyRun], todo: Sequence[ProxyRun], outcome: ProxyOutcome) -> tuple[list, list]:
    """(runs that may start now, in order; runs dropped because their source failed: each is marked
    failed by name). The others still wait for their source run."""
    pending = {r.name for r in todo} - set(outcome.made) - set(outcome.failed)
    ready, dropped = [], []
    for run in waiting:
        if run.after in outcome.failed:
            outcome.failed[run.name] = f"not run: it starts from {run.after}, which failed"
            dropped.append(run)
        elif run.after not in pending:
            ready.append(run)
    return ready, dropped


def check_sources(todo: Sequence[ProxyRun]) -> None:
    """A run that starts from another (init_from) needs that run finished or queued in this invocation."""
    from avs.config_checks import ConfigError

    queued = {r.name for r in todo}
    for run in todo:
        if run.after is not None and run.after not in queued and not Path(str(run.init_checkpoint)).is_file():
            raise ConfigError(
                f"{run.name} starts from {run.after} (init_from), which has not finished and is not selected "
                f"(only / only_subsets): {run.init_checkpoint} not found"
            )


def _finish(
    cfg: DictConfig,
    end: RunEnd,
    only: bool,
    log_dir: Path,
    outcome: ProxyOutcome,
    standins: dict | None,
    workers: int,
) -> None:
    """Record one ended task: runs.jsonl, the outcome, the results line."""
    run = end.run
    _record(
        log_dir.parent / RUNS_FILE,
        run,
        end.code,
        end.seconds,
        "follow-up" if only else "train",
        workers,
        int(cfg.threads),
    )
    if not only and not (end.code == 0 and finished(run.run_dir)):
        outcome.failed[run.name] = f"exit code {end.code}; log {_log_path(log_dir, run)}"
        return
    if not only:
        outcome.made.append(run.name)
        if not cfg.keep_last_checkpoint:  # configs/proxy_benchmark.yaml
            _drop_last_checkpoint(run.run_dir)
    if end.followup_error:
        outcome.failed[run.name] = f"follow-up failed: {end.followup_error}"
    recorded = outcome.checks.get(run.name)
    if recorded is None:
        _record_results(cfg, run, standins or {}, log_dir.parent, end=None if only else end)
        return
    _check_rerun(cfg, run, recorded, standins or {}, log_dir.parent, outcome, None if only else end)


def _check_rerun(
    cfg: DictConfig,
    run: ProxyRun,
    recorded: dict,
    standins: dict,
    out_dir: Path,
    outcome: ProxyOutcome,
    end: RunEnd | None = None,
) -> None:
    """A recorded run made again: its line goes to the out dir only, the comparison (with both runs' wall
    seconds) to the reproductions file; numbers that differ stop the benchmark (avs.proxy.recorded)."""
    from avs.proxy.recorded import reproduction, write_reproduction

    now = _record_results(cfg, run, standins, out_dir, tracked=False, end=end)
    line = reproduction(recorded, now)
    results = results_path(cfg)
    if results is not None:
        write_reproduction(results, line)
    print(f"{run.name}: rerun of a recorded run: {'the same numbers' if line['same'] else 'other numbers'}")
    if not line["same"]:
        why = (
            f"rerun of the recorded {run.name} gave other numbers ({', '.join(line['differing'])}; recorded vs "
            f"now in {results.parent / 'proxy_reproductions.jsonl' if results else out_dir}): this code or machine "
            "computes another table; start a new out dir without continue_recorded, or a new protocol version"
        )
        outcome.failed[run.name] = why
        outcome.stopped = why
