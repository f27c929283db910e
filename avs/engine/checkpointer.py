"""Writes and restores the resumable state of a run: checkpoints/<name>.ckpt.

last.ckpt keys: model, optimizer, scaler, scheduler, epoch, step, batch_in_epoch, best, history,
loss_history, faults, consecutive_nonfinite, rng (and rng_per_rank under DDP), world_size, config,
avs_checkpoint_version, resumable=True. best.ckpt holds what evaluation, export, the demo, tables and
`init_from` need: the same keys without the `RESUME_ONLY_KEYS` (optimizer moments are two thirds of
a checkpoint's size), and resumable=False; a resume from it is refused (resume_check.load_for_resume).
Hook state: `hooks` ({hook name: state}) when a hook has state (HookBase.state_dict; rank 0's under DDP),
handed back to the hooks of the same names on resume (last.ckpt only). Writes are atomic; under DDP every
rank calls `save` and rank 0 writes.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from avs.engine import distributed as D
from avs.engine.amp import load_scaler_state
from avs.engine.build import seed_everything
from avs.engine.checkpoint import CheckpointError, capture_rng, restore_rng, save_checkpoint
from avs.engine.resume_check import load_for_resume, restore_optimizer
from avs.engine.rundir import BEST_CKPT, CHECKPOINT_DIR, resume_advice
from avs.engine.state import RunState
from avs.utils.io import atomic_save

log = logging.getLogger(__name__)

CHECKPOINT_VERSION = 2
#: the keys only resuming needs: in last.ckpt, not in best.ckpt
RESUME_ONLY_KEYS = ("optimizer", "scaler", "scheduler", "rng", "rng_per_rank", "hooks")
#: the checkpoint that holds the full resume state
RESUMABLE = ("last",)


class Checkpointer:
    """Saves the model, optimizer, scaler, scheduler and `RunState` of a run; restores them on resume."""

    def __init__(
        self,
        run_dir: str | Path,
        cfg: DictConfig,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler,
        state: RunState,
        dist: D.DistInfo,
        device: torch.device,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.ckpt_dir = self.run_dir / CHECKPOINT_DIR
        self.cfg, self.model, self.optimizer, self.scaler = cfg, model, optimizer, scaler
        self.state, self.dist, self.device = state, dist, device
        self.scheduler: Any = None  # set once the number of steps is known
        self.hooks: list[Any] = []  # the loop's hooks (attach_hooks), whose states are saved
        self._hook_states: dict[str, Any] = {}  # states read on resume, for hooks not attached yet

    def state_dict(self, resumable: bool = True) -> dict[str, Any]:
        """The checkpoint contents; without `resumable`, those of best.ckpt (no RESUME_ONLY_KEYS)."""
        s = self.state
        full = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            **s.checkpoint_entries(),
            "rng": capture_rng(),
            "world_size": self.dist.world_size,
            "config": OmegaConf.to_yaml(self.cfg, resolve=True),
            "avs_checkpoint_version": CHECKPOINT_VERSION,
            **self._hooks_entry(),
            "resumable": resumable,
        }
        return full if resumable else {k: v for k, v in full.items() if k not in RESUME_ONLY_KEYS}

    def _hooks_entry(self) -> dict[str, Any]:
        states = {h.name: state for h in self.hooks if (state := h.state_dict())}
        return {"hooks": states} if states else {}

    def attach_hooks(self, hooks: list[Any]) -> None:
        """Save these hooks' states from now on; hand them the states a resumed checkpoint holds."""
        self.hooks = list(hooks)
        self._load_hook_states()

    def _load_hook_states(self) -> None:
        if not self.hooks:
            return
        states, self._hook_states = self._hook_states, {}
        for hook in self.hooks:
            if hook.name in states:
                hook.load_state_dict(states.pop(hook.name))
        for name in states:
            log.warning("the checkpoint holds the state of hook %r, which this run does not have: not restored", name)

    def save(self, name: str) -> Path:
        """Write checkpoints/<name>.ckpt atomically (rank 0; every rank must call it under DDP).

        A failed write (e.g. disk full) leaves the previous file intact and raises CheckpointError
        on every rank with the step of the last good checkpoint.
        """
        path = self.ckpt_dir / f"{name}.ckpt"
        resumable = name in RESUMABLE
        self.state.flush_losses()
        rng_all = D.gather_objects(capture_rng()) if self.dist.enabled and resumable else None
        error: str | None = None
        if self.dist.is_main:
            ckpt = self.state_dict(resumable)
            if rng_all is not None:
                ckpt["rng_per_rank"] = rng_all
            try:
                save_checkpoint(path, ckpt)
            except CheckpointError as exc:
                error = str(exc)
        if self.dist.enabled:
            error = D.broadcast_object(error)
        if error is not None:
            prev = self.state.last_saved.get(name)
            where = f"step {prev}" if prev is not None else "none written by this process"
            log.error("checkpoint write failed at step %d: %s", self.state.step, error)
            raise CheckpointError(
                f"{error}; training stopped at step {self.state.step}. Previous {path.name}: {where}. "
                f"Free disk space, then {resume_advice(self.run_dir)}"
            )
        self.state.last_saved[name] = self.state.step
        return path

    def resume(self, path: Path, loaded: tuple[dict[str, Any], list[dict[str, Any]]] | None = None) -> None:
        """Restore everything from `path` (`loaded`: its already verified (state, config changes))."""
        ckpt, changes = loaded if loaded is not None else load_for_resume(path, self.cfg)
        try:
            self.model.load_state_dict(ckpt["model"])
            restore_optimizer(self.optimizer, self.scheduler, ckpt)
        except (KeyError, RuntimeError, ValueError) as exc:
            raise CheckpointError(
                f"{path}: does not fit this model/optimizer ({type(exc).__name__}: {str(exc)[:300]}); "
                "resume with the config the run was started with"
            ) from exc
        load_scaler_state(self.scaler, ckpt.get("scaler"), path)  # empty when written without fp16
        self.state.restore(ckpt)
        self._hook_states = dict(ckpt.get("hooks") or {})
        self._load_hook_states()
        self._restore_rng(ckpt, path)
        self.state.faults["resumed_from"].append({"path": str(path), "step": self.state.step, "changes": changes})
        self.adopt_best(path.parent / BEST_CKPT)
        s = self.state
        log.info(
            "resumed from %s at epoch %d, step %d (batch %d of the epoch)", path, s.epoch, s.step, s.batch_in_epoch
        )

    def _restore_rng(self, ckpt: dict[str, Any], path: Path) -> None:
        per_rank = ckpt.get("rng_per_rank")
        if per_rank is not None and len(per_rank) == self.dist.world_size:
            restore_rng(per_rank[self.dist.rank], own_device_only=self.device.type == "cuda")
            return
        restore_rng(ckpt["rng"])
        if self.dist.enabled:
            if self.dist.rank > 0:
                seed_everything(int(self.cfg.seed) + 7919 * self.dist.rank + self.state.step)
            log.warning(
                "%s was written by %s process(es), now %d: per-rank RNG streams re-derived",
                path,
                ckpt.get("world_size", 1),
                self.dist.world_size,
            )

    def adopt_best(self, src: Path) -> None:
        """Resuming into another run dir: copy the source run's best.ckpt so selection carries over."""
        dst = self.ckpt_dir / BEST_CKPT
        if not self.dist.is_main or not src.is_file() or (dst.exists() and dst.resolve() == src.resolve()):
            return
        with open(src, "rb") as fh_in:
            atomic_save(dst, lambda fh: shutil.copyfileobj(fh_in, fh))
        log.info("copied %s to %s (the best checkpoint so far)", src, dst)

    def clean_stale_temps(self) -> None:
        """Remove temp files left by a process killed mid-write (atomic writes never leave partial targets)."""
        for folder in (self.ckpt_dir, self.run_dir):
            if folder.is_dir():
                for tmp in folder.glob(".*.tmp"):
                    try:
                        tmp.unlink()
                        log.info("removed stale temp file %s", tmp)
                    except OSError:
                        pass
