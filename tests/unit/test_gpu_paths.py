"""CUDA-side code paths exercised on CPU: memory format, RNG state, AMP choice, scaler state,
export device independence, motion under autocast, fused attention precision, SyncBN freezing,
config refusals. Tests that need a GPU are marked and skipped elsewhere."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch

from avs.config_checks import ConfigError, check_config
from tests.conftest import compose_cfg, tiny_overrides

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


# ----------------------------------------------------------------------------- cached embeddings
@pytest.mark.parametrize(
    "overrides,message",
    [
        (
            ["data.audio_source=embedding"],
            r"data\.audio_source=embedding .*model\.audio_encoder is TinyAudioEncoder.*set audio=vggish",
        ),
        (["experiment=quickstart", "data.audio_source=embedding"], r"data\.audio_source=embedding.*set audio=vggish"),
        (
            ["data.audio_source=embedding", "audio=vggish", "audio.trainable=true"],
            r"audio\.trainable=true.*set audio\.trainable=false",
        ),
        (
            ["data.audio_source=embedding", "audio=vggish", "model.audio_dim=64"],
            r"model\.audio_dim=64: set model\.audio_dim=128",
        ),
    ],
    ids=["tiny", "quickstart", "trainable_vggish", "audio_dim"],
)
def test_cached_embeddings_refuse_an_encoder_that_would_not_run(overrides, message, tmp_path):
    cfg = compose_cfg("train", tiny_overrides(tmp_path) + overrides)
    with pytest.raises(ConfigError, match=message):
        check_config(cfg)


def test_cached_embeddings_with_frozen_vggish_pass(tmp_path):
    check_config(compose_cfg("train", tiny_overrides(tmp_path) + ["data.audio_source=embedding", "audio=vggish"]))
    check_config(
        compose_cfg("train", tiny_overrides(tmp_path) + ["data.audio_source=embedding", "model.use_audio=false"])
    )


# ----------------------------------------------------------------------------- channels_last
MODELS = ("tpavi", "ecmvae", "avsbg", "ecmvae_bg")


def _tiny_batch(cfg, batch_size: int = 2, seed: int = 0) -> dict:
    from avs.benchmark import make_batch

    return make_batch(
        batch_size, int(cfg.data.num_frames), int(cfg.data.image_size), "logmel", torch.device("cpu"), seed=seed
    )


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
    from avs.engine.build import amp_dtype

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", _fake_bf16_check(native))
    dtype = amp_dtype("auto", torch.device("cuda", 0))
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
        idx = (
            device
            if isinstance(device, int)
            else (torch.device(device).index if torch.device(device).index is not None else self.current)
        )
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

    net = nn.ModuleDict(
        {
            "backbone": VisualBackbone("resnet50", freeze=freeze, drop_path_rate=0.0),
            "head": nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)),
        }
    )
    net = nn.SyncBatchNorm.convert_sync_batchnorm(net).train()
    body = net["backbone"].body
    sync = [m for m in body.modules() if isinstance(m, nn.SyncBatchNorm)]
    assert len(sync) == 53 and not any(isinstance(m, nn.BatchNorm2d) for m in body.modules())
    frozen = (
        sync if freeze == "bn" else [body.bn1] + [m for m in body.layer1.modules() if isinstance(m, nn.SyncBatchNorm)]
    )
    assert all(not m.training for m in frozen)
    assert all(not p.requires_grad for m in frozen for p in m.parameters())
    assert net["head"][1].training  # only the backbone's frozen parts stay in eval
    if freeze == "stages:1":
        assert body.layer2[0].bn1.training and body.layer2[0].bn1.weight.requires_grad
    net.eval().train()
    assert all(not m.training for m in frozen)


# ------------------------------------------------------------------- TPAVI factorised attention in fp16 / bf16
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

    cfg = compose_cfg(
        "train",
        tiny_overrides(tmp_path) + [f"model={model}", "model.channels=32", "model.audio_dim=32", "audio.embed_dim=32"],
    )
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
    assert (
        m32.dtype == torch.float32 and torch.allclose(gq32, rq32, atol=1e-6) and torch.allclose(gk32, rk32, atol=1e-6)
    )


# ----------------------------------------------------------------------------- losses unchanged, no host sync
def _old_bce(logits, masks, keep):
    import torch.nn.functional as F

    if not bool(keep.any()):
        return torch.zeros(())
    return F.binary_cross_entropy_with_logits(logits[keep], masks[keep])


def _old_structure(logits, masks, keep, legacy_mean_bce=False, smoothing=0.0, kernel=31):
    import torch.nn.functional as F

    if not bool(keep.any()):
        return torch.zeros(())
    pred, mask = logits[keep], masks[keep]
    weit = 1.0 + 5.0 * torch.abs(F.avg_pool2d(mask, kernel_size=kernel, stride=1, padding=kernel // 2) - mask)
    target = mask * (1.0 - smoothing) + smoothing / 2.0 if smoothing > 0 else mask
    if legacy_mean_bce:
        wbce = F.binary_cross_entropy_with_logits(pred, target)
    else:
        bce = F.binary_cross_entropy_with_logits(pred, target, reduction="none")
        wbce = (weit * bce).sum(dim=(2, 3)) / weit.sum(dim=(2, 3))
    prob = torch.sigmoid(pred)
    inter = (prob * mask * weit).sum(dim=(2, 3))
    union = ((prob + mask) * weit).sum(dim=(2, 3))
    return (wbce + 1.0 - (inter + 1.0) / (union - inter + 1.0)).mean()


def _old_avm(logits, vfeats, afeats, keep, legacy_sum=False):
    import torch.nn.functional as F

    if not bool(keep.any()):
        return torch.zeros(())
    per = []
    for vmap, a in zip(vfeats, afeats):
        v = (vmap * torch.sigmoid(F.adaptive_avg_pool2d(logits, vmap.shape[-2:]))).mean(dim=(2, 3))
        log_pa = F.log_softmax(a, dim=-1)
        kl = (log_pa.exp() * (log_pa - F.log_softmax(v, dim=-1))).sum(-1)[keep]
        per.append(kl.sum() if legacy_sum else kl.mean())
    return torch.stack(per).mean()


@pytest.mark.parametrize("labelled", ["all", "first", "none"])
def test_losses_equal_the_boolean_mask_formulas_without_host_syncs(labelled):
    from avs import losses as L
    from avs.engine.syncs import SyncCounter

    g = torch.Generator().manual_seed(1)
    n = 6
    logits = 3 * torch.randn(n, 1, 32, 32, generator=g)
    masks = (torch.rand(n, 1, 32, 32, generator=g) > 0.6).float()
    keep = {
        "all": torch.ones(n, dtype=torch.bool),
        "none": torch.zeros(n, dtype=torch.bool),
        "first": torch.arange(n) % 3 == 0,
    }[labelled]
    vfeats = [torch.randn(n, 8, s, s, generator=g) for s in (8, 4)]
    afeats = [torch.randn(n, 8, generator=g) for _ in range(2)]
    pairs = [
        (lambda: L.bce_loss(logits, masks, keep), _old_bce(logits, masks, keep)),
        (lambda: L.structure_loss(logits, masks, keep), _old_structure(logits, masks, keep)),
        (
            lambda: L.structure_loss(logits, masks, keep, legacy_mean_bce=True, smoothing=0.001),
            _old_structure(logits, masks, keep, legacy_mean_bce=True, smoothing=0.001),
        ),
        (lambda: L.av_mapping_loss(logits, vfeats, afeats, valid=keep), _old_avm(logits, vfeats, afeats, keep)),
        (
            lambda: L.av_mapping_loss(logits, vfeats, afeats, valid=keep, legacy_sum=True),
            _old_avm(logits, vfeats, afeats, keep, legacy_sum=True),
        ),
    ]
    for new, old in pairs:
        with SyncCounter() as counter:
            value = new()
        assert counter.total == 0, counter.counts
        assert torch.allclose(value, old, rtol=1e-6, atol=1e-7), (float(value), float(old))
        if labelled == "none":
            assert float(value) == 0.0


def test_segmentor_device_side_choices_equal_the_host_side_ones():
    """projector_mask=auto and the posterior masks pick on the device what the host-side branch picked."""
    from avs.models.methods.ecmvae import ECMVAESegmentor
    from avs.models.projector import VisualToAudioProjector

    torch.manual_seed(0)
    proj = VisualToAudioProjector(channels=8, audio_dim=8, feature_size=(2, 2), hidden=4)
    feat = torch.randn(6, 8, 2, 2)
    masks = (torch.rand(6, 1, 16, 16) > 0.5).float()
    logits = torch.randn(6, 1, 16, 16)
    for use_gt in (True, False):
        got = proj.forward_either(feat, masks, logits, torch.tensor(use_gt))
        want = proj(feat, masks if use_gt else logits, mask_is_logits=not use_gt)
        assert torch.equal(got, want)
    # posterior masks: all labelled -> the masks; S4 (frame 0 only) -> frame 0 repeated
    clip_masks = masks.view(2, 3, 1, 16, 16)
    all_valid = torch.ones(2, 3, dtype=torch.bool)
    first_only = torch.tensor([[True, False, False], [True, False, False]])
    assert torch.equal(ECMVAESegmentor._posterior_masks(SimpleNamespace(num_classes=1), masks, all_valid), masks)
    s4 = ECMVAESegmentor._posterior_masks(SimpleNamespace(num_classes=1), masks, first_only).view(2, 3, 1, 16, 16)
    assert torch.equal(s4, clip_masks[:, :1].expand_as(clip_masks))


# ----------------------------------------------------------------------------- host syncs per training step
@pytest.mark.parametrize("model", MODELS)
def test_trainer_step_makes_at_most_one_host_sync(model, synth_data_dir, tmp_path, monkeypatch):
    """Counted with a dispatch mode over real Trainer steps (data loaded in a worker process, not counted)."""
    from avs.engine.hooks import ValidationHook
    from avs.engine.loop import TrainLoop
    from avs.engine.syncs import SyncCounter
    from avs.engine.trainer import Trainer

    cfg = compose_cfg(
        "train",
        tiny_overrides(synth_data_dir)
        + [
            f"model={model}",
            "model.channels=32",
            "model.audio_dim=32",
            "audio.embed_dim=32",
            "trainer.max_steps=4",
            "trainer.log_every_steps=100",
            "trainer.test_at_end=false",
            "data.num_workers=1",
            "trainer.val_every_epochs=100",
        ],
    )
    trainer = Trainer(cfg, tmp_path / "run")
    counter = SyncCounter()
    marks: list[int] = []
    original = TrainLoop.optimizer_step

    def step(self, clip, loss_bad):
        out = original(self, clip, loss_bad)
        marks.append(counter.total)
        return out

    monkeypatch.setattr(TrainLoop, "optimizer_step", step)
    real_fit = TrainLoop.train

    def fit_counted(self):
        with counter:
            return real_fit(self)

    monkeypatch.setattr(TrainLoop, "train", fit_counted)
    monkeypatch.setattr(ValidationHook, "validate", lambda self: None)
    trainer.fit()
    assert len(marks) == 4
    per_step = [b - a for a, b in zip(marks[1:], marks[2:])]  # steps 3 and 4 (step 1 logs, step 2 ends the epoch)
    assert per_step and max(per_step) <= 1, (per_step, counter.counts)
    assert len(trainer.loss_history) == 4 and all(isinstance(v, float) for v in trainer.loss_history)


def test_compiled_training_is_not_recompiled_for_a_short_last_batch(synth_data_dir, tmp_path, monkeypatch):
    """trainer.compile drops the short last batch: one training graph, compiled once."""
    from torch._dynamo.utils import counters

    from avs.engine.hooks import ValidationHook
    from avs.engine.trainer import Trainer

    cfg = compose_cfg(
        "train",
        tiny_overrides(synth_data_dir)
        + [
            "model=tpavi",
            "model.channels=32",
            "data.batch_size=3",
            "trainer.max_steps=0",
            "trainer.epochs=2",
            "trainer.compile=true",
            "trainer.compile_backend=eager",
            "trainer.test_at_end=false",
        ],
    )
    monkeypatch.setattr(ValidationHook, "validate", lambda self: None)
    torch._dynamo.reset()
    counters.clear()
    trainer = Trainer(cfg, tmp_path / "run")
    trainer.fit()
    assert trainer.step == 2  # 4 clips, batches of 3: the 1-clip batch of each epoch is dropped
    assert counters["stats"]["unique_graphs"] == 1
    torch._dynamo.reset()


@pytest.mark.parametrize("model", MODELS)
def test_benchmark_sync_counter_sees_at_most_two_syncs_per_step(model, tmp_path):
    """The benchmark's count (trainer-style step) at tiny size, and the counter does see syncs when there are some."""
    from avs.benchmark import train_step_syncs
    from avs.engine.syncs import SyncCounter
    from avs.models.build import build_model

    cfg = compose_cfg(
        "train",
        tiny_overrides(tmp_path) + [f"model={model}", "model.channels=32", "model.audio_dim=32", "audio.embed_dim=32"],
    )
    torch.manual_seed(0)
    net = build_model(cfg)
    batch = _tiny_batch(cfg)
    result = train_step_syncs(net, batch)
    assert result["per_step"] <= 2, result
    t = torch.randn(4)
    with SyncCounter() as counter:
        float(t.sum())
        bool((t > 0).any())
        t[t > 0].sum()
    assert counter.counts == {"item": 2, "bool_mask_index": 1}


