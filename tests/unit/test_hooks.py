"""Each training hook alone, and the free evaluate()."""

from __future__ import annotations

import json
import signal
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from avs.engine.checkpoint import load_checkpoint
from avs.engine.checkpointer import CHECKPOINT_VERSION, Checkpointer
from avs.engine.distributed import DistInfo
from avs.engine.hooks import (
    CheckpointHook,
    HookBase,
    InterruptAfterHook,
    NonFiniteGuard,
    RunReportHook,
    SignalHook,
    TensorBoard,
    ValidationHook,
)
from avs.engine.loop import NonFiniteLossError, StopTraining
from avs.engine.signals import StopSignal
from avs.engine.state import RunState
from avs.evaluation import MetricsEvaluator, evaluate, metrics_of, pad_batch
from avs.metrics import MetricAccumulator


def fake_loop(**kw):
    plan = SimpleNamespace(total_steps=kw.pop("total_steps", 10), epochs=kw.pop("epochs", 5))
    return SimpleNamespace(state=RunState(), dist=DistInfo(), plan=plan, stop=None, result={}, **kw)


def attach(hook, loop):
    hook.loop = loop
    return hook


# ----------------------------------------------------------------------------- checkpoints
def _checkpointer(run_dir, seed):
    torch.manual_seed(seed)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    cfg = OmegaConf.create({"seed": 1, "trainer": {"lr": 1e-3}})
    return Checkpointer(
        run_dir,
        cfg,
        model,
        opt,
        torch.amp.GradScaler("cpu", enabled=False),
        RunState(),
        DistInfo(),
        torch.device("cpu"),
    )


def test_checkpoint_hook_writes_last_every_n_steps_and_at_epoch_end(tmp_path):
    saved = []
    loop = fake_loop()
    hook = attach(CheckpointHook(saved.append, every=2), loop)
    for step in (1, 2, 3, 4):
        loop.state.step = step
        hook.after_step()
    hook.after_epoch()
    hook.on_interrupt("x")
    assert saved == ["last", "last", "last", "last"]
    assert attach(CheckpointHook(saved.append, every=0), loop).after_step() is None and len(saved) == 4


def test_checkpointer_writes_and_restores_the_whole_state(tmp_path, monkeypatch):
    a = _checkpointer(tmp_path / "a", seed=0)
    a.state.step, a.state.epoch, a.state.batch_in_epoch = 7, 2, 1
    a.state.best = {"metric": 0.5, "epoch": 1, "step": 4}
    a.state.loss_history = [1.0, 0.5]
    path = a.save("last")
    ckpt = load_checkpoint(path)
    assert ckpt["avs_checkpoint_version"] == CHECKPOINT_VERSION and ckpt["step"] == 7
    assert a.state.last_saved == {"last": 7}
    b = _checkpointer(tmp_path / "b", seed=1)
    assert not torch.equal(a.model.weight, b.model.weight)
    monkeypatch.setattr("avs.engine.checkpointer.load_for_resume", lambda p, cfg: (load_checkpoint(p), []))
    b.resume(path)
    assert torch.equal(a.model.weight, b.model.weight)
    assert (b.state.step, b.state.epoch, b.state.batch_in_epoch) == (7, 2, 1)
    assert b.state.best["metric"] == 0.5 and b.state.loss_history == [1.0, 0.5]
    assert b.state.faults["resumed_from"] == [{"path": str(path), "step": 7, "changes": []}]


# ----------------------------------------------------------------------------- non-finite guard
def test_non_finite_guard_saves_and_stops_after_n_in_a_row(tmp_path):
    saved = []
    loop = fake_loop()
    guard = attach(NonFiniteGuard(3, saved.append, tmp_path), loop)
    s = loop.state
    for step in (2, 3):
        s.step, s.consecutive_nonfinite = step, step - 1
        s.faults["nonfinite_steps"].append({"step": step, "kind": "loss", "video_ids": [f"v{step}"]})
        guard.after_step()
    assert saved == []
    s.step, s.consecutive_nonfinite = 4, 3
    s.faults["nonfinite_steps"].append({"step": 4, "kind": "grad", "video_ids": ["v4"]})
    with pytest.raises(NonFiniteLossError, match=r"3 consecutive .*steps \[2, 3, 4\]; clips \['v2', 'v3', 'v4'\]"):
        guard.after_step()
    assert saved == ["last"] and s.faults["interruptions"][-1]["reason"] == "non-finite"


