"""Run dir ownership: one training per run dir, and no silent overwrite of an earlier run's checkpoints.

`RunDirLock` holds an exclusive `flock` on `<run_dir>/.lock` for the life of a training (the file
holds the owner's pid, host and start time). A second training into the same dir is refused naming
the dir and the holder. The kernel drops the lock when its process dies, so a lock file that still
names an owner but is not locked was left by a dead process: it is named in a log line and taken
over. `check_run_dir_free` refuses a run dir that already holds checkpoints unless the run
continues them (`trainer.resume` pointing into this dir). Under DDP only rank 0 locks.

A resume is the same run: `resume_overrides` puts the resumed run's stored overrides
(`.hydra/overrides.yaml`) in front of the command line, so `resume_command` (printed after a stop)
works as written.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import shlex
import socket
from pathlib import Path
from typing import Any

from avs.config import PROJECT_ROOT
from avs.errors import AVSError, ExitCode, MissingFileError

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"
CHECKPOINT_DIR = "checkpoints"  # a run dir's checkpoints live here
LAST_CKPT = "last.ckpt"  # the newest state (resumable)
BEST_CKPT = "best.ckpt"  # the state of the best validation score


class RunDirError(AVSError, code=ExitCode.OUTPUT):
    """The run dir is in use by another training, or holds checkpoints of a run that is not being continued."""


def _describe(owner: dict[str, Any]) -> str:
    if not owner:
        return "an unknown process"
    return f"pid {owner.get('pid', '?')} on {owner.get('host', '?')}, started {owner.get('started', '?')}"


def _read_owner(fd: int) -> dict[str, Any]:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 4096).decode("utf-8", "replace").strip()
    if not text:
        return {}
    try:
        owner = json.loads(text)
        return owner if isinstance(owner, dict) else {"raw": text}
    except ValueError:
        return {"raw": text}


class RunDirLock:
    """Exclusive lock of a run dir (`acquire` / `release`, or a context manager)."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        """True while this object holds the lock."""
        return self._fd is not None

    def acquire(self) -> RunDirLock:
        """Take the lock or raise RunDirError naming the dir and the holder; a dead owner's lock is taken over."""
        import fcntl

        if self._fd is not None:
            return self
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            owner = _read_owner(fd)
            os.close(fd)
            raise RunDirError(
                f"run dir {self.run_dir} is in use by another training ({_describe(owner)}; lock file {self.path}): "
                "wait for it to finish or choose another hydra.run.dir"
            ) from None
        previous = _read_owner(fd)
        if previous:  # a clean release empties the file: an owner still named here died holding it
            log.warning(
                "run dir lock %s was left by %s, which is no longer running: taking it over",
                self.path,
                _describe(previous),
            )
        me = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": _dt.datetime.now().isoformat(timespec="seconds"),
        }
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, json.dumps(me).encode())
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        """Empty the lock file (a clean end) and drop the lock. The file stays: removing it would race a waiter."""
        if self._fd is None:
            return
        import fcntl

        try:
            os.ftruncate(self._fd, 0)
        except OSError:
            pass
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> RunDirLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def check_run_dir_free(run_dir: str | Path, resume_path: str | Path | None) -> None:
    """Refuse a run dir holding checkpoints unless `resume_path` (the checkpoint resumed from) lies in it."""
    ckpt_dir = Path(run_dir) / CHECKPOINT_DIR
    found = sorted(p.name for p in ckpt_dir.glob("*.ckpt")) if ckpt_dir.is_dir() else []
    if not found:
        return
    if resume_path is not None and Path(resume_path).resolve().parent == ckpt_dir.resolve():
        return
    raise RunDirError(
        f"run dir {run_dir} already holds checkpoints of an earlier run ({', '.join(found)}): continue that run with "
        f"trainer.resume=auto, or start a new one in another dir (hydra.run.dir=<new dir>, or leave hydra.run.dir "
        "unset for a new timestamped dir)"
    )


def claim_run_dir(
    run_dir: str | Path, resume_path: str | Path | None, is_main: bool = True, distributed: bool = False
) -> RunDirLock | None:
    """Lock `run_dir` (rank 0) and check it holds no other run's checkpoints; every rank raises the same RunDirError."""
    lock: RunDirLock | None = None
    error: str | None = None
    if is_main:
        try:
            lock = RunDirLock(run_dir).acquire()
            check_run_dir_free(run_dir, resume_path)
        except RunDirError as exc:
            if lock is not None:
                lock.release()
                lock = None
            error = str(exc)
    if distributed:
        from avs.engine import distributed as D

        error = D.broadcast_object(error)
    if error is not None:
        raise RunDirError(error)
    return lock


