"""Importing the authors' released checkpoints (AVSBench, MMVAE-AVS, AVS-bidirectional).

Each test builds a state dict in the released layout -- key names written out here from the
released model classes (`Pred_endecoder`, `AVSMMVAE`, `AVSModel`), shapes taken from an avs
model of the same tiny config, random values -- plus the torchvggish file, imports it, and checks
the strict mapping, that every avs weight comes from the file, that eval runs on the result and
that its predictions equal those of the same weights loaded directly into an avs model built with
the recorded release flags.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from avs.config import PROJECT_ROOT
from avs.engine.checkpoint import CheckpointError, load_checkpoint
from avs.inference.released import RULES, UNUSED, convert_state_dict, import_checkpoint, map_keys, release_config
from avs.models.build import build_model
from tests.conftest import compose_cfg, tiny_overrides

VGG = ["audio=vggish", "audio.pretrained=false"]
MODELS = {"avsbench": "tpavi", "mmvae_avs": "ecmvae", "avs_bidirectional": "avsbg"}


# ----------------------------------------------------------------------------- released layouts
def _pvt_original(key: str, prefix: str) -> str:
    """Our timm PVT-v2 body key -> the original PVT-v2 name (patch_embed1..4, block1..4, norm1..4)."""
    k = key.removeprefix("backbone.body.")
    if k.startswith("patch_embed."):
        return prefix + "patch_embed1." + k.removeprefix("patch_embed.")
    stage, rest = re.fullmatch(r"stages_(\d)\.(.+)", k).groups()
    i = int(stage) + 1
    if rest.startswith("downsample."):
        return f"{prefix}patch_embed{i}." + rest.removeprefix("downsample.")
    if rest.startswith("norm."):
        return f"{prefix}norm{i}." + rest.removeprefix("norm.")
    rest = rest.removeprefix("blocks.").replace("mlp.dwconv.", "mlp.dwconv.dwconv.")
    return f"{prefix}block{i}.{rest}"


def _simple_decoder(key: str, src: str, dst: str, modulelist: bool) -> str:
    """Our simple-decoder key (path{p}.resConfUnit{u}.body.{0,1,3,4} / output_conv) -> the released name."""
    k = key.removeprefix(src + ".")
    if k.startswith("output_conv."):
        return f"{dst}.head_up_2.{k}"
    p, u, idx, leaf = re.fullmatch(r"path(\d)\.resConfUnit(\d)\.body\.(\d)\.(.+)", k).groups()
    n = 5 - int(p)  # path4 is the first block
    block = f"short_connect_with_decode_module.{n - 1}" if modulelist else f"fusion_block_{n}"
    part = {"0": "ConvBNReLU1.conv", "1": "ConvBNReLU1.norm", "3": "ConvBNReLU2.conv", "4": "ConvBNReLU2.norm"}[idx]
    return f"{dst}.{block}.resConfUnit{u}.{part}.{leaf}"


def _dimreduce(key: str, src: str, dst: str) -> str:
    i, j, leaf = re.fullmatch(rf"{src}\.stages\.(\d)\.(\d)\.(.+)", key).groups()
    return f"{dst}.conv_list.{i}.reduce.{int(j) // 2}.{'conv' if int(j) % 2 == 0 else 'norm'}.{leaf}"


def _latent(key: str) -> str:
    k = key.removeprefix("latent.")
    m = re.fullmatch(r"(enc_\w+)\.convs\.(\d+)\.(.+)", k)
    if m:
        enc, idx, leaf = m.group(1), int(m.group(2)), m.group(3)
        return f"mm_vae_model.{enc}.{'layer' if idx % 3 == 0 else 'bn'}{idx // 3 + 1}.{leaf}"
    m = re.fullmatch(r"ba_(prior|post)\.(mu|logvar|target)\.(.+)", k)
    if m:
        head = {"mu": "mu", "logvar": "logvar", "target": "sc_a"}[m.group(2)]
        return f"mm_vae_model.ba_lower_bound_{head}_{m.group(1)}.{m.group(3)}"
    m = re.fullmatch(r"(noise_model_prior|noise_model_post)\.(.+)", k)
    if m:
        return f"mm_vae_model.{m.group(1)}.noise_conv.{m.group(2)}"
    return "mm_vae_model." + k


def released_name(source: str, key: str) -> str:
    """Our key -> the name the released model class gives that weight."""
    if key.startswith("backbone."):
        return _pvt_original(key, "encoder_backbone." if source == "avsbench" else "encoder.")
    if source == "avsbench":
        m = re.fullmatch(r"neck\.stages\.(\d)\.branches\.(\d)\.(.+)", key)
        if m:
            return f"conv{int(m.group(1)) + 1}.conv2d_list.{m.group(2)}.{m.group(3)}"
        m = re.fullmatch(r"fusion\.blocks\.(\d)\.(.+)", key)
        if m:
            return f"tpavi_b{int(m.group(1)) + 1}.{m.group(2)}"
        return key.removeprefix("decoder.")  # path*, output_conv identical
    if source == "mmvae_avs":
        if key.startswith("neck."):
            return _dimreduce(key, "neck", "neck_prior")
        if key.startswith("neck_post."):
            return _dimreduce(key, "neck_post", "neck_post")
        if key.startswith("fusion.blocks."):
            return "fusion_modules." + key.removeprefix("fusion.blocks.")
        if key.startswith("decoder."):
            return _simple_decoder(key, "decoder", "decoder_prior", modulelist=False)
        if key.startswith("decoder_post."):
            return _simple_decoder(key, "decoder_post", "decoder_post", modulelist=False)
        return _latent(key)
    # avs_bidirectional
    if key.startswith("neck."):
        return _dimreduce(key, "neck", "neck")
    m = re.fullmatch(r"fusion\.blocks\.(\d)\.(conv\d)\.(.+)", key)
    if m:
        return f"fusion_modules.{m.group(1)}.{m.group(2)}.conv.{m.group(3)}"
    m = re.fullmatch(r"motion\.gates\.(\d)\.(.+)", key)
    if m:
        return f"corr_atten.{m.group(1)}.{m.group(2)}"
    m = re.fullmatch(r"projector\.mask_encoder\.(\d)\.(.+)", key)
    if m:
        return f"mask_encoder.{m.group(1)}.conv.{m.group(2)}"
    if key.startswith("projector.spatial_pool."):
        return "maksed_visual_to_audio." + key.removeprefix("projector.spatial_pool.")
    return _simple_decoder(key, "decoder", "decoder", modulelist=True)


def _random_like(t: torch.Tensor, gen: torch.Generator, key: str = "") -> torch.Tensor:
    """Fresh random values at the scale of the model's own init (so deep random nets stay finite)."""
    if not t.is_floating_point():
        return torch.randint(0, 100, t.shape, generator=gen, dtype=t.dtype)
    scale = float(t.std()) if t.numel() > 1 and float(t.std()) > 0 else 0.1
    noise = torch.randn(t.shape, generator=gen, dtype=t.dtype) * scale
    if key.endswith("running_var"):
        return 0.5 + noise.abs()
    return t + noise


