"""The training loop: epochs of optimizer steps, with hooks called around them.

`TrainLoop.train()` calls, on every registered hook in order: before_train, then per epoch
before_epoch / (before_step, after_backward, after_step per optimizer step) / after_epoch, then
after_train (avs.engine.hooks.HookBase says when exactly each runs).
A hook stops the run by raising `StopTraining` (signals, trainer.interrupt_after_steps): the other
hooks still see that event, then every hook's `on_interrupt` runs and `train()` returns
{'interrupted': True, ...}. Any other exception runs every hook's `on_failure` and propagates.

One optimizer step: forwards under autocast, the weighted sum of the loss terms, gradient
accumulation over `trainer.grad_accum` batches, backward, unscaling (fp16), the total gradient norm
(`loop.grad_norm`), the after_backward hooks, clipping, and the update, which is skipped (never
applied) when the loss or a gradient is not finite.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from avs.engine import distributed as D
from avs.engine.build import weighted_loss
from avs.engine.state import RunState
from avs.engine.syncs import LossWindow, read_step_flags
from avs.errors import AVSError, ExitCode
from avs.evaluation.evaluator import move_to

log = logging.getLogger(__name__)


class TrainingError(AVSError, RuntimeError, code=ExitCode.RUN_FAILED):
    """Training cannot continue (the message says why and which checkpoint to resume from)."""


class NonFiniteLossError(TrainingError):
    """Too many consecutive steps had a non-finite loss or gradient."""


class StopTraining(Exception):
    """Raised by a hook to stop the run with a resumable checkpoint (`reason` is recorded)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class Plan:
    """How long the run is and how its epochs are cut into steps."""

    batch_size: int
    batches_per_epoch: int
    total_steps: int
    epochs: float  # math.inf when trainer.max_steps gives the length
    accum: int = 1
    drop_last: bool = False
    clip: float = 0.0  # trainer.grad_clip (0 = off)
    nan_steps: frozenset[int] = frozenset()  # trainer.debug_nan_steps: a testing aid


@dataclass
class StepOutcome:
    """The last optimizer step: 'ok' | 'loss' | 'grad' | 'amp_overflow', its loss, loss terms and the
    total gradient norm before clipping (a 0-dim device tensor)."""

    outcome: str
    loss: torch.Tensor
    terms: dict[str, torch.Tensor]
    grad_norm: torch.Tensor | None = None