def resume_command(run_dir: str | Path) -> str:
    """The command that continues the run in `run_dir` in place (its stored overrides are replayed)."""
    script = PROJECT_ROOT / "scripts" / "train.py"
    try:
        script = script.relative_to(Path.cwd())
    except ValueError:
        pass
    run = shlex.quote(str(Path(run_dir).resolve()))
    return f"python {shlex.quote(str(script))} trainer.resume={run} hydra.run.dir={run}"


def resume_advice(run_dir: str | Path) -> str:
    """How to continue a stopped run, from what its checkpoints/ folder holds now."""
    ckpt_dir = Path(run_dir) / CHECKPOINT_DIR
    if (ckpt_dir / LAST_CKPT).is_file():
        return f"resume with: {resume_command(run_dir)}"
    found = sorted(p.name for p in ckpt_dir.glob("*.ckpt")) if ckpt_dir.is_dir() else []
    held = f"{ckpt_dir} holds only {', '.join(found)}" if found else f"no checkpoint was written to {ckpt_dir}"
    return f"there is nothing to resume ({held}, no last.ckpt): start the run again"


def lock_holder(run_dir: str | Path) -> dict[str, Any] | None:
    """The owner recorded in `run_dir`'s lock file while a live process holds it; None when the dir is free."""
    import fcntl

    path = Path(run_dir) / LOCK_NAME
    if not path.is_file():
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return _read_owner(fd)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def precheck_run_dir(overrides: list[str], config_name: str = "train") -> None:
    """Before Hydra starts: refuse an explicit `hydra.run.dir=` that another training holds or that holds
    another run's checkpoints, so Hydra never writes its .hydra/ files and train.log into it.

    The trainer makes the same checks again (and takes the lock); this only moves the refusal in
    front of Hydra's writes. A timestamped default run dir is new, so it is not looked at.
    """
    given = [a.split("=", 1)[1] for a in overrides if a.startswith("hydra.run.dir=")]
    if not given or not Path(given[-1]).expanduser().is_dir():
        return
    run_dir = Path(given[-1]).expanduser()
    owner = lock_holder(run_dir)
    if owner is not None:
        raise RunDirError(
            f"run dir {run_dir} is in use by another training ({_describe(owner)}; lock file {run_dir / LOCK_NAME}): "
            "wait for it to finish or choose another hydra.run.dir"
        )
    from avs.config import compose_config
    from avs.engine.build import resolve_resume_path

    try:
        cfg = compose_config(config_name, [a for a in overrides if "=" in a])
    except Exception:  # noqa: BLE001  (a rejected override: Hydra itself reports it, with hints)
        return
    resume = resolve_resume_path(cfg.trainer.resume, run_dir / CHECKPOINT_DIR)
    if resume is not None and not resume.is_file():
        return  # no checkpoint there: check_config refuses that trainer.resume with the reason
    check_run_dir_free(run_dir, resume)


# Stored overrides a resume does not replay: the command line names the resume itself, an allowed change is
# part of the stored config from then on, and a planned stop would stop the resumed run again at once.
NOT_REPLAYED: tuple[str, ...] = ("trainer.resume", "trainer.resume_allow_changes", "trainer.interrupt_after_steps")


def override_key(arg: str) -> str:
    """`+key=v`, `++key=v`, `~key`, `key=v` -> key."""
    return arg.split("=", 1)[0].lstrip("+~")


def _last_value(args: list[str], key: str) -> str | None:
    values = [a.split("=", 1)[1] for a in args if "=" in a and override_key(a) == key]
    return values[-1] if values else None


def resumed_run_dir(args: list[str]) -> Path | None:
    """The run dir a `trainer.resume=` on this command line continues (None: no resume, or a fresh auto run).

    A `trainer.resume` path that does not exist is refused here (MissingFileError), before Hydra starts.
    """
    spec = _last_value(args, "trainer.resume")
    if spec is None or spec.strip().lower() in ("", "null", "none", "false"):
        return None
    if spec == "auto":
        given = _last_value(args, "hydra.run.dir")
        return Path(given).expanduser() if given else None
    path = Path(spec).expanduser()
    if not path.exists():
        raise MissingFileError(
            f"trainer.resume={spec}: no such file or folder (give a run dir, or a checkpoint file in its checkpoints/)"
        )
    if path.is_file():
        path = path.parent
    return path.parent if path.name == CHECKPOINT_DIR else path


