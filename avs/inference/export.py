"""Export the inference path of an AVSegmentor to TorchScript (torch.jit.trace) or ONNX and check it against eager.

The exported module maps ``(frames [B,T,3,H,W], audio [B,T,1,96,64]) -> logits [B,T,1,H,W]``
(frames ImageNet-normalised, audio VGGish log-mel). Latent models (ECMVAE) use the prior mean
code, so the export is deterministic. The trace is specialised to the traced (T, H, W) and, for
models with the AVS-BG motion module, also to the traced batch size B (its memory chunking
unrolls over B*T); the sidecar json records the shapes. The ONNX file comes from the same trace
(torch.onnx's TorchScript-based exporter) and is checked with onnxruntime on the CPU; its batch axis
is dynamic exactly when the TorchScript trace accepts other batch sizes.

Two parts of the eager model are not traceable as they stand; the wrapper handles both without
touching the model code (see docs/demo.md):
* CorrelationPyramidMotion checks ``isinstance(num_frames, int)``, but under tracing T comes from
  ``frames.shape`` as a tensor: the wrapper passes ``int(T)`` (T is fixed per checkpoint).
* its correlation is a custom ``torch.autograd.Function`` (memory-saving backward), which the
  tracer records as an opaque Python call that cannot be saved: while tracing, its forward
  (the same chunked computation) is called directly, which traces to plain tensor ops.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from avs.data.audio import LOGMEL_SHAPE
from avs.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from avs.errors import AVSError, ConfigError, ExitCode
from avs.models.segmentor import AVSegmentor
from avs.utils.io import atomic_write_bytes, atomic_write_text

log = logging.getLogger(__name__)

__all__ = [
    "ExportError",
    "ExportedSegmentor",
    "ExportResult",
    "export_onnx",
    "export_torchscript",
    "example_inputs",
    "load_exported",
    "ONNX_OPSET",
]

#: the ONNX opset written by export_onnx (onnxruntime >= 1.14 runs it)
ONNX_OPSET = 17


class ExportError(AVSError, RuntimeError, code=ExitCode.RUN_FAILED):
    """The traced module could not be built or does not reproduce the eager model."""


class _IntFrames(nn.Module):
    """Calls the wrapped motion module with a Python int T (traced shapes are tensors)."""

    def __init__(self, motion: nn.Module) -> None:
        super().__init__()
        self.inner = motion

    def forward(self, feats: list[torch.Tensor], num_frames: Any) -> list[torch.Tensor]:
        return self.inner(feats, int(num_frames))


class ExportedSegmentor(nn.Module):
    """Inference wrapper: (frames [B,T,3,H,W], audio [B,T,1,96,64]) -> logits [B,T,1,H,W].

    Shares the parameters of `model` and leaves it unchanged; latent models predict with the
    prior mean code (one deterministic pass, as `eval_num_samples=1`).
    """

    def __init__(self, model: AVSegmentor) -> None:
        super().__init__()
        view = copy.copy(model)  # shallow: same parameters, own attribute and submodule tables
        view.__dict__["_modules"] = dict(model._modules)
        view.eval_num_samples = 1
        if view.motion is not None:
            view.motion = _IntFrames(model.motion)
        self.model = view.eval()
        # the wrapper itself in eval mode too: torch.onnx.export restores the wrapper's mode afterwards,
        # recursively, and the submodules are the caller's model's
        self.eval()

    def forward(self, frames: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        return self.model({"frames": frames, "audio": audio})["logits"]


class _NoGradContext:
    """Stand-in for the autograd ctx when a Function's forward is called directly."""

    def save_for_backward(self, *tensors: torch.Tensor) -> None:
        pass


