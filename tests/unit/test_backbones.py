"""VisualBackbone: shapes, parameter counts, original-layout weight loading, freezing."""

from __future__ import annotations

import re

import pytest
import timm
import torch
import torchvision

from avs.models import backbones
from avs.models.backbones import VisualBackbone, convert_state_dict


def _n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _pvt_b0_original_keys() -> list[str]:
    """Key names of the original PVT-v2 release for b0, written from the architecture.

    depths [2,2,2,2], dims [32,64,160,256], sr ratios [8,4,2,1] (stage 4 has no sr conv/norm).
    """
    keys: list[str] = []
    for s in range(1, 5):
        for part in ("proj", "norm"):
            keys += [f"patch_embed{s}.{part}.weight", f"patch_embed{s}.{part}.bias"]
        for j in range(2):
            names = ["norm1", "attn.q", "attn.kv", "attn.proj"]
            if s < 4:
                names += ["attn.sr", "attn.norm"]
            names += ["norm2", "mlp.fc1", "mlp.dwconv.dwconv", "mlp.fc2"]
            for n in names:
                keys += [f"block{s}.{j}.{n}.weight", f"block{s}.{j}.{n}.bias"]
        keys += [f"norm{s}.weight", f"norm{s}.bias"]
    return keys + ["head.weight", "head.bias"]


@pytest.fixture(scope="module")
def b0() -> VisualBackbone:
    torch.manual_seed(0)
    return VisualBackbone("pvt_v2_b0", drop_path_rate=0.0).eval()


@pytest.fixture(scope="module")
def tv_r50() -> torch.nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet50(weights=None).eval()


@pytest.fixture(scope="module")
def r50_state(tv_r50) -> dict[str, torch.Tensor]:
    """The torchvision layout: conv1/bn1/layer1..4/fc."""
    return tv_r50.state_dict()


@pytest.fixture(scope="module")
def pvt_original_file(tmp_path_factory, b0) -> tuple:
    """A pvt_v2_b0 checkpoint in the original PVT key layout, wrapped in {'model': ...}."""
    keys = _pvt_b0_original_keys()
    target = b0.body.state_dict()
    g = torch.Generator().manual_seed(1)
    # which model key each original key lands on (distinct scalars make the mapping visible)
    tagged = convert_state_dict("pvt_v2_b0", {k: torch.tensor(float(i)) for i, k in enumerate(keys)})
    dest = {keys[int(v)]: k for k, v in tagged.items()}
    head = {"head.weight": (1000, 256), "head.bias": (1000,)}  # ImageNet classifier, dropped on load
    sd = {k: torch.randn(target[dest[k]].shape if k in dest else head[k], generator=g) for k in keys}
    path = tmp_path_factory.mktemp("w") / "pvt_v2_b0.pth"
    torch.save({"model": sd}, path)
    return path, sd


