"""Trainer: builds one run from a composed config and trains it (avs.engine.loop.TrainLoop + hooks).

Fault handling (docs/reliability.md): every file is written atomically; SIGTERM / SIGINT save a
resumable checkpoint after the current step; non-finite losses or gradients skip the optimizer
update and stop the run after `trainer.max_consecutive_nonfinite` in a row; bad clips raise or are
skipped and reported (`data.on_error`). Distributed data parallel (docs/distributed.md): the
process group comes from the environment (torchrun); only rank 0 writes files.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from avs.data.loaders import RunData
from avs.engine import distributed as D
from avs.engine import hooks as H
from avs.engine.build import (
    amp_dtype,
    autocast_for,
    build_run_model,
    compile_module,
    resolve_loss_weights,
    resolve_resume_path,
    wrap_ddp,
)
from avs.engine.checkpointer import Checkpointer
from avs.engine.hook_config import build_hooks
from avs.engine.loop import NonFiniteLossError, Plan, TrainingError, TrainLoop  # noqa: F401  (the run's errors)
from avs.engine.optim import build_optimizer, build_scheduler
from avs.engine.records import write_run_report
from avs.engine.resume_check import load_for_resume
from avs.engine.rundir import CHECKPOINT_DIR, claim_run_dir
from avs.engine.sampler import ResumableSampler
from avs.engine.signals import StopSignal
from avs.engine.state import RunState
from avs.evaluation.evaluator import build_evaluators, evaluate_split
from avs.evaluation.evaluators import OverlayImages
from avs.utils.device import select_device
from avs.utils.io import atomic_write_text

log = logging.getLogger(__name__)


class Trainer:
    """Trains and evaluates one model from a composed config; writes everything under `run_dir` (rank 0)."""

    def __init__(self, cfg: DictConfig, run_dir: str | Path) -> None:
        from avs.config_checks import check_config, check_files

        check_config(cfg)
        check_files(cfg)  # data root and weight files, before any model is built
        self.cfg, self.tcfg = cfg, cfg.trainer
        self.dist = D.init_from_env()
        self.run_dir = Path(run_dir)
        self.ckpt_dir = self.run_dir / CHECKPOINT_DIR
        self.device = select_device(self.tcfg.device, self.dist.local_rank, self.dist.world_size, "trainer.device")
        self.loss_weights = resolve_loss_weights(cfg)
        self._resume_path = resolve_resume_path(self.tcfg.get("resume"), self.ckpt_dir)
        # the checkpoint to resume from is verified and its config compared before any model is built
        self._resume = load_for_resume(self._resume_path, cfg) if self._resume_path is not None else None
        self.model = build_run_model(cfg, self.device, self.dist)
        self.optimizer = build_optimizer(self.model.parameters(), self.tcfg)
        self.amp_dtype = amp_dtype(self.tcfg.amp, self.device)
        self.autocast = autocast_for(self.amp_dtype, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.state = RunState()
        self.data = RunData(cfg, is_main=self.is_main, cuda=self.device.type == "cuda", barrier=D.barrier)
        self.tb = H.TensorBoard(self.run_dir, enabled=self.is_main and bool(self.tcfg.tensorboard))
        self.checkpointer = Checkpointer(
            self.run_dir, cfg, self.model, self.optimizer, self.scaler, self.state, self.dist, self.device
        )
        self.loop: TrainLoop | None = None
        self._net: torch.nn.Module | None = None  # the module that runs training forwards (DDP wrapper or model)
        self._eval_net: torch.nn.Module | None = None  # the module that runs eval forwards (model, maybe compiled)

    @property
    def is_main(self) -> bool:
        """True on the process that writes files (rank 0; always in a single process)."""
        return self.dist.is_main

    # the run's counters and records live in `state`
    step = property(lambda self: self.state.step, lambda self, v: setattr(self.state, "step", v))
    epoch = property(lambda self: self.state.epoch)
    best = property(lambda self: self.state.best)
    history = property(lambda self: self.state.history)
    loss_history = property(lambda self: self.state.loss_history)
    skipped = property(lambda self: self.state.skipped)
    consecutive_nonfinite = property(lambda self: self.state.consecutive_nonfinite)

    # ------------------------------------------------------------------ checkpoints
    def save(self, name: str) -> Path:
        """Write checkpoints/<name>.ckpt (every rank calls it under DDP; rank 0 writes)."""
        self.checkpointer.scaler = self.scaler
        return self.checkpointer.save(name)

    def resume(self, spec: str | Path | None = None) -> bool:
        """Restore the state of `spec` (auto | run dir | checkpoint file; default trainer.resume). True if resumed."""
        path = resolve_resume_path(spec, self.ckpt_dir) if spec is not None else self._resume_path
        if path is None:
            log.info("trainer.resume=auto: no checkpoint in %s, starting fresh", self.ckpt_dir)
            return False
        loaded = self._resume if spec is None else None
        self._resume = None
        self.checkpointer.scaler = self.scaler
        self.checkpointer.resume(path, loaded)
        self.tb.purge_step = self.state.step + 1  # events the stopped run logged after this checkpoint are hidden
        return True

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, split: str, log_images: bool = False) -> dict[str, dict[str, float]]:
        """Metrics of the current weights on `split` under every configured protocol (all ranks agree).

        One evaluation pass runs every evaluator: the metrics, the user's `eval.evaluators`, those the
        hooks ask for (HookBase.evaluators) and, with `log_images`, frame | GT | prediction overlays of the
        first batch for TensorBoard. The other evaluators' summaries go to `loop.evaluations[split]`.
        """
        evaluators = build_evaluators(self.cfg.eval.get("evaluators"))
        if self.loop is not None:
            for hook in self.loop.hooks:
                evaluators += hook.evaluators(split)
        if log_images and self.is_main and self.tb.writer() is not None:
            step = self.state.step
            evaluators.append(OverlayImages(lambda grid: self.tb.writer().add_image(f"{split}/masks", grid, step)))
        net = self._eval_net if self._eval_net is not None else self.model
        show = bool(self.tcfg.progress) and self.is_main
        results = evaluate_split(
            net,
            self.data,
            split,
            self.cfg,
            device=self.device,
            dist=self.dist,
            model=self.model,
            autocast=self.autocast,
            state=self.state,
            evaluators=evaluators,
            progress=show,
        )
        metrics = results.pop("metrics")
        if self.loop is not None:
            self.loop.evaluations[split] = results
        return metrics

    # ------------------------------------------------------------------ training
    def fit(self) -> dict[str, Any]:
        """Train with val-based selection; then evaluate the best checkpoint on test once.

        Returns the result dict; {'interrupted': True, ...} when stopped by a signal or
        trainer.interrupt_after_steps (checkpoints/last.ckpt then holds a resumable state).
        """
        if self.is_main:
            from avs.evaluation.outputs import check_output_path

            check_output_path(self.run_dir, [self.cfg.data.root], what="run dir")
        lock = claim_run_dir(self.run_dir, self._resume_path, self.is_main, self.dist.enabled)
        try:
            with StopSignal() as stop:
                try:
                    self.loop = self._build_loop(stop)
                except BaseException as exc:
                    self._setup_failed(exc)
                    raise
                return self.loop.train()
        finally:
            if lock is not None:
                lock.release()

    def _setup_failed(self, exc: BaseException) -> None:
        self.data.close()
        self.tb.close()
        if self.is_main and self.run_dir.is_dir():
            try:
                message = f"{type(exc).__name__}: {exc}"
                write_run_report(self.run_dir, self.state, self.dist.world_size, "failed", message)
            except OSError:
                pass

    def _plan(self, num_clips: int) -> tuple[Plan, ResumableSampler]:
        """The run's length and epoch cut, and the train sampler (this process's shard)."""
        tcfg = self.tcfg
        bs = int(self.cfg.data.batch_size)
        accum = max(1, int(tcfg.grad_accum))
        drop_last = bool(tcfg.drop_last)
        if not drop_last and str(tcfg.compile).lower() not in ("false", "off", "none"):
            # a smaller last batch would recompile every compiled graph (the batch dimension is specialised)
            log.info(
                "trainer.compile: the short last batch of each epoch is dropped (as trainer.drop_last=true), "
                "so the compiled training graphs are never recompiled"
            )
            drop_last = True
        sampler = ResumableSampler(
            num_clips,
            shuffle=True,
            seed=int(self.cfg.seed),
            num_replicas=self.dist.world_size,
            rank=self.dist.rank,
            with_epoch=True,  # the (epoch, index) pairs seed the flips, also in persistent workers
        )
        shard = len(sampler)
        batches_per_epoch = shard // bs if drop_last else math.ceil(shard / bs)
        if batches_per_epoch == 0:
            raise ValueError(
                f"data.batch_size={bs} is larger than the train split ({shard} clips per process) with drop_last"
            )
        max_steps = int(tcfg.get("max_steps") or 0)
        total_steps = max_steps if max_steps > 0 else int(tcfg.epochs) * max(1, batches_per_epoch // accum)
        # with max_steps the step count ends the run (also one extended on resume past a cut-short epoch)
        epochs = math.inf if max_steps > 0 else int(tcfg.epochs)
        plan = Plan(
            batch_size=bs,
            batches_per_epoch=batches_per_epoch,
            total_steps=total_steps,
            epochs=epochs,
            accum=accum,
            drop_last=drop_last,
            clip=float(tcfg.grad_clip or 0),
            nan_steps=frozenset(int(s) for s in (tcfg.get("debug_nan_steps") or [])),
        )
        return plan, sampler

    def _build_loop(self, stop: StopSignal) -> TrainLoop:
        """Plan, schedule, resume, run-dir files, the compiled/DDP modules, then the loop with its hooks."""
        self.data.preflight(("train", "val", "test") if self.tcfg.test_at_end else ("train", "val"))
        plan, sampler = self._plan(len(self.data.dataset("train")))
        scheduler = build_scheduler(self.optimizer, self.tcfg, plan.total_steps)
        self.checkpointer.scheduler = scheduler
        save_on_start = False
        if self._resume_path is not None:
            self.resume()
            # resumed into another run dir: write last.ckpt there at once, so it is resumable itself
            save_on_start = self._resume_path.parent.resolve() != self.ckpt_dir.resolve()
        elif self.tcfg.get("resume") == "auto":
            log.info("trainer.resume=auto: no checkpoint in %s, starting fresh", self.ckpt_dir)
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.checkpointer.clean_stale_temps()
            atomic_write_text(self.run_dir / "config_resolved.yaml", OmegaConf.to_yaml(self.cfg, resolve=True))
        self._net = compile_module(wrap_ddp(self.model, self.cfg, self.device, self.dist), self.tcfg)
        self._eval_net = self._net if not self.dist.enabled else compile_module(self.model, self.tcfg)
        if save_on_start:
            self.save("last")
        loop = TrainLoop(
            self.model,
            self._net,
            self.optimizer,
            scheduler,
            self.scaler,
            self.state,
            self.data,
            sampler,
            plan,
            loss_weights=self.loss_weights,
            device=self.device,
            dist=self.dist,
            autocast=self.autocast,
            skip_mode=self.cfg.data.on_error == "skip",
        )
        loop.stop = stop
        loop.register(*build_hooks(self))  # the `hooks` group and trainer.hooks (avs.engine.hook_config)
        self.checkpointer.attach_hooks(loop.hooks)  # a resumed run's hook states are loaded here
        return loop
