"""Importing the released AVSBench-semantic (AVSS) TPAVI checkpoints, and the release flags they need.

The released AVSS `Pred_endecoder` has the S4/MS3 key names (so the layout below reuses
`released_name` of test_import_released.py, which spells them out) but TPAVI's `align_channel`
has no bias, its TPAVI attends within 5-frame windows of the 10-frame clips, and its vid flag
zeroes the padded frames' neck maps, TPAVI outputs, decoder stages and logits. A state dict in that
layout (shapes from a tiny avs model of the same config, random values) must import strictly and
predict what the same weights predict in an avs model built with the release flags; and those
flags must compute the released function, checked against a small reference written here.
"""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from avs.config import PROJECT_ROOT
from avs.engine.checkpoint import CheckpointError, load_checkpoint
from avs.inference.released import RULES, UNUSED, import_checkpoint, map_keys, release_config
from avs.inference.released_avss import source_overrides
from avs.models.build import build_model
from tests.conftest import compose_cfg
from tests.integration.test_import_released import _random_like, released_name, unused_extras

SOURCE = "avsbench_avss"
# v1s / v1m clips: 5 real frames + 5 padded; v2: 10 real; the third pattern mixes real and padded
# frames inside one 5-frame window, where zeroing the neck maps (not the backbone maps) matters
VID = torch.tensor([[1] * 5 + [0] * 5, [1] * 10, [1, 1, 0, 1, 0, 1, 1, 1, 0, 0]], dtype=torch.bool)


def _overrides(data_dir) -> list[str]:
    return [
        "model=tpavi",
        "data=synth_avss",
        f"paths.data_dir={data_dir}",
        f"paths.log_dir={data_dir}/logs",
        "data.synthetic.clips={train: 3, val: 3, test: 3}",
        "data.image_size=64",
        "data.batch_size=2",
        "data.eval_batch_size=2",
        "data.num_workers=0",
        "backbone=pvt_v2_b0",
        "model.channels=64",
        "audio=vggish",
        "audio.pretrained=false",
        "trainer.progress=false",
        "trainer.tensorboard=false",
        "trainer.device=cpu",
    ]


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    from avs.data.synthetic import ensure_synthetic

    tmp = tmp_path_factory.mktemp("avss_import")
    overrides = _overrides(tmp)
    cfg = release_config(overrides)
    ensure_synthetic(cfg.data)
    gen = torch.Generator().manual_seed(0)
    ours = {k: _random_like(v, gen, k) for k, v in build_model(cfg).state_dict().items()}
    released = {released_name("avsbench", k): v for k, v in ours.items() if not k.startswith("audio_encoder.")}
    released.update(unused_extras("avsbench", ours, gen))
    vggish = {k.removeprefix("audio_encoder."): v for k, v in ours.items() if k.startswith("audio_encoder.")}
    rel_path, vgg_path, out = tmp / "V2_pvt_miou_best.pth", tmp / "vggish-10086976.pth", tmp / "imported.ckpt"
    torch.save(released, rel_path)  # model.module.state_dict(): no prefix
    torch.save(vggish, vgg_path)
    record = import_checkpoint(SOURCE, rel_path, cfg, out, vggish_path=vgg_path)
    return {"cfg": cfg, "ours": ours, "released": released, "record": record, "out": out, "tmp": tmp}


def _batch(cfg, seed: int = 1) -> dict:
    size = int(cfg.data.image_size)
    gen = torch.Generator().manual_seed(seed)
    return {
        "frames": torch.randn(len(VID), 10, 3, size, size, generator=gen),
        "audio": torch.randn(len(VID), 10, 1, 96, 64, generator=gen),
        "frame_valid": VID.clone(),
    }


# ----------------------------------------------------------------------------- the import
def test_release_preset_on_avss_sets_the_avss_flags(imported):
    m = imported["cfg"].model
    assert m.fusion.legacy_window == 5 and m.fusion.block.legacy_align_without_bias and m.legacy_vid_zeroing
    paper = compose_cfg("train", _overrides(imported["tmp"]))  # default preset: none of them
    assert paper.model.fusion.legacy_window is None
    assert not paper.model.fusion.block.legacy_align_without_bias and not paper.model.legacy_vid_zeroing
    s4 = release_config(["model=tpavi", "data=s4"])  # the S4/MS3 release keeps its biased, whole-clip TPAVI
    assert s4.model.fusion.legacy_window is None and not s4.model.fusion.block.legacy_align_without_bias


def test_every_avs_weight_comes_from_the_file(imported):
    assert not any(k.endswith("align_channel.bias") for k in imported["released"])
    state = load_checkpoint(imported["out"])
    assert set(state["model"]) == set(imported["ours"])
    for k, v in imported["ours"].items():
        assert torch.equal(state["model"][k], v), k
    counts = imported["record"]["counts"]
    assert counts["mapped"] + counts["documented_unused"] == len(imported["released"])
    assert counts["documented_unused"] == 4  # path4.resConfUnit1 (PVT file: no head)
    assert counts["avs_filled"] == counts["avs_keys"] == len(imported["ours"])
    assert state["released"]["source"] == SOURCE
    flags = state["release_flags"]
    assert flags["model.fusion.legacy_window"] == 5 and flags["model.legacy_vid_zeroing"] is True
    assert flags["model.fusion.block.legacy_align_without_bias"] is True