# ----------------------------------------------------------------------------- on a GPU only
@cuda_only
def test_cuda_export_traced_on_the_gpu_runs_on_the_cpu(tmp_path):
    from avs.inference.export import example_inputs, export_torchscript, load_exported
    from avs.models.build import build_model

    cfg = compose_cfg(
        "train",
        tiny_overrides(tmp_path) + ["model=avsbg", "model.channels=32", "model.audio_dim=32", "audio.embed_dim=32"],
    )
    torch.manual_seed(0)
    net = build_model(cfg).eval().cuda()
    frames, audio = example_inputs(1, 3, (64, 64), device="cuda")
    result = export_torchscript(net, tmp_path / "m.pt", frames, audio, atol=1e-3)
    on_cpu = load_exported(result.path, "cpu")
    with torch.no_grad():
        ref = net.cpu()({"frames": frames.cpu(), "audio": audio.cpu()})["logits"]
        assert torch.allclose(on_cpu(frames.cpu(), audio.cpu()), ref, atol=1e-3)


@cuda_only
@pytest.mark.parametrize("model", MODELS)
def test_cuda_amp_channels_last_training_step(model, tmp_path):
    """amp=auto (+ GradScaler when fp16) and channels_last: a finite training step, one host sync for the guard."""
    from types import SimpleNamespace

    from avs.engine.loop import TrainLoop
    from avs.engine.trainer import Trainer

    cfg = compose_cfg(
        "train",
        tiny_overrides(tmp_path)
        + [
            f"model={model}",
            "model.channels=32",
            "model.audio_dim=32",
            "audio.embed_dim=32",
            "trainer.device=cuda",
            "trainer.channels_last=true",
            "trainer.amp=auto",
        ],
    )
    trainer = Trainer(cfg, tmp_path / "run")
    assert trainer.amp_dtype in (torch.bfloat16, torch.float16)
    assert trainer.scaler.is_enabled() == (trainer.amp_dtype == torch.float16)
    batch = {k: v.cuda() for k, v in _tiny_batch(cfg).items()}
    trainer.model.train()
    with trainer.autocast():
        terms = trainer.model(batch)
    loss = sum(terms.values())
    trainer.scaler.scale(loss).backward()
    loop = SimpleNamespace(
        model=trainer.model,
        optimizer=trainer.optimizer,
        scaler=trainer.scaler,
        scheduler=None,
        dist=trainer.dist,
        state=trainer.state,
    )
    assert TrainLoop.optimizer_step(loop, 0.0, ~torch.isfinite(loss.detach())) in ("ok", "amp_overflow")


