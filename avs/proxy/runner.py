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
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from avs.config import PROJECT_ROOT, compose_config
from avs.engine.rundir import CHECKPOINT_DIR, LAST_CKPT
from avs.proxy.protocol import (
    CEILINGS_FILE,
    PROTOCOL_FILE,
    RUNS_FILE,
    ProxyRun,
    check_same_protocol,
    expand,
    protocol_node,
)
from avs.utils.io import atomic_write_text

log = logging.getLogger(__name__)

TRAIN_SCRIPT = PROJECT_ROOT / "scripts" / "train.py"
UNCERTAINTY_SCRIPT = PROJECT_ROOT / "scripts" / "uncertainty.py"
UNCERTAINTY_FILE = "uncertainty.json"


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


def check_runs(runs: Sequence[ProxyRun]) -> None:
    """Every (subset, cell) config is checked (values and files) before the first run starts."""
    from avs.config_checks import ConfigError, check_config, check_files

    seen: set[tuple[str, str]] = set()
    for run in runs:
        if (run.subset, run.cell) in seen:
            continue
        seen.add((run.subset, run.cell))
        cfg = compose_train(run.overrides)
        try:
            check_config(cfg)
            check_files(cfg)
        except ConfigError as exc:
            raise type(exc)(f"cell {run.cell} on {run.subset}: {exc}") from exc


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


def _command(run: ProxyRun) -> list[str]:
    return [sys.executable, str(TRAIN_SCRIPT), *run.overrides, f"hydra.run.dir={run.run_dir}", "trainer.progress=false"]


def _log_path(log_dir: Path, run: ProxyRun) -> Path:
    return log_dir / f"{run.subset}_{run.cell}_seed{run.seed}.log"


def _run_one(
    run: ProxyRun, threads: int, log_dir: Path, followups: Sequence[list[str]] = (), train: bool = True
) -> RunEnd:
    """Train (unless `train` is False: a finished run missing a follow-up's output), then each
    follow-up command after a finished training, in this worker's slot."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    log_path = _log_path(log_dir, run)
    start = time.perf_counter()
    code = 0
    if train:
        with open(log_path, "w") as fh:
            code = subprocess.call(_command(run), stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=PROJECT_ROOT)
    followup_error = None
    if code == 0 and finished(run.run_dir):
        for cmd in followups:
            with open(log_path, "a") as fh:
                fh.write(f"\n$ {' '.join(cmd)}\n")
                fh.flush()
                extra = subprocess.call(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=PROJECT_ROOT)
            if extra != 0:
                followup_error = f"{Path(cmd[1]).name} exit code {extra}; log {log_path}"
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
    """The runs `only` (cells) and `only_subsets` keep; a name the protocol does not have is refused."""
    from avs.config_checks import ConfigError

    for key, have in (("only", {r.cell for r in runs}), ("only_subsets", {r.subset for r in runs})):
        unknown = sorted(set(cfg.get(key) or []) - have)
        if unknown:
            raise ConfigError(f"{key}: {unknown} not in the protocol (it has {sorted(have)})")
    cells, subsets = set(cfg.get("only") or []), set(cfg.get("only_subsets") or [])
    return [r for r in runs if (not cells or r.cell in cells) and (not subsets or r.subset in subsets)]


def run_protocol(cfg: DictConfig, out_dir: Path) -> ProxyOutcome:
    """Write protocol.yaml, make the data, run what is not finished (with its follow-ups)."""
    start = time.perf_counter()
    protocol = protocol_node(cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    check_same_protocol(out_dir, protocol)
    runs = expand(protocol, out_dir)
    runs = _selected(cfg, runs)
    atomic_write_text(out_dir / PROTOCOL_FILE, OmegaConf.to_yaml(protocol))
    outcome = ProxyOutcome()
    todo = []
    followup_only = []
    for run in runs:
        if finished(run.run_dir):
            outcome.kept.append(run.name)
            if followup_commands(cfg, run) and not (run.run_dir / UNCERTAINTY_FILE).is_file():
                followup_only.append(run)
        else:
            if run.run_dir.exists():
                _set_aside(run.run_dir)
            todo.append(run)
    check_runs(todo)
    prepare_data(protocol, runs, out_dir)
    log_dir = out_dir / "logs"
    log_dir.mkdir(exist_ok=True)
    if cfg.get("dry_run"):
        for run in todo:
            print(" ".join(_command(run)))
        for run in followup_only:
            for cmd in followup_commands(cfg, run):
                print(" ".join(cmd))
        outcome.seconds = time.perf_counter() - start
        return outcome
    _execute(cfg, todo, followup_only, log_dir, outcome)
    outcome.seconds = time.perf_counter() - start
    return outcome


def _execute(
    cfg: DictConfig, todo: Sequence[ProxyRun], followup_only: Sequence[ProxyRun], log_dir: Path, outcome: ProxyOutcome
) -> None:
    workers = max(1, int(cfg.workers))
    total = len(todo) + len(followup_only)
    bar = tqdm(total=total, desc="proxy runs", unit="run", disable=not cfg.get("progress", True))
    threads = int(cfg.threads)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(_run_one, r, threads, log_dir, followup_commands(cfg, r), False) for r in followup_only]
        futures += [pool.submit(_run_one, r, threads, log_dir, followup_commands(cfg, r)) for r in todo]
        for fut in as_completed(futures):
            end = fut.result()
            run = end.run
            only = run in followup_only
            task = "follow-up" if only else "train"
            _record(log_dir.parent / RUNS_FILE, run, end.code, end.seconds, task, workers, threads)
            if only:
                if end.followup_error:
                    outcome.failed[run.name] = f"follow-up failed: {end.followup_error}"
            elif end.code == 0 and finished(run.run_dir):
                outcome.made.append(run.name)
                if not cfg.get("keep_last_checkpoint", False):
                    _drop_last_checkpoint(run.run_dir)
                if end.followup_error:
                    outcome.failed[run.name] = f"follow-up failed: {end.followup_error}"
            else:
                outcome.failed[run.name] = f"exit code {end.code}; log {_log_path(log_dir, run)}"
            bar.set_postfix_str(f"{run.name} {end.seconds:.0f}s")
            bar.update(1)
    bar.close()


def followup_commands(cfg: DictConfig, run: ProxyRun) -> list[list[str]]:
    """Commands run after the training in the same worker: the uncertainty pass for the listed cells."""
    node = cfg.get("uncertainty")
    if node is None or run.cell not in set(node.get("cells") or []):
        return []
    return [
        [
            sys.executable,
            str(UNCERTAINTY_SCRIPT),
            f"checkpoint={run.run_dir / 'checkpoints' / 'best.ckpt'}",
            f"split={node.split}",
            f"eval.num_samples={int(node.num_samples)}",
            f"out={run.run_dir / UNCERTAINTY_FILE}",
            f"hydra.run.dir={run.run_dir.parent.parent.parent / 'logs' / 'uncertainty' / run.name.replace('/', '_')}",
        ]
    ]
