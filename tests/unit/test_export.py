"""TorchScript export of the inference path: TPAVI, ECMVAE (fixed latent) and AVS-BG match eager within 1e-4."""

from __future__ import annotations

import json

import pytest
import torch

from avs.inference.export import ExportedSegmentor, ExportError, example_inputs, export_torchscript, load_exported
from avs.models.build import build_model
from avs.models.motion import CorrelationPyramidMotion
from tests.conftest import compose_cfg, tiny_overrides

T, S = 3, 64
# TPAVI keeps its audio projection; ECMVAE / AVS-BG feed the audio unprojected, so audio_dim = channels
MODELS = {
    "tpavi": ["model=tpavi", "model.channels=32"],
    "ecmvae": ["model=ecmvae", "model.channels=32", "model.audio_dim=32", "audio.embed_dim=32", "eval.num_samples=4"],
    "avsbg": ["model=avsbg", "model.channels=32", "model.audio_dim=32", "audio.embed_dim=32"],
}


@pytest.fixture(scope="module")
def make_model(tmp_path_factory):
    """Build each tiny model once per module (random init, perturbed BatchNorm statistics)."""
    cache: dict[str, torch.nn.Module] = {}
    root = tmp_path_factory.mktemp("export")

    def get(name: str):
        if name not in cache:
            cfg = compose_cfg("train", tiny_overrides(root, "ms3") + MODELS[name])
            torch.manual_seed(0)
            model = build_model(cfg).eval()
            # random BatchNorm statistics so the check is not on an identity-like network
            for m in model.modules():
                if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                    m.running_mean.uniform_(-0.2, 0.2)
                    m.running_var.uniform_(0.5, 1.5)
            cache[name] = model
        return cache[name]

    return get


@pytest.mark.parametrize("name", list(MODELS))
def test_exported_matches_eager(tmp_path, make_model, name):
    from avs.models import motion as motion_mod

    model = make_model(name)
    keys = set(model.state_dict())
    correlation = motion_mod._mean_relu_correlation
    frames, audio = example_inputs(1, T, (S, S), seed=0)
    other = example_inputs(1, T, (S, S), seed=1)
    result = export_torchscript(model, tmp_path / f"{name}.pt", frames, audio, atol=1e-4)
    assert result.max_abs_diff <= 1e-4
    loaded = load_exported(result.path)
    with torch.no_grad():
        k = model.eval_num_samples
        model.eval_num_samples = 1  # eager reference: one deterministic pass (prior mean code for ECMVAE)
        eager = model({"frames": other[0], "audio": other[1]})["logits"]
        model.eval_num_samples = k
        got = loaded(*other)
    assert got.shape == (1, T, 1, S, S)
    assert torch.allclose(got, eager, atol=1e-4, rtol=0)
    assert eager.std() > 0  # not a constant map
    meta = json.loads(result.meta_path.read_text())
    assert meta["traced_shapes"]["frames"] == [1, T, 3, S, S]
    assert meta["fixed_batch"] is (name == "avsbg")
    assert (meta["latent"] == "prior mean code") is (name == "ecmvae")
    # the eager model is left as it was (AVS-BG: motion module and its autograd correlation)
    assert set(model.state_dict()) == keys
    assert motion_mod._mean_relu_correlation is correlation
    if name == "avsbg":
        assert isinstance(model.motion, CorrelationPyramidMotion)
    else:  # TPAVI / ECMVAE traces also take another batch size (AVS-BG's chunking fixes B)
        f2, a2 = example_inputs(2, T, (S, S), seed=2)
        with torch.no_grad():
            assert torch.allclose(loaded(f2, a2), ExportedSegmentor(model)(f2, a2), atol=1e-4, rtol=0)


def test_ecmvae_wrapper_uses_the_prior_mean_and_leaves_the_model_sampling(make_model):
    model = make_model("ecmvae")
    frames, audio = example_inputs(1, T, (S, S), seed=3)
    wrapper = ExportedSegmentor(model)
    assert model.eval_num_samples == 4 and wrapper.model.eval_num_samples == 1
    with torch.no_grad():
        a = wrapper(frames, audio)
        b = wrapper(frames, audio)
        sampled = model({"frames": frames, "audio": audio})
    assert torch.equal(a, b)  # deterministic
    assert "variance" in sampled  # the original still draws K samples
    assert not torch.allclose(a, sampled["logits"])


class _Tiny(torch.nn.Module):
    """Smallest object with the AVSegmentor inference interface (for the mismatch check)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 1, 1)
        self.motion = None
        self.latent = None
        self.eval_num_samples = 1

    def forward(self, batch):
        f = batch["frames"]
        return {"logits": self.conv(f.flatten(0, 1)).view(*f.shape[:2], 1, *f.shape[-2:])}


def test_export_mismatch_raises(tmp_path, monkeypatch):
    import avs.inference.export as ex

    frames, audio = example_inputs(1, T, (8, 8))
    ok = export_torchscript(_Tiny(), tmp_path / "ok.pt", frames, audio)
    assert ok.max_abs_diff == 0.0
    real = ex._eager_logits
    monkeypatch.setattr(ex, "_eager_logits", lambda m, f, a: real(m, f, a) + 1e-3)
    with pytest.raises(ExportError, match="differ from eager"):
        export_torchscript(_Tiny(), tmp_path / "m.pt", frames, audio, atol=1e-4)


# ----------------------------------------------------------------------------- ONNX (onnxruntime on the CPU)
ONNX_MODELS = {**MODELS, "ecmvae_bg": ["model=ecmvae_bg", *MODELS["avsbg"][1:]]}


@pytest.mark.parametrize("name", list(ONNX_MODELS))
def test_onnx_export_matches_eager_with_onnxruntime(tmp_path, name):
    from avs.inference.export import export_onnx

    cfg = compose_cfg("train", tiny_overrides(tmp_path / "data", "ms3") + ONNX_MODELS[name])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    for m in model.modules():  # random BatchNorm statistics, as make_model
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    frames, audio = example_inputs(1, T, (S, S), seed=0)
    checks = [example_inputs(1, T, (S, S), seed=1)]
    result = export_onnx(model, tmp_path / f"{name}.onnx", frames, audio, check_inputs=checks)
    assert result.max_abs_diff <= 1e-4 and result.max_rel_diff <= 1e-4
    assert not model.training  # the exporter restores the wrapper's (eval) mode, not train mode
    meta = json.loads(result.meta_path.read_text())
    assert meta["format"] == "onnx" and meta["fixed_batch"] is (model.motion is not None)
    # an independent run of the saved file on another input (batch 2 where the batch axis is dynamic)
    import onnxruntime as ort

    batch = 1 if model.motion is not None else 2
    assert meta["dynamic_axes"] == ({} if batch == 1 else {"0": "batch"})
    f2, a2 = example_inputs(batch, T, (S, S), seed=3)
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {"frames": f2.numpy(), "audio": a2.numpy()})[0])
    with torch.no_grad():
        eager = ExportedSegmentor(model)(f2, a2)
    assert got.shape == (batch, T, 1, S, S) and eager.std() > 0
    assert float((got - eager).abs().max()) <= 1e-4 * float(eager.abs().max())


def test_export_script_refuses_an_unknown_format(tmp_path):
    from tests.conftest import run_script

    proc = run_script("export.py", ["checkpoint=x.ckpt", "format=tflite", f"hydra.run.dir={tmp_path}/run"], tmp_path)
    assert proc.returncode == 2 and "format must be 'torchscript' or 'onnx'" in proc.stderr
