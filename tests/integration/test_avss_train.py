"""AVSS (AVSBench-semantic) models on tiny semantic Sounding Shapes: every method trains, resumes, is
evaluated by the eval path and exported; the semantic loss and the padded frames (docs/avss.md)."""

from __future__ import annotations

import csv
import functools
import json
import math
from pathlib import Path

import pytest
import torch

from avs.engine.trainer import Trainer
from avs.losses import semantic_ce_loss
from avs.models.methods.avsbench import AVSBenchSegmentor
from tests.conftest import compose_cfg

METHODS = ["tpavi", "avsbg", "ecmvae", "ecmvae_bg"]


def _overrides(data_dir: Path) -> list[str]:
    return [
        "data=synth_avss",
        f"paths.data_dir={data_dir}",
        f"paths.log_dir={data_dir}/logs",
        "data.synthetic.clips={train: 3, val: 3, test: 3}",
        "data.image_size=64",
        "data.batch_size=2",
        "data.eval_batch_size=2",
        "data.num_workers=0",
        "backbone=pvt_v2_b0",
        "audio=tiny",
        "trainer.progress=false",
        "trainer.tensorboard=false",
        "trainer.device=cpu",
    ]


@pytest.fixture(scope="module")
def avss_dir(tmp_path_factory) -> Path:
    from avs.data.synthetic import ensure_synthetic

    data_dir = tmp_path_factory.mktemp("avss")
    ensure_synthetic(compose_cfg("train", _overrides(data_dir)).data)
    return data_dir


def _batch(cfg, indices: list[int]) -> dict:
    from torch.utils.data import default_collate

    from avs.data.avss import build_avss_dataset

    ds = build_avss_dataset(cfg.data, "train", True)
    return default_collate([ds[i] for i in indices])


def test_semantic_ce_loss_hand_values():
    # 3 frames, 2 classes, 1x2 pixels; frame 1 is padded / unlabelled (valid False) and must not count
    logits = torch.tensor(
        [
            [[[0.0, 0.0]], [[0.0, math.log(3.0)]]],  # frame 0: pixel 0 p=(.5,.5), pixel 1 p=(.25,.75)
            [[[50.0, -50.0]], [[-50.0, 50.0]]],  # frame 1: huge, wrong everywhere -> ignored
            [[[math.log(4.0), 0.0]], [[0.0, 0.0]]],  # frame 2: pixel 0 p=(.8,.2), pixel 1 p=(.5,.5)
        ]
    )  # [3,2,1,2]
    labels = torch.tensor([[[1, 1]], [[0, 0]], [[0, 1]]])  # [3,1,2]
    valid = torch.tensor([True, False, True])
    f0 = (-math.log(0.5) - math.log(0.75)) / 2
    f2 = (-math.log(0.8) - math.log(0.5)) / 2
    got = semantic_ce_loss(logits, labels, valid)
    assert got.item() == pytest.approx((f0 + f2) / 2, rel=1e-6)
    assert semantic_ce_loss(logits, labels, torch.zeros(3, dtype=torch.bool)).item() == 0.0
    with pytest.raises(ValueError, match="labels"):
        semantic_ce_loss(logits, labels[:, 0], valid)


def test_semantic_loss_with_a_foreground_term_adds_the_binary_loss_on_the_foreground_view():
    from avs.losses import BCESegLoss, SemanticCELoss, bce_loss

    # 3 classes; frame 0 pixel 0: logits (0, ln 2, ln 2) -> P(fg) = 4/5, foreground logit ln 4
    logits = torch.tensor([[[[0.0, 0.0]], [[math.log(2.0), 0.0]], [[math.log(2.0), 0.0]]]])  # [1,3,1,2]
    labels = torch.tensor([[[2, 0]]])
    valid = torch.tensor([True])
    plain = SemanticCELoss()
    both = SemanticCELoss(foreground=BCESegLoss(), foreground_weight=0.5)
    # pixel 0: P(fg) = 0.8, label fg; pixel 1: logits all 0 -> P(fg) = 2/3, label bg
    fg_bce = (-math.log(0.8) - math.log(1 / 3)) / 2
    assert plain(logits, labels, valid).item() == pytest.approx(semantic_ce_loss(logits, labels, valid).item())
    got = both(logits, labels, valid).item()
    assert got == pytest.approx(semantic_ce_loss(logits, labels, valid).item() + 0.5 * fg_bce, rel=1e-6)
    fg = torch.tensor([[[[math.log(4.0), math.log(2.0)]]]])
    assert bce_loss(fg, torch.tensor([[[[1.0, 0.0]]]]), valid).item() == pytest.approx(fg_bce, rel=1e-6)


