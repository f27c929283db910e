"""Faults during training (docs/reliability.md): kill -9 / SIGTERM / SIGINT and resume, disk full during a
checkpoint, NaN losses, corrupt clips mid-epoch (raise / skip, with DataLoader workers), and a soak run."""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from avs.config import PROJECT_ROOT
from avs.data.avsbench import AVSDataError, get_layout, mask_path, split_records
from avs.engine.checkpoint import CheckpointError, load_checkpoint
from avs.engine.loop import NonFiniteLossError, TrainLoop
from avs.engine.sampler import ResumableSampler
from avs.engine.trainer import Trainer
from tests.conftest import compose_cfg, tiny_overrides

SMALL = ["model.channels=32"]
DET = ["data.batch_size=1", "trainer.deterministic=true", "trainer.test_at_end=false"]


def _trainer(data_dir: Path, run_dir: Path, extra: list[str]) -> Trainer:
    return Trainer(compose_cfg("train", tiny_overrides(data_dir) + SMALL + extra), run_dir)


def _watch_steps(monkeypatch, hook=None) -> list[dict]:
    """Record (step, outcome, a parameter before/after) around every optimizer step; optional hook(loop)."""
    calls: list[dict] = []
    original = TrainLoop.optimizer_step

    def wrapped(self, clip, loss_bad):
        p = next(self.model.parameters())
        before = p.detach().clone()
        outcome = original(self, clip, loss_bad)
        calls.append({"step": self.step + 1, "outcome": outcome, "changed": not torch.equal(before, p.detach())})
        if hook is not None:
            hook(self)
        return outcome

    monkeypatch.setattr(TrainLoop, "optimizer_step", wrapped)
    return calls


# ----------------------------------------------------------------------------- kill -9 / SIGTERM, subprocess
def _wait_for_step(proc: subprocess.Popen, ckpt: Path, k: int, err: Path, timeout: float = 300) -> int:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise AssertionError(f"training exited (rc {proc.returncode}) before step {k}:\n{err.read_text()[-3000:]}")
        if ckpt.is_file():
            step = int(load_checkpoint(ckpt)["step"])  # atomic writes: never a partial file
            if step >= k:
                return step
        time.sleep(0.05)
    raise AssertionError(f"step {k} not reached in {timeout} s")


def _metrics(run: Path) -> dict:
    record = json.loads((run / "metrics.json").read_text())
    return {k: record[k] for k in ("val", "test", "history", "best_step", "best_epoch", "steps", "skipped_clips")}


def test_kill9_then_sigterm_then_resume_matches_uninterrupted_run(synth_data_dir, tmp_path):
    script = str(PROJECT_ROOT / "scripts" / "train.py")
    base = [
        sys.executable,
        script,
        *tiny_overrides(synth_data_dir),
        *SMALL,
        "data.batch_size=1",
        "data.flip_prob=0.5",
        "trainer.max_steps=6",
        "trainer.deterministic=true",
        "trainer.checkpoint_every_steps=1",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def launch(run_dir: Path, extra: list[str], tag: str) -> tuple[subprocess.Popen, Path]:
        err = tmp_path / f"{tag}.err"
        with open(err, "w") as fh:  # Hydra logs to stdout
            proc = subprocess.Popen(
                base + [f"hydra.run.dir={run_dir}"] + extra, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=tmp_path
            )
        return proc, err

    ref, ref_err = launch(tmp_path / "ref", [], "ref")
    assert ref.wait(timeout=600) == 0, ref_err.read_text()[-3000:]

    run = tmp_path / "cut"
    ckpt = run / "checkpoints" / "last.ckpt"
    rng = random.Random()
    k1 = rng.randint(1, 2)
    proc, err = launch(run, [], "kill9")
    _wait_for_step(proc, ckpt, k1, err)
    time.sleep(rng.uniform(0.0, 0.3))  # anywhere in the next step, possibly mid checkpoint write
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    killed_at = int(load_checkpoint(ckpt)["step"])
    assert 1 <= killed_at < 6

    # resume in the same run dir (trainer.resume=auto + hydra.run.dir), stop it with SIGTERM
    proc, err = launch(run, ["trainer.resume=auto"], "sigterm")
    _wait_for_step(proc, ckpt, killed_at + 1, err)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) == 128 + signal.SIGTERM, err.read_text()[-3000:]
    log_text = err.read_text()
    assert f"resumed from {ckpt}" in log_text and "received SIGTERM" in log_text and "stopped by SIGTERM" in log_text
    state = load_checkpoint(ckpt)
    stopped_at = int(state["step"])
    # stops after the step in flight (possibly the last one, before the epoch-end validation)
    assert killed_at < stopped_at <= 6 and state["faults"]["interruptions"][-1]["reason"] == "SIGTERM"
    assert not list(ckpt.parent.glob(".*.tmp"))  # temp files of the killed writer were cleaned up
    report = json.loads((run / "run_report.json").read_text())
    assert report["status"] == "interrupted" and report["last_checkpoint_step"] == stopped_at

    # finish from the old run dir into a new one (trainer.resume=<run dir>)
    final, err = launch(tmp_path / "final", [f"trainer.resume={run}"], "final")
    assert final.wait(timeout=600) == 0, err.read_text()[-3000:]
    assert _metrics(tmp_path / "final") == _metrics(tmp_path / "ref")
    a = load_checkpoint(tmp_path / "ref" / "checkpoints" / "last.ckpt")
    b = load_checkpoint(tmp_path / "final" / "checkpoints" / "last.ckpt")
    assert a["loss_history"] == b["loss_history"] and len(a["loss_history"]) == 6
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    resumed = [r["step"] for r in b["faults"]["resumed_from"]]
    assert resumed == [killed_at, stopped_at]


