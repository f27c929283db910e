"""One trainer for every AVSegmentor variant: device, AMP, checkpoints, resume, faults, DDP, validation, test.

Fault handling (docs/reliability.md): every file is written atomically; SIGTERM / SIGINT save a
resumable checkpoint after the current step; non-finite losses or gradients skip the optimizer
update and stop the run after `trainer.max_consecutive_nonfinite` in a row; bad clips raise or are
skipped and reported (`data.on_error`). Distributed data parallel (docs/distributed.md): the
process group comes from the environment (torchrun); only rank 0 writes files.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import subprocess
import time
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader
from tqdm import tqdm

from avs.config import auto_flag
from avs.engine import distributed as D
from avs.engine.amp import load_scaler_state, native_bf16
from avs.engine.optim import build_scheduler
from avs.engine.checkpoint import (
    CheckpointError,
    capture_rng,
    load_checkpoint,
    model_state_from,
    restore_rng,
    save_checkpoint,
)
from avs.engine.resume_check import load_for_resume, restore_optimizer
from avs.engine.rundir import claim_run_dir, resume_advice
from avs.engine.sampler import ResumableSampler
from avs.engine.signals import StopSignal, ignore_stop_signals
from avs.engine.syncs import LossLog, LossWindow, read_step_flags
from avs.errors import AVSError, ExitCode
from avs.metrics import MetricAccumulator
from avs.models.build import build_model
from avs.utils.device import select_device  # noqa: F401  (re-exported for callers)
from avs.utils.device import to_channels_last
from avs.utils.io import atomic_save, atomic_write_text

log = logging.getLogger(__name__)

CHECKPOINT_VERSION = 2


class TrainingError(AVSError, RuntimeError, code=ExitCode.RUN_FAILED):
    """Training cannot continue (the message says why and which checkpoint to resume from)."""


class NonFiniteLossError(TrainingError):
    """Too many consecutive steps had a non-finite loss or gradient."""


# ----------------------------------------------------------------------------- setup helpers
def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python, NumPy and torch; optionally force deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False


def git_commit() -> str | None:
    """The checkout's HEAD commit, if this is a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def resolve_loss_weights(cfg: DictConfig) -> dict[str, float]:
    """`model.loss_weights` with 'auto' entries resolved per data subset (e.g. A-V loss 0 on S4, 0.5 on MS3)."""
    weights = OmegaConf.to_container(cfg.model.loss_weights, resolve=True)
    auto = OmegaConf.to_container(cfg.model.get("auto_weights", {}) or {}, resolve=True)
    subset = cfg.data.subset
    out = {}
    for name, w in weights.items():
        if w == "auto":
            if name not in auto or subset not in auto[name]:
                raise ValueError(f"model.loss_weights.{name}=auto needs model.auto_weights.{name}.{subset}")
            w = auto[name][subset]
        out[name] = float(w)
    return out


def resolve_resume_path(spec: Any, ckpt_dir: str | Path) -> Path | None:
    """`trainer.resume` -> checkpoint path: auto = <ckpt_dir>/last.ckpt if present; a run dir -> its last.ckpt."""
    if spec in (None, "", False) or str(spec).lower() in ("null", "none", "false"):
        return None
    if str(spec) == "auto":
        path = Path(ckpt_dir) / "last.ckpt"
        return path if path.is_file() else None
    p = Path(str(spec)).expanduser()
    if p.is_file():
        return p
    for cand in (p / "checkpoints" / "last.ckpt", p / "last.ckpt"):
        if cand.is_file():
            return cand
    raise CheckpointError(
        f"trainer.resume={spec}: neither a checkpoint file nor a run directory holding checkpoints/last.ckpt"
    )


def ddp_find_unused_parameters(cfg: DictConfig) -> bool:
    """`trainer.find_unused_parameters`: true/false as given; auto = true only where a variant builds unused parts.

    Every trainable parameter of the shipped variants receives a gradient each step (tests/integration/
    test_ddp.py), except with `model.use_audio=false` (the no-audio ablations): the audio encoder,
    fusion and projector are built but not run.
    """
    return auto_flag(cfg.trainer.get("find_unused_parameters", "auto"), "trainer.find_unused_parameters",
                     auto=not bool(cfg.model.get("use_audio", True)))