def resume_overrides(args: list[str]) -> list[str]:
    """The command line of a resume: the resumed run's stored overrides (`.hydra/overrides.yaml`) first, then
    the given ones. So `trainer.resume=<run dir>` alone continues the run with its model, data and every
    override; a key given again replaces the stored one (a changed result key is then refused by
    avs.engine.resume_check unless trainer.resume_allow_changes lists it). Without a resume, or without
    stored overrides (a checkpoint copied out of its run dir), the command line is returned as given.
    """
    run_dir = resumed_run_dir(args)
    stored_file = run_dir / ".hydra" / "overrides.yaml" if run_dir is not None else None
    if stored_file is None or not stored_file.is_file():
        return list(args)
    from omegaconf import OmegaConf

    stored = [str(o) for o in (OmegaConf.load(stored_file) or []) if "=" in str(o) or str(o).startswith("~")]
    given = {override_key(a) for a in args if not a.startswith("-")}
    kept = [
        o
        for o in stored
        if override_key(o) not in given and override_key(o) not in NOT_REPLAYED and not o.startswith("hydra.")
    ]
    return kept + list(args)


def precheck_resume(overrides: list[str], config_name: str = "train") -> None:
    """Before Hydra starts: refuse a resume whose config changes the run's results (avs.engine.resume_check),
    so a refused resume leaves the run dir's `.hydra/` record (the overrides a resume replays) as it was.

    Only the checkpoint's stored config is read (memory-mapped); the trainer loads and verifies the whole
    checkpoint, and reports a damaged one, later.
    """
    from avs.config import compose_config
    from avs.engine.build import resolve_resume_path
    from avs.engine.resume_check import check_resume_config

    given = _last_value(overrides, "hydra.run.dir")
    if _last_value(overrides, "trainer.resume") == "auto" and not given:
        return
    try:
        cfg = compose_config(config_name, [a for a in overrides if "=" in a])
        path = resolve_resume_path(cfg.trainer.get("resume"), Path(given or ".").expanduser() / CHECKPOINT_DIR)
        if path is None or not path.is_file():
            return
        import torch

        stored = torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("config")
    except Exception:  # noqa: BLE001  (rejected overrides, a damaged checkpoint: reported later with their reason)
        return
    quiet = logging.getLogger("avs.engine.resume_check")
    quiet.disabled = True  # the trainer logs the allowed changes once, into train.log
    try:
        check_resume_config(stored, cfg, path)
    finally:
        quiet.disabled = False


# ------------------------------------------------------------------------------------------------
# a command refused before it starts leaves no run dir


def _process_start() -> float | None:
    """This process's start time (epoch seconds, rounded down by up to 1 s) from /proc; None elsewhere."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        lines = Path("/proc/stat").read_text().splitlines()
        boot = next(int(line.split()[1]) for line in lines if line.startswith("btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def only_hydra_files(run_dir: Path, output_subdir: str | None, log_name: str, since: float) -> bool:
    """True when `run_dir` holds nothing but Hydra's own start-up files, all written at or after `since`:
    `<output_subdir>/{config,hydra,overrides}.yaml` and the job log `log_name`."""
    allowed = {log_name} | ({output_subdir} if output_subdir else set())
    entries = list(run_dir.iterdir())
    if any(p.name not in allowed for p in entries):
        return False
    sub = run_dir / output_subdir if output_subdir else None
    if sub is not None and sub.is_dir():
        if any(p.name not in ("config.yaml", "hydra.yaml", "overrides.yaml") for p in sub.iterdir()):
            return False
        entries += list(sub.iterdir())
    return all(p.stat().st_mtime >= since for p in entries)


def remove_refused_run_dir() -> Path | None:
    """After a refusal (an AVSError out of a script's task): remove the Hydra run dir if it holds only what Hydra
    wrote when this process started it (see `only_hydra_files`) -> the removed dir, else None.

    Anything else in it (a checkpoint, metrics, a lock file, an older run's files) keeps the dir. Linux only
    (the process start time comes from /proc); elsewhere the dir stays.
    """
    import shutil

    try:
        from hydra.core.hydra_config import HydraConfig

        if not HydraConfig.initialized():
            return None
        hc = HydraConfig.get()
        run_dir = Path(hc.runtime.output_dir)
        subdir, log_name = hc.output_subdir, f"{hc.job.name}.log"
    except Exception:  # noqa: BLE001  (no Hydra run: nothing to tidy)
        return None
    since = _process_start()
    cwd = Path.cwd().resolve()
    if since is None or not subdir or not (run_dir / subdir).is_dir():
        return None  # Linux only; and only a dir where Hydra wrote its files (never e.g. `hydra.run.dir=.`)
    if run_dir.resolve() == cwd or run_dir.resolve() in cwd.parents:
        return None
    if not only_hydra_files(run_dir, subdir, log_name, since):
        return None
    shutil.rmtree(run_dir, ignore_errors=True)
    if run_dir.exists():
        return None
    if run_dir.parent.name == "runs":  # the default <log_dir>/<task>/runs/<name>: drop runs/ and <task>/ if now empty
        for parent in (run_dir.parent, run_dir.parent.parent):
            try:
                parent.rmdir()
            except OSError:
                break
    return run_dir