def unused_extras(source: str, sd: dict[str, torch.Tensor], gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Weights the released classes hold but never call (each decoder's first resConfUnit1, audio_neck)."""
    out: dict[str, torch.Tensor] = {}
    if source == "avsbench":
        for k, v in sd.items():  # path4 gets the same ResidualConvUnit as path3
            if k.startswith("decoder.path3.resConfUnit1."):
                out[k.replace("decoder.path3.", "path4.")] = _random_like(v, gen, k)
        return out
    c = sd["neck.stages.0.0.weight"].shape[0]
    out["audio_neck.weight"] = torch.randn(c, 128, generator=gen)
    out["audio_neck.bias"] = torch.randn(c, generator=gen)
    for src, dst in (("decoder", "decoder_prior"), ("decoder_post", "decoder_post")):
        if source == "avs_bidirectional" and src == "decoder_post":
            continue
        for k, v in sd.items():
            if k.startswith(f"{src}.path3.resConfUnit1."):
                name = _simple_decoder(
                    k.replace(".path3.", ".path4."),
                    src,
                    "decoder" if source == "avs_bidirectional" else dst,
                    modulelist=source == "avs_bidirectional",
                )
                out[name] = _random_like(v, gen, k)
    return out


def released_layout(source: str, cfg, seed: int = 0):
    """-> (released state dict, VGGish file dict, our state dict holding the same random values)."""
    gen = torch.Generator().manual_seed(seed)
    ours = {k: _random_like(v, gen, k) for k, v in build_model(cfg).state_dict().items()}
    released, vggish = {}, {}
    for k, v in ours.items():
        if k.startswith("audio_encoder."):
            vggish[k.removeprefix("audio_encoder.")] = v
        else:
            released[released_name(source, k)] = v
    released.update(unused_extras(source, ours, gen))
    return released, vggish, ours


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module", params=list(MODELS))
def imported(request, synth_data_dir, tmp_path_factory):
    source = request.param
    tmp = tmp_path_factory.mktemp(source)
    overrides = tiny_overrides(synth_data_dir) + VGG + [f"model={MODELS[source]}"]
    cfg = release_config(overrides)
    released, vggish, ours = released_layout(source, cfg)
    if source == "mmvae_avs":  # saved from a DataParallel wrapper
        released = {f"module.{k}": v for k, v in released.items()}
    rel_path, vgg_path, out = tmp / f"{source}_best.pth", tmp / "vggish-10086976.pth", tmp / "imported.ckpt"
    torch.save(released, rel_path)
    torch.save(vggish, vgg_path)
    record = import_checkpoint(source, rel_path, cfg, out, vggish_path=vgg_path)
    return {
        "source": source,
        "overrides": overrides,
        "released": released,
        "vggish": vggish,
        "ours": ours,
        "record": record,
        "out": out,
        "tmp": tmp,
        "cfg": cfg,
    }


# ----------------------------------------------------------------------------- tests
def test_every_avs_weight_comes_from_the_file(imported):
    state = load_checkpoint(imported["out"])
    assert set(state["model"]) == set(imported["ours"])
    for k, v in imported["ours"].items():
        assert torch.equal(state["model"][k], v), k
    counts = imported["record"]["counts"]
    released_keys = {k.removeprefix("module.") for k in imported["released"]}
    assert counts["mapped"] + counts["documented_unused"] == len(released_keys)
    assert counts["documented_unused"] > 0 and counts["avs_filled"] == counts["avs_keys"] == len(imported["ours"])
    assert counts["vggish_mapped"] == len(imported["vggish"])
    rec = state["released"]
    assert rec["source"] == imported["source"] and rec["file"] == f"{imported['source']}_best.pth"
    import hashlib

    assert rec["sha256"] == hashlib.sha256((imported["tmp"] / rec["file"]).read_bytes()).hexdigest()
    assert "model.preset: release" in state["config"] or "preset: release" in state["config"]
    assert state["release_flags"] and all(v is not None for v in state["release_flags"].values())


def test_imported_predictions_equal_direct_load_with_recorded_flags(imported):
    from avs.inference.model import load_model

    loaded = load_model(imported["out"], device="cpu")
    direct = build_model(imported["cfg"]).eval()
    direct.load_state_dict(imported["ours"])
    cfg = imported["cfg"]
    t, size = int(cfg.data.num_frames), int(cfg.data.image_size)
    gen = torch.Generator().manual_seed(1)
    batch = {
        "frames": torch.randn(2, t, 3, size, size, generator=gen),
        "audio": torch.randn(2, t, 1, 96, 64, generator=gen),
    }
    torch.manual_seed(5)
    a = loaded.model(batch)["logits"]
    torch.manual_seed(5)
    b = direct(batch)["logits"]
    assert torch.equal(a, b)
    if imported["source"] == "avsbench":  # the recorded flag matters: without it the prediction differs
        from omegaconf import open_dict

        paper = imported["cfg"].copy()
        with open_dict(paper):
            paper.model.decoder.legacy_inplace_relu_skip = False
        plain = build_model(paper).eval()
        plain.load_state_dict(imported["ours"])
        assert not torch.allclose(plain(batch)["logits"], a)


def test_eval_runs_on_the_imported_checkpoint(imported, synth_data_dir, tmp_path):
    from avs.evaluation.checkpoint import evaluate_checkpoint

    ecfg = compose_cfg(
        "eval",
        [
            f"checkpoint={imported['out']}",
            "split=val",
            "device=cpu",
            f"paths.data_dir={synth_data_dir}",
            f"paths.log_dir={tmp_path}/logs",
        ],
    )
    out = evaluate_checkpoint(ecfg, tmp_path / "eval")
    miou = out["metrics"]["per_frame"]["miou"]
    assert 0.0 <= miou <= 1.0
    assert (tmp_path / "eval" / "metrics_val.json").is_file()


def test_missing_and_extra_keys_fail_with_the_list(imported):
    source, released = imported["source"], {k.removeprefix("module."): v for k, v in imported["released"].items()}
    target = build_model(imported["cfg"]).state_dict()
    dropped = next(k for k in released if ".theta." in k or ".conv2." in k or "output_conv.2" in k)
    broken = {k: v for k, v in released.items() if k != dropped}
    broken["some_new_head.weight"] = torch.zeros(3)
    with pytest.raises(CheckpointError) as err:
        convert_state_dict(source, broken, target, imported["vggish"], name="x.pth")
    msg = str(err.value)
    assert msg.startswith("x.pth:") and "some_new_head.weight" in msg
    assert "1 released key(s) match no rule" in msg and "1 avs key(s) are not filled" in msg
    missing_ours = map_keys([dropped], RULES[source], UNUSED[source]).mapped[dropped]
    assert missing_ours in msg
    # a shape that does not fit is a conflict, not a silent skip
    wrong = dict(released)
    wrong[dropped] = torch.zeros(1)
    with pytest.raises(CheckpointError, match="shape"):
        convert_state_dict(source, wrong, target, imported["vggish"], name="x.pth")


def test_unsafe_or_missing_file_is_a_checkpoint_error(tmp_path):
    cfg = release_config(tiny_overrides(tmp_path) + ["model=tpavi"])
    with pytest.raises(CheckpointError, match="not found"):
        import_checkpoint("avsbench", tmp_path / "nope.pth", cfg, tmp_path / "o.ckpt")
    evil = tmp_path / "evil.pth"
    torch.save({"x": Path("a")}, evil)  # unpickling needs a non-allowlisted global
    with pytest.raises(CheckpointError, match="weights_only"):
        import_checkpoint("avsbench", evil, cfg, tmp_path / "o.ckpt")


def test_avsbench_resnet_two_branch_layout_maps_to_torchvision_names():
    from avs.models.backbones import VisualBackbone

    ours = [f"backbone.{k}" for k in VisualBackbone(name="resnet50", pretrained=None).state_dict()]
    released = []
    for k in ours:
        name = k.removeprefix("backbone.body.")
        name = re.sub(r"^layer3\.", "layer3_1.", name)
        name = re.sub(r"^layer4\.", "layer4_1.", name)
        released.append("resnet." + name)
    released += [k.replace("layer3_1.", "layer3_2.") for k in released if ".layer3_1." in k]
    released += [k.replace("layer4_1.", "layer4_2.") for k in released if ".layer4_1." in k]
    km = map_keys(released, RULES["avsbench"], UNUSED["avsbench"])
    assert not km.unmatched
    assert sorted(km.mapped.values()) == sorted(ours)
    assert all(re.match(r"resnet\.layer[34]_2\.", k) for k in km.unused)
    # ECMVAE / AVS-BG keep torchvision names under encoder.
    km2 = map_keys(
        ["encoder." + k.removeprefix("backbone.body.") for k in ours], RULES["mmvae_avs"], UNUSED["mmvae_avs"]
    )
    assert not km2.unmatched and sorted(km2.mapped.values()) == sorted(ours)


def test_import_script_cli(imported, tmp_path):
    if imported["source"] != "avsbench":
        pytest.skip("one CLI run is enough")
    out = tmp_path / "cli.ckpt"
    cmd = [
        sys.executable,
        str(PROJECT_ROOT / "scripts" / "import_checkpoint.py"),
        "--source",
        "avsbench",
        "--released",
        str(imported["tmp"] / "avsbench_best.pth"),
        "--vggish",
        str(imported["tmp"] / "vggish-10086976.pth"),
        "--out",
        str(out),
        *imported["overrides"],
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert out.is_file() and "documented_unused" in proc.stdout
    bad = subprocess.run(
        cmd[:3] + ["avs_bidirectional"] + cmd[4:], capture_output=True, text=True, timeout=600, cwd=tmp_path
    )
    assert bad.returncode != 0 and "match no rule" in bad.stderr


def test_export_of_an_imported_ecmvae_uses_the_prior_mean(imported, tmp_path):
    if imported["source"] != "mmvae_avs":
        pytest.skip("the sampled test path exists for ECMVAE only")
    from avs.inference.export import example_inputs, export_checkpoint, load_exported
    from avs.inference.model import load_model

    cfg = compose_cfg("export", [f"checkpoint={imported['out']}", "num_checks=0"])
    result = export_checkpoint(cfg, tmp_path)  # raises if exported and eager differ
    loaded = load_model(imported["out"], "cpu")
    assert loaded.model.latent.legacy_test_sample  # the checkpoint keeps the release's sampled path
    t, size = int(imported["cfg"].data.num_frames), int(imported["cfg"].data.image_size)
    frames, audio = example_inputs(1, t, (size, size), seed=3)
    loaded.model.latent.legacy_test_sample = False
    with torch.no_grad():
        mean_path = loaded.model({"frames": frames, "audio": audio})["logits"]
        got = load_exported(result.path)(frames, audio)
    assert torch.allclose(got, mean_path, atol=1e-4, rtol=0)