@contextlib.contextmanager
def _traceable_motion() -> Iterator[None]:
    """While active, the motion correlation runs its chunked forward without the autograd.Function."""
    from avs.models import motion as motion_mod

    original = motion_mod._mean_relu_correlation
    fn = motion_mod._MeanReLUCorrelation

    def forward_only(
        query: torch.Tensor, key: torch.Tensor, chunk_size: int | None, col_every: int = 0
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        key = key.to(query.dtype)
        # whole-volume chunks (the trace unrolls the chunk loop, and the export may run on another device)
        maps, positions = motion_mod._chunk_plan(query.shape[0], query.shape[2], key.shape[2], chunk_size)
        rows, cols = fn.forward(
            _NoGradContext(), query.contiguous(), key.contiguous(), int(maps), int(positions), False, int(col_every)
        )
        return (rows, cols) if col_every else rows

    motion_mod._mean_relu_correlation = forward_only
    try:
        yield
    finally:
        motion_mod._mean_relu_correlation = original


def example_inputs(
    batch: int, num_frames: int, image_size: tuple[int, int], seed: int = 0, device: str | torch.device = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random (frames [B,T,3,H,W] ~ N(0,1), log-mel [B,T,1,96,64] ~ N(-4,2)) for tracing and checking."""
    g = torch.Generator().manual_seed(int(seed))
    frames = torch.randn(batch, num_frames, 3, *image_size, generator=g)
    audio = torch.randn(batch, num_frames, *LOGMEL_SHAPE, generator=g) * 2.0 - 4.0  # roughly log-mel scaled
    return frames.to(device), audio.to(device)


@dataclass
class ExportResult:
    """What export_torchscript wrote and how closely the saved module matches eager."""

    path: Path
    meta_path: Path
    max_abs_diff: float
    input_shapes: dict[str, list[int]]
    max_rel_diff: float = 0.0  # max |exported - eager| / max |eager|


def _trace(wrapper: ExportedSegmentor, frames: torch.Tensor, audio: torch.Tensor) -> torch.jit.ScriptModule:
    with _traceable_motion(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        try:
            return torch.jit.trace(wrapper, (frames, audio), check_trace=False, strict=False)
        except Exception as exc:
            raise ExportError(f"torch.jit.trace failed: {type(exc).__name__}: {exc}") from exc


def load_exported(path: str | Path, device: str | torch.device = "cpu") -> torch.jit.ScriptModule:
    """Load a module written by export_torchscript."""
    return torch.jit.load(str(path), map_location=device)


def export_torchscript(
    model: AVSegmentor,
    path: str | Path,
    frames: torch.Tensor,
    audio: torch.Tensor,
    atol: float = 1e-4,
    meta: dict[str, Any] | None = None,
    check_inputs: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> ExportResult:
    """Trace `model` on (frames, audio), save it to `path` (+ `<path>.json`), reload and compare with eager.

    The comparison runs on the traced inputs and on every pair in `check_inputs` (same shapes);
    raises ExportError when the reloaded module differs from eager by more than `atol`.
    """
    path = Path(path)
    model = model.eval()
    wrapper = ExportedSegmentor(model)
    with torch.no_grad():
        traced = _trace(wrapper, frames, audio)
        buf = io.BytesIO()
        torch.jit.save(traced, buf)
        atomic_write_bytes(path, buf.getvalue())
        loaded = load_exported(path, frames.device)
        worst, rel, eager = _compare(model, lambda f, a: loaded(f, a), [(frames, audio)] + list(check_inputs or []))
    return _finish(model, path, "torchscript", (frames, audio, eager), (worst, rel, atol), meta)


def export_onnx(
    model: AVSegmentor,
    path: str | Path,
    frames: torch.Tensor,
    audio: torch.Tensor,
    atol: float = 1e-4,
    meta: dict[str, Any] | None = None,
    check_inputs: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> ExportResult:
    """Export `model` to ONNX at `path` (+ `<path>.json`), run it with onnxruntime (CPU) and compare with eager.

    Inputs `frames`, `audio`, output `logits`; axis 0 (batch) is dynamic unless the model has the
    AVS-BG motion module (fixed batch, as the TorchScript trace). Raises ExportError when the
    onnxruntime output differs from eager by more than `atol` on any of the inputs.
    """
    ort = _onnxruntime()
    path = Path(path)
    model = model.eval()
    wrapper = ExportedSegmentor(model)
    axes = {} if model.motion is not None else {k: {0: "batch"} for k in ("frames", "audio", "logits")}
    buf = io.BytesIO()
    with torch.no_grad(), _traceable_motion(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings and the exporter's deprecation notice
        try:
            torch.onnx.export(
                wrapper,
                (frames, audio),
                buf,
                input_names=["frames", "audio"],
                output_names=["logits"],
                dynamic_axes=axes,
                opset_version=ONNX_OPSET,
                dynamo=False,  # the TorchScript-based exporter: the same trace as export_torchscript
            )
        except Exception as exc:
            raise ExportError(f"torch.onnx.export failed: {type(exc).__name__}: {exc}") from exc
    atomic_write_bytes(path, buf.getvalue())
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def run(f: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        feeds = {"frames": f.detach().cpu().float().numpy(), "audio": a.detach().cpu().float().numpy()}
        return torch.from_numpy(session.run(["logits"], feeds)[0]).to(f.device)

    with torch.no_grad():
        worst, rel, eager = _compare(model, run, [(frames, audio)] + list(check_inputs or []))
    extra = {"opset": ONNX_OPSET, "onnxruntime": ort.__version__, "dynamic_axes": axes.get("frames", {})}
    return _finish(model, path, "onnx", (frames, audio, eager), (worst, rel, atol), {**extra, **(meta or {})})


def _onnxruntime() -> Any:
    """The onnxruntime module, or a ConfigError naming the extra that installs it."""
    try:
        import onnxruntime
    except ImportError:
        raise ConfigError("format=onnx needs the onnxruntime package: pip install -e '.[onnx]'") from None
    return onnxruntime


def _compare(model: AVSegmentor, exported: Any, inputs: list[tuple[torch.Tensor, torch.Tensor]]):
    """(max |exported - eager|, that / max |eager|, the last eager logits) over `inputs`."""
    worst, rel, eager = 0.0, 0.0, None
    for f, a in inputs:
        eager = _eager_logits(model, f, a)
        got = exported(f, a)
        if got.shape != eager.shape:
            raise ExportError(f"exported output shape {tuple(got.shape)} != eager {tuple(eager.shape)}")
        diff = float((got.float() - eager.float()).abs().max())
        worst = max(worst, diff)
        rel = max(rel, diff / max(float(eager.float().abs().max()), 1e-12))
    return worst, rel, eager


def _output_text(num_classes: int) -> str:
    if num_classes == 1:
        return "logits [B,T,1,H,W] (foreground probability = sigmoid)"
    return (
        f"logits [B,T,{num_classes},H,W] (AVSS class = argmax over dim 2, class 0 = background; "
        "padded frames are not zeroed: score only the real frames)"
    )


def _finish(
    model: AVSegmentor,
    path: Path,
    fmt: str,
    tensors: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    diffs: tuple[float, float, float],
    meta: dict[str, Any] | None,
) -> ExportResult:
    """Check the difference against atol and write the sidecar `<path>.json` -> ExportResult."""
    frames, audio, eager = tensors
    worst, rel, atol = diffs
    if not worst <= atol:
        raise ExportError(f"{path}: exported logits differ from eager by {worst:.3g} > atol={atol}")
    shapes = {"frames": list(frames.shape), "audio": list(audio.shape), "logits": list(eager.shape)}
    record = {
        "format": fmt,
        "inputs": {
            "frames": "float32 [B,T,3,H,W], RGB / 255, ImageNet-normalised",
            "audio": "float32 [B,T,1,96,64], VGGish log-mel (avs.data.audio)",
        },
        "output": _output_text(int(getattr(model, "num_classes", 1))),
        "traced_shapes": shapes,
        "fixed_batch": model.motion is not None,
        "latent": "prior mean code" if model.latent is not None else None,
        "max_abs_diff_vs_eager": worst,
        "max_rel_diff_vs_eager": rel,
        "atol": atol,
        "torch": torch.__version__,
        **(meta or {}),
    }
    meta_path = path.with_name(path.name + ".json")
    atomic_write_text(meta_path, json.dumps(record, indent=2))
    return ExportResult(path, meta_path, worst, shapes, rel)


def _eager_logits(model: AVSegmentor, frames: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
    """The eager model's deterministic prediction (prior mean code for latent models) -> [B,T,1,H,W]."""
    k = model.eval_num_samples
    model.eval_num_samples = 1
    try:
        return model({"frames": frames, "audio": audio})["logits"]
    finally:
        model.eval_num_samples = k


def export_checkpoint(cfg: Any, out_dir: str | Path) -> ExportResult:
    """scripts/export.py: rebuild `cfg.checkpoint`, export to `<out_dir>/<name>.pt` (TorchScript) or
    `<name>.onnx` (`cfg.format=onnx`), check within `cfg.atol`."""
    from avs.inference.model import load_model

    loaded = load_model(str(cfg.checkpoint), cfg.get("device", "cpu") or "cpu", num_samples=1)
    if loaded.model.latent is not None and getattr(loaded.model.latent, "legacy_test_sample", False):
        log.info("export uses the prior mean code (the checkpoint's legacy_test_sample draws a random one)")
        loaded.model.latent.legacy_test_sample = False
    batch = int(cfg.get("batch_size", 1) or 1)
    if batch < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch}")
    seed = int(cfg.get("seed", 0) or 0)
    frames, audio = example_inputs(batch, loaded.num_frames, loaded.image_size, seed, loaded.device)
    checks = [
        example_inputs(batch, loaded.num_frames, loaded.image_size, seed + 1 + i, loaded.device)
        for i in range(int(cfg.get("num_checks", 2) or 0))
    ]
    name = cfg.get("name") or f"{Path(str(cfg.checkpoint)).stem}_{loaded.method}"
    meta = {
        "checkpoint": str(loaded.checkpoint),
        "method": loaded.method,
        "backbone": str(loaded.cfg.backbone.get("name", "")),
        "num_frames": loaded.num_frames,
        "image_size": list(loaded.image_size),
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
    }
    fmt = str(cfg.get("format", "torchscript"))
    exporter, suffix = (export_onnx, ".onnx") if fmt == "onnx" else (export_torchscript, ".pt")
    result = exporter(
        loaded.model,
        Path(out_dir) / f"{name}{suffix}",
        frames,
        audio,
        atol=float(cfg.get("atol", 1e-4)),
        meta=meta,
        check_inputs=checks,
    )
    log.info("exported %s -> %s (max |exported - eager| = %.3g)", cfg.checkpoint, result.path, result.max_abs_diff)
    return result
