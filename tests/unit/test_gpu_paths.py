"""CUDA-side code paths exercised on CPU: memory format, RNG state, AMP choice, scaler state,
export device independence, motion under autocast, fused attention precision, SyncBN freezing,
config refusals. Tests that need a GPU are marked and skipped elsewhere."""

from __future__ import annotations

import logging

import pytest
import torch

from avs.config_checks import ConfigError, check_config
from tests.conftest import compose_cfg, tiny_overrides

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


# ----------------------------------------------------------------------------- cached embeddings
@pytest.mark.parametrize(
    "overrides,message",
    [
        (["data.audio_source=embedding"], r"data\.audio_source=embedding .*model\.audio_encoder is TinyAudioEncoder.*set audio=vggish"),
        (["experiment=quickstart", "data.audio_source=embedding"], r"data\.audio_source=embedding.*set audio=vggish"),
        (["data.audio_source=embedding", "audio=vggish", "audio.trainable=true"], r"audio\.trainable=true.*set audio\.trainable=false"),
        (["data.audio_source=embedding", "audio=vggish", "model.audio_dim=64"], r"model\.audio_dim=64: set model\.audio_dim=128"),
    ],
    ids=["tiny", "quickstart", "trainable_vggish", "audio_dim"],
)
def test_cached_embeddings_refuse_an_encoder_that_would_not_run(overrides, message, tmp_path):
    cfg = compose_cfg("train", tiny_overrides(tmp_path) + overrides)
    with pytest.raises(ConfigError, match=message):
        check_config(cfg)


def test_cached_embeddings_with_frozen_vggish_pass(tmp_path):
    check_config(compose_cfg("train", tiny_overrides(tmp_path) + ["data.audio_source=embedding", "audio=vggish"]))
    check_config(compose_cfg("train", tiny_overrides(tmp_path) + ["data.audio_source=embedding", "model.use_audio=false"]))


# ----------------------------------------------------------------------------- channels_last
MODELS = ("tpavi", "ecmvae", "avsbg", "ecmvae_bg")


def _tiny_batch(cfg, batch_size: int = 2, seed: int = 0) -> dict:
    from avs.engine.bench import make_batch

    return make_batch(batch_size, int(cfg.data.num_frames), int(cfg.data.image_size), "logmel", torch.device("cpu"), seed=seed)


@pytest.mark.parametrize("model", MODELS)
def test_trainer_channels_last_converts_every_4d_weight_and_trains(model, tmp_path):
    """trainer.channels_last=true: 4-D weights NHWC, 5-D (Conv3d) untouched, and a training step runs."""
    from avs.engine.trainer import Trainer

    cfg = compose_cfg("train", tiny_overrides(tmp_path) + [f"model={model}", "trainer.channels_last=true"])
    trainer = Trainer(cfg, tmp_path / "run")
    params = dict(trainer.model.named_parameters())
    four_d = [n for n, p in params.items() if p.dim() == 4]
    assert four_d and all(params[n].is_contiguous(memory_format=torch.channels_last) for n in four_d)
    assert all(p.is_contiguous() for p in params.values() if p.dim() != 4)
    trainer.model.train()
    terms = trainer.model(_tiny_batch(cfg))
    sum(terms.values()).backward()
    assert all(p.grad is not None for n, p in params.items() if n in four_d and n.startswith("decoder."))


# ----------------------------------------------------------------------------- AMP choice and scaler state
def _fake_bf16_check(native: bool):
    """torch.cuda.is_bf16_supported of a GPU that emulates bf16 (native=False, e.g. V100/T4) or has it."""

    def is_bf16_supported(including_emulation: bool = True) -> bool:
        return True if including_emulation else native

    return is_bf16_supported


@pytest.mark.parametrize("native,expected", [(False, torch.float16), (True, torch.bfloat16)])
def test_amp_auto_takes_fp16_with_a_scaler_on_gpus_without_native_bf16(native, expected, monkeypatch):
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    from avs.engine.trainer import Trainer

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", _fake_bf16_check(native))
    fake = SimpleNamespace(tcfg=OmegaConf.create({"amp": "auto"}), device=torch.device("cuda", 0))
    dtype = Trainer._amp_dtype(fake)
    assert dtype == expected
    # the trainer enables its GradScaler exactly for fp16
    assert torch.amp.GradScaler("cpu", enabled=dtype == torch.float16).is_enabled() == (not native)


def test_resume_into_fp16_from_a_checkpoint_without_scaler_state(tmp_path, caplog):
    """A bf16/off/CPU run saves an empty GradScaler state; resuming with an enabled scaler starts it fresh."""
    from avs.engine.trainer import Trainer

    cfg = compose_cfg("train", tiny_overrides(tmp_path))
    first = Trainer(cfg, tmp_path / "run")
    first.step = 3
    path = first.save("last")
    assert first.scaler.state_dict() == {}  # written without fp16 AMP
    second = Trainer(cfg, tmp_path / "run2")
    second.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, enabled=True)  # as trainer.amp=fp16 builds it
    with caplog.at_level(logging.INFO, logger="avs.engine.amp"):
        assert second.resume(str(path))
    assert second.step == 3
    assert second.scaler.is_enabled() and second.scaler.get_scale() == 2.0**10
    assert "no GradScaler state" in caplog.text
    # a real scaler state is still restored
    second.scaler.scale(torch.ones(()))  # the scale tensor exists once something was scaled
    second.scaler.update(new_scale=64.0)
    third = Trainer(cfg, tmp_path / "run3")
    third.scaler = torch.amp.GradScaler("cpu", enabled=True)
    second.step = 5
    third.resume(str(second.save("last")))
    assert third.scaler.get_scale() == 64.0


