"""A tidy outputs/: refused commands leave no run dir; run dirs are named after method and data."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from avs.engine.rundir import only_hydra_files
from tests.conftest import compose_cfg, run_script

ROOT = Path(__file__).resolve().parents[2]


def _run(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return run_script(script, list(args), cwd)


@pytest.mark.parametrize(
    "script,args,code",
    [
        ("eval.py", ["checkpoint=missing.ckpt"], 4),
        ("export.py", ["checkpoint=missing.ckpt", "format=tflite"], 2),
        ("train.py", ["trainer.device=cpu", "data.root=/no/such/avsbench"], 5),
    ],
)
def test_a_refused_command_leaves_no_run_dir(tmp_path, script, args, code):
    proc = _run(script, *args, f"paths.log_dir={tmp_path}/outputs", cwd=tmp_path)
    assert proc.returncode == code, proc.stderr
    assert proc.stderr.startswith("error: ")
    assert not (tmp_path / "outputs").exists() or not any((tmp_path / "outputs").rglob("*")), list(
        (tmp_path / "outputs").rglob("*")
    )


def test_a_refused_command_keeps_a_dir_that_held_something_before(tmp_path):
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    old = run / "eval.log"
    old.write_text("an earlier run's log\n")
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    proc = _run("eval.py", "checkpoint=missing.ckpt", f"hydra.run.dir={run}", cwd=tmp_path)
    assert proc.returncode == 4
    assert run.is_dir() and "an earlier run's log" in old.read_text()


def test_only_hydra_files_names_what_hydra_writes(tmp_path):
    since = time.time() - 5
    (tmp_path / ".hydra").mkdir()
    for name in ("config.yaml", "hydra.yaml", "overrides.yaml"):
        (tmp_path / ".hydra" / name).write_text("{}")
    (tmp_path / "train.log").write_text("")
    assert only_hydra_files(tmp_path, ".hydra", "train.log", since)
    assert not only_hydra_files(tmp_path, ".hydra", "train.log", time.time() + 60)  # older than this process
    (tmp_path / "checkpoints").mkdir()
    assert not only_hydra_files(tmp_path, ".hydra", "train.log", since)


@pytest.mark.parametrize(
    "config,overrides,tail",
    [
        ("train", ["experiment=quickstart"], "_avsbg_synth_ms3"),
        ("train", ["experiment=quickstart", "model=tpavi", "data=synth_s4"], "_tpavi_synth_s4"),
        ("train", ["model=ecmvae", "data=s4"], "_ecmvae_s4"),
        ("eval", ["checkpoint=x.ckpt"], ""),
    ],
)
def test_run_dirs_are_named_after_method_and_data(config, overrides, tail):
    cfg = compose_cfg(config, overrides, hydra_cfg=True)
    run_dir = Path(str(cfg.hydra.run.dir))
    assert run_dir.parent.name == "runs" and run_dir.parent.parent.name == cfg.task_name
    stamp = run_dir.name[: len("2026-01-31_12-00-00")]
    time.strptime(stamp, "%Y-%m-%d_%H-%M-%S")
    assert run_dir.name[len(stamp) :] == tail


def test_the_suite_logs_outside_the_repository_outputs():
    """tests/conftest.py points the default log dir (and so every script a test starts) at a session tmp dir."""
    from avs.config import PROJECT_ROOT

    log_dir = Path(compose_cfg("eval", ["checkpoint=x.ckpt"]).paths.log_dir)
    assert log_dir != PROJECT_ROOT / "outputs" and PROJECT_ROOT not in log_dir.parents
    assert os.environ["AVS_LOG_DIR"] == str(log_dir)


def test_the_working_directory_is_never_removed(tmp_path, monkeypatch):
    """`hydra.run.dir=.` without Hydra files (scripts/pretrain.py's config): a refusal in an empty cwd keeps it."""
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = _run("pretrain.py", "tasks=[nothing]", cwd=empty)
    assert proc.returncode == 2 and "tasks: expected a non-empty list" in proc.stderr
    assert empty.is_dir()
