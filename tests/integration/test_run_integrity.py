"""Run integrity (docs/reliability.md, "Run integrity"): run dir ownership, resume = the same run, damaged
checkpoints refused by resume and eval, eval's data config, and what a user sees when a run cannot go on."""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import shutil
import zipfile
from pathlib import Path

import pytest

from avs.config_checks import ConfigError
from avs.engine.checkpoint import CheckpointError, load_checkpoint
from avs.engine.loop import TrainLoop
from avs.engine.trainer import Trainer
from avs.evaluation.checkpoint import evaluate_checkpoint
from tests.conftest import compose_cfg, run_script, tiny_overrides

BASE = [
    "model.channels=32",
    "data.batch_size=1",
    "trainer.deterministic=true",
    "trainer.test_at_end=false",
    "scheduler=cosine",
    "trainer.lr=1e-3",
]


def _cfg(data_dir: Path, extra: list[str]):
    return compose_cfg("train", tiny_overrides(data_dir) + BASE + extra)


@pytest.fixture(scope="module")
def finished_run(synth_data_dir, tmp_path_factory) -> Path:
    """A finished 2-step tiny run (cosine schedule, lr 1e-3); tests work on copies of it."""
    run = tmp_path_factory.mktemp("finished") / "run"
    Trainer(_cfg(synth_data_dir, []), run).fit()
    return run