def test_imported_predictions_equal_direct_load_with_release_flags(imported):
    from avs.inference.model import load_model

    loaded = load_model(imported["out"], device="cpu")
    direct = build_model(imported["cfg"]).eval()
    direct.load_state_dict(imported["ours"])
    batch = _batch(imported["cfg"])
    a = loaded.model(batch)["logits"]
    assert torch.equal(a, direct(batch)["logits"])
    pad = ~VID
    assert a.shape[2] == imported["cfg"].data.num_classes
    assert torch.count_nonzero(a[pad]) == 0 and bool((a[VID] != 0).any())  # padded frames: exactly zero


def test_eval_runs_on_the_imported_checkpoint(imported, tmp_path):
    from avs.evaluation.checkpoint import evaluate_checkpoint

    ecfg = compose_cfg(
        "eval",
        [
            f"checkpoint={imported['out']}",
            "split=val",
            "device=cpu",
            f"paths.data_dir={imported['tmp']}",
            f"paths.log_dir={tmp_path}/logs",
        ],
    )
    out = evaluate_checkpoint(ecfg, tmp_path / "eval")
    for protocol in ("per_class", "avsbench_legacy"):
        assert 0.0 <= out["metrics"][protocol]["miou"] <= 1.0
    assert (tmp_path / "eval" / "metrics_val.json").is_file()


def test_import_script_picks_the_experiment_from_the_file(imported, tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "import_checkpoint", PROJECT_ROOT / "scripts" / "import_checkpoint.py"
    )
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "cli.ckpt"
    user = [o for o in _overrides(imported["tmp"]) if not o.startswith("model=")]  # the experiment brings it
    argv = ["--source", SOURCE, "--released", str(imported["tmp"] / "V2_pvt_miou_best.pth"), "--out", str(out)]
    assert script.main([*argv, "--vggish", str(imported["tmp"] / "vggish-10086976.pth"), *user]) == 0
    state = load_checkpoint(out)
    assert "avsbench_tpavi_pvt" in state["config"] and state["release_flags"]["model.fusion.legacy_window"] == 5
    assert state["released"]["counts"]["avs_filled"] == len(imported["ours"])


def test_source_selection_and_plain_refusals(imported, tmp_path):
    r50 = tmp_path / "V2_resnet_miou_best.pth"
    torch.save({"resnet.conv1.weight": torch.zeros(1), "tpavi_b1.g.weight": torch.zeros(1)}, r50)
    assert source_overrides(SOURCE, r50, ["x=1"]) == ["experiment=avsbench_tpavi_r50", "data=avss", "x=1"]
    assert source_overrides(SOURCE, r50, ["experiment=e", "data=d"]) == ["experiment=e", "data=d"]
    assert source_overrides("avsbench", r50, ["x=1"]) == ["x=1"]
    neither = tmp_path / "other.pth"
    torch.save({"encoder.patch_embed1.proj.weight": torch.zeros(1)}, neither)
    with pytest.raises(CheckpointError, match="not a released AVSS TPAVI checkpoint"):
        source_overrides(SOURCE, neither, [])
    rel = imported["tmp"] / "V2_pvt_miou_best.pth"
    with pytest.raises(CheckpointError, match="--source avsbench_avss"):  # the S4/MS3 source on AVSS data
        import_checkpoint("avsbench", rel, imported["cfg"], tmp_path / "o.ckpt")
    with pytest.raises(CheckpointError, match="needs AVSBench-semantic data"):
        import_checkpoint(SOURCE, rel, release_config(["model=tpavi", "data=s4"]), tmp_path / "o.ckpt")
    with pytest.raises(CheckpointError, match="resnet50 layout but backbone.name=pvt_v2_b0"):
        import_checkpoint(SOURCE, r50, imported["cfg"], tmp_path / "o.ckpt")


def test_full_size_layouts_map_strictly():
    """The released key counts: PVT-v2-B5 file 1186 keys, ResNet-50 file 626 (names built on the meta device)."""
    for experiment, n_file, n_unused in (("avsbench_tpavi_pvt", 1186, 4), ("avsbench_tpavi_r50", 626, 178)):
        overrides = [f"experiment={experiment}", "data=avss", "backbone.pretrained=null", "audio.pretrained=false"]
        cfg = release_config(overrides)
        with torch.device("meta"):
            ours = build_model(cfg).state_dict()
        names = [k for k in ours if not k.startswith("audio_encoder.")]
        released = [_full_size_name(k) for k in names]
        released += _full_size_unused(released)
        assert len(released) == n_file, experiment
        km = map_keys(released, RULES[SOURCE], UNUSED[SOURCE])
        assert not km.unmatched and len(km.unused) == n_unused
        assert sorted(km.mapped.values()) == sorted(names)
        assert not any("align_channel.bias" in k for k in names)