# ----------------------------------------------------------------------------- CUDA RNG state on another GPU count
class FakeCudaRng:
    """torch.cuda RNG functions of a machine with `count` GPUs (set_rng_state fails past the last one, as torch's)."""

    def __init__(self, monkeypatch, count: int, current: int = 0) -> None:
        self.count, self.current, self.set = count, current, {}
        for mod in (torch.cuda, torch.cuda.random):
            monkeypatch.setattr(mod, "set_rng_state", self.set_rng_state, raising=False)
            monkeypatch.setattr(mod, "get_rng_state_all", self.get_rng_state_all, raising=False)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: self.count)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: self.current)

    def get_rng_state_all(self):
        return [torch.full((16,), i, dtype=torch.uint8) for i in range(self.count)]

    def set_rng_state(self, new_state, device="cuda"):
        idx = device if isinstance(device, int) else (torch.device(device).index if torch.device(device).index is not None else self.current)
        if idx >= self.count:
            raise IndexError(f"list index out of range (device {idx} of {self.count})")
        self.set[idx] = int(new_state[0])


def test_rng_saved_on_8_gpus_restores_on_fewer(monkeypatch, caplog):
    from avs.engine.checkpoint import capture_rng, restore_rng

    fake = FakeCudaRng(monkeypatch, count=8)
    state = capture_rng()
    assert len(state["cuda"]) == 8
    for visible in (4, 1):
        fake.count, fake.set = visible, {}
        with caplog.at_level(logging.INFO, logger="avs.engine.checkpoint"):
            restore_rng(state)
        assert fake.set == {i: i for i in range(visible)}  # device i gets the state saved for device i
        assert f"devices {visible}..7 were not restored" in caplog.text
    fake.count, fake.set = 16, {}  # more GPUs than saved: the extra ones keep their state
    restore_rng(state)
    assert fake.set == {i: i for i in range(8)}


def test_rng_under_ddp_restores_the_ranks_own_device(monkeypatch):
    from avs.engine.checkpoint import capture_rng, restore_rng

    fake = FakeCudaRng(monkeypatch, count=8, current=3)
    state = capture_rng()  # rank 3 of an 8-GPU job
    fake.count, fake.current, fake.set = 4, 1, {}  # resumed where this rank uses cuda:1 of 4
    restore_rng(state, own_device_only=True)
    assert fake.set == {1: 3}


def test_trainer_resume_on_fewer_gpus(monkeypatch, tmp_path):
    from avs.engine.trainer import Trainer

    cfg = compose_cfg("train", tiny_overrides(tmp_path))
    first = Trainer(cfg, tmp_path / "run")
    second = Trainer(cfg, tmp_path / "run2")
    fake = FakeCudaRng(monkeypatch, count=8)
    first.step = 2
    path = first.save("last")
    fake.count, fake.set = 1, {}  # CUDA_VISIBLE_DEVICES=0
    assert second.resume(str(path)) and second.step == 2
    assert fake.set == {0: 0}


# ----------------------------------------------------------------------------- SyncBatchNorm keeps frozen BN frozen
@pytest.mark.parametrize("freeze", ["bn", "stages:1"])
def test_sync_batchnorm_conversion_keeps_frozen_batchnorm_frozen(freeze):
    from torch import nn

    from avs.models.backbones import VisualBackbone

    net = nn.ModuleDict({"backbone": VisualBackbone("resnet50", freeze=freeze, drop_path_rate=0.0),
                         "head": nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))})
    net = nn.SyncBatchNorm.convert_sync_batchnorm(net).train()
    body = net["backbone"].body
    sync = [m for m in body.modules() if isinstance(m, nn.SyncBatchNorm)]
    assert len(sync) == 53 and not any(isinstance(m, nn.BatchNorm2d) for m in body.modules())
    frozen = sync if freeze == "bn" else [body.bn1] + [m for m in body.layer1.modules() if isinstance(m, nn.SyncBatchNorm)]
    assert all(not m.training for m in frozen)
    assert all(not p.requires_grad for m in frozen for p in m.parameters())
    assert net["head"][1].training  # only the backbone's frozen parts stay in eval
    if freeze == "stages:1":
        assert body.layer2[0].bn1.training and body.layer2[0].bn1.weight.requires_grad
    net.eval().train()
    assert all(not m.training for m in frozen)


