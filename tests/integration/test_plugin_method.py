"""A method of one's own, with zero edits in avs/: a Python file and ONE model YAML outside the package.

tests/plugin_method/dice_gate.py defines `DiceGateSegmentor` (its own audio gate part and its own
Dice loss; `fg_fraction` logged only) and tests/plugin_method/configs/model/dice_gate.yaml its config.
The scripts find the class through PYTHONPATH (`_target_: dice_gate.DiceGateSegmentor`) and the YAML
through `hydra.searchpath`, as docs/adding_a_method.md tells: train one step, resume, evaluate,
export, a 2-job multirun and a table.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from avs.errors import ExitCode
from tests.conftest import run_script, tiny_overrides

METHOD_DIR = Path(__file__).resolve().parents[1] / "plugin_method"
SEARCHPATH = f"hydra.searchpath=[file://{METHOD_DIR / 'configs'}]"
NARROW = ["model.channels=16", "model.audio_dim=16", "audio.embed_dim=16", "audio.width=8"]


def _script(name: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    path = os.pathsep.join(p for p in (str(METHOD_DIR), os.environ.get("PYTHONPATH", "")) if p)
    return run_script(name, args, cwd, env={"PYTHONPATH": path}, timeout=600)


def _train_args(data_dir: Path, *extra: str) -> list[str]:
    return [SEARCHPATH, "model=dice_gate", *tiny_overrides(data_dir), *NARROW, "trainer.test_at_end=false", *extra]


@pytest.fixture(scope="module")
def trained(synth_data_dir, tmp_path_factory) -> Path:
    """One step of DiceGate through scripts/train.py (TensorBoard on: the log-only term is logged there)."""
    run = tmp_path_factory.mktemp("dice_gate") / "run"
    args = _train_args(synth_data_dir, "trainer.max_steps=1", "trainer.tensorboard=true", f"hydra.run.dir={run}")
    proc = _script("train.py", args, run.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run


def test_a_method_of_ones_own_trains_logs_its_log_only_term_and_resumes(trained, synth_data_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from avs.engine.checkpoint import load_checkpoint

    ckpt = load_checkpoint(trained / "checkpoints" / "last.ckpt")
    assert OmegaConf.create(ckpt["config"]).model._target_ == "dice_gate.DiceGateSegmentor"
    assert any(k.startswith("gate.mlp.") for k in ckpt["model"])  # its own part was built and saved
    assert json.loads((trained / "metrics.json").read_text())["loss_weights"] == {"avm": 0.5, "seg": 1.0, "dice": 0.5}
    ea = EventAccumulator(str(trained / "tensorboard"))
    ea.Reload()
    assert {"train/seg", "train/dice", "train/fg_fraction"} <= set(ea.Tags()["scalars"])
    # resume the stopped run for one more step
    resumed = tmp_path / "resumed"
    args = _train_args(synth_data_dir, "trainer.max_steps=2", f"trainer.resume={trained}", f"hydra.run.dir={resumed}")
    proc = _script("train.py", args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((resumed / "run_report.json").read_text())
    assert report["step"] == 2 and report["resumed_from"][0]["step"] == 1


def test_a_method_of_ones_own_evaluates_and_exports(trained, tmp_path):
    ckpt = trained / "checkpoints" / "last.ckpt"
    proc = _script(
        "eval.py", [f"checkpoint={ckpt}", "split=val", "device=cpu", f"output_dir={tmp_path}/eval"], tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    meta = json.loads((tmp_path / "eval" / "metrics_val.json").read_text())
    assert meta["method"] == "dice_gate"
    proc = _script("export.py", [f"checkpoint={ckpt}", f"out_dir={tmp_path}/export"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    exported = sorted((tmp_path / "export").glob("*.pt"))
    assert exported, sorted(p.name for p in (tmp_path / "export").iterdir())
    module = torch.jit.load(str(exported[0]))
    logits = module(torch.randn(1, 3, 3, 64, 64), torch.randn(1, 3, 1, 96, 64))
    assert logits.shape == (1, 3, 1, 64, 64)


def test_a_method_of_ones_own_sweeps_and_makes_a_table(synth_data_dir, tmp_path):
    sweep = tmp_path / "sweep"
    args = [
        "-m",
        *_train_args(synth_data_dir, "trainer.max_steps=1", "model.gate_hidden=4,8"),
        f"hydra.sweep.dir={sweep}",
    ]
    proc = _script("train.py", args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(list(sweep.glob("*/metrics.json"))) == 2
    proc = _script(
        "tables.py", [str(sweep), "--split", "val", "--name", "dice_gate", "--out", str(tmp_path / "t")], tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = (tmp_path / "t" / "dice_gate.md").read_text()
    assert "model.gate_hidden" in table and "| 4 " in table and "| 8 " in table, table


def test_a_loss_term_without_weight_is_refused_before_step_one(synth_data_dir, tmp_path):
    run = tmp_path / "run"
    proc = _script(
        "train.py", _train_args(synth_data_dir, "~model.loss_weights.dice", f"hydra.run.dir={run}"), tmp_path
    )
    assert proc.returncode == ExitCode.CONFIG, proc.stderr[-3000:]
    assert "error: model returns loss term 'dice' with no weight: set model.loss_weights.dice" in proc.stderr
    assert not (run / "checkpoints").exists()
