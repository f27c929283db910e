"""A stopped run prints the command that resumes it, and that command works as printed: the resume takes
the run's model, data and every override from its run dir (docs/reliability.md, "Run integrity")."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from avs.config import PROJECT_ROOT
from avs.engine.rundir import resume_overrides
from avs.errors import MissingFileError
from tests.conftest import tiny_overrides

SHORT = ["model.channels=32", "data.batch_size=1", "trainer.max_steps=3"]


def _run(cmd: list[str] | str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # `python` = this interpreter
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=600, cwd=cwd, env=env, shell=isinstance(cmd, str)
    )


def _stopped_run(data_dir: Path, tmp_path: Path) -> tuple[Path, str]:
    run = tmp_path / "run"
    args = tiny_overrides(data_dir) + SHORT + ["trainer.interrupt_after_steps=1", f"hydra.run.dir={run}"]
    proc = _run([sys.executable, str(PROJECT_ROOT / "scripts" / "train.py"), *args], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    hints = re.findall(r"resume with: (.+)$", proc.stderr, flags=re.M)
    assert hints, proc.stderr[-3000:]
    return run, hints[-1].strip()


def test_the_printed_resume_command_runs_as_written_and_finishes_the_run(synth_data_dir, tmp_path):
    run, command = _stopped_run(synth_data_dir, tmp_path)
    assert json.loads((run / "run_report.json").read_text())["status"] == "interrupted"
    assert "data.root" not in command and "model." not in command  # nothing of the original to repeat
    proc = _run(command, tmp_path)  # exactly the printed line, through a shell
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((run / "run_report.json").read_text())["status"] == "finished"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["faults"]["resumed_from"], metrics["faults"]
    replayed = (run / ".hydra" / "overrides.yaml").read_text()
    assert "model.channels=32" in replayed and "trainer.interrupt_after_steps" not in replayed


def test_a_resume_may_add_free_keys_but_a_changed_result_key_is_refused_by_name(synth_data_dir, tmp_path):
    run, command = _stopped_run(synth_data_dir, tmp_path)
    stored = (run / ".hydra" / "overrides.yaml").read_text()
    refused = _run(command + " trainer.lr=0.05", tmp_path)
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert re.search(r"^error: resuming .*trainer\.lr: .* in the checkpoint, 0\.05 now", refused.stderr, flags=re.M)
    assert (run / ".hydra" / "overrides.yaml").read_text() == stored  # refused before Hydra rewrote the record
    proc = _run(command + " trainer.log_every_steps=1 data.num_workers=0", tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_resume_overrides_put_the_stored_ones_first_and_let_the_command_line_win(tmp_path):
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "overrides.yaml").write_text(
        "- data=synth_ms3\n- trainer.lr=0.001\n- trainer.interrupt_after_steps=1\n"
        "- trainer.resume_allow_changes=[seed]\n- not an override\n"
    )
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"")
    for spec in (str(tmp_path), str(tmp_path / "checkpoints" / "last.ckpt")):
        got = resume_overrides([f"trainer.resume={spec}", "trainer.lr=0.01"])
        assert got == ["data=synth_ms3", f"trainer.resume={spec}", "trainer.lr=0.01"]
    auto = resume_overrides(["trainer.resume=auto", f"hydra.run.dir={tmp_path}"])
    assert auto[:2] == ["data=synth_ms3", "trainer.lr=0.001"]
    assert resume_overrides(["trainer.resume=auto"]) == ["trainer.resume=auto"]  # a new run dir: nothing stored
    assert resume_overrides(["seed=3"]) == ["seed=3"]


def test_a_missing_resume_path_is_refused_before_hydra_with_exit_5(tmp_path):
    with pytest.raises(MissingFileError, match=r"trainer\.resume=.*nope: no such file or folder"):
        resume_overrides([f"trainer.resume={tmp_path}/nope"])
    proc = _run(
        [sys.executable, str(PROJECT_ROOT / "scripts" / "train.py"), f"trainer.resume={tmp_path}/nope"], tmp_path
    )
    assert proc.returncode == 5, proc.stderr[-2000:]
    assert proc.stderr.startswith("error: trainer.resume=") and "Traceback" not in proc.stderr
    assert not (tmp_path / "outputs").exists()