@cuda_only
def test_cuda_rng_state_round_trip():
    from avs.engine.checkpoint import capture_rng, restore_rng

    state = capture_rng()
    a = torch.rand(3, device="cuda")
    restore_rng(state)
    assert torch.equal(torch.rand(3, device="cuda"), a)


def test_compiled_evaluation_pads_a_short_last_batch_instead_of_recompiling(synth_data_dir, tmp_path):
    """Eval batches of 3 and 1 clips: one compiled graph, and the metrics of the eager evaluation."""
    from torch._dynamo.utils import counters

    from avs.engine.build import compile_module
    from avs.engine.trainer import Trainer
    from avs.evaluation import pad_batch

    over = tiny_overrides(synth_data_dir) + [
        "model=tpavi",
        "model.channels=32",
        "data.eval_batch_size=3",
        "data.flip_prob=0",
    ]
    torch.manual_seed(0)
    eager = Trainer(compose_cfg("train", over), tmp_path / "eager")
    expected = eager.evaluate("train")  # 4 clips: batches of 3 and 1
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    compiled = Trainer(
        compose_cfg("train", over + ["trainer.compile=true", "trainer.compile_backend=eager"]), tmp_path / "compiled"
    )
    compiled._eval_net = compile_module(compiled.model, compiled.tcfg)
    got = compiled.evaluate("train")
    assert counters["stats"]["unique_graphs"] == 1
    for protocol, values in expected.items():
        for key, value in values.items():
            if isinstance(value, float):
                assert got[protocol][key] == pytest.approx(value, abs=1e-6), (protocol, key)
    torch._dynamo.reset()
    padded = pad_batch({"frames": torch.arange(2.0).view(2, 1), "video_id": ["a", "b"], "n": 7}, 4)
    assert padded["frames"].flatten().tolist() == [0.0, 1.0, 1.0, 1.0]
    assert padded["video_id"] == ["a", "b", "b", "b"] and padded["n"] == 7


