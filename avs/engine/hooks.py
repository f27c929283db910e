"""Hooks of the training loop (avs.engine.loop.TrainLoop), each one concern of a run.

Which hooks run, and in which order, is config: the `hooks` group (configs/hooks/default.yaml, built by
avs.engine.hook_config) lists the built-in ones by name with a `priority` (lower runs first): `LoggingHook`
(progress bar, TensorBoard), `NonFiniteGuard`, `ValidationHook` (val + best selection), `CheckpointHook`,
`InterruptAfterHook`, `SignalHook` (SIGTERM / SIGINT), when configured `KLWarmupHook` (the `kl` weight's
ramp) and `LatentKLHook` (per-dimension KL in each validation), the user's hooks, `FinalEvaluationHook`
(best weights, test at the end), `MetricsHook` (metrics.json), `RunReportHook` (run_report.json). Fault
handling is described in docs/reliability.md.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tqdm import tqdm

from avs.engine import distributed as D
from avs.engine.checkpoint import load_checkpoint
from avs.engine.loop import NonFiniteLossError, StopTraining
from avs.engine.records import metrics_record, write_metrics, write_run_report
from avs.engine.rundir import BEST_CKPT, CHECKPOINT_DIR, LAST_CKPT, resume_advice
from avs.errors import ConfigError

log = logging.getLogger(__name__)


class HookBase:
    """A hook does nothing at any event unless it overrides it; `loop` is set when registered.

    Events, in order: before_train; per epoch before_epoch, then per optimizer step before_step,
    after_backward, after_step; after_epoch; after_train (on_interrupt / on_failure instead when
    stopped). `after_backward` runs once per optimizer step with the step's gradients in place
    (accumulated over trainer.grad_accum micro-batches, all-reduced under DDP, unscaled by the fp16
    GradScaler), before clipping, the non-finite check and the update; `loop.grad_norm` is their total
    L2 norm, a 0-dim device tensor that clipping uses too (no extra host sync unless the hook reads it
    with float()). A hook must not change the gradients there: clipping uses the norm computed before.

    A hook with state returns it from `state_dict()` (tensors, numbers, strings, lists, dicts: what a
    weights_only checkpoint holds); it is saved in every checkpoint under `hooks.<name>` (rank 0's state
    under DDP) and handed to `load_state_dict` on resume. `evaluators(split)` returns evaluators to run
    in every evaluation of `split` (their summaries are then in `loop.evaluations[split][<name>]`).
    """

    loop: Any = None
    name: str = ""  # its key in the `hooks` config (or trainer.hooks[i]); names its state in a checkpoint

    def before_train(self) -> None: ...

    def before_epoch(self) -> None: ...

    def before_step(self) -> None: ...

    def after_backward(self) -> None: ...

    def after_step(self) -> None: ...

    def after_epoch(self) -> None: ...

    def after_train(self) -> None: ...

    def on_interrupt(self, reason: str) -> None: ...

    def on_failure(self, exc: BaseException) -> None: ...

    def evaluators(self, split: str) -> list[Any]:
        return []

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class TensorBoard:
    """The run's TensorBoard writer, opened on first use (rank 0, when `enabled`)."""

    def __init__(self, run_dir: str | Path, enabled: bool) -> None:
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.purge_step: int | None = None  # a resumed run: hides events the stopped run logged after its checkpoint
        self._writer = None

    def writer(self):
        if self._writer is None and self.enabled:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=self.purge_step)
        return self._writer

    def scalars(self, prefix: str, values: dict[str, float], step: int) -> None:
        w = self.writer()
        if w is not None:
            for k, v in values.items():
                w.add_scalar(f"{prefix}/{k}", v, step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class LoggingHook(HookBase):
    """Progress bar, and the losses and lr to TensorBoard every `log_every` steps (and at step 1)."""

    def __init__(self, tb: TensorBoard, log_every: int, progress: bool) -> None:
        self.tb, self.log_every, self.progress = tb, log_every, progress
        self.bar: tqdm | None = None

    def before_train(self) -> None:
        total = self.loop.plan.total_steps
        self.bar = tqdm(
            total=total,
            initial=min(self.loop.state.step, total),
            desc="train",
            disable=not self.progress,
            dynamic_ncols=True,
        )

    def after_step(self) -> None:
        loop, last = self.loop, self.loop.last
        self.bar.update(1)
        if last.outcome == "ok" and (loop.state.step % self.log_every == 0 or loop.state.step == 1):
            loss_value = loop.state.flush_losses()[-1]
            self.bar.set_postfix(loss=f"{loss_value:.4f}", epoch=loop.state.epoch)
            scalars = {k: float(v.detach()) for k, v in last.terms.items()}
            scalars["total"] = loss_value
            scalars["lr"] = loop.optimizer.param_groups[0]["lr"]
            self.tb.scalars("train", scalars, loop.state.step)

    def _close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.tb.close()

    def after_train(self) -> None:
        self._close()

    def on_interrupt(self, reason: str) -> None:
        self._close()

    def on_failure(self, exc: BaseException) -> None:
        self._close()


class NonFiniteGuard(HookBase):
    """After `max_bad` consecutive non-finite steps: save last.ckpt (the last good weights) and fail."""

    def __init__(self, max_bad: int, save: Callable[[str], Any], run_dir: str | Path) -> None:
        self.max_bad, self.save, self.run_dir = max_bad, save, Path(run_dir)

    def after_step(self) -> None:
        s = self.loop.state
        if s.consecutive_nonfinite < self.max_bad:
            return
        bad = s.bad_steps()[-s.consecutive_nonfinite :]
        steps = [f["step"] for f in bad]
        clips = sorted({v for f in bad for v in f["video_ids"]})
        s.interrupted("non-finite")
        s.merge_skipped("train", self.loop.dist.enabled)
        self.save("last")  # the weights are the last good ones: the bad updates were never applied
        msg = (
            f"{s.consecutive_nonfinite} consecutive steps with a non-finite loss or gradient (steps {steps}; "
            f"clips {clips}); stopped. {self.run_dir / 'checkpoints' / 'last.ckpt'} holds the last good weights "
            f"(no update was applied at those steps). Lower trainer.lr, set trainer.grad_clip, check those clips, "
            f"or raise trainer.max_consecutive_nonfinite; resume with trainer.resume={self.run_dir}"
        )
        log.error(msg)
        raise NonFiniteLossError(msg)


class ValidationHook(HookBase):
    """Every `every` epochs and after the last: evaluate the selection split; a better value saves best.ckpt."""

    def __init__(
        self,
        evaluate: Callable[..., dict],
        save: Callable[[str], Any],
        tb: TensorBoard,
        every: int,
        split: str,
        protocol: str,
        metric: str,
    ) -> None:
        self.evaluate, self.save, self.tb, self.every = evaluate, save, tb, every
        self.split, self.protocol, self.metric = split, protocol, metric

    def after_epoch(self) -> None:
        loop = self.loop
        last_epoch = loop.state.step >= loop.plan.total_steps or loop.state.epoch >= loop.plan.epochs
        if loop.state.epoch % self.every == 0 or last_epoch:
            self.validate()

    def validate(self) -> None:
        s = self.loop.state
        metrics = self.evaluate(self.split, log_images=True)
        value = metrics[self.protocol][self.metric]
        s.history.append({"epoch": s.epoch, "step": s.step, self.split: metrics})
        scalars = {f"{self.protocol}/{k}": v for k, v in metrics[self.protocol].items() if isinstance(v, (int, float))}
        self.tb.scalars("val", scalars, s.step)
        if value > s.best["metric"]:
            s.best = {"metric": float(value), "epoch": s.epoch, "step": s.step, "val": metrics}
            self.save("best")
            log.info("new best val %s/%s = %.4f at epoch %d", self.protocol, self.metric, value, s.epoch)


class CheckpointHook(HookBase):
    """last.ckpt every `every` steps (0 = off), at every epoch end and when the run is stopped."""

    def __init__(self, save: Callable[[str], Any], every: int) -> None:
        self.save, self.every = save, every

    def after_step(self) -> None:
        if self.every and self.loop.state.step % self.every == 0:
            self.save("last")

    def after_epoch(self) -> None:
        self.save("last")

    def on_interrupt(self, reason: str) -> None:
        self.save("last")


class InterruptAfterHook(HookBase):
    """trainer.interrupt_after_steps: stop (resumably) once that many steps are done; 0 = never."""

    def __init__(self, steps: int) -> None:
        self.steps = steps

    def after_step(self) -> None:
        if self.steps and self.loop.state.step >= self.steps:
            raise StopTraining(f"trainer.interrupt_after_steps={self.steps}")


class SignalHook(HookBase):
    """SIGTERM / SIGINT (the loop's StopSignal): stop after the current step or epoch end, on every rank."""

    def _check(self, agreed: bool | None = None) -> None:
        stop = self.loop.stop
        flag = stop is not None and stop.requested
        if agreed is None:
            agreed = D.any_true(flag) if self.loop.dist.enabled else flag
        if agreed:
            raise StopTraining(stop.name if stop is not None and stop.requested else "a stop signal")

    def after_step(self) -> None:
        # under DDP the loop OR-ed the stop request over the ranks with the step's flags: no collective here
        agreed = getattr(self.loop, "stop_agreed", None) if self.loop.dist.enabled else None
        self.loop.stop_agreed = None
        self._check(agreed)

    def after_epoch(self) -> None:
        self._check()


class FinalEvaluationHook(HookBase):
    """At the end: load best.ckpt into the model and, with `test_at_end`, evaluate the test split once."""

    def __init__(
        self, evaluate: Callable[..., dict], ckpt_dir: str | Path, test_at_end: bool, tb: TensorBoard | None = None
    ) -> None:
        self.evaluate, self.ckpt_dir, self.test_at_end = evaluate, Path(ckpt_dir), test_at_end
        self.tb = tb  # the test metrics go to TensorBoard as test/<protocol>/<metric> at the final step

    def after_train(self) -> None:
        loop = self.loop
        best_path = self.ckpt_dir / BEST_CKPT
        loop.state.flush_losses()
        D.barrier()
        if best_path.exists():
            loop.model.load_state_dict(load_checkpoint(best_path)["model"])
        loop.state.merge_skipped("train", loop.dist.enabled)
        if self.test_at_end:
            loop.result["test"] = self.evaluate("test")
            if self.tb is not None:
                scalars = {
                    f"{proto}/{k}": v
                    for proto, values in loop.result["test"].items()
                    if isinstance(values, dict)
                    for k, v in values.items()
                    if isinstance(v, (int, float)) and not isinstance(v, bool)
                }
                self.tb.scalars("test", scalars, loop.state.step)
                self.tb.close()  # flushed now (reopened on a later write)
        loop.data.close()


class MetricsHook(HookBase):
    """metrics.json of a finished run (rank 0)."""

    def __init__(self, cfg: Any, run_dir: str | Path, loss_weights: dict[str, float]) -> None:
        self.cfg, self.run_dir, self.loss_weights = cfg, Path(run_dir), loss_weights

    def after_train(self) -> None:
        loop = self.loop
        if loop.dist.is_main:
            record = metrics_record(self.cfg, loop.state, loop.result, loop.dist.world_size, self.loss_weights)
            write_metrics(self.run_dir, record)


class RunReportHook(HookBase):
    """run_report.json (rank 0): finished, interrupted (with how to resume) or failed."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)

    def write(self, status: str, message: str | None = None) -> None:
        if self.loop.dist.is_main:
            write_run_report(self.run_dir, self.loop.state, self.loop.dist.world_size, status, message)

    def after_train(self) -> None:
        s = self.loop.state
        self.write("finished")
        if s.faults["nonfinite_steps"] or s.skipped:
            log.warning(
                "run finished with %d skipped step(s) and %d skipped clip(s): see %s",
                len(s.faults["nonfinite_steps"]),
                len(set(s.skipped)),
                self.run_dir / "run_report.json",
            )

    def on_interrupt(self, reason: str) -> None:
        self.write("interrupted", reason)
        last = self.run_dir / CHECKPOINT_DIR / LAST_CKPT
        log.warning(
            "stopped by %s at step %d: saved %s; %s", reason, self.loop.state.step, last, resume_advice(self.run_dir)
        )

    def on_failure(self, exc: BaseException) -> None:
        if self.run_dir.is_dir():
            try:
                self.write("failed", f"{type(exc).__name__}: {exc}")
            except OSError:
                pass


class KLWarmupHook(HookBase):
    """KL warm-up (`trainer.kl_warmup`): before each optimizer step, the `term` loss weight is its configured
    value times a factor rising linearly from `start` to 1 over `steps` optimizer steps.

    With `cycle_steps` > 0 the ramp restarts every `cycle_steps` steps and the factor holds 1 for the
    rest of each cycle (cyclical annealing, Fu et al. 2019). The factor depends on the step count
    only, so a resumed run continues the schedule. The hook works on its own copy of the loop's
    weights: metrics.json keeps the configured ones. The current weight goes to TensorBoard as
    `train/weight/<term>` every `log_every` steps (and at step 1).
    """

    def __init__(
        self,
        steps: int,
        start: float = 0.0,
        cycle_steps: int = 0,
        term: str = "kl",
        tb: TensorBoard | None = None,
        log_every: int = 0,
    ) -> None:
        from avs.config_checks import check_kl_warmup  # the one rule, also checked before the run

        if check_kl_warmup(steps, start, cycle_steps) < 1:
            raise ConfigError(f"trainer.kl_warmup.steps must be >= 1 for the warm-up hook, got {steps}")
        self.steps, self.start, self.cycle_steps, self.term = int(steps), float(start), int(cycle_steps), term
        self.tb, self.log_every = tb, int(log_every)
        self.target = 0.0

    def factor(self, done: int) -> float:
        """The weight factor of the step that follows `done` completed optimizer steps."""
        if self.cycle_steps:
            done %= self.cycle_steps
        if done >= self.steps:
            return 1.0
        return self.start + (1.0 - self.start) * done / self.steps

    def before_train(self) -> None:
        self.loop.loss_weights = dict(self.loop.loss_weights)
        self.target = float(self.loop.loss_weights.get(self.term, 0.0))
        log.info(
            "KL warm-up: loss weight %s ramps from %g to %g over %d steps%s",
            self.term,
            self.start * self.target,
            self.target,
            self.steps,
            f", restarting every {self.cycle_steps} steps" if self.cycle_steps else "",
        )

    def before_step(self) -> None:
        self.loop.loss_weights[self.term] = self.target * self.factor(self.loop.state.step)

    def after_step(self) -> None:
        step = self.loop.state.step
        if self.tb is not None and self.log_every and (step % self.log_every == 0 or step == 1):
            self.tb.scalars("train", {f"weight/{self.term}": self.loop.loss_weights[self.term]}, step)


class LatentKLHook(HookBase):
    """`trainer.record_latent_kl`: every validation of `split` also runs a LatentKLEvaluator (the per-dimension
    KL(posterior || prior) of every latent code, avs.evaluation.evaluators); after each validation (a new
    entry in the run's history) its summary is appended to <run_dir>/latent_kl.jsonl by rank 0.

    Under DDP the evaluator gathers every rank's shard: the line covers the whole split.
    """

    def __init__(self, run_dir: str | Path, split: str = "val") -> None:
        self.run_dir, self.split = Path(run_dir), split
        self._recorded_step: int | None = None

    def evaluators(self, split: str) -> list[Any]:
        from avs.evaluation.evaluators import LatentKLEvaluator

        return [LatentKLEvaluator()] if split == self.split else []

    def after_epoch(self) -> None:
        loop, s = self.loop, self.loop.state
        if not loop.dist.is_main or not s.history or self._recorded_step == s.step:
            return
        last = s.history[-1]
        if last.get("epoch") != s.epoch or last.get("step") != s.step:
            return  # no validation at this epoch end
        self._recorded_step = s.step
        self.record()

    def record(self) -> Path:
        """Append the latest validation's latent KL (loop.evaluations[split]['latent_kl']) to latent_kl.jsonl."""
        from avs.engine.diagnostics import append_latent_kl, latent_kl_record

        s = self.loop.state
        result = self.loop.evaluations.get(self.split, {}).get("latent_kl")
        if result is None:
            raise RuntimeError(f"LatentKLHook: the {self.split} evaluation ran without its LatentKLEvaluator")
        record = latent_kl_record(result, epoch=s.epoch, step=s.step, split=self.split)
        return append_latent_kl(self.run_dir, record)