# ---------------------------------------------------------------------------- architecture
@pytest.mark.parametrize("size", [64, 96])
def test_pvt_b0_shapes(b0, size):
    with torch.no_grad():
        feats = b0(torch.randn(2, 3, size, size))
    assert b0.out_channels == [32, 64, 160, 256]
    assert b0.strides == [4, 8, 16, 32]
    expected = [(2, c, size // s, size // s) for c, s in zip([32, 64, 160, 256], [4, 8, 16, 32])]
    assert [tuple(f.shape) for f in feats] == expected


def test_resnet50_shapes_and_param_count():
    net = VisualBackbone("resnet50", drop_path_rate=0.0).eval()
    assert _n_params(net) == 23_508_032
    assert net.out_channels == [256, 512, 1024, 2048]
    assert net.strides == [4, 8, 16, 32]
    for size in (64, 96):
        with torch.no_grad():
            feats = net(torch.randn(1, 3, size, size))
        assert [tuple(f.shape) for f in feats] == [
            (1, c, size // s, size // s) for c, s in zip([256, 512, 1024, 2048], [4, 8, 16, 32])
        ]


def test_pvt_b5_param_count_and_reference_hyperparameters():
    with torch.device("meta"):
        net = VisualBackbone("pvt_v2_b5")
    assert _n_params(net) == 81_443_008
    assert net.out_channels == [64, 128, 320, 512]
    stage_params = [_n_params(getattr(net.body, f"stages_{i}")) for i in range(4)]
    stage_params[0] += _n_params(net.body.patch_embed)
    # spec: 0.95 / 2.87 / 66.62 / 11.00 M per stage
    assert [round(p / 1e6, 2) for p in stage_params] == [0.95, 2.87, 66.62, 11.00]
    assert [len(getattr(net.body, f"stages_{i}").blocks) for i in range(4)] == [3, 6, 40, 3]
    blk = net.body.stages_2.blocks[0]
    assert blk.norm1.eps == 1e-6 and net.body.stages_3.norm.eps == 1e-6
    assert blk.attn.q.bias is not None and blk.attn.kv.bias is not None  # qkv_bias=True
    assert [getattr(net.body, f"stages_{i}").blocks[0].attn.sr is None for i in range(4)] == [False] * 3 + [True]
    # stochastic depth: linear 0 -> 0.1 over the 52 blocks
    rates = [
        float(getattr(b.drop_path1, "drop_prob", 0.0))
        for i in range(4)
        for b in getattr(net.body, f"stages_{i}").blocks
    ]
    expected = torch.linspace(0, 0.1, 52).tolist()
    assert rates == pytest.approx(expected, abs=1e-7)


def test_bad_input_and_names(b0):
    with pytest.raises(ValueError, match=r"\[N,3,H,W\]"):
        b0(torch.randn(1, 1, 64, 64))
    with pytest.raises(ValueError, match="backbone.name"):
        VisualBackbone("vit_b16")
    with pytest.raises(ValueError, match="backbone.pretrained"):
        VisualBackbone("pvt_v2_b0", pretrained="imagenet")
    with pytest.raises(ValueError, match="backbone.weights_path"):
        VisualBackbone("pvt_v2_b0", pretrained="file")
    with pytest.raises(FileNotFoundError, match="no_such.pth"):
        VisualBackbone("pvt_v2_b0", pretrained=True, weights_path="/nonexistent/no_such.pth")
    with pytest.raises(ValueError, match="backbone.freeze"):
        VisualBackbone("pvt_v2_b0", freeze="stages:7")


def test_timm_hub_failure_is_explained(monkeypatch):
    real = timm.create_model

    def fake(name, pretrained=False, **kw):
        if pretrained:
            raise OSError("network unreachable")
        return real(name, pretrained=False, **kw)

    monkeypatch.setattr(backbones.timm, "create_model", fake)
    expected = r"network unreachable.*backbone\.pretrained=file with backbone\.weights_path"
    with pytest.raises(RuntimeError, match=expected):
        VisualBackbone("pvt_v2_b0", pretrained="timm")


# ---------------------------------------------------------------------------- weight loading
def test_original_pvt_keys_map_one_to_one(b0):
    keys = _pvt_b0_original_keys()
    # distinct scalar per source key so that a many-to-one mapping would show
    sd = {k: torch.tensor(float(i)) for i, k in enumerate(keys)}
    mapped = convert_state_dict("pvt_v2_b0", sd)
    assert len(keys) == 178
    assert set(mapped) == set(b0.body.state_dict())  # covers every model key, head dropped
    assert len({float(v) for v in mapped.values()}) == len(mapped) == len(keys) - 2
    # a few hand-checked correspondences
    inv = {float(v): k for k, v in mapped.items()}
    assert inv[float(keys.index("block3.1.mlp.dwconv.dwconv.weight"))] == "stages_2.blocks.1.mlp.dwconv.weight"
    assert inv[float(keys.index("patch_embed2.proj.weight"))] == "stages_1.downsample.proj.weight"
    assert inv[float(keys.index("patch_embed1.norm.bias"))] == "patch_embed.norm.bias"
    assert inv[float(keys.index("norm4.weight"))] == "stages_3.norm.weight"


def test_load_original_pvt_file(pvt_original_file):
    path, sd = pvt_original_file
    net = VisualBackbone("pvt_v2_b0", pretrained="file", weights_path=str(path), drop_path_rate=0.0).eval()
    body = net.body
    # every tensor of the file (but the head) is in the model, compared through module attributes
    assert torch.equal(body.patch_embed.proj.weight, sd["patch_embed1.proj.weight"])
    assert torch.equal(body.stages_1.downsample.norm.bias, sd["patch_embed2.norm.bias"])
    assert torch.equal(body.stages_2.blocks[1].mlp.dwconv.weight, sd["block3.1.mlp.dwconv.dwconv.weight"])
    assert torch.equal(body.stages_0.blocks[0].attn.sr.weight, sd["block1.0.attn.sr.weight"])
    assert torch.equal(body.stages_3.blocks[1].attn.kv.bias, sd["block4.1.attn.kv.bias"])
    assert torch.equal(body.stages_3.norm.weight, sd["norm4.weight"])
    own = body.state_dict()
    mapped = convert_state_dict("pvt_v2_b0", sd)
    assert all(torch.equal(own[k], v) for k, v in mapped.items())
    # independent check: timm's own original->timm filter gives the same features
    ref = timm.create_model("pvt_v2_b0", pretrained=False, num_classes=1000).eval()
    from timm.models.pvt_v2 import checkpoint_filter_fn

    ref.load_state_dict(checkpoint_filter_fn(sd, ref), strict=True)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ours = net(x)
        theirs = ref.forward_intermediates(x, intermediates_only=True)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(ours, theirs))


def test_load_torchvision_resnet50(tmp_path, tv_r50, r50_state):
    path = tmp_path / "resnet50-19c8e357.pth"
    torch.save(r50_state, path)
    net = VisualBackbone("resnet50", pretrained=True, weights_path=str(path), drop_path_rate=0.0).eval()
    own = net.body.state_dict()
    for k, v in r50_state.items():
        if not k.startswith("fc."):
            assert torch.equal(own[k], v), k
    # same layer4 features as torchvision's own forward
    tv = tv_r50
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        y = tv.maxpool(tv.relu(tv.bn1(tv.conv1(x))))
        outs = []
        for layer in (tv.layer1, tv.layer2, tv.layer3, tv.layer4):
            y = layer(y)
            outs.append(y)
        ours = net(x)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(ours, outs))


def test_old_resnet_file_without_num_batches_tracked(tmp_path, r50_state):
    # the 2017 torchvision file predates BN `num_batches_tracked`; it also may be wrapped
    sd = {k: v for k, v in r50_state.items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "old.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}}, path)
    net = VisualBackbone("resnet50", pretrained="file", weights_path=str(path))
    assert torch.equal(net.body.layer3[2].bn2.running_var, sd["layer3.2.bn2.running_var"])


def test_mismatched_files_give_clear_errors(tmp_path, pvt_original_file, r50_state):
    _, sd = pvt_original_file
    missing = dict(sd)
    del missing["block2.1.attn.kv.weight"]
    p1 = tmp_path / "missing.pth"
    torch.save(missing, p1)
    with pytest.raises(ValueError, match=r"missing\.pth.*missing keys: stages_1\.blocks\.1\.attn\.kv\.weight"):
        VisualBackbone("pvt_v2_b0", pretrained="file", weights_path=str(p1))

    wrong = dict(sd)
    wrong["norm3.weight"] = torch.zeros(7)
    p2 = tmp_path / "wrong_shape.pth"
    torch.save(wrong, p2)
    with pytest.raises(ValueError, match=re.escape("stages_2.norm.weight: file (7,) vs model (160,)")):
        VisualBackbone("pvt_v2_b0", pretrained="file", weights_path=str(p2))

    # (part of) a ResNet file loaded as PVT: lists a few of the missing and unexpected keys
    p3 = tmp_path / "resnet_as_pvt.pth"
    torch.save(dict(list(r50_state.items())[:40]), p3)
    with pytest.raises(ValueError) as info:
        VisualBackbone("pvt_v2_b0", pretrained="file", weights_path=str(p3))
    msg = str(info.value)
    assert "resnet_as_pvt.pth" in msg and "missing keys:" in msg and "unexpected keys: conv1.weight" in msg
    assert "in total)" in msg  # long lists are truncated with a count

    p4 = tmp_path / "not_a_dict.pth"
    torch.save([torch.zeros(1)], p4)
    with pytest.raises(ValueError, match="not_a_dict.pth"):
        VisualBackbone("pvt_v2_b0", pretrained="file", weights_path=str(p4))


# ---------------------------------------------------------------------------- freezing
def test_freeze_all_stays_eval():
    net = VisualBackbone("pvt_v2_b0", freeze=True)
    assert not any(p.requires_grad for p in net.parameters())
    net.train()
    assert not net.body.training and not any(m.training for m in net.body.modules())


def test_freeze_stages_pvt():
    net = VisualBackbone("pvt_v2_b0", freeze="stages:2").train()
    frozen = {n.split(".")[0] for n, p in net.body.named_parameters() if not p.requires_grad}
    trainable = {n.split(".")[0] for n, p in net.body.named_parameters() if p.requires_grad}
    assert frozen == {"patch_embed", "stages_0", "stages_1"}
    assert trainable == {"stages_2", "stages_3"}
    assert not net.body.stages_1.training and net.body.stages_2.training
    # the frozen part gets no gradient, the rest does
    sum(f.sum() for f in net(torch.randn(1, 3, 64, 64))).backward()
    assert net.body.patch_embed.proj.weight.grad is None
    assert net.body.stages_2.blocks[0].attn.q.weight.grad is not None


def test_freeze_bn_resnet():
    net = VisualBackbone("resnet50", freeze="bn", drop_path_rate=0.0).train()
    bn = net.body.layer2[0].bn1
    assert not bn.weight.requires_grad and not bn.bias.requires_grad and not bn.training
    assert net.body.layer2[0].conv1.weight.requires_grad and net.body.training
    before = bn.running_mean.clone()
    net(torch.randn(2, 3, 64, 64))
    assert torch.equal(bn.running_mean, before)  # statistics not updated in train mode


def test_freeze_stages_resnet():
    net = VisualBackbone("resnet50", freeze="stages:1", drop_path_rate=0.0).train()
    frozen = {n.split(".")[0] for n, p in net.body.named_parameters() if not p.requires_grad}
    assert frozen == {"conv1", "bn1", "layer1"}
    assert not net.body.bn1.training and not net.body.layer1.training and net.body.layer2.training


def _remap_before_timm(key: str) -> str | None:
    """The hand-written original->features_only remap this package used before timm's filter (frozen copy)."""
    if key.startswith("head."):
        return None
    rules = (
        (r"^patch_embed1\.(.*)$", lambda m: f"patch_embed.{m[1]}"),
        (r"^patch_embed([2-4])\.(.*)$", lambda m: f"stages_{int(m[1]) - 1}.downsample.{m[2]}"),
        (
            r"^block([1-4])\.(\d+)\.(.*)$",
            lambda m: f"stages_{int(m[1]) - 1}.blocks.{m[2]}.{m[3].replace('mlp.dwconv.dwconv.', 'mlp.dwconv.')}",
        ),
        (r"^norm([1-4])\.(.*)$", lambda m: f"stages_{int(m[1]) - 1}.norm.{m[2]}"),
    )
    for pattern, repl in rules:
        m = re.match(pattern, key)
        if m:
            return repl(m)
    return key


def test_original_layout_loads_exactly_as_before_timm_filter(pvt_original_file):
    """timm's checkpoint_filter_fn replaced our own remap: every original key lands where it used to."""
    _, sd = pvt_original_file
    before = {_remap_before_timm(k): v for k, v in sd.items() if _remap_before_timm(k) is not None}
    now = convert_state_dict("pvt_v2_b0", sd)
    assert set(now) == set(before)
    assert all(now[k] is before[k] for k in now)  # the same tensor object: no copy, no reordering of values
    # a collision is still reported with the original key names
    dup = {"patch_embed1.proj.weight": torch.zeros(1), "patch_embed.proj.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match="patch_embed1.proj.weight"):
        convert_state_dict("pvt_v2_b0", dup)
