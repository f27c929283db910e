"""Tiny end-to-end runs of the trainer on generated Sounding Shapes data (CPU, seconds each)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from avs.engine.checkpoint import load_checkpoint
from avs.engine.trainer import Trainer
from avs.evaluation.checkpoint import evaluate_checkpoint
from tests.conftest import compose_cfg, run_script, tiny_overrides

SMALL = ["model.channels=32"]


def _trainer(data_dir: Path, run_dir: Path, extra: list[str]) -> Trainer:
    cfg = compose_cfg("train", tiny_overrides(data_dir) + SMALL + extra)
    return Trainer(cfg, run_dir)


def test_fit_writes_run_dir_and_eval_reproduces_val(synth_data_dir, tmp_path):
    run = tmp_path / "run"
    trainer = _trainer(synth_data_dir, run, ["trainer.max_steps=4"])
    result = trainer.fit()
    assert (run / "checkpoints" / "best.ckpt").is_file() and (run / "checkpoints" / "last.ckpt").is_file()
    assert (run / "config_resolved.yaml").is_file()
    record = json.loads((run / "metrics.json").read_text())
    for key in (
        "method",
        "backbone",
        "data",
        "resolution",
        "metric_protocols",
        "eval_batch_size",
        "legacy_batch_size",
        "init_from",
        "supervised_frames",
        "seed",
        "git_commit",
        "config",
    ):
        assert key in record, key
    assert record["selection"]["split"] == "val"
    assert set(record["test"]) == {"per_frame", "avsbench_legacy", "dataset_level"}
    assert result["steps"] == 4
    # eval.py path on the best checkpoint reproduces the val metrics logged during training
    ecfg = compose_cfg(
        "eval",
        [
            f"checkpoint={run / 'checkpoints' / 'best.ckpt'}",
            "split=val",
            "device=cpu",
            f"paths.data_dir={synth_data_dir}",
            f"paths.log_dir={tmp_path}/logs",
        ],
    )
    out = evaluate_checkpoint(ecfg, tmp_path / "eval")
    for protocol, values in record["val"].items():
        for k, v in values.items():
            if isinstance(v, float):
                assert out["metrics"][protocol][k] == pytest.approx(v, abs=1e-4), (protocol, k)
    assert (tmp_path / "eval" / "metrics_val.md").read_text().startswith("**val**")


def test_test_split_selection_is_refused(synth_data_dir, tmp_path):
    from avs.config_checks import ConfigError

    with pytest.raises(ConfigError, match="allow_test_selection"):
        _trainer(synth_data_dir, tmp_path / "r", ["trainer.select_split=test"])


def test_resume_reproduces_uninterrupted_run(synth_data_dir, tmp_path):
    common = [
        "trainer.max_steps=6",
        "data.batch_size=1",
        "trainer.deterministic=true",
        "trainer.test_at_end=false",
        "data.flip_prob=0.5",
    ]
    full = _trainer(synth_data_dir, tmp_path / "full", common)
    full.fit()
    cut = _trainer(synth_data_dir, tmp_path / "cut", common + ["trainer.interrupt_after_steps=3"])
    assert cut.fit()["interrupted"]
    resumed = _trainer(synth_data_dir, tmp_path / "cut", common + ["trainer.resume=auto"])
    resumed.fit()
    assert resumed.loss_history == full.loss_history  # same per-step losses, bit for bit
    a = load_checkpoint(tmp_path / "full" / "checkpoints" / "last.ckpt")["model"]
    b = load_checkpoint(tmp_path / "cut" / "checkpoints" / "last.ckpt")["model"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_multirun_writes_one_dir_per_job(synth_data_dir, tmp_path):
    sweep = tmp_path / "sweep"
    args = [
        "-m",
        "seed=1,2",
        f"hydra.sweep.dir={sweep}",
        *tiny_overrides(synth_data_dir),
        *SMALL,
        "trainer.max_steps=1",
    ]
    proc = run_script("train.py", args, tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(p.read_text()) for p in sorted(sweep.glob("*/metrics.json"))]
    assert [r["seed"] for r in records] == [1, 2]


def test_latent_kl_per_dimension_on_a_split(synth_data_dir, tmp_path):
    from torch.utils.data import DataLoader

    from avs.data import build_dataset
    from avs.engine.diagnostics import gaussian_kl_per_dim, latent_kl_per_dimension
    from avs.models.build import build_model

    # closed form against a hand value: KL(N(1, 1) || N(0, e^0)) = 0.5 per dimension
    one = torch.ones(1, 2)
    assert torch.allclose(gaussian_kl_per_dim(one, 0 * one, 0 * one, 0 * one), torch.full((1, 2), 0.5))
    cfg = compose_cfg(
        "train",
        tiny_overrides(synth_data_dir)
        + ["model=ecmvae", "model.channels=32", "model.audio_dim=32", "audio.embed_dim=32"],
    )
    model = build_model(cfg)
    loader = DataLoader(build_dataset(cfg.data, "val", train=False), batch_size=2)
    out = latent_kl_per_dimension(model, loader)
    assert out["frames"] == 2 * cfg.data.num_frames
    assert set(out) == {"s_v", "s_a", "c", "frames"}
    assert all(len(v) == 16 and min(v) >= 0 for k, v in out.items() if k != "frames")


def test_validation_logs_mask_overlays_to_tensorboard(synth_data_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "tb"
    _trainer(
        synth_data_dir, run, ["trainer.max_steps=2", "trainer.tensorboard=true", "trainer.test_at_end=false"]
    ).fit()
    ea = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0})
    ea.Reload()
    assert "val/masks" in ea.Tags()["images"]
    assert any(t.startswith("train/") for t in ea.Tags()["scalars"]) and any(
        t.startswith("val/") for t in ea.Tags()["scalars"]
    )


def test_final_test_metrics_reach_tensorboard(synth_data_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "tb"
    result = _trainer(synth_data_dir, run, ["trainer.max_steps=2", "trainer.tensorboard=true"]).fit()
    ea = EventAccumulator(str(run / "tensorboard"))
    ea.Reload()
    tags = [t for t in ea.Tags()["scalars"] if t.startswith("test/")]
    assert tags, ea.Tags()["scalars"]
    for proto, values in result["test"].items():
        for k, v in values.items():
            if isinstance(v, float):
                (event,) = ea.Scalars(f"test/{proto}/{k}")
                assert event.step == 2 and abs(event.value - v) < 1e-6


def test_checkpoint_config_needs_no_weight_files():
    from omegaconf import OmegaConf

    from avs.evaluation.checkpoint import config_from_checkpoint

    stored = OmegaConf.to_yaml(
        OmegaConf.create(
            {
                "backbone": {"name": "pvt_v2_b5", "pretrained": "file", "weights_path": "/nowhere/pvt_v2_b5.pth"},
                "audio": {"pretrained": True},
                "model": {"audio_encoder": {"pretrained": True}},
            }
        )
    )
    cfg = config_from_checkpoint({"config": stored}, "x.ckpt")
    assert cfg.backbone.pretrained is None and cfg.audio.pretrained is False
    assert cfg.model.audio_encoder.pretrained is False
    kept = config_from_checkpoint({"config": stored}, "x.ckpt", weight_files=True)
    assert kept.backbone.pretrained == "file"