# ----------------------------------------------------------------------------- SIGINT, in process
@pytest.fixture
def default_sigint():
    """Python's own SIGINT handler for the test (a shell's background job starts with SIGINT ignored)."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


def test_sigint_saves_a_resumable_checkpoint(synth_data_dir, tmp_path, monkeypatch, default_sigint):
    def send_sigint(trainer):
        if trainer.step == 1:  # during step 2
            os.kill(os.getpid(), signal.SIGINT)

    _watch_steps(monkeypatch, send_sigint)
    trainer = _trainer(synth_data_dir, tmp_path / "run", DET + ["trainer.max_steps=4"])
    result = trainer.fit()
    assert result["interrupted"] and result["signal"] == "SIGINT" and result["step"] == 2
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")["step"] == 2
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored
    monkeypatch.undo()
    # continue in a new run dir (trainer.resume=<old run dir>): it holds a resumable last.ckpt at once
    resumed = _trainer(
        synth_data_dir, tmp_path / "run2", DET + ["trainer.max_steps=4", f"trainer.resume={tmp_path / 'run'}"]
    )
    assert resumed.fit()["steps"] == 4 and len(resumed.loss_history) == 4
    report = json.loads((tmp_path / "run2" / "run_report.json").read_text())
    assert report["resumed_from"] == [
        {"path": str(tmp_path / "run" / "checkpoints" / "last.ckpt"), "step": 2, "changes": []}
    ]
    assert {p.name for p in (tmp_path / "run2" / "checkpoints").iterdir()} == {"last.ckpt", "best.ckpt"}


# ----------------------------------------------------------------------------- disk full
def test_disk_full_during_checkpoint_keeps_previous_and_stops(synth_data_dir, tmp_path, monkeypatch):
    import avs.utils.io as io_mod

    real_replace = os.replace
    saves = {"n": 0}

    def replace(src, dst):
        if str(dst).endswith("last.ckpt"):
            saves["n"] += 1
            if saves["n"] == 2:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(io_mod.os, "replace", replace)
    run = tmp_path / "run"
    trainer = _trainer(synth_data_dir, run, DET + ["trainer.max_steps=3", "trainer.checkpoint_every_steps=1"])
    with pytest.raises(
        CheckpointError, match=r"No space left on device.*stopped at step 2\. Previous last\.ckpt: step 1"
    ):
        trainer.fit()
    state = load_checkpoint(run / "checkpoints" / "last.ckpt")  # the previous one, complete
    assert state["step"] == 1 and len(state["loss_history"]) == 1
    assert not list((run / "checkpoints").glob(".*.tmp"))
    report = json.loads((run / "run_report.json").read_text())
    assert report["status"] == "failed" and "No space left" in report["message"]


# ----------------------------------------------------------------------------- non-finite losses
def test_nan_step_is_skipped_counted_and_reported(synth_data_dir, tmp_path, monkeypatch, caplog):
    calls = _watch_steps(monkeypatch)
    run = tmp_path / "run"
    trainer = _trainer(synth_data_dir, run, DET + ["trainer.max_steps=3", "trainer.debug_nan_steps=[2]"])
    with caplog.at_level("WARNING", logger="avs.engine.loop"):
        result = trainer.fit()
    assert result["steps"] == 3
    assert [c["outcome"] for c in calls] == ["ok", "loss", "ok"]
    assert [c["changed"] for c in calls] == [True, False, True]  # no optimizer update at step 2
    report = json.loads((run / "run_report.json").read_text())
    (entry,) = report["nonfinite_steps"]
    assert entry["step"] == 2 and entry["kind"] == "loss" and len(entry["video_ids"]) == 1
    assert report["status"] == "finished" and report["num_nonfinite_steps"] == 1
    assert json.loads((run / "metrics.json").read_text())["faults"]["nonfinite_steps"] == [2]
    assert "step 2: non-finite loss nan" in caplog.text and entry["video_ids"][0] in caplog.text
    assert trainer.consecutive_nonfinite == 0


def test_consecutive_nonfinite_steps_stop_with_last_good_checkpoint(synth_data_dir, tmp_path, monkeypatch):
    calls = _watch_steps(monkeypatch)
    run = tmp_path / "run"
    common = DET + ["trainer.max_steps=5", "trainer.max_consecutive_nonfinite=3"]
    trainer = _trainer(synth_data_dir, run, common + ["trainer.debug_nan_steps=[2,3,4]"])
    after_step1 = None

    with pytest.raises(NonFiniteLossError, match=r"3 consecutive steps .*steps \[2, 3, 4\]"):
        trainer.fit()
    assert [c["outcome"] for c in calls] == ["ok", "loss", "loss", "loss"]
    state = load_checkpoint(run / "checkpoints" / "last.ckpt")
    assert state["step"] == 4 and state["consecutive_nonfinite"] == 3
    after_step1 = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    for k, v in state["model"].items():  # the saved weights are the step-1 ones: nothing bad was applied
        assert torch.equal(v, after_step1[k]), k
    assert json.loads((run / "run_report.json").read_text())["status"] == "failed"
    # the data is fine again (no injection): resume and finish
    monkeypatch.undo()
    resumed = _trainer(synth_data_dir, run, common + ["trainer.resume=auto"])
    assert resumed.fit()["steps"] == 5
    assert json.loads((run / "metrics.json").read_text())["faults"]["nonfinite_steps"] == [2, 3, 4]


# ----------------------------------------------------------------------------- bad data mid-epoch
def _corrupt_copy(synth_data_dir: Path, tmp_path: Path, position: int = 2) -> tuple[Path, str, Path]:
    """Copy the tiny MS3 data and corrupt the mask of the clip read at `position` in epoch 0."""
    shutil.copytree(synth_data_dir / "sounding_shapes", tmp_path / "data" / "sounding_shapes")
    cfg = compose_cfg("train", tiny_overrides(tmp_path / "data") + DET)
    root = Path(cfg.data.root)
    records = split_records(root, "ms3", "train")
    sampler = ResumableSampler(len(records), shuffle=True, seed=int(cfg.seed))
    rec = records[list(sampler)[position]]
    path = mask_path(root, get_layout("ms3"), rec, 2)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(64))  # a PNG header, then garbage
    return tmp_path / "data", rec.video_id, path


def test_corrupt_mask_mid_epoch_raises_naming_file_and_clip(synth_data_dir, tmp_path):
    """With a DataLoader worker: the error still names the file and clip (the worker's text is re-raised)."""
    data_dir, vid, path = _corrupt_copy(synth_data_dir, tmp_path)
    trainer = _trainer(data_dir, tmp_path / "run", DET + ["trainer.max_steps=4", "data.num_workers=1"])
    with pytest.raises(AVSDataError) as info:
        trainer.fit()
    text = str(info.value)
    assert str(path) in text and f"clip '{vid}'" in text
    assert "Caught AVSDataError in DataLoader worker process 0" in text  # same type, original text
    assert trainer.step == 2  # two good steps, then the third clip of the epoch failed


def test_corrupt_mask_is_skipped_and_reported(synth_data_dir, tmp_path):
    data_dir, vid, path = _corrupt_copy(synth_data_dir, tmp_path)
    run = tmp_path / "run"
    trainer = _trainer(data_dir, run, DET + ["trainer.max_steps=3", "data.on_error=skip"])
    result = trainer.fit()
    assert result["steps"] == 3
    assert json.loads((run / "metrics.json").read_text())["skipped_clips"] == [vid]
    report = json.loads((run / "run_report.json").read_text())
    assert report["num_skipped_clips"] == 1 and str(path) in report["skipped_clips"]["train"][vid]


# ----------------------------------------------------------------------------- soak (AVS_SOAK=1)
def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


@pytest.mark.skipif(os.environ.get("AVS_SOAK") != "1", reason="soak run: set AVS_SOAK=1 (about 4 min on 2 cores)")
def test_soak_1000_steps_no_memory_or_fd_growth(synth_data_dir, tmp_path, monkeypatch):
    samples: dict[int, tuple[float, int, float]] = {}

    def sample(trainer):
        if trainer.step + 1 in (50, 1000):
            samples[trainer.step + 1] = (_rss_mb(), len(os.listdir("/proc/self/fd")), time.time())

    _watch_steps(monkeypatch, sample)
    trainer = _trainer(
        synth_data_dir,
        tmp_path / "run",
        [
            "data.batch_size=1",
            "trainer.max_steps=1000",
            "trainer.val_every_epochs=50",
            "trainer.checkpoint_every_steps=100",
            "data.num_workers=1",
            "trainer.tensorboard=true",
            "trainer.test_at_end=false",
            "trainer.log_every_steps=1",
        ],
    )
    trainer.fit()
    (rss0, fd0, t0), (rss1, fd1, t1) = samples[50], samples[1000]
    print(f"\nsoak: RSS {rss0:.1f} -> {rss1:.1f} MB, open fds {fd0} -> {fd1}, {950 / (t1 - t0):.2f} steps/s")
    assert rss1 - rss0 < 150 and fd1 - fd0 <= 2