# ----------------------------------------------------------------------------- signals, interrupt_after
def test_signal_hook_stops_once_a_signal_arrived():
    loop = fake_loop()
    hook = attach(SignalHook(), loop)
    with StopSignal() as stop:
        loop.stop = stop
        hook.after_step()  # nothing requested yet
        stop.request(signal.SIGTERM)
        with pytest.raises(StopTraining, match="SIGTERM"):
            hook.after_step()
        with pytest.raises(StopTraining, match="SIGTERM"):
            hook.after_epoch()


def test_interrupt_after_stops_at_that_step():
    loop = fake_loop()
    hook = attach(InterruptAfterHook(3), loop)
    loop.state.step = 2
    hook.after_step()
    loop.state.step = 3
    with pytest.raises(StopTraining, match="trainer.interrupt_after_steps=3"):
        hook.after_step()


# ----------------------------------------------------------------------------- validation and selection
def test_validation_selects_the_best_val_value(tmp_path):
    values = iter([0.5, 0.3, 0.7, 0.6])
    asked = []

    def evaluate_split(split, log_images=False):
        asked.append((split, log_images))
        return {"legacy": {"miou": next(values)}}

    saved = []
    loop = fake_loop(epochs=4, total_steps=100)
    hook = attach(
        ValidationHook(
            evaluate_split,
            saved.append,
            TensorBoard(tmp_path, enabled=False),
            every=1,
            split="val",
            protocol="legacy",
            metric="miou",
        ),
        loop,
    )
    for epoch in (1, 2, 3, 4):
        loop.state.epoch, loop.state.step = epoch, 10 * epoch
        hook.after_epoch()
    assert asked == [("val", True)] * 4 and saved == ["best", "best"]
    assert loop.state.best["metric"] == 0.7 and loop.state.best["epoch"] == 3 and loop.state.best["step"] == 30
    assert [h["val"]["legacy"]["miou"] for h in loop.state.history] == [0.5, 0.3, 0.7, 0.6]


def test_validation_runs_every_n_epochs_and_after_the_last(tmp_path):
    calls = []
    loop = fake_loop(epochs=5, total_steps=100)
    hook = attach(
        ValidationHook(
            lambda s, log_images=False: calls.append(loop.state.epoch) or {"p": {"m": 0.0}},
            lambda name: None,
            TensorBoard(tmp_path, enabled=False),
            every=2,
            split="val",
            protocol="p",
            metric="m",
        ),
        loop,
    )
    for epoch in range(1, 6):
        loop.state.epoch = epoch
        hook.after_epoch()
    assert calls == [2, 4, 5]


# ----------------------------------------------------------------------------- run report
def test_run_report_hook_writes_each_status(tmp_path):
    loop = fake_loop()
    hook = attach(RunReportHook(tmp_path), loop)
    loop.state.step = 3
    loop.state.last_saved["last"] = 3
    hook.on_interrupt("trainer.interrupt_after_steps=3")
    report = json.loads((tmp_path / "run_report.json").read_text())
    assert report["status"] == "interrupted" and report["message"] == "trainer.interrupt_after_steps=3"
    assert report["step"] == 3 and report["last_checkpoint_step"] == 3
    hook.on_failure(RuntimeError("bad"))
    assert json.loads((tmp_path / "run_report.json").read_text())["message"] == "RuntimeError: bad"
    hook.after_train()
    assert json.loads((tmp_path / "run_report.json").read_text())["status"] == "finished"