# ----------------------------------------------------------------------------- TPAVI factorised attention in fp16 / bf16
def _tpavi_attention(dtype, scale: float = 1.5, size: int = 56):
    """The factorised TPAVI attention output y (input of W_z) at stage-1 size N = 5*56*56 = 15,680:
    fp64 reference and under CPU autocast with `dtype` (None = fp32)."""
    from avs.models.fusion import TPAVIFusion

    torch.manual_seed(0)
    c = 8
    m = TPAVIFusion(c, audio_dim=c, impl="factorised", mode="vv")
    with torch.no_grad():  # positively correlated theta/phi/g of magnitude `scale`: y = C' N scale^3 before 1/N
        for conv in (m.theta, m.phi, m.g):
            conv.weight.fill_(scale / c)
            conv.bias.zero_()
    seen = []
    m.W_z.register_forward_hook(lambda mod, inp, out: seen.append(inp[0]))
    x = 1 + 0.1 * torch.randn(1, c, 5, size, size)
    m.double()(x.double())
    m.float()
    ctx = torch.autocast("cpu", dtype=dtype) if dtype is not None else torch.no_grad()
    with ctx:
        m(x)
    return seen[0].detach(), seen[1].detach()


@pytest.mark.parametrize("dtype,tol", [(None, 1e-5), (torch.float16, 1e-2), (torch.bfloat16, 3e-2)])
def test_tpavi_factorised_attention_stays_bounded_in_half_precision(dtype, tol):
    ref, y = _tpavi_attention(dtype)
    assert dtype is None or y.dtype == dtype  # the einsums did run in reduced precision
    assert ref.abs().max() > 10  # |y| = C' scale^3 ~ 13.5; before the 1/N it is 15,680 times that (> fp16 max)
    assert torch.isfinite(y).all()
    rel = float((y.double() - ref).abs().max() / ref.abs().max())
    assert rel < tol


# ----------------------------------------------------------------------------- export holds no trace-device constant
@pytest.mark.parametrize("model", ["avsbg", "tpavi"])
def test_traced_export_holds_no_device_constant(model, tmp_path):
    """A trace made on one device must run on another: no Device constant (e.g. of an arange) in the graph."""
    from avs.inference.export import example_inputs, export_torchscript, load_exported
    from avs.models.build import build_model

    cfg = compose_cfg("train", tiny_overrides(tmp_path) + [f"model={model}", "model.channels=32", "model.audio_dim=32",
                                                           "audio.embed_dim=32"])
    torch.manual_seed(0)
    net = build_model(cfg).eval()
    frames, audio = example_inputs(1, 3, (64, 64))
    result = export_torchscript(net, tmp_path / "m.pt", frames, audio, atol=1e-4)
    loaded = load_exported(result.path)
    graph = str(loaded.inlined_graph)
    device_constants = [line for line in graph.splitlines() if ": Device = prim::Constant" in line]
    assert device_constants == []
    assert "aten::arange" not in graph
    with torch.no_grad():
        ref = net({"frames": frames, "audio": audio})["logits"]
        assert torch.allclose(loaded(frames, audio), ref, atol=1e-4)


# ----------------------------------------------------------------------------- motion correlation under autocast
def test_motion_correlation_backward_runs_at_the_forward_precision():
    """Under CPU bf16 autocast: the custom Function's backward GEMMs run in bf16 like its forward, and the
    gradient matches autograd of the plain (unchunked) computation within bf16 rounding."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from avs.models.motion import _mean_relu_correlation

    class BmmDtypes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.dtypes = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten.bmm.default:
                self.dtypes.append(args[0].dtype)
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    q = torch.randn(4, 8, 30, requires_grad=True)  # fp32 features, as LayerNorm outputs under autocast
    k = torch.randn(4, 8, 30, requires_grad=True)
    fwd = BmmDtypes()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with fwd:
            m = _mean_relu_correlation(q, k, 7)  # 5 chunks of query positions
        ref = torch.bmm(q.transpose(1, 2), k).clamp(min=0).mean(-1)
    assert fwd.dtypes and set(fwd.dtypes) == {torch.bfloat16}
    assert torch.allclose(m.float(), ref.float(), atol=1e-6)
    g = torch.randn(m.shape)
    bwd = BmmDtypes()
    with bwd:
        gq, gk = torch.autograd.grad(m, (q, k), g)
    rq, rk = torch.autograd.grad(ref, (q, k), g)
    assert len(bwd.dtypes) == 15 and set(bwd.dtypes) == {torch.bfloat16}  # 5 chunks x (recompute, dq, dk)
    assert gq.dtype == q.dtype and gk.dtype == k.dtype
    for got, want in ((gq, rq), (gk, rk)):
        assert float((got - want).abs().max()) <= 2**-7 * float(want.abs().max()) + 1e-6
    # without autocast: fp32 throughout, equal to autograd
    m32 = _mean_relu_correlation(q, k, 7)
    gq32, gk32 = torch.autograd.grad(m32, (q, k), g)
    ref32 = torch.bmm(q.transpose(1, 2), k).clamp(min=0).mean(-1)
    rq32, rk32 = torch.autograd.grad(ref32, (q, k), g)
    assert m32.dtype == torch.float32 and torch.allclose(gq32, rq32, atol=1e-6) and torch.allclose(gk32, rk32, atol=1e-6)
