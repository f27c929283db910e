"""The training loop alone: hook order, gradient accumulation, stops, failures and the non-finite skip."""

from __future__ import annotations

import pytest
import torch

from avs.engine.distributed import DistInfo
from avs.engine.hooks import HookBase
from avs.engine.loop import Plan, StopTraining, TrainLoop
from avs.engine.state import RunState

EVENTS = ("before_train", "before_epoch", "before_step", "after_step", "after_epoch", "after_train")


class TinyNet(torch.nn.Module):
    LOG_ONLY_TERMS = ("unused",)  # logged, not trained (an unweighted term would be refused)

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(3))

    def forward(self, batch):
        return {"a": ((batch["frames"] * self.w).sum(-1) - 1.0).pow(2).mean(), "unused": self.w.sum()}


class FakeData:
    """RunData's interface over in-memory batches."""

    def __init__(self, n: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.batches = [{"frames": torch.randn(1, 3, generator=g), "video_id": [f"v{i}"]} for i in range(n)]
        self.epochs_set: list[int] = []
        self.closed = 0

    def dataset(self, split):
        data = self

        class DS:
            def set_epoch(self, epoch):
                data.epochs_set.append(epoch)

        return DS()

    def loader(self, split, sampler=None, batch_size=None):
        return list(self.batches[sampler.start :])

    def end_pass(self, it, loader, failed):
        pass

    def close(self):
        self.closed += 1


class FakeSampler:
    start = 0

    def set_epoch(self, epoch, start=0):
        self.start = start


class Recorder(HookBase):
    def __init__(self, log: list) -> None:
        self.log = log

    def __getattribute__(self, name):
        if name in EVENTS:
            return lambda: object.__getattribute__(self, "log").append(name)
        return object.__getattribute__(self, name)

    def on_interrupt(self, reason):
        self.log.append(("on_interrupt", reason))

    def on_failure(self, exc):
        self.log.append(("on_failure", type(exc).__name__))


def make_loop(n_batches=2, epochs=2, accum=1, nan_steps=(), lr=0.1):
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    steps = epochs * (n_batches // accum)
    plan = Plan(
        batch_size=1,
        batches_per_epoch=n_batches,
        total_steps=steps,
        epochs=epochs,
        accum=accum,
        nan_steps=frozenset(nan_steps),
    )
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    return TrainLoop(
        model,
        model,
        opt,
        None,
        scaler,
        RunState(),
        FakeData(n_batches),
        FakeSampler(),
        plan,
        loss_weights={"a": 1.0},
        device=torch.device("cpu"),
        dist=DistInfo(),
    )


def test_hooks_are_called_in_order_around_epochs_and_steps():
    loop = make_loop(n_batches=2, epochs=2)
    log: list = []
    loop.register(Recorder(log))
    result = loop.train()
    epoch = ["before_epoch", "before_step", "after_step", "before_step", "after_step", "after_epoch"]
    assert log == ["before_train", *epoch, *epoch, "after_train"]
    assert result["steps"] == 4 and loop.state.epoch == 2 and loop.data.epochs_set == [0, 1]
    assert len(loop.state.flush_losses()) == 4


class GradNormSpy(HookBase):
    """Logs after_backward with the norm it is handed and the gradients' own norm at that moment."""

    def __init__(self, log: list) -> None:
        self.log = log

    def after_backward(self) -> None:
        own = float(torch.cat([p.grad.flatten() for p in self.loop.model.parameters() if p.grad is not None]).norm())
        self.log.append(("after_backward", float(self.loop.grad_norm), own))

    def after_step(self) -> None:
        self.log.append(("after_step", float(self.loop.last.grad_norm)))


def test_after_backward_sees_the_unclipped_gradients_and_their_norm_once_per_optimizer_step():
    loop = make_loop(n_batches=4, epochs=1, accum=2)
    loop.plan.clip = 1e-3
    log: list = []
    loop.register(GradNormSpy(log))
    loop.train()
    assert [e[0] for e in log] == ["after_backward", "after_step"] * 2  # one per optimizer step (2 micro-batches)
    for backward, step in zip(log[::2], log[1::2]):
        assert backward[1] == pytest.approx(backward[2], rel=1e-6) and backward[1] > 1e-3  # before clipping
        assert step[1] == backward[1]


def test_a_stopping_hook_lets_the_later_hooks_see_the_last_step():
    loop = make_loop(n_batches=2, epochs=3)
    log: list = []
    loop.register(StopAt(2), Recorder(log))
    loop.train()
    assert log[-2:] == ["after_step", ("on_interrupt", "test stop")] and log.count("after_step") == 2


def test_hooks_run_in_registration_order():
    loop = make_loop(n_batches=1, epochs=1)
    log: list = []
    loop.register(Recorder(log), Recorder(log))
    loop.train()
    assert log[:2] == ["before_train", "before_train"] and log[-2:] == ["after_train", "after_train"]


def test_gradient_accumulation_steps_once_per_window():
    loop = make_loop(n_batches=4, epochs=1, accum=2)
    calls = []
    original = loop.optimizer_step
    loop.optimizer_step = lambda clip, bad: calls.append(loop.state.batch_in_epoch) or original(clip, bad)
    loop.train()
    assert calls == [2, 4] and loop.state.step == 2


class StopAt(HookBase):
    def __init__(self, step: int) -> None:
        self.at = step

    def after_step(self):
        if self.loop.step == self.at:
            raise StopTraining("test stop")


def test_a_hook_stops_the_run_and_every_hook_hears_of_it():
    loop = make_loop(n_batches=2, epochs=3)
    log: list = []
    loop.register(StopAt(3), Recorder(log))
    result = loop.train()
    assert result == {"interrupted": True, "step": 3, "reason": "test stop", "signal": None}
    assert log[-1] == ("on_interrupt", "test stop") and "after_train" not in log
    assert loop.state.faults["interruptions"] == [{"step": 3, "epoch": 1, "reason": "test stop"}]
    assert loop.data.closed == 1


class Boom(HookBase):
    def after_epoch(self):
        raise OSError("disk gone")


def test_a_failure_reaches_every_hook_and_propagates():
    loop = make_loop()
    log: list = []
    loop.register(Boom(), Recorder(log))
    with pytest.raises(OSError, match="disk gone"):
        loop.train()
    assert log[-1] == ("on_failure", "OSError") and loop.data.closed == 1


def test_a_non_finite_loss_skips_the_update_and_is_recorded():
    loop = make_loop(n_batches=2, epochs=2, nan_steps=(2,))
    seen = {}

    class Watch(HookBase):
        def before_step(self):
            seen[self.loop.step + 1] = self.loop.model.w.detach().clone()

    loop.register(Watch())
    loop.train()
    after_2 = seen[3]
    assert torch.equal(seen[2], after_2)  # step 2 changed nothing
    assert not torch.equal(seen[1], seen[2])  # step 1 did
    bad = loop.state.faults["nonfinite_steps"]
    assert [(f["step"], f["kind"], f["video_ids"]) for f in bad] == [(2, "loss", ["v1"])]
    assert loop.state.consecutive_nonfinite == 0  # steps 3 and 4 were good again


def test_resumed_mid_epoch_starts_at_the_stored_batch():
    loop = make_loop(n_batches=2, epochs=2)
    loop.state.step, loop.state.batch_in_epoch = 1, 1
    log: list = []
    loop.register(Recorder(log))
    loop.train()
    assert loop.state.step == 4 and log.count("after_step") == 3