# ----------------------------------------------------------------------------- evaluate()
class Seg(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 1, 1)

    def forward(self, batch):
        b, t = batch["frames"].shape[:2]
        return {"logits": self.conv(batch["frames"].flatten(0, 1)).view(b, t, 1, *batch["frames"].shape[-2:])}


def _batches():
    g = torch.Generator().manual_seed(0)
    out, index = [], 0
    for n in (3, 1):
        frames = torch.randn(n, 2, 3, 8, 8, generator=g)
        masks = (torch.rand(n, 2, 1, 8, 8, generator=g) > 0.5).float()
        out.append(
            {
                "frames": frames,
                "masks": masks,
                "index": torch.arange(index, index + n),
                "video_id": [f"v{i}" for i in range(index, index + n)],
            }
        )
        index += n
    return out


def test_evaluate_equals_scoring_the_batches_by_hand():
    torch.manual_seed(0)
    model = Seg()
    batches = _batches()
    expected = MetricAccumulator()
    with torch.no_grad():
        for b in batches:
            expected.update(model(b)["logits"].float(), b["masks"], indices=b["index"])
    seen = []
    skipped_batch = {"skipped": ["bad"]}  # every clip of this batch failed: no frames
    protocols = ["avsbench_legacy", "per_frame"]
    ev = MetricsEvaluator(protocols, 3)
    got = evaluate(model, [batches[0], skipped_batch, batches[1]], [ev], on_batch=seen.append)
    assert len(seen) == 3 and len(ev.accumulator) == len(expected) == 8  # frames
    want = metrics_of(expected, protocols, 3)
    assert got == {"metrics": want} and not model.training


def test_pad_batch_repeats_the_last_clip():
    padded = pad_batch({"frames": torch.arange(2.0).view(2, 1), "video_id": ["a", "b"], "n": 7}, 4)
    assert padded["frames"].flatten().tolist() == [0.0, 1.0, 1.0, 1.0] and padded["video_id"] == ["a", "b", "b", "b"]


class CountingHook(HookBase):
    """A user hook for the trainer.hooks test: counts events, keeps the steps it saw."""

    made: list[CountingHook] = []

    def __init__(self, tag: str = "") -> None:
        self.tag, self.steps, self.trained = tag, [], 0
        CountingHook.made.append(self)

    def after_step(self) -> None:
        self.steps.append(self.loop.step)

    def after_train(self) -> None:
        self.trained += 1


def test_user_hooks_come_from_the_config_and_see_every_step(synth_data_dir, tmp_path):
    from avs.engine.trainer import Trainer
    from tests.conftest import compose_cfg, tiny_overrides

    hook = "{_target_: tests.unit.test_hooks.CountingHook, tag: mine}"
    cfg = compose_cfg(
        "train",
        tiny_overrides(synth_data_dir)
        + ["model.channels=32", "trainer.max_steps=3", "trainer.test_at_end=false", f"trainer.hooks=[{hook}]"],
    )
    trainer = Trainer(cfg, tmp_path / "run")
    names = [type(h).__name__ for h in trainer._build_loop(StopSignal()).hooks]
    assert names.index("SignalHook") < names.index("CountingHook") < names.index("FinalEvaluationHook")
    CountingHook.made.clear()
    Trainer(cfg, tmp_path / "run2").fit()
    (mine,) = CountingHook.made
    assert (mine.tag, mine.steps, mine.trained) == ("mine", [1, 2, 3], 1)


def test_a_user_hook_that_is_not_a_hook_is_refused_by_name(synth_data_dir, tmp_path):
    from avs.engine.hook_config import build_hooks
    from avs.engine.trainer import Trainer
    from avs.errors import ConfigError
    from tests.conftest import compose_cfg, tiny_overrides

    cfg = compose_cfg(
        "train",
        tiny_overrides(synth_data_dir) + ["model.channels=32", "trainer.hooks=[{_target_: collections.OrderedDict}]"],
    )
    with pytest.raises(ConfigError, match=r"trainer\.hooks\[0\]: OrderedDict is not an avs\.engine\.hooks\.HookBase"):
        build_hooks(Trainer(cfg, tmp_path / "run"))