# ----------------------------------------------------------------------------- a numbered GPU under torchrun
def test_numbered_gpu_under_torchrun_is_refused_by_name(monkeypatch):
    """trainer.device=cuda:1 with 2 torchrun ranks would put both on cuda:1: refused; cuda / auto map per rank."""
    from avs.errors import ConfigError, ExitCode
    from avs.utils.device import select_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(ConfigError, match=r"trainer.device=cuda:1 under torchrun \(2 processes\)") as err:
        select_device("cuda:1", 0, key="trainer.device")
    assert err.value.exit_code == ExitCode.CONFIG
    with pytest.raises(ConfigError):
        select_device("cuda:0", 1, world_size=2)
    assert select_device("cuda", 1) == torch.device("cuda", 1)
    assert select_device("auto", 1) == torch.device("cuda", 1)
    assert select_device("cpu", 1) == torch.device("cpu")
    monkeypatch.setenv("WORLD_SIZE", "1")  # a single process may name any GPU
    assert select_device("cuda:1", 0) == torch.device("cuda", 1)


# ----------------------------------------------------------------------------- DDP step flags under NCCL
def test_ddp_step_flags_take_one_collective_and_one_host_read_under_nccl(monkeypatch):
    """With an NCCL-only group every control tensor lives on the GPU and each read is a host sync: the
    step's loss / gradient flags and the stop request are agreed in one all_reduce and read once, and
    the signal hook then needs no collective of its own (mocked 2-rank group; CPU stands in for CUDA)."""
    from types import SimpleNamespace

    import torch.distributed as dist

    from avs.engine import distributed as D
    from avs.engine.hooks import SignalHook
    from avs.engine.loop import StopTraining
    from avs.engine.syncs import SyncCounter, read_step_flags

    remote = torch.tensor([0, 0, 1], dtype=torch.int32)  # the other rank: finite loss and a stop request
    calls: list[str] = []

    def all_reduce(t, op=None, **kw):
        calls.append(t.device.type)
        t.copy_(torch.maximum(t, remote[: t.numel()]))

    monkeypatch.setattr(D, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda *a, **k: 2)
    monkeypatch.setattr(dist, "get_backend", lambda *a, **k: "nccl")
    monkeypatch.setattr(D, "_coll_device", lambda: torch.device("cpu"))  # stands in for cuda:LOCAL_RANK
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    loss_bad = ~torch.isfinite(torch.stack([torch.tensor(1.0), torch.tensor(float("nan"))])).all()
    with SyncCounter() as counter:
        flags = read_step_flags(loss_bad, torch.tensor(3.0), stop=False, across_ranks=True)
    assert flags == (True, False, True)  # own non-finite loss, the other rank's stop request
    assert counter.total == 1 and len(calls) == 1, (counter.counts, calls)
    loop = SimpleNamespace(dist=SimpleNamespace(enabled=True), stop=None, stop_agreed=flags[2])
    hook = SignalHook()
    hook.loop = loop
    with SyncCounter() as counter, pytest.raises(StopTraining):
        hook.after_step()
    assert counter.total == 0 and len(calls) == 1  # the agreed flag, no second collective
    loop.stop_agreed = None  # no step ran since (e.g. the epoch end): the hook asks the ranks itself
    hook.after_step()
    assert len(calls) == 2