def _copy(run: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    return dst


# ----------------------------------------------------------------------------- run dir ownership
def test_training_into_a_locked_run_dir_is_refused_naming_dir_and_holder(synth_data_dir, tmp_path):
    from avs.engine.rundir import RunDirError, RunDirLock

    run = tmp_path / "run"
    held = RunDirLock(run).acquire()  # another training holds the dir
    try:
        trainer = Trainer(_cfg(synth_data_dir, []), run)
        with pytest.raises(RunDirError, match=rf"run dir {run} is in use by another training \(pid {os.getpid()} "):
            trainer.fit()
        assert not (run / "checkpoints").exists() and not (run / "metrics.json").exists()
    finally:
        held.release()


def test_stale_lock_of_a_dead_process_is_named_and_taken_over(synth_data_dir, tmp_path, caplog):
    run = tmp_path / "run"
    run.mkdir()
    (run / ".lock").write_text(json.dumps({"pid": 4194999, "host": "gone", "started": "yesterday"}))
    with caplog.at_level(logging.WARNING, logger="avs.engine.rundir"):
        Trainer(_cfg(synth_data_dir, []), run).fit()
    assert any("pid 4194999 on gone" in r.getMessage() and "taking it over" in r.getMessage() for r in caplog.records)
    assert (run / "metrics.json").is_file()
    assert (run / ".lock").read_text() == ""  # released cleanly at the end


def test_rerun_into_a_finished_run_dir_without_resume_is_refused(synth_data_dir, finished_run, tmp_path):
    from avs.engine.rundir import RunDirError

    run = _copy(finished_run, tmp_path)
    before = (run / "checkpoints" / "best.ckpt").read_bytes()
    trainer = Trainer(_cfg(synth_data_dir, []), run)
    with pytest.raises(RunDirError, match=r"already holds checkpoints.*trainer\.resume=auto.*hydra\.run\.dir="):
        trainer.fit()
    assert (run / "checkpoints" / "best.ckpt").read_bytes() == before  # nothing overwritten


# ----------------------------------------------------------------------------- resume = the same run
def test_resume_with_a_changed_result_key_is_refused_by_name(synth_data_dir, finished_run, tmp_path):
    run = _copy(finished_run, tmp_path)
    with pytest.raises(
        ConfigError, match=r"trainer\.lr: 0\.001 in the checkpoint, 0\.05 now.*resume_allow_changes=\[trainer\.lr\]"
    ):
        Trainer(_cfg(synth_data_dir, ["trainer.resume=auto", "trainer.lr=0.05", "trainer.max_steps=4"]), run)
    with pytest.raises(ConfigError, match=r"seed: 123 in the checkpoint, 5 now"):
        Trainer(_cfg(synth_data_dir, ["trainer.resume=auto", "seed=5"]), run)


def _first_step_after_resume(monkeypatch) -> dict:
    seen: dict = {}
    original = TrainLoop.optimizer_step

    def wrapped(self, clip, loss_bad):
        if not seen:
            seen.update(
                step=self.step,
                lrs=[g["lr"] for g in self.optimizer.param_groups],
                base_lrs=list(self.scheduler.base_lrs),
                t_max=self.scheduler.T_max,
            )
        return original(self, clip, loss_bad)

    monkeypatch.setattr(TrainLoop, "optimizer_step", wrapped)
    return seen


def test_allowed_lr_change_reaches_optimizer_and_schedule_and_is_recorded(
    synth_data_dir, finished_run, tmp_path, monkeypatch
):
    run = _copy(finished_run, tmp_path)
    seen = _first_step_after_resume(monkeypatch)
    trainer = Trainer(
        _cfg(
            synth_data_dir,
            [
                "trainer.resume=auto",
                "trainer.lr=0.05",
                "trainer.max_steps=4",
                "trainer.resume_allow_changes=[trainer.lr]",
            ],
        ),
        run,
    )
    trainer.fit()
    assert seen["step"] == 2 and seen["t_max"] == 4
    assert seen["base_lrs"] == [0.05]
    assert seen["lrs"][0] == pytest.approx(0.05 * (1 + math.cos(math.pi * 2 / 4)) / 2)  # the new schedule at step 2
    report = json.loads((run / "run_report.json").read_text())
    metrics = json.loads((run / "metrics.json").read_text())
    for resumed in (report["resumed_from"][-1], metrics["faults"]["resumed_from"][-1]):
        assert {"key": "trainer.lr", "checkpoint": 0.001, "now": 0.05} in resumed["changes"]
    assert metrics["steps"] == 4


def test_extending_the_run_rebuilds_the_schedule_for_the_new_length(
    synth_data_dir, finished_run, tmp_path, monkeypatch
):
    run = _copy(finished_run, tmp_path)
    seen = _first_step_after_resume(monkeypatch)
    Trainer(_cfg(synth_data_dir, ["trainer.resume=auto", "trainer.max_steps=4"]), run).fit()
    # continues at step 2 of a 4-step cosine (lr/2), not at the end of the old 2-step one (lr 0, then rising again)
    assert seen["step"] == 2 and seen["t_max"] == 4 and seen["base_lrs"] == [1e-3]
    assert seen["lrs"][0] == pytest.approx(1e-3 / 2)
    assert json.loads((run / "metrics.json").read_text())["steps"] == 4


def test_free_keys_change_silently_on_resume(synth_data_dir, finished_run, tmp_path):
    run = _copy(finished_run, tmp_path)
    trainer = Trainer(
        _cfg(
            synth_data_dir,
            [
                "trainer.resume=auto",
                "trainer.log_every_steps=1",
                "trainer.checkpoint_every_steps=5",
                "data.eval_batch_size=1",
                "runtime.allocator=off",  # how the process runs, not what it computes
            ],
        ),
        run,
    )
    assert trainer._resume is not None and trainer._resume[1] == []


# ----------------------------------------------------------------------------- damaged checkpoints
def _largest_entry_offset(path: Path) -> tuple[int, int]:
    """(offset, size) of the data of the largest record of a torch.save zip: tensor bytes."""
    with zipfile.ZipFile(path) as zf:
        info = max(zf.infolist(), key=lambda i: i.file_size)
    raw = path.read_bytes()
    name_len = int.from_bytes(raw[info.header_offset + 26 : info.header_offset + 28], "little")
    extra_len = int.from_bytes(raw[info.header_offset + 28 : info.header_offset + 30], "little")
    return info.header_offset + 30 + name_len + extra_len, info.file_size


def _damage(path: Path, size: int, byte: int) -> None:
    offset, length = _largest_entry_offset(path)
    raw = bytearray(path.read_bytes())
    start = offset + max(0, (length - size) // 2)
    raw[start : start + size] = bytes([byte]) * size
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("size,byte", [(4096, 0x00), (65536, 0xFF)], ids=["4KB-zeros", "64KB-0xFF"])
def test_damaged_checkpoint_is_refused_by_resume_and_eval(synth_data_dir, finished_run, tmp_path, size, byte):
    run = _copy(finished_run, tmp_path)
    for name in ("last.ckpt", "best.ckpt"):
        _damage(run / "checkpoints" / name, size, byte)
    last = run / "checkpoints" / "last.ckpt"
    with pytest.raises(CheckpointError, match=rf"{last} is damaged"):
        Trainer(_cfg(synth_data_dir, ["trainer.resume=auto", "trainer.max_steps=4"]), run)
    best = run / "checkpoints" / "best.ckpt"
    ecfg = compose_cfg("eval", [f"checkpoint={best}", "split=val", "device=cpu", f"paths.data_dir={synth_data_dir}"])
    with pytest.raises(CheckpointError, match=rf"{best} is damaged"):
        evaluate_checkpoint(ecfg, tmp_path / "eval")


# ----------------------------------------------------------------------------- eval's data config
def test_eval_with_a_data_group_keeps_the_checkpoint_image_size_and_frames(synth_data_dir, finished_run, tmp_path):
    best = finished_run / "checkpoints" / "best.ckpt"
    trained = load_checkpoint(best)["config"]
    assert "image_size: 64" in trained and "num_frames: 3" in trained
    ecfg = compose_cfg(
        "eval",
        [
            f"checkpoint={best}",
            "split=val",
            "device=cpu",
            f"paths.data_dir={synth_data_dir}",
            "data=synth_ms3",
            "data.synthetic.clips={train: 4, val: 2, test: 2}",
        ],
    )
    assert ecfg.data.image_size == 96 and ecfg.data.num_frames == 5  # the group's own values
    evaluate_checkpoint(ecfg, tmp_path / "eval")
    meta = json.loads((tmp_path / "eval" / "metrics_val.json").read_text())
    assert meta["resolution"] == 64
    assert meta["train_config"]["data"]["num_frames"] == 3


# ----------------------------------------------------------------------------- disk full
def test_disk_full_before_any_last_checkpoint_does_not_advise_a_resume(synth_data_dir, tmp_path, monkeypatch):
    import avs.utils.io as io_mod

    real_replace = os.replace

    def replace(src, dst):
        if str(dst).endswith("last.ckpt"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(io_mod.os, "replace", replace)
    run = tmp_path / "run"
    trainer = Trainer(_cfg(synth_data_dir, ["trainer.checkpoint_every_steps=1"]), run)
    with pytest.raises(CheckpointError) as info:
        trainer.fit()
    msg = str(info.value)
    assert "No space left on device" in msg and "trainer.resume=" not in msg
    assert "nothing to resume" in msg and "no last.ckpt" in msg
    assert not (run / "checkpoints" / "last.ckpt").exists()
    assert (run / ".lock").read_text() == ""  # the lock was released: the dir can be used again


def test_eval_script_takes_data_root_alone(synth_data_dir, finished_run, tmp_path):
    from omegaconf import OmegaConf

    best = finished_run / "checkpoints" / "best.ckpt"
    moved = tmp_path / "moved"
    shutil.copytree(OmegaConf.create(load_checkpoint(best)["config"]).data.root, moved)  # the dataset moved
    proc = run_script(
        "eval.py",
        [f"checkpoint={best}", "split=val", "device=cpu", f"data.root={moved}", f"output_dir={tmp_path}/out"],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    meta = json.loads((tmp_path / "out" / "metrics_val.json").read_text())
    assert meta["data"]["root"] == str(moved) and meta["resolution"] == 64


def _train_script(args: list[str], cwd: Path):
    return run_script("train.py", args, cwd)


def test_train_script_refuses_before_hydra_writes_into_the_run_dir(synth_data_dir, finished_run, tmp_path):
    """The first run's .hydra/ files and train.log stay its own when a second training is refused."""
    from avs.engine.rundir import RunDirLock

    run = _copy(finished_run, tmp_path)
    (run / ".hydra").mkdir(exist_ok=True)
    (run / ".hydra" / "overrides.yaml").write_text("- first run\n")
    (run / "train.log").write_text("first run\n")
    args = tiny_overrides(synth_data_dir) + BASE + [f"hydra.run.dir={run}"]
    proc = _train_script(args, tmp_path)  # a finished run, no trainer.resume
    assert proc.returncode == 6, proc.stderr[-2000:]
    assert "already holds checkpoints" in proc.stderr and "Traceback" not in proc.stderr
    held = RunDirLock(run).acquire()  # a live training holds the dir
    try:
        proc = _train_script(args + ["trainer.resume=auto"], tmp_path)
    finally:
        held.release()
    assert proc.returncode == 6 and f"pid {os.getpid()}" in proc.stderr, proc.stderr[-2000:]
    assert (run / ".hydra" / "overrides.yaml").read_text() == "- first run\n"
    assert (run / "train.log").read_text() == "first run\n"


# ----------------------------------------------------------------------------- best.ckpt vs last.ckpt
def test_best_holds_what_evaluation_needs_and_last_the_resume_state(synth_data_dir, finished_run, tmp_path):
    """best.ckpt: weights, config, metrics, digest, no optimizer / scheduler / scaler / RNG (smaller);
    last.ckpt: the full resume state. Evaluation runs from best; a resume from it is refused by name."""
    from avs.engine.checkpointer import RESUME_ONLY_KEYS

    ckpt_dir = finished_run / "checkpoints"
    best, last = load_checkpoint(ckpt_dir / "best.ckpt"), load_checkpoint(ckpt_dir / "last.ckpt")
    assert best["resumable"] is False and last["resumable"] is True
    assert not set(RESUME_ONLY_KEYS) & set(best)
    assert {"optimizer", "scheduler", "scaler", "rng"} <= set(last)
    for key in ("model", "config", "best", "history", "step", "avs_checkpoint_version"):
        assert key in best
    assert best["best"]["metric"] == last["best"]["metric"]
    assert (ckpt_dir / "best.ckpt").stat().st_size < 0.6 * (ckpt_dir / "last.ckpt").stat().st_size
    run = _copy(finished_run, tmp_path)
    cfg = _cfg(synth_data_dir, [f"trainer.resume={run / 'checkpoints' / 'best.ckpt'}", "trainer.max_steps=4"])
    with pytest.raises(CheckpointError, match=r"best\.ckpt holds the weights.*resume from last\.ckpt"):
        Trainer(cfg, tmp_path / "new_run")
    eval_cfg = compose_cfg("eval", [f"checkpoint={ckpt_dir / 'best.ckpt'}", "split=val", "device=cpu"])
    metrics = evaluate_checkpoint(eval_cfg, tmp_path / "eval")
    assert metrics
