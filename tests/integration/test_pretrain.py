"""scripts/pretrain.py at toy size: weights + manifest, determinism, held-out accuracy, loading by config."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from tests.conftest import compose_cfg, run_script

ROOT = Path(__file__).resolve().parents[2]
# Two categories, one object per frame, clean sounds: easy enough to beat chance in a few steps.
TOY = [
    "visual.image_size=32",
    "visual.num_categories=2",
    "visual.num_objects=[1,1]",
    "visual.train_images=64",
    "visual.val_images=32",
    "visual.epochs=3",
    "visual.batch_size=16",
    "audio.num_categories=2",
    "audio.snr_db=[20,30]",
    "audio.train_clips=64",
    "audio.val_clips=32",
    "audio.epochs=3",
    "audio.batch_size=16",
]


def _script():
    spec = importlib.util.spec_from_file_location("pretrain_script", ROOT / "scripts" / "pretrain.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(out_dir: Path, extra: list[str] = ()) -> dict:
    cfg = compose_cfg("pretrain", TOY + [f"out_dir={out_dir}", *extra])
    return _script().run(cfg)


@pytest.fixture(scope="module")
def toy_runs(tmp_path_factory) -> tuple[Path, Path, dict]:
    a, b = tmp_path_factory.mktemp("w_a"), tmp_path_factory.mktemp("w_b")
    records = _run(a)
    _run(b)
    return a, b, records


def test_writes_weights_and_manifest(toy_runs):
    out, _, records = toy_runs
    for task, name in (("visual", "standin_pvt_v2_b0_64px"), ("audio", "standin_tiny_audio")):
        assert (out / f"{name}.pth").is_file()
        manifest = json.loads((out / f"{name}.json").read_text())
        assert manifest == records[task]
        for key in ("command", "seed", "config", "data_hash", "wall_time_s", "torch_version", "weights_sha256"):
            assert key in manifest, key
        assert manifest["torch_version"] == torch.__version__
        assert manifest["config"]["num_categories"] == 2


def test_same_seed_same_bytes_and_other_seed_differs(toy_runs, tmp_path):
    a, b, _ = toy_runs
    for name in ("standin_pvt_v2_b0_64px.pth", "standin_tiny_audio.pth"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    _run(tmp_path, ["seed=1", "tasks=[audio]"])
    assert (tmp_path / "standin_tiny_audio.pth").read_bytes() != (a / "standin_tiny_audio.pth").read_bytes()
    seed1 = json.loads((tmp_path / "standin_tiny_audio.json").read_text())
    seed0 = json.loads((a / "standin_tiny_audio.json").read_text())
    assert seed1["data_hash"] != seed0["data_hash"]


def test_above_chance_on_the_toy_tasks(toy_runs):
    _, _, rec = toy_runs
    assert rec["audio"]["heldout_accuracy"] > rec["audio"]["chance_accuracy"]
    assert rec["visual"]["heldout_exact_match"] > rec["visual"]["chance_exact_match"]


def test_files_load_through_the_model_config(toy_runs, tmp_path):
    from avs.models.build import build_model

    out, _, _ = toy_runs
    cfg = compose_cfg(
        "train",
        [
            "experiment=proxy_pretrained",
            f"paths.weights_dir={out}",
            f"paths.data_dir={tmp_path}",
        ],
    )
    model = build_model(cfg)
    visual = torch.load(out / "standin_pvt_v2_b0_64px.pth", weights_only=True)
    audio = torch.load(out / "standin_tiny_audio.pth", weights_only=True)
    body = model.backbone.body.state_dict()
    enc = model.audio_encoder.state_dict()
    assert set(visual) == set(body) and set(audio) == set(enc)
    assert all(torch.equal(body[k], v) for k, v in visual.items())
    assert all(torch.equal(enc[k], v) for k, v in audio.items())
    fresh = build_model(compose_cfg("train", ["experiment=quickstart", f"paths.data_dir={tmp_path}"]))
    assert not torch.equal(fresh.audio_encoder.state_dict()["head.0.weight"], audio["head.0.weight"])


def test_wrong_sizes_and_missing_file_are_plain_errors(toy_runs, tmp_path):
    from avs.models.audio_encoders import TinyAudioEncoder

    out, _, _ = toy_runs
    with pytest.raises(ValueError, match="audio.width"):
        TinyAudioEncoder(embed_dim=32, width=8, pretrained="file", weights_path=str(out / "standin_tiny_audio.pth"))
    with pytest.raises(FileNotFoundError, match="audio.weights_path"):
        TinyAudioEncoder(embed_dim=32, width=16, pretrained="file", weights_path=str(tmp_path / "nope.pth"))


def test_command_line(tmp_path):
    proc = run_script("pretrain.py", [f"out_dir={tmp_path}", "tasks=[audio]", *TOY], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "audio: held-out accuracy" in proc.stdout
    assert (tmp_path / "standin_tiny_audio.json").is_file()
    bad = run_script("pretrain.py", [f"out_dir={tmp_path}", "tasks=[video]"], tmp_path)
    assert bad.returncode != 0 and "tasks" in bad.stderr


def test_pretrain_help_says_what_it_makes_and_how_long(tmp_path):
    proc = run_script("pretrain.py", ["--help"], tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    head = proc.stdout.split("Overrides are")[0]  # the text above the config dump
    assert "standin_pvt_v2_b0_64px.pth" in head and "standin_tiny_audio.pth" in head
    assert "How long" in head and "docs/synthetic.md" in head and "experiment=proxy_pretrained" in head
