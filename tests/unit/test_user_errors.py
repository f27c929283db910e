"""What a user sees (docs/reliability.md, "Errors a user sees"): plain lines and an exit code per kind of
error, config values checked with the key named, config combinations that would crash later refused up
front, input files checked before the model is built, and checkpoint integrity on load."""

from __future__ import annotations

import ast
import logging
import subprocess

import pytest
import torch

from avs.config import PROJECT_ROOT
from avs.config_checks import ConfigError, check_config
from avs.engine.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from tests.conftest import compose_cfg, run_script, tiny_overrides

SCRIPTS = PROJECT_ROOT / "scripts"


_script = run_script


def _plain(proc: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in proc.stderr and "Error executing job" not in proc.stderr, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert 1 <= len(lines) <= 2 and lines[0].startswith("error: "), proc.stderr[-2000:]


# ----------------------------------------------------------------------------- config values and combinations
@pytest.mark.parametrize(
    "overrides,message",
    [
        (
            ["experiment=quickstart", "audio=vggish"],
            r"audio\.embed_dim, audio\.width: not parameters of avs\.models\.vggish\.VGGish",
        ),
        (["trainer.epochs=0", "trainer.max_steps=0"], r"trainer\.epochs must be >= 1"),
        (["trainer.lr=abc"], r"trainer\.lr: expected a number, got 'abc'"),
        (["trainer.weight_decay=abc"], r"trainer\.weight_decay: expected a number, got 'abc'"),
        (["trainer.grad_clip=-1"], r"trainer\.grad_clip=-1 must be >= 0"),
        (["seed=abc"], r"seed: expected an integer, got 'abc'"),
        (["seed=1.5"], r"seed: expected an integer, got 1\.5"),
        (["data.flip_prob=abc"], r"data\.flip_prob: expected a number, got 'abc'"),
        (["trainer.resume_allow_changes=lr"], r"trainer\.resume_allow_changes must be a list"),
    ],
)
def test_config_values_and_combinations_that_would_crash_later_are_refused(overrides, message, tmp_path):
    cfg = compose_cfg("train", tiny_overrides(tmp_path) + overrides)
    with pytest.raises(ConfigError, match=message):
        check_config(cfg)


def test_zero_epochs_is_fine_when_max_steps_gives_the_length(tmp_path):
    check_config(compose_cfg("train", tiny_overrides(tmp_path) + ["trainer.epochs=0", "trainer.max_steps=3"]))


def test_missing_data_root_and_weight_files_are_found_before_the_model_is_built(tmp_path, monkeypatch):
    import avs.engine.trainer as trainer_mod
    from avs.config_checks import MissingFileError

    def no_model(cfg):
        raise AssertionError("the model was built before the files were checked")

    monkeypatch.setattr("avs.models.build.build_model", no_model)
    missing_root = tiny_overrides(tmp_path) + ["data.synthetic=null", f"data.root={tmp_path}/nope"]
    with pytest.raises(MissingFileError, match=rf"data\.root={tmp_path}/nope: no such folder"):
        trainer_mod.Trainer(compose_cfg("train", missing_root), tmp_path / "run")
    missing_weights = tiny_overrides(tmp_path) + ["backbone=resnet50", f"backbone.weights_path={tmp_path}/r50.pth"]
    with pytest.raises(MissingFileError, match=rf"backbone\.weights_path={tmp_path}/r50\.pth: weight file not found"):
        trainer_mod.Trainer(compose_cfg("train", missing_weights), tmp_path / "run")


# ----------------------------------------------------------------------------- checkpoint integrity (unit)
def test_checkpoint_with_tensor_bytes_changed_is_damaged(tmp_path):
    path = tmp_path / "last.ckpt"
    save_checkpoint(path, {"model": {"w": torch.randn(200_000)}, "step": 1})
    assert load_checkpoint(path)["step"] == 1
    raw = bytearray(path.read_bytes())
    mid = len(raw) // 2
    raw[mid : mid + 4096] = bytes(4096)
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=rf"checkpoint {path} is damaged"):
        load_checkpoint(path)


def test_checkpoint_written_without_a_hash_loads_with_a_note(tmp_path, caplog):
    path = tmp_path / "old.ckpt"
    torch.save({"model": {"w": torch.ones(3)}, "step": 7}, path)  # what earlier versions wrote
    with caplog.at_level(logging.WARNING, logger="avs.engine.checkpoint"):
        assert load_checkpoint(path)["step"] == 7
    assert [r.getMessage() for r in caplog.records] == [
        f"{path} has no content hash (written before checkpoints carried one): loaded without verification"
    ]


def test_non_finite_weights_are_refused(tmp_path):
    path = tmp_path / "nan.ckpt"
    save_checkpoint(path, {"model": {"a": torch.ones(2), "b": torch.tensor([1.0, float("nan")])}})
    with pytest.raises(CheckpointError, match=r"holds non-finite model weights \(1 tensor\(s\), e\.g\. b\)"):
        load_checkpoint(path)