class TrainLoop:
    """Owns the model, optimizer, scheduler, scaler and `RunState`; runs epochs and calls the hooks."""

    def __init__(
        self,
        model: torch.nn.Module,
        net: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        scaler: torch.amp.GradScaler,
        state: RunState,
        data: Any,
        sampler: Any,
        plan: Plan,
        *,
        loss_weights: dict[str, float],
        device: torch.device,
        dist: D.DistInfo,
        autocast: Callable[[], AbstractContextManager] = nullcontext,
        skip_mode: bool = False,
    ) -> None:
        self.model, self.net, self.optimizer, self.scheduler, self.scaler = model, net, optimizer, scheduler, scaler
        self.state, self.data, self.sampler, self.plan = state, data, sampler, plan
        self.loss_weights, self.device, self.dist, self.autocast = loss_weights, device, dist, autocast
        self.skip_mode = skip_mode  # data.on_error=skip: a batch may hold no clip
        self.hooks: list[Any] = []
        self.stop: Any = None  # the StopSignal of the run, if any
        self.last: StepOutcome | None = None
        self.grad_norm: torch.Tensor | None = None  # of the current step's gradients, from after_backward on
        self.evaluations: dict[str, dict[str, Any]] = {}  # split -> {evaluator name: summary} of its last evaluation
        self.result: dict[str, Any] = {}
        self.start_time = time.time()

    @property
    def step(self) -> int:
        return self.state.step

    @property
    def epoch(self) -> int:
        return self.state.epoch

    def register(self, *hooks: Any) -> None:
        for hook in hooks:
            hook.loop = self
            self.hooks.append(hook)

    def call(self, event: str, *args: Any) -> None:
        """`event` on every hook in order; a StopTraining is raised once every hook has seen the event
        (a hook after the one that stops still sees the last step, so its state matches the checkpoint)."""
        stop: StopTraining | None = None
        for hook in self.hooks:
            try:
                getattr(hook, event)(*args)
            except StopTraining as exc:
                stop = stop or exc
        if stop is not None:
            raise stop

    def finished(self) -> bool:
        """Every step taken and the last epoch's end (validation, save) done."""
        s = self.state
        return s.batch_in_epoch == 0 and (s.step >= self.plan.total_steps or s.epoch >= self.plan.epochs)

    # ------------------------------------------------------------------ the run
    def train(self) -> dict[str, Any]:
        """Train to the end of the plan -> result dict ({'interrupted': True, ...} when a hook stopped it)."""
        try:
            return self._train()
        except BaseException as exc:
            self.data.close()  # join persistent DataLoader workers
            for hook in self.hooks:
                try:
                    hook.on_failure(exc)
                except Exception as inner:  # noqa: BLE001  (the first error is the one to report)
                    log.debug("on_failure of %s: %s", type(hook).__name__, inner)
            raise

    def _train(self) -> dict[str, Any]:
        self.start_time = time.time()
        self.call("before_train")
        try:
            while not self.finished():
                if self.state.step < self.plan.total_steps:
                    self.call("before_epoch")
                    self.run_epoch()
                # end of epoch (also reached on resume from a checkpoint written after the epoch's last step)
                self.state.epoch += 1
                self.state.batch_in_epoch = 0
                self.call("after_epoch")
        except StopTraining as stop:
            return self._interrupt(stop.reason)
        self.result = {"best": self.state.best, "train_time_s": time.time() - self.start_time, "steps": self.state.step}
        self.call("after_train")
        return self.result

    def _interrupt(self, reason: str) -> dict[str, Any]:
        self.state.interrupted(reason)
        self.data.close()
        self.state.merge_skipped("train", self.dist.enabled)
        self.call("on_interrupt", reason)
        signal_name = self.stop.name if self.stop is not None and self.stop.requested else None
        return {"interrupted": True, "step": self.state.step, "reason": reason, "signal": signal_name}

    def _next(self, it: Any, micro: int) -> dict[str, Any] | None:
        """The next batch (None at the end of the pass)."""
        try:
            return next(it)
        except StopIteration:
            return None
        except RuntimeError as exc:  # e.g. a DataLoader worker that a SIGTERM ended
            if self.dist.enabled or self.stop is None or not self.stop.requested:
                raise
            log.warning("data loading stopped during shutdown (%s)", str(exc).splitlines()[0])
            self.state.batch_in_epoch -= micro % self.plan.accum  # an unfinished accumulation window is replayed
            raise StopTraining(self.stop.name or "a stop signal") from None

    def run_epoch(self) -> None:
        """One pass over the train loader (from the batch a resumed run stopped at)."""
        s, p = self.state, self.plan
        self.sampler.set_epoch(s.epoch, start=s.batch_in_epoch * p.batch_size)
        self.data.dataset("train").set_epoch(s.epoch)
        loader = self.data.loader("train", sampler=self.sampler, batch_size=p.batch_size)
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        it = iter(loader)
        failed = True
        try:
            self._run_batches(it)
            failed = False
        finally:
            self.data.end_pass(it, loader, failed)

    def _run_batches(self, it: Any) -> None:
        s, p = self.state, self.plan
        micro = 0
        window, window_ids = LossWindow(), []  # the window's losses stay on the device until the optimizer step
        while (batch := self._next(it, micro)) is not None:
            s.note_skipped("train", batch)
            has_data = "frames" in batch
            if self.skip_mode and self.dist.enabled:  # every rank must run the same forwards (DDP)
                has_data = D.all_true(has_data)
            if not has_data:  # data.on_error=skip and every clip of the batch failed
                s.batch_in_epoch += 1
                continue
            if p.drop_last and s.batch_in_epoch >= p.batches_per_epoch:
                # the short last batch, told by position: every DDP rank agrees (a batch that
                # data.on_error=skip shortened on one rank only is trained, not an epoch end)
                break
            if micro % p.accum == 0:
                self.call("before_step")
            loss, terms = self._forward_backward(batch, micro, window)
            window_ids += list(batch.get("video_id", []))
            micro += 1
            s.batch_in_epoch += 1
            if micro % p.accum:
                continue
            self._finish_step(loss, terms, window, window_ids)
            window, window_ids = LossWindow(), []
            if s.step >= p.total_steps:
                break

    def _forward_backward(self, batch: dict[str, Any], micro: int, window: LossWindow):
        batch = move_to(batch, self.device)
        sync = (micro + 1) % self.plan.accum == 0
        ctx = self.net.no_sync() if self.dist.enabled and not sync else nullcontext()
        with ctx:
            with self.autocast():
                terms = self.net(batch)
            loss = weighted_loss(terms, self.loss_weights, self.model)  # unweighted terms are refused
            if self.state.step + 1 in self.plan.nan_steps:  # testing aid (trainer.debug_nan_steps)
                loss = loss * float("nan")
            window.add(loss, terms)  # no host sync: checked once at the optimizer step
            # backward even for a non-finite loss: every DDP rank must join the gradient all-reduce
            self.scaler.scale(loss / self.plan.accum).backward()
        return loss, terms

    def _finish_step(
        self, loss: torch.Tensor, terms: dict[str, torch.Tensor], window: LossWindow, window_ids: list[str]
    ) -> None:
        outcome = self.optimizer_step(self.plan.clip, window.nonfinite())
        self.state.step += 1
        self.state.loss_log.add(loss)  # read in batches (logging steps, checkpoints): no sync per step
        if outcome != "ok":
            scale = self.scaler.get_scale() if self.scaler.is_enabled() else None
            self.state.record_nonfinite(outcome, window_ids, window.bad_terms(), float(loss.detach()), self.dist, scale)
        self.last = StepOutcome(outcome, loss, terms, self.grad_norm)
        self.call("after_step")

    # ------------------------------------------------------------------ the update
    def optimizer_step(self, clip: float, loss_bad: torch.Tensor | bool) -> str:
        """Unscale, measure, run the after_backward hooks, check, clip and apply the accumulated gradients
        -> 'ok' | 'loss' | 'grad' | 'amp_overflow'."""
        self.scaler.unscale_(self.optimizer)  # no-op without fp16 AMP
        params = [p for p in self.model.parameters() if p.grad is not None]
        # the norm clip_grad_norm_ computes, taken first so the hooks see it (one norm per step, no sync)
        norm = torch.nn.utils.get_total_norm([p.grad for p in params]) if params else torch.zeros(())
        self.grad_norm = norm
        self.call("after_backward")
        if clip > 0 and params:
            torch.nn.utils.clip_grads_with_norm_(params, clip, norm)
        # one host sync for the step's flags; under DDP they and a stop request are OR-ed over the ranks
        # on the device first (SignalHook reads `stop_agreed` instead of a collective of its own)
        stop = self.stop is not None and self.stop.requested
        loss_bad, grad_bad, self.stop_agreed = read_step_flags(loss_bad, norm, stop, across_ranks=self.dist.enabled)
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
            self.state.consecutive_nonfinite += 1
        elif outcome == "ok":
            self.state.consecutive_nonfinite = 0
        return outcome