def _move(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    nb = device.type == "cuda"
    return {k: v.to(device, non_blocking=nb) if torch.is_tensor(v) else v for k, v in batch.items()}


def pad_batch(batch: dict[str, Any], size: int) -> dict[str, Any]:
    """A copy of `batch` grown to `size` clips by repeating its last clip (tensors and lists; other values kept)."""
    n = int(batch["frames"].shape[0])
    extra = size - n
    out: dict[str, Any] = {}
    for k, v in batch.items():
        if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == n:
            out[k] = torch.cat([v, v[-1:].expand(extra, *v.shape[1:])])
        elif isinstance(v, list) and len(v) == n:
            out[k] = v + v[-1:] * extra
        else:
            out[k] = v
    return out


def shutdown_loader_iterator(it: Any) -> None:
    """Join a DataLoader iterator's workers now: an exception's traceback would otherwise keep them alive."""
    stop = getattr(it, "_shutdown_workers", None)  # multi-process iterators only
    if stop is not None:
        stop()


def collate_skip_errors(items: list[Any]) -> dict[str, Any]:
    """`collate_skip_none` that also keeps why each clip was dropped: batch['skipped_errors'] {video_id: message}."""
    from avs.data.avsbench import SkippedItem, collate_skip_none

    errors = {it.video_id: it.error for it in items if isinstance(it, SkippedItem)}
    out = collate_skip_none(items)
    out["skipped_errors"] = errors
    return out


def _empty_faults() -> dict[str, Any]:
    return {
        "nonfinite_steps": [],  # {step, epoch, kind: loss|grad|amp_overflow, video_ids, terms}
        "skipped_clips": {},  # split -> {video_id: error}
        "interruptions": [],  # {step, epoch, reason}
        "resumed_from": [],  # {path, step}
    }


# ----------------------------------------------------------------------------- the trainer
class Trainer:
    """Trains and evaluates one model from a composed config; writes everything under `run_dir` (rank 0)."""

    def __init__(self, cfg: DictConfig, run_dir: str | Path) -> None:
        from avs.config_checks import check_config, check_files

        check_config(cfg)
        check_files(cfg)  # data root and weight files, before any model is built
        self.cfg = cfg
        self.tcfg = cfg.trainer
        self.dist = D.init_from_env()
        self.run_dir = Path(run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.device = select_device(self.tcfg.device, self.dist.local_rank)
        seed_everything(int(cfg.seed), bool(self.tcfg.deterministic))
        self.loss_weights = resolve_loss_weights(cfg)
        self._resume_path = resolve_resume_path(self.tcfg.get("resume"), self.ckpt_dir)
        # the checkpoint to resume from is verified and its config compared before any model is built
        self._resume = load_for_resume(self._resume_path, cfg) if self._resume_path is not None else None
        self.model = build_model(cfg).to(self.device)
        if cfg.model.get("init_from"):
            self._init_from(cfg.model.init_from)
        if self.tcfg.get("channels_last"):  # 4-D weights only (Conv3d weights cannot be channels_last)
            to_channels_last(self.model)
        if self.device.type == "cuda" and not bool(self.tcfg.deterministic):
            # fixed input shapes (data.image_size, T): cuDNN's autotuner picks the fastest kernels once
            torch.backends.cudnn.benchmark = bool(self.tcfg.get("cudnn_benchmark", True))
        if self.dist.enabled:
            if self.tcfg.get("sync_bn", False):
                if self.device.type != "cuda":
                    raise ValueError("trainer.sync_bn=true needs CUDA devices (torch's SyncBatchNorm); set trainer.sync_bn=false on CPU")
                self.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
            seed_everything(int(cfg.seed) + self.dist.rank, bool(self.tcfg.deterministic))  # per-rank dropout etc.
        from avs.engine.optim import build_optimizer

        self.optimizer = build_optimizer(self.model.parameters(), self.tcfg)
        self.amp_dtype = self._amp_dtype()
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.best: dict[str, Any] = {"metric": -math.inf, "epoch": None, "step": None}
        self.history: list[dict[str, Any]] = []
        self.loss_history: list[float] = []
        self._loss_log = LossLog()  # this run's latest losses, still on the device (flushed into loss_history)
        self.skipped: list[str] = []  # clips dropped with data.on_error=skip
        self.faults: dict[str, Any] = _empty_faults()
        self.consecutive_nonfinite = 0
        self._datasets: dict[str, Any] = {}
        self._writer = None
        self._net: torch.nn.Module | None = None  # the module that runs training forwards (DDP wrapper or model)
        self._eval_net: torch.nn.Module | None = None  # the module that runs eval forwards (model, maybe compiled)
        self._loaders: dict[str, DataLoader] = {}  # kept across epochs when the workers are persistent
        self._stop: StopSignal | None = None
        self._last_saved: dict[str, int] = {}
        self._purge_step: int | None = None  # TensorBoard: the step a resumed run continues from
        self._save_on_start = False
        self.scheduler = None  # built in fit() once the number of steps is known

    @property
    def is_main(self) -> bool:
        """True on the process that writes files (rank 0; always in a single process)."""
        return self.dist.is_main

    # ------------------------------------------------------------------ data
    def dataset(self, split: str):
        """The split's dataset (built once; synthetic data is generated on first use, by rank 0 first)."""
        if split not in self._datasets:
            from avs.data import build_dataset

            if self.cfg.data.get("synthetic"):
                from avs.data.synthetic import ensure_synthetic

                if self.is_main:
                    ensure_synthetic(self.cfg.data)
                D.barrier()
                if not self.is_main:
                    ensure_synthetic(self.cfg.data)
            ds = build_dataset(self.cfg.data, split, train=(split == "train"))
            ds.seed = int(self.cfg.seed)  # augmentation draws follow (seed, epoch, index)
            self._datasets[split] = ds
        return self._datasets[split]

    def persistent_workers(self) -> bool:
        """data.persistent_workers: auto (= on with worker processes) | true | false."""
        workers = int(self.cfg.data.num_workers)
        return auto_flag(self.cfg.data.get("persistent_workers", "auto"), "data.persistent_workers", auto=workers > 0,
                         supported=workers > 0, requirement="data.num_workers > 0")

    def _loader(self, split: str, sampler=None, batch_size: int | None = None) -> DataLoader:
        """The split's DataLoader; with persistent workers it is built once and reused every epoch
        (the sampler is then the same object, re-seeded with `set_epoch` before each pass)."""
        if split in self._loaders:
            return self._loaders[split]
        dcfg = self.cfg.data
        ds = self.dataset(split)
        pin = auto_flag(dcfg.get("pin_memory", "auto"), "data.pin_memory", auto=self.device.type == "cuda")
        workers = int(dcfg.num_workers)
        persistent = self.persistent_workers()
        collate = collate_skip_errors if dcfg.get("on_error", "raise") == "skip" else None
        loader = DataLoader(
            ds,
            batch_size=batch_size or int(dcfg.eval_batch_size),
            sampler=sampler,
            shuffle=False,
            num_workers=workers,
            pin_memory=pin,
            persistent_workers=persistent,
            collate_fn=collate,
            worker_init_fn=ignore_stop_signals if workers > 0 else None,
            generator=torch.Generator().manual_seed(int(self.cfg.seed)),
        )
        if persistent:
            self._loaders[split] = loader
        return loader

    def _end_pass(self, it: Any, loader: DataLoader, failed: bool) -> None:
        """After a pass over `loader`: keep persistent workers alive unless the pass failed."""
        if failed or not loader.persistent_workers:
            shutdown_loader_iterator(it)
            for key in [k for k, v in self._loaders.items() if v is loader]:
                del self._loaders[key]

    def close_loaders(self) -> None:
        """Join every persistent DataLoader worker (end of fit, interruption, failure)."""
        for loader in self._loaders.values():
            shutdown_loader_iterator(getattr(loader, "_iterator", None))
        self._loaders.clear()

    def _compile(self, module: torch.nn.Module) -> torch.nn.Module:
        """trainer.compile: false | true | a torch.compile mode (default, reduce-overhead, max-autotune...)."""
        spec = self.tcfg.get("compile", False)
        if spec is False or str(spec).lower() in ("false", "off", "none"):
            return module
        mode = None if spec is True or str(spec).lower() in ("true", "default") else str(spec)
        backend = str(self.tcfg.get("compile_backend", "inductor"))
        log.info("torch.compile(backend=%s, mode=%s): the first steps compile (slow)", backend, mode or "default")
        return torch.compile(module, backend=backend, mode=mode)

    def _note_skipped(self, split: str, batch: dict[str, Any]) -> None:
        ids = [v for v in batch.get("skipped", []) if v is not None]
        if not ids:
            return
        self.skipped += ids
        errors = batch.get("skipped_errors", {}) or {}
        table = self.faults["skipped_clips"].setdefault(split, {})
        for vid in ids:
            table.setdefault(vid, errors.get(vid, "unreadable"))

    def _merge_skipped(self, split: str) -> None:
        """Under DDP: every rank's skipped clips of `split` on every rank (collective)."""
        if not self.dist.enabled:
            return
        merged: dict[str, str] = {}
        for part in D.gather_objects(self.faults["skipped_clips"].get(split, {})):
            merged.update(part)
        if merged:
            self.faults["skipped_clips"][split] = merged
            self.skipped = sorted(set(self.skipped) | set(merged))

    # ------------------------------------------------------------------ model helpers
    def _amp_dtype(self) -> torch.dtype | None:
        amp = str(self.tcfg.get("amp", "auto"))
        if amp in ("off", "false", "False", "none", "None"):
            return None
        if amp == "auto":
            if self.device.type != "cuda":
                return None
            return torch.bfloat16 if native_bf16(self.device) else torch.float16  # fp16 + GradScaler on V100/T4
        table = {"bf16": torch.bfloat16, "fp16": torch.float16}
        if amp not in table:
            raise ValueError(f"trainer.amp must be auto|off|bf16|fp16, got {amp!r}")
        if amp == "fp16" and self.device.type != "cuda":
            raise ValueError("trainer.amp=fp16 needs CUDA; use bf16 or off on CPU")
        return table[amp]

    def _autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _init_from(self, path: str) -> None:
        """S4 -> MS3 style initialisation: load matching weights, report what was skipped."""
        state = model_state_from(load_checkpoint(path), path)
        own = self.model.state_dict()
        usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
        skipped = sorted(set(state) - set(usable))
        missing = sorted(set(own) - set(usable))
        self.model.load_state_dict(usable, strict=False)
        log.info("init_from %s: loaded %d tensors, skipped %d, left %d at init", path, len(usable), len(skipped), len(missing))
        if not usable:
            raise CheckpointError(f"model.init_from={path}: no tensor matches this model")

    def _wrap_ddp(self) -> torch.nn.Module:
        if not self.dist.enabled:
            return self.model
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DDP(
            self.model,
            device_ids=ids,
            output_device=ids[0] if ids else None,
            find_unused_parameters=ddp_find_unused_parameters(self.cfg),
        )

    # ------------------------------------------------------------------ checkpoints
    def _state(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "epoch": self.epoch,
            "step": self.step,
            "batch_in_epoch": self.batch_in_epoch,
            "best": dict(self.best),
            "history": list(self.history),
            "loss_history": list(self.loss_history),
            "faults": self.faults,
            "consecutive_nonfinite": self.consecutive_nonfinite,
            "rng": capture_rng(),
            "world_size": self.dist.world_size,
            "config": OmegaConf.to_yaml(self.cfg, resolve=True),
            "avs_checkpoint_version": CHECKPOINT_VERSION,
        }

    def save(self, name: str) -> Path:
        """Write checkpoints/<name>.ckpt atomically (rank 0; every rank must call it under DDP).

        A failed write (e.g. disk full) leaves the previous file intact and raises CheckpointError
        on every rank with the step of the last good checkpoint.
        """
        path = self.ckpt_dir / f"{name}.ckpt"
        self._loss_log.flush(self.loss_history)
        rng_all = D.gather_objects(capture_rng()) if self.dist.enabled else None
        error: str | None = None
        if self.is_main:
            state = self._state()
            if rng_all is not None:
                state["rng_per_rank"] = rng_all
            try:
                save_checkpoint(path, state)
            except CheckpointError as exc:
                error = str(exc)
        if self.dist.enabled:
            error = D.broadcast_object(error)
        if error is not None:
            prev = self._last_saved.get(name)
            where = f"step {prev}" if prev is not None else "none written by this process"
            log.error("checkpoint write failed at step %d: %s", self.step, error)
            raise CheckpointError(
                f"{error}; training stopped at step {self.step}. Previous {path.name}: {where}. "
                f"Free disk space, then {resume_advice(self.run_dir)}"
            )
        self._last_saved[name] = self.step
        return path

    def resume(self, spec: str | Path | None = None) -> bool:
        """Restore the state of `spec` (auto | run dir | checkpoint file; default trainer.resume). True if resumed."""
        path = resolve_resume_path(spec, self.ckpt_dir) if spec is not None else self._resume_path
        if path is None:
            log.info("trainer.resume=auto: no checkpoint in %s, starting fresh", self.ckpt_dir)
            return False
        state, changes = self._resume if spec is None and self._resume else load_for_resume(path, self.cfg)
        self._resume = None
        try:
            self.model.load_state_dict(state["model"])
            restore_optimizer(self.optimizer, self.scheduler, state)
        except (KeyError, RuntimeError, ValueError) as exc:
            raise CheckpointError(
                f"{path}: does not fit this model/optimizer ({type(exc).__name__}: {str(exc)[:300]}); "
                "resume with the config the run was started with"
            ) from exc
        load_scaler_state(self.scaler, state.get("scaler"), path)  # empty when written without fp16
        self.epoch, self.step, self.batch_in_epoch = state["epoch"], state["step"], state["batch_in_epoch"]
        self.best = dict(state["best"])
        self.history = list(state["history"])
        self.loss_history = list(state["loss_history"])
        self.faults = state.get("faults") or _empty_faults()
        self.consecutive_nonfinite = int(state.get("consecutive_nonfinite", 0))
        for table in self.faults.get("skipped_clips", {}).values():
            self.skipped += list(table)
        per_rank = state.get("rng_per_rank")
        if per_rank is not None and len(per_rank) == self.dist.world_size:
            restore_rng(per_rank[self.dist.rank], own_device_only=self.device.type == "cuda")
        else:
            restore_rng(state["rng"])
            if self.dist.enabled:
                if self.dist.rank > 0:
                    seed_everything(int(self.cfg.seed) + 7919 * self.dist.rank + self.step)
                log.warning("%s was written by %s process(es), now %d: per-rank RNG streams re-derived",
                            path, state.get("world_size", 1), self.dist.world_size)
        self.faults["resumed_from"].append({"path": str(path), "step": self.step, "changes": changes})
        self._purge_step = self.step + 1  # events the stopped run logged after this checkpoint are hidden
        self._adopt_best(path.parent / "best.ckpt")
        # resumed into another run dir: write last.ckpt there at once (fit), so it is resumable itself
        self._save_on_start = path.parent.resolve() != self.ckpt_dir.resolve()
        log.info("resumed from %s at epoch %d, step %d (batch %d of the epoch)", path, self.epoch, self.step, self.batch_in_epoch)
        return True

    def _adopt_best(self, src: Path) -> None:
        """Resuming into another run dir: copy the source run's best.ckpt so selection carries over."""
        dst = self.ckpt_dir / "best.ckpt"
        if not self.is_main or not src.is_file() or (dst.exists() and dst.resolve() == src.resolve()):
            return
        with open(src, "rb") as fh_in:
            atomic_save(dst, lambda fh: shutil.copyfileobj(fh_in, fh))
        log.info("copied %s to %s (the best checkpoint so far)", src, dst)

    def _clean_stale_temps(self) -> None:
        """Remove temp files left by a process killed mid-write (atomic writes never leave partial targets)."""
        for folder in (self.ckpt_dir, self.run_dir):
            if folder.is_dir():
                for tmp in folder.glob(".*.tmp"):
                    try:
                        tmp.unlink()
                        log.info("removed stale temp file %s", tmp)
                    except OSError:
                        pass

    # ------------------------------------------------------------------ logging
    def writer(self):
        if self._writer is None and self.is_main and self.tcfg.get("tensorboard", True):
            from torch.utils.tensorboard import SummaryWriter

            # purge_step hides events a killed run logged after its last checkpoint
            self._writer = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=self._purge_step)
        return self._writer

    def _log_scalars(self, prefix: str, values: dict[str, float], step: int) -> None:
        w = self.writer()
        if w is not None:
            for k, v in values.items():
                w.add_scalar(f"{prefix}/{k}", v, step)

    def _close_writer(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def write_run_report(self, status: str, message: str | None = None) -> Path | None:
        """run_report.json: status (finished | interrupted | failed), steps and every fault met (rank 0)."""
        if not self.is_main:
            return None
        report = {
            "status": status,
            "message": message,
            "step": self.step,
            "epoch": self.epoch,
            "world_size": self.dist.world_size,
            "last_checkpoint_step": self._last_saved.get("last"),
            "num_nonfinite_steps": sum(1 for f in self.faults["nonfinite_steps"] if f["kind"] != "amp_overflow"),
            "num_skipped_clips": len(set(self.skipped)),
            **self.faults,
        }
        path = self.run_dir / "run_report.json"
        atomic_write_text(path, json.dumps(report, indent=2, default=str))
        return path

    # ------------------------------------------------------------------ training
    def fit(self) -> dict[str, Any]:
        """Train with val-based selection; then evaluate the best checkpoint on test once.

        Returns the result dict; {'interrupted': True, ...} when stopped by a signal or
        trainer.interrupt_after_steps (checkpoints/last.ckpt then holds a resumable state).
        """
        if self.is_main:
            from avs.engine.outputs import check_output_path

            check_output_path(self.run_dir, [self.cfg.data.root], what="run dir")
        lock = claim_run_dir(self.run_dir, self._resume_path, self.is_main, self.dist.enabled)
        with StopSignal() as stop:
            self._stop = stop
            try:
                return self._fit()
            except BaseException as exc:
                self.close_loaders()
                self._close_writer()
                if self.is_main and self.run_dir.is_dir():
                    try:
                        self.write_run_report("failed", f"{type(exc).__name__}: {exc}")
                    except OSError:
                        pass
                raise
            finally:
                self._stop = None
                if lock is not None:
                    lock.release()

    def _stop_requested(self) -> bool:
        flag = self._stop is not None and self._stop.requested
        return D.any_true(flag) if self.dist.enabled else flag

    def _interrupt(self, reason: str, bar) -> dict[str, Any]:
        self.faults["interruptions"].append({"step": self.step, "epoch": self.epoch, "reason": reason})
        self.close_loaders()
        self._merge_skipped("train")
        self.save("last")
        bar.close()
        self._close_writer()
        self.write_run_report("interrupted", reason)
        log.warning(
            "stopped by %s at step %d: saved %s; resume with trainer.resume=auto hydra.run.dir=%s "
            "(or trainer.resume=%s)", reason, self.step, self.ckpt_dir / "last.ckpt", self.run_dir, self.run_dir,
        )
        signal_name = self._stop.name if self._stop is not None and self._stop.requested else None
        return {"interrupted": True, "step": self.step, "reason": reason, "signal": signal_name}

    def _fit(self) -> dict[str, Any]:
        tcfg = self.tcfg
        train_ds = self.dataset("train")
        bs = int(self.cfg.data.batch_size)
        accum = max(1, int(tcfg.get("grad_accum", 1)))
        drop_last = bool(tcfg.get("drop_last", False))
        if not drop_last and str(tcfg.get("compile", False)).lower() not in ("false", "off", "none"):
            # a smaller last batch would recompile every compiled graph (the batch dimension is specialised)
            log.info("trainer.compile: the short last batch of each epoch is dropped (as trainer.drop_last=true), "
                     "so the compiled training graphs are never recompiled")
            drop_last = True
        sampler = ResumableSampler(
            len(train_ds), shuffle=True, seed=int(self.cfg.seed), num_replicas=self.dist.world_size, rank=self.dist.rank,
            with_epoch=True,  # the (epoch, index) pairs seed the flips, also in persistent workers
        )
        shard = len(sampler)
        batches_per_epoch = shard // bs if drop_last else math.ceil(shard / bs)
        if batches_per_epoch == 0:
            raise ValueError(f"data.batch_size={bs} is larger than the train split ({shard} clips per process) with drop_last")
        steps_per_epoch = max(1, batches_per_epoch // accum)
        max_steps = int(tcfg.get("max_steps") or 0)
        epochs = int(tcfg.epochs)
        total_steps = max_steps if max_steps > 0 else epochs * steps_per_epoch
        if max_steps > 0:
            epochs = math.inf  # the step count ends the run (also one extended on resume past a cut-short epoch)
        self.scheduler = build_scheduler(self.optimizer, self.tcfg, total_steps)
        if self._resume_path is not None:
            self.resume()
        elif tcfg.get("resume") == "auto":
            log.info("trainer.resume=auto: no checkpoint in %s, starting fresh", self.ckpt_dir)
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._clean_stale_temps()
            atomic_write_text(self.run_dir / "config_resolved.yaml", OmegaConf.to_yaml(self.cfg, resolve=True))
        self._net = self._compile(self._wrap_ddp())
        self._eval_net = self._net if not self.dist.enabled else self._compile(self.model)
        if self._save_on_start:
            self.save("last")

        val_every = int(tcfg.get("val_every_epochs", 1))
        ckpt_every = int(tcfg.get("checkpoint_every_steps", 0) or 0)
        interrupt_after = int(tcfg.get("interrupt_after_steps", 0) or 0)
        log_every = int(tcfg.get("log_every_steps", 10))
        clip = float(tcfg.get("grad_clip", 0) or 0)
        max_bad = int(tcfg.get("max_consecutive_nonfinite", 3))
        nan_steps = {int(s) for s in (tcfg.get("debug_nan_steps") or [])}
        skip_mode = self.cfg.data.get("on_error", "raise") == "skip"
        t0 = time.time()
        show = bool(tcfg.get("progress", True)) and self.is_main
        bar = tqdm(total=total_steps, initial=min(self.step, total_steps), desc="train", disable=not show, dynamic_ncols=True)

        def finished() -> bool:  # every step taken and the last epoch's end (validation, save) done
            return self.batch_in_epoch == 0 and (self.step >= total_steps or self.epoch >= epochs)

        while not finished():
            if self.step < total_steps:
                sampler.set_epoch(self.epoch, start=self.batch_in_epoch * bs)
                train_ds.set_epoch(self.epoch)
                loader = self._loader("train", sampler=sampler, batch_size=bs)
                self.model.train()
                micro = 0
                window = LossWindow()  # the window's losses stay on the device until the optimizer step
                window_ids: list[str] = []
                self.optimizer.zero_grad(set_to_none=True)
                it = iter(loader)
                failed = True
                try:
                    while True:
                        try:
                            batch = next(it)
                        except StopIteration:
                            break
                        except RuntimeError as exc:  # e.g. a DataLoader worker that a SIGTERM ended
                            if self.dist.enabled or self._stop is None or not self._stop.requested:
                                raise
                            log.warning("data loading stopped during shutdown (%s)", str(exc).splitlines()[0])
                            self.batch_in_epoch -= micro % accum  # an unfinished accumulation window is replayed
                            return self._interrupt(self._stop.name or "a stop signal", bar)
                        self._note_skipped("train", batch)
                        has_data = "frames" in batch
                        if skip_mode and self.dist.enabled:  # every rank must run the same forwards (DDP)
                            has_data = D.all_true(has_data)
                        if not has_data:  # data.on_error=skip and every clip of the batch failed
                            self.batch_in_epoch += 1
                            continue
                        if drop_last and self.batch_in_epoch >= batches_per_epoch:
                            # the short last batch, told by position: every DDP rank agrees (a batch that
                            # data.on_error=skip shortened on one rank only is trained, not an epoch end)
                            break
                        batch = _move(batch, self.device)
                        sync = (micro + 1) % accum == 0
                        ctx = self._net.no_sync() if self.dist.enabled and not sync else nullcontext()
                        with ctx:
                            with self._autocast():
                                terms = self._net(batch)
                            loss = sum(self.loss_weights.get(k, 0.0) * v for k, v in terms.items())
                            if self.step + 1 in nan_steps:  # testing aid (trainer.debug_nan_steps)
                                loss = loss * float("nan")
                            window.add(loss, terms)  # no host sync: checked once at the optimizer step
                            window_ids += list(batch.get("video_id", []))
                            # backward even for a non-finite loss: every DDP rank must join the gradient all-reduce
                            self.scaler.scale(loss / accum).backward()
                        micro += 1
                        self.batch_in_epoch += 1
                        if micro % accum:
                            continue
                        outcome = self._optimizer_step(clip, window.nonfinite())
                        self.step += 1
                        self._loss_log.add(loss)  # read in batches (logging steps, checkpoints): no sync per step
                        if outcome != "ok":
                            self._record_nonfinite(outcome, window_ids, window.bad_terms(), float(loss.detach()))
                        window, window_ids = LossWindow(), []
                        bar.update(1)
                        if outcome == "ok" and (self.step % log_every == 0 or self.step == 1):
                            loss_value = self._loss_log.flush(self.loss_history)[-1]
                            bar.set_postfix(loss=f"{loss_value:.4f}", epoch=self.epoch)
                            scalars = {k: float(v.detach()) for k, v in terms.items()}
                            scalars["total"] = loss_value
                            scalars["lr"] = self.optimizer.param_groups[0]["lr"]
                            self._log_scalars("train", scalars, self.step)
                        if self.consecutive_nonfinite >= max_bad:
                            self._stop_nonfinite(bar)
                        if ckpt_every and self.step % ckpt_every == 0:
                            self.save("last")
                        if interrupt_after and self.step >= interrupt_after:
                            return self._interrupt(f"trainer.interrupt_after_steps={interrupt_after}", bar)
                        if self._stop_requested():
                            return self._interrupt(self._stop.name if self._stop and self._stop.requested else "a stop signal", bar)
                        if self.step >= total_steps:
                            break
                    failed = False
                finally:
                    self._end_pass(it, loader, failed)
            # end of epoch (also reached on resume from a checkpoint written after the epoch's last step)
            self.epoch += 1
            self.batch_in_epoch = 0
            last_epoch = self.step >= total_steps or self.epoch >= epochs
            if self.epoch % val_every == 0 or last_epoch:
                self._validate()
            self.save("last")
            if self._stop_requested():
                return self._interrupt(self._stop.name if self._stop and self._stop.requested else "a stop signal", bar)
        bar.close()
        train_time = time.time() - t0
        return self._finish(train_time)

    def _optimizer_step(self, clip: float, loss_bad: bool) -> str:
        """Unscale, check, clip and apply the accumulated gradients -> 'ok' | 'loss' | 'grad' | 'amp_overflow'."""
        self.scaler.unscale_(self.optimizer)  # no-op without fp16 AMP
        params = [p for p in self.model.parameters() if p.grad is not None]
        if clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, clip)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params]) if params else torch.zeros(())
        # one host sync for both flags; grads are already all-reduced: same grad answer on every rank
        loss_bad, grad_bad = read_step_flags(loss_bad, norm)
        if self.dist.enabled:
            loss_bad = D.any_true(loss_bad)
        if self.scaler.is_enabled() and grad_bad and not loss_bad:
            outcome = "amp_overflow"  # the GradScaler skips this update and lowers its scale
            self.scaler.step(self.optimizer)
        elif loss_bad or grad_bad:
            outcome = "loss" if loss_bad else "grad"
        else:
            outcome = "ok"
            self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.scheduler is not None:
            with warnings.catch_warnings():  # a skipped first update makes torch warn about the call order
                warnings.simplefilter("ignore", UserWarning)
                self.scheduler.step()
        if outcome in ("loss", "grad"):
            self.consecutive_nonfinite += 1
        elif outcome == "ok":
            self.consecutive_nonfinite = 0
        return outcome

    def _record_nonfinite(self, kind: str, video_ids: list[str], terms: dict[str, float], loss_value: float) -> None:
        ids = list(dict.fromkeys(video_ids))
        if self.dist.enabled:  # the clips of every rank
            ids = list(dict.fromkeys(v for part in D.gather_objects(ids) for v in part))
        entry = {"step": self.step, "epoch": self.epoch, "kind": kind, "video_ids": ids,
                 "terms": {k: (v if math.isfinite(v) else str(v)) for k, v in terms.items()}}
        self.faults["nonfinite_steps"].append(entry)
        if kind == "amp_overflow":
            log.info("step %d: fp16 gradient overflow, update skipped by the GradScaler (scale now %.1f)",
                     self.step, self.scaler.get_scale())
            return
        what = f"loss {loss_value}" if kind == "loss" else "gradient"
        log.warning(
            "step %d: non-finite %s%s; optimizer update skipped (%d in a row). clips: %s",
            self.step, what, f" (terms {entry['terms']})" if terms else "", self.consecutive_nonfinite, ", ".join(ids),
        )

    def _stop_nonfinite(self, bar) -> None:
        bad = [f for f in self.faults["nonfinite_steps"] if f["kind"] != "amp_overflow"][-self.consecutive_nonfinite :]
        steps = [f["step"] for f in bad]
        clips = sorted({v for f in bad for v in f["video_ids"]})
        self.faults["interruptions"].append({"step": self.step, "epoch": self.epoch, "reason": "non-finite"})
        self._merge_skipped("train")
        self.save("last")  # the weights are the last good ones: the bad updates were never applied
        bar.close()
        self._close_writer()
        msg = (
            f"{self.consecutive_nonfinite} consecutive steps with a non-finite loss or gradient (steps {steps}; "
            f"clips {clips}); stopped. {self.ckpt_dir / 'last.ckpt'} holds the last good weights "
            f"(no update was applied at those steps). Lower trainer.lr, set trainer.grad_clip, check those clips, "
            f"or raise trainer.max_consecutive_nonfinite; resume with trainer.resume={self.run_dir}"
        )
        self.write_run_report("failed", msg)
        log.error(msg)
        raise NonFiniteLossError(msg)

    def _validate(self) -> None:
        split = str(self.tcfg.get("select_split", "val"))  # test only with allow_test_selection (config check)
        metrics = self.evaluate(split, log_images=True)
        key = str(self.tcfg.get("select_metric", "miou"))
        protocol = str(self.cfg.eval.protocol)
        value = metrics[protocol][key]
        entry = {"epoch": self.epoch, "step": self.step, split: metrics}
        self.history.append(entry)
        self._log_scalars("val", {f"{protocol}/{k}": v for k, v in metrics[protocol].items() if isinstance(v, (int, float))}, self.step)
        if value > self.best["metric"]:
            self.best = {"metric": float(value), "epoch": self.epoch, "step": self.step, "val": metrics}
            self.save("best")
            log.info("new best val %s/%s = %.4f at epoch %d", protocol, key, value, self.epoch)

    def _finish(self, train_time: float) -> dict[str, Any]:
        """Load the best checkpoint, evaluate test once, write metrics.json and run_report.json."""
        selection_split = str(self.tcfg.get("select_split", "val"))
        best_path = self.ckpt_dir / "best.ckpt"
        self._loss_log.flush(self.loss_history)
        D.barrier()
        if best_path.exists():
            self.model.load_state_dict(load_checkpoint(best_path)["model"])
        self._merge_skipped("train")
        result: dict[str, Any] = {"best": self.best, "train_time_s": train_time, "steps": self.step}
        if self.tcfg.get("test_at_end", True):
            result["test"] = self.evaluate("test")
        self.close_loaders()
        if self.is_main:
            self._write_metrics(result, selection_split)
            self.write_run_report("finished")
        self._close_writer()
        if self.faults["nonfinite_steps"] or self.skipped:
            log.warning("run finished with %d skipped step(s) and %d skipped clip(s): see %s",
                        len(self.faults["nonfinite_steps"]), len(set(self.skipped)), self.run_dir / "run_report.json")
        return result

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(
        self, split: str, save_masks_dir: str | Path | None = None, log_images: bool = False
    ) -> dict[str, dict[str, float]]:
        """Metrics of the current weights on `split` under every configured protocol.

        `log_images`: also write frame | GT | prediction overlays of the first batch to TensorBoard.

        Under DDP each rank scores a shard (padded with repeats that the accumulator drops by clip
        index) and the per-frame statistics are gathered, so every rank returns the metrics of
        the whole split, exactly as a single process would.
        """
        ecfg = self.cfg.eval
        ds = self.dataset(split)
        sampler = None
        if self.dist.enabled:
            sampler = ResumableSampler(len(ds), shuffle=False, num_replicas=self.dist.world_size, rank=self.dist.rank)
            D.broadcast_buffers(self.model)  # BatchNorm statistics drift per rank in DDP training
        loader = self._loader(split, sampler=sampler, batch_size=int(self.cfg.data.eval_batch_size))
        acc = MetricAccumulator()
        self.model.eval()
        show = bool(self.tcfg.get("progress", True)) and self.is_main
        it = iter(loader)
        failed = True
        net = self._eval_net if self._eval_net is not None else self.model
        try:
            for batch in tqdm(it, total=len(loader), desc=f"eval {split}", leave=False, disable=not show):
                self._note_skipped(split, batch)
                if "frames" not in batch:
                    continue
                batch = _move(batch, self.device)
                n = int(batch["frames"].shape[0])
                full = int(self.cfg.data.eval_batch_size)
                compiled = hasattr(net, "_orig_mod")  # a torch.compile wrapper
                with self._autocast():  # compiled: a short batch is padded, so one graph serves every batch
                    out = net(pad_batch(batch, full) if compiled and n < full else batch)
                logits = out["logits"][:n].float()
                acc.update(logits, batch["masks"], indices=batch["index"])
                if log_images and self.is_main and self.writer() is not None:
                    from avs.engine.visuals import overlay_grid

                    self.writer().add_image(f"{split}/masks", overlay_grid(batch["frames"], batch["masks"], logits), self.step)
                    log_images = False  # the first batch only
                if save_masks_dir is not None:
                    from avs.engine.outputs import save_pred_masks

                    save_pred_masks(save_masks_dir, ds, batch, logits)
            failed = False
        finally:
            self._end_pass(it, loader, failed)
        if self.dist.enabled:
            acc = acc.all_gather()
            self._merge_skipped(split)
        protocols = list(ecfg.protocols)
        lb = int(ecfg.get("legacy_batch_size", self.cfg.data.eval_batch_size))
        if len(acc) == 0:
            raise TrainingError(f"no clip of the {split} split could be evaluated (all skipped? see run_report.json)")
        return {p: acc.compute(p, legacy_batch_size=lb) for p in protocols}

    def _write_metrics(self, result: dict[str, Any], selection_split: str) -> None:
        cfg = self.cfg
        record = {
            "method": cfg.model.get("name"),
            "backbone": cfg.backbone.get("name"),
            "data": {
                "name": cfg.data.get("name"),
                "subset": cfg.data.subset,
                "release": cfg.data.get("release", "synthetic" if cfg.data.get("synthetic") else "avsbench-object"),
                "root": str(cfg.data.root),
            },
            "resolution": int(cfg.data.image_size),
            "num_frames": int(cfg.data.num_frames),
            "metric_protocols": list(cfg.eval.protocols),
            "selection": {"split": selection_split, "protocol": str(cfg.eval.protocol), "metric": str(self.tcfg.get("select_metric", "miou"))},
            "eval_batch_size": int(cfg.data.eval_batch_size),
            "legacy_batch_size": int(cfg.eval.get("legacy_batch_size", cfg.data.eval_batch_size)),
            "init_from": cfg.model.get("init_from"),
            "supervised_frames": "first" if cfg.data.subset == "s4" else "all",
            "seed": int(cfg.seed),
            "world_size": self.dist.world_size,
            "global_batch_size": int(cfg.data.batch_size) * self.dist.world_size * max(1, int(self.tcfg.get("grad_accum", 1))),
            "git_commit": git_commit(),
            "loss_weights": self.loss_weights,
            "skipped_clips": sorted(set(self.skipped)),
            "faults": {
                "nonfinite_steps": [f["step"] for f in self.faults["nonfinite_steps"] if f["kind"] != "amp_overflow"],
                "amp_overflow_steps": [f["step"] for f in self.faults["nonfinite_steps"] if f["kind"] == "amp_overflow"],
                "interruptions": self.faults["interruptions"],
                "resumed_from": self.faults["resumed_from"],
            },
            "val": self.best.get("val"),
            "test": result.get("test"),
            "best_epoch": self.best.get("epoch"),
            "best_step": self.best.get("step"),
            "steps": result["steps"],
            "train_time_s": result["train_time_s"],
            "history": self.history,
            "config": OmegaConf.to_container(cfg, resolve=True),
        }
        atomic_write_text(self.run_dir / "metrics.json", json.dumps(record, indent=2, default=str))