def test_a_directory_is_not_called_a_missing_checkpoint(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(
        CheckpointError,
        match=rf"{tmp_path} is a directory, expected a \.ckpt file "
        rf"\(did you mean {tmp_path}/checkpoints/best\.ckpt\?\)",
    ):
        load_checkpoint(tmp_path)


# ----------------------------------------------------------------------------- scripts: plain errors, exit codes
def test_every_script_reports_project_errors_through_the_shared_wrapper():
    for path in sorted(SCRIPTS.glob("*.py")):
        tree = ast.parse(path.read_text())
        tasks = [
            f
            for f in tree.body
            if isinstance(f, ast.FunctionDef) and any("hydra.main" in ast.unparse(d) for d in f.decorator_list)
        ]
        if tasks:
            names = [ast.unparse(d) for d in tasks[0].decorator_list]
            assert names[-1] == "plain_errors", f"{path.name}: @plain_errors must sit below @hydra.main"
        else:
            assert "run_plain(main)" in path.read_text(), f"{path.name}: entry point not wrapped"


def test_train_with_a_missing_data_root_prints_one_plain_error(tmp_path):
    proc = _script(
        "train.py",
        ["data=ms3", f"data.root={tmp_path}/nope", "backbone=pvt_v2_b0", "audio=tiny", f"hydra.run.dir={tmp_path}/run"],
        tmp_path,
    )
    assert proc.returncode == 5
    _plain(proc)
    assert f"error: data.root={tmp_path}/nope: no such folder" in proc.stderr


def test_eval_on_a_directory_says_so_and_traceback_on_request(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    proc = _script("eval.py", [f"checkpoint={run}", f"output_dir={tmp_path}/out"], tmp_path)
    assert proc.returncode == 4
    _plain(proc)
    assert f"{run} is a directory, expected a .ckpt file (did you mean {run}/checkpoints/best.ckpt?)" in proc.stderr
    traced = _script("eval.py", [f"checkpoint={run}", f"output_dir={tmp_path}/out"], tmp_path, {"AVS_TRACEBACK": "1"})
    assert traced.returncode == 4 and "Traceback" in traced.stderr and "is a directory" in traced.stderr


def test_eval_prints_override_hints(tmp_path):
    proc = _script("eval.py", ["checkpoint=x.ckpt", "splitt=val"], tmp_path)
    assert proc.returncode == 1
    assert "hint: unknown config key 'splitt'" in proc.stderr and "did you mean 'split'" in proc.stderr


def test_sweep_with_a_missing_weight_file_stops_before_the_first_job(tmp_path):
    data = tmp_path / "data"
    proc = _script(
        "train.py",
        [
            "-m",
            *tiny_overrides(data),
            "backbone=pvt_v2_b0,resnet50",
            f"backbone.weights_path={tmp_path}/none.pth",
            f"hydra.sweep.dir={tmp_path}/sweep",
        ],
        tmp_path,
    )
    assert proc.returncode == 5
    _plain(proc)
    assert "sweep job #1 of 2 (" in proc.stderr and "backbone=resnet50" in proc.stderr
    assert f"backbone.weights_path={tmp_path}/none.pth: weight file not found" in proc.stderr
    assert not (tmp_path / "sweep").exists() and not data.exists()  # no job ran, no data generated


# ----------------------------------------------------------------------------- resume config comparison (unit)
def test_resume_comparison_refuses_result_keys_and_tolerates_keys_added_since(tmp_path):
    from omegaconf import OmegaConf

    from avs.engine.resume_check import check_resume_config

    cfg = compose_cfg("train", tiny_overrides(tmp_path) + ["model.channels=32"])
    stored = OmegaConf.to_container(cfg, resolve=True)
    stored["model"]["channels"] = 64
    stored["trainer"]["tensorboard"] = True  # a free key
    with pytest.raises(ConfigError, match=r"model\.channels: 64 in the checkpoint, 32 now") as info:
        check_resume_config(OmegaConf.to_yaml(stored), cfg, "last.ckpt")
    assert "tensorboard" not in str(info.value)
    stored["model"]["channels"] = 32
    del stored["data"]["on_error"]  # a key the configs gained after the checkpoint was written
    changes = check_resume_config(OmegaConf.to_yaml(stored), cfg, "last.ckpt")
    assert changes == [{"key": "data.on_error", "checkpoint": None, "now": "raise"}]


def test_a_model_without_audio_needs_no_audio_weight_file(tmp_path):
    from avs.config_checks import MissingFileError, check_files

    vggish = tiny_overrides(tmp_path) + [
        "audio=vggish",
        f"audio.weights_path={tmp_path}/vggish.pth",
        "data.synthetic=null",
        f"data.root={tmp_path}",
    ]
    with pytest.raises(MissingFileError, match=r"audio\.weights_path=.*vggish\.pth: weight file not found"):
        check_files(compose_cfg("train", vggish))
    check_files(compose_cfg("train", vggish + ["model.use_audio=false"]))  # no audio encoder is built


def test_evaluation_on_synthetic_data_of_another_config_names_the_keys_that_differ(synth_data_dir):
    """An eval whose data.synthetic keys differ from the data present at data.root names each differing key
    with what the root was made with and what was asked (the root's generation.json), not just 'not complete'."""
    from omegaconf import OmegaConf

    from avs.data.preflight import require_synthetic
    from avs.errors import MissingFileError

    data = compose_cfg("train", tiny_overrides(synth_data_dir, "s4")).data
    require_synthetic(data)  # the data present: accepted
    other = OmegaConf.merge(data, {"synthetic": {"clips": {"val": 5}, "frame_noise": 9.0}})
    with pytest.raises(MissingFileError) as err:
        require_synthetic(other)
    text = str(err.value)
    assert f"data.root={data.root}" in text and "never generates" in text
    assert "clips.val: there 2, asked 5" in text and "frame_noise: there 2.0, asked 9.0" in text
    assert "clips.train" not in text  # only the keys that differ