def test_decoder_with_one_output_channel_is_unchanged():
    from avs.models.decoder import build_decoder
    from avs.models.segmentor import Segmentor

    torch.manual_seed(0)
    plain = build_decoder(channels=16, kind="simple")
    torch.manual_seed(0)
    owner = type("M", (), {"channels": 16, "num_classes": 1})()
    via_segmentor = Segmentor.make_decoder(owner, functools.partial(build_decoder, kind="simple"))
    a, b = plain.state_dict(), via_segmentor.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert plain.output_conv[-1].out_channels == 1
    semantic = build_decoder(channels=16, kind="simple", num_classes=9)
    assert semantic.output_conv[-1].out_channels == 9
    feats = [torch.randn(2, 16, s, s) for s in (16, 8, 4, 2)]
    assert semantic(feats, (64, 64)).shape == (2, 9, 64, 64)


@pytest.mark.parametrize("method", ["tpavi", "avsbg"])
def test_padded_frames_count_in_no_loss(avss_dir, method):
    from avs.models.build import build_model

    cfg = compose_cfg("train", _overrides(avss_dir) + [f"model={method}"])
    torch.manual_seed(0)
    model = build_model(cfg).train()
    batch = _batch(cfg, [0, 1])  # v1s and v1m: 5 real frames, 5 padded each
    assert not batch["frame_valid"][:, 5:].any()
    torch.manual_seed(1)
    terms = {k: v.detach() for k, v in model(batch).items()}
    other = {**batch, "frames": batch["frames"].clone(), "masks": batch["masks"].clone()}
    other["frames"][:, 5:] = torch.randn_like(other["frames"][:, 5:])
    other["masks"][:, 5:] = torch.randint(0, int(cfg.data.num_classes), other["masks"][:, 5:].shape)
    torch.manual_seed(1)
    changed = model(other)
    for k, v in terms.items():
        assert torch.equal(v, changed[k].detach()), k
    model.zero_grad()
    sum(changed.values()).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


class BinaryOnly(AVSBenchSegmentor):
    """A researcher's class that does not declare the semantic capability."""

    SEMANTIC = False


def test_avss_is_refused_for_binary_classes_and_binary_protocols(avss_dir):
    from avs.config_checks import ConfigError, check_config

    target = f"model._target_={__name__}.BinaryOnly"
    with pytest.raises(ConfigError, match="SEMANTIC"):
        check_config(compose_cfg("train", _overrides(avss_dir) + [target]))
    cfg = compose_cfg("train", _overrides(avss_dir) + ["eval.protocols=[per_frame]", "eval.protocol=per_frame"])
    with pytest.raises(ConfigError, match="eval.protocols"):
        check_config(cfg)
    check_config(compose_cfg("train", _overrides(avss_dir)))  # the shipped class passes


@pytest.mark.parametrize("method", METHODS)
def test_method_trains_resumes_evaluates_and_exports(avss_dir, tmp_path, method):
    from avs.evaluation.checkpoint import evaluate_checkpoint
    from avs.inference.export import export_checkpoint

    common = _overrides(avss_dir) + [f"model={method}", "trainer.max_steps=2", "trainer.deterministic=true"]
    run = tmp_path / "run"
    cut = Trainer(compose_cfg("train", common + ["trainer.interrupt_after_steps=1"]), run)
    assert cut.fit()["interrupted"]
    resumed = Trainer(compose_cfg("train", common + ["trainer.resume=auto"]), run)
    result = resumed.fit()
    assert result["steps"] == 2
    record = json.loads((run / "metrics.json").read_text())
    assert set(record["test"]) == {"per_class", "avsbench_legacy"}
    for protocol in ("per_class", "avsbench_legacy"):
        assert 0.0 <= record["test"][protocol]["miou"] <= 1.0
        assert len(record["test"][protocol]["iou_per_class"]) == 9
    assert record["val"]["per_class"]["num_frames"] == 20  # 5 + 5 + 10 real labelled frames, never padded ones

    ecfg = compose_cfg(
        "eval",
        [f"checkpoint={run / 'checkpoints' / 'best.ckpt'}", "split=val", "device=cpu", f"paths.data_dir={avss_dir}"],
    )
    out = evaluate_checkpoint(ecfg, tmp_path / "eval")
    for protocol in ("per_class", "avsbench_legacy"):
        assert out["metrics"][protocol]["miou"] == pytest.approx(record["val"][protocol]["miou"], abs=1e-6)
    with open(tmp_path / "eval" / "classes_val_per_class.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 9 and rows[0]["name"]

    xcfg = compose_cfg("export", [f"checkpoint={run / 'checkpoints' / 'best.ckpt'}", "num_checks=0"])
    exported = export_checkpoint(xcfg, tmp_path / "export")
    assert exported.input_shapes["logits"][2] == 9


def test_quickstart_avss_overlay_trains_one_step(avss_dir, tmp_path):
    cfg = compose_cfg("train", ["experiment=quickstart_avss", *_overrides(avss_dir), "trainer.max_steps=1"])
    assert cfg.model.name == "avsbg" and cfg.data.subset == "avss" and cfg.eval.protocol == "per_class"
    result = Trainer(cfg, tmp_path / "run").fit()
    assert result["steps"] == 1