def _full_size_name(key: str) -> str:
    """AVSBench's ResNet-50 keeps torchvision names under `resnet.`, layer3/4 as layer3_1/layer4_1."""
    if not key.startswith("backbone.body.") or key.startswith("backbone.body.stages_") or "patch_embed" in key:
        return released_name("avsbench", key)
    rest = key.removeprefix("backbone.body.")
    return "resnet." + rest.replace("layer3.", "layer3_1.", 1).replace("layer4.", "layer4_1.", 1)


def _full_size_unused(released: list[str]) -> list[str]:
    extra = [k.replace("path3.", "path4.", 1) for k in released if k.startswith("path3.resConfUnit1.")]
    for a, b in (("layer3_1.", "layer3_2."), ("layer4_1.", "layer4_2.")):
        extra += [k.replace(a, b, 1) for k in released if k.startswith("resnet." + a)]
    return extra


# ----------------------------------------------------------------------------- the released function
def _ref_tpavi(blk, x: torch.Tensor, audio: torch.Tensor, window: int = 5) -> torch.Tensor:
    """The released AVSS TPAVIModule (dot mode) as its code reads: [B*T,C,h,w] maps, [B*T,128] audio ->
    [B*T,C,h,w]; clips are reshaped into `window`-frame groups, align_channel has no bias, the literal
    THW x THW matrix divided by its size."""
    _, c, h, w = x.shape
    x5 = x.reshape(-1, window, c, h, w).permute(0, 2, 1, 3, 4)  # [N,C,5,h,w]
    n, ci = x5.shape[0], blk.inter_channels
    a = audio.view(-1, window, audio.shape[-1]) @ blk.align_channel.weight.t()  # [N,5,C]
    a = a.permute(0, 2, 1)[..., None, None].repeat(1, 1, 1, h, w)  # [N,C,5,h,w]
    g = blk.g(x5).view(n, ci, -1).permute(0, 2, 1)
    theta = blk.theta(x5).view(n, ci, -1).permute(0, 2, 1)
    phi = blk.phi(a).view(n, ci, -1)
    f = torch.matmul(theta, phi)
    y = torch.matmul(f / f.size(-1), g).permute(0, 2, 1).reshape(n, ci, window, h, w)
    z = blk.W_z(y) + x5
    z = F.layer_norm(z.permute(0, 2, 3, 4, 1), (c,), blk.norm_layer.weight, blk.norm_layer.bias, blk.norm_layer.eps)
    return z.permute(0, 4, 1, 2, 3).permute(0, 2, 1, 3, 4).reshape(-1, c, h, w)


def _ref_forward(model, frames: torch.Tensor, audio: torch.Tensor, vid: torch.Tensor) -> torch.Tensor:
    """The released AVSS forward on avs's backbone / neck / decoder parts: the vid flag multiplies the
    audio, the four neck maps, each TPAVI output, each decoder stage and the logits."""
    b, t = frames.shape[:2]
    flag = vid.reshape(-1).float().view(-1, 1, 1, 1)
    maps = [m * flag for m in model.neck(model.backbone(frames.flatten(0, 1)))]
    a = audio.flatten(0, 1) * vid.reshape(-1, 1).float()
    maps = [_ref_tpavi(blk, maps[i], a) * flag for i, blk in enumerate(model.fusion.blocks)]
    d = model.decoder
    x = d.path4(maps[3], out_size=tuple(maps[2].shape[-2:])) * flag
    x = d.path3(x, maps[2], out_size=tuple(maps[1].shape[-2:])) * flag
    x = d.path2(x, maps[1], out_size=tuple(maps[0].shape[-2:])) * flag
    x = d.path1(x, maps[0]) * flag
    logits = F.interpolate(d.output_conv(x), size=frames.shape[-2:], mode="bilinear", align_corners=False)
    return (logits * flag).view(b, t, *logits.shape[1:])


def test_release_flags_compute_the_released_avss_function(imported):
    cfg = imported["cfg"]
    model = build_model(cfg).eval()
    model.load_state_dict(imported["ours"])
    gen = torch.Generator().manual_seed(3)
    size = int(cfg.data.image_size)
    frames = torch.randn(len(VID), 10, 3, size, size, generator=gen)
    audio = torch.randn(len(VID), 10, 128, generator=gen)  # VGGish embeddings (the encoder is not a difference)
    with torch.no_grad():
        ref = _ref_forward(model, frames, audio, VID)
        got = model({"frames": frames, "audio": audio, "frame_valid": VID})["logits"]
        scale = float(ref.abs().max())
        assert scale > 0 and float((got - ref).abs().max()) <= 1e-5 * scale
        assert torch.count_nonzero(got[~VID]) == 0
        # each flag matters: without it the same weights compute something else
        for key in ("window", "zeroing"):
            if key == "window":
                model.fusion.legacy_window = None
            else:
                model.fusion.legacy_window, model.legacy_vid_zeroing = 5, False
            other = model({"frames": frames, "audio": audio, "frame_valid": VID})["logits"]
            assert float((other - ref).abs().max()) > 1e-3 * scale, key
