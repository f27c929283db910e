"""Qualitative views of a checkpoint on a dataset split: frame / GT / prediction / variance grids, t-SNE of latents."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from avs.evaluation.evaluator import DatasetEvaluator, evaluate
from avs.evaluation.outputs import predicted_labels
from avs.evaluation.visuals import denormalize as rgb01
from avs.inference.model import LoadedModel, load_model
from avs.inference.overlay import heatmap, image_grid, save_png, scatter_plot, tint
from avs.inference.semantic import blend_labels, legend_strip, present_classes
from avs.inference.video import MissingDependencyError

log = logging.getLogger(__name__)

__all__ = ["VisualizeEvaluator", "VisualizeResult", "visualize_split", "tsne_embed", "denormalize"]

CODE_NAMES = ("c", "s_a", "s_v")  # shared, audio-specific, visual-specific (ECMVAE)
VARIANCE_MAX = 0.25


@dataclass
class VisualizeResult:
    """Files written by visualize_split; `tsne_skipped` says why there is no t-SNE plot."""

    grids: list[Path] = field(default_factory=list)
    latents: Path | None = None
    tsne: Path | None = None
    tsne_skipped: str | None = None


def denormalize(frames: torch.Tensor) -> np.ndarray:
    """ImageNet-normalised [T,3,H,W] -> uint8 RGB [T,H,W,3]."""
    x = rgb01(frames.cpu()).mul(255).round().to(torch.uint8)
    return np.ascontiguousarray(x.permute(0, 2, 3, 1).numpy())  # [T,3,H,W] -> [T,H,W,3]


def tsne_embed(codes: np.ndarray, seed: int = 0) -> np.ndarray:
    """t-SNE of codes [N,D] -> [N,2]; MissingDependencyError (avs[viz]) when scikit-learn is absent."""
    try:
        from sklearn.manifold import TSNE
    except ImportError as exc:
        raise MissingDependencyError(
            "t-SNE needs scikit-learn, which is not installed: pip install 'avs[viz]'  (or: pip install scikit-learn)"
        ) from exc
    n = codes.shape[0]
    if n < 4:
        raise ValueError(f"t-SNE needs at least 4 codes, got {n}")
    perplexity = float(min(30.0, max(1.0, (n - 1) / 3.0)))
    return np.asarray(TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(codes))


def _opt(cfg: Mapping[str, Any], key: str, default: Any) -> Any:
    value = cfg.get(key, default)
    return default if value is None else value


@dataclass(frozen=True)
class _GridOptions:
    """The options of a visualize run, read (and checked) before anything is loaded."""

    split: str
    num_clips: int
    num_samples: int
    threshold: float
    progress: bool


def visualize_split(cfg: Mapping[str, Any], out_dir: str | Path) -> VisualizeResult:
    """Grids for the first `cfg.num_clips` clips of `cfg.split` and a t-SNE of the latent codes (latent models).

    Keys (configs/visualize.yaml): checkpoint, split, data (optional override), num_clips, num_samples,
    tsne, tsne_clips, batch_size, device, seed, threshold, tile_height, progress.
    """
    out = Path(out_dir)
    opts = _GridOptions(
        split=str(_opt(cfg, "split", "val")),
        num_clips=int(_opt(cfg, "num_clips", 8)),
        num_samples=int(_opt(cfg, "num_samples", 1)),
        threshold=float(_opt(cfg, "threshold", 0.5)),
        progress=bool(_opt(cfg, "progress", True)),
    )
    loaded = load_model(str(cfg["checkpoint"]), _opt(cfg, "device", "auto"), opts.num_samples)
    loader = _split_loader(cfg, loaded, opts.split, opts.num_clips)
    torch.manual_seed(int(_opt(cfg, "seed", 0)))
    result = VisualizeResult()
    codes = _grids_and_codes(cfg, opts, loaded, loader, out, result)
    if not loaded.has_latent:
        result.tsne_skipped = f"{loaded.method} has no latent codes (t-SNE is for ECMVAE-style models)"
    elif not bool(_opt(cfg, "tsne", True)):
        result.tsne_skipped = "tsne=false"
    elif codes:
        _write_tsne(cfg, {k: np.concatenate(v, axis=0) for k, v in codes.items()}, out, opts.split, result)
    if result.tsne_skipped:
        log.warning("t-SNE skipped: %s", result.tsne_skipped)
    return result


def _split_loader(cfg: Mapping[str, Any], loaded: LoadedModel, split: str, num_clips: int) -> DataLoader:
    """In-order loader over the clips the grids (and the t-SNE, over all clips unless tsne_clips) need."""
    from avs.data import build_dataset

    data_cfg = cfg.get("data") or loaded.cfg.data
    if data_cfg.get("synthetic"):
        from avs.data.preflight import require_synthetic

        require_synthetic(data_cfg)  # evaluation never generates data
    ds = build_dataset(data_cfg, split, train=False)
    want_tsne = bool(_opt(cfg, "tsne", True)) and loaded.has_latent
    tsne_clips = cfg.get("tsne_clips")
    total = len(ds) if want_tsne and tsne_clips is None else min(len(ds), max(num_clips, int(tsne_clips or 0)))
    return DataLoader(
        torch.utils.data.Subset(ds, range(total)),
        batch_size=int(_opt(cfg, "batch_size", 2)),
        shuffle=False,
        num_workers=0,
    )


class VisualizeEvaluator(DatasetEvaluator):
    """A frame / GT / prediction [/ variance] grid per clip for the first `num_clips` clips (grids/<video_id>.png)
    and the latent codes (`latents` of the output, [B*T,L] per code) of every clip -> {"grids", "codes"}; on
    AVSS the codes of the real frames only (`frame_valid`)."""

    name = "visualize"

    def __init__(
        self,
        out_dir: str | Path,
        num_clips: int,
        threshold: float = 0.5,
        tile_height: int = 128,
        class_names: list[str] | tuple[str, ...] = (),
    ) -> None:
        self.out, self.num_clips, self.threshold, self.tile_height = Path(out_dir), num_clips, threshold, tile_height
        self.class_names = list(class_names)  # AVSS: names of the legend (class ids when empty)

    def reset(self) -> None:
        self.grids: list[Path] = []
        self.codes: dict[str, list[np.ndarray]] = {}
        self.seen = 0

    def process(self, batch: dict[str, Any], output: dict[str, Any]) -> None:
        logits = output["logits"].float()
        if logits.shape[2] > 1:  # AVSS: class ids [B,T,H,W] drawn in the palette; the threshold is not used
            probs = predicted_labels(logits).cpu()
        else:
            probs = torch.sigmoid(logits).cpu()  # [B,T,1,H,W]
        var = output.get("variance")
        real = batch.get("frame_valid")  # AVSS: the codes of padded frames are left out of the t-SNE
        for name, value in (output.get("latents") or {}).items():
            value = value.float().cpu()  # [B*T,L]
            if real is not None:
                value = value[real.reshape(-1).cpu().bool()]
            self.codes.setdefault(name, []).append(value.numpy())
        cpu = {k: v.cpu() if torch.is_tensor(v) else v for k, v in batch.items()}
        for b in range(probs.shape[0]):
            if self.seen < self.num_clips:
                v = None if var is None else var[b].float().cpu()
                self.grids.append(self._grid(cpu, b, probs[b], v, int(logits.shape[2])))
            self.seen += 1

    def _grid(self, batch: dict, b: int, pred: torch.Tensor, var: torch.Tensor | None, num_classes: int) -> Path:
        if num_classes > 1:
            return _semantic_clip_grid(self.out, batch, b, pred, var, self.tile_height, self.class_names, num_classes)
        return _clip_grid(self.out, batch, b, pred, var, self.threshold, self.tile_height)

    def summarize(self) -> dict[str, Any]:
        return {"grids": self.grids, "codes": self.codes}


def _grids_and_codes(
    cfg: Mapping[str, Any],
    opts: _GridOptions,
    loaded: LoadedModel,
    loader: DataLoader,
    out: Path,
    result: VisualizeResult,
) -> dict[str, list[np.ndarray]]:
    """One avs.evaluation.evaluate pass with a VisualizeEvaluator: the grids go into `result.grids`;
    returns the latent codes of every clip by name."""
    names = list(getattr(loader.dataset.dataset, "class_names", []))  # the Subset's dataset (AVSS: label2idx.json)
    ev = VisualizeEvaluator(out, opts.num_clips, opts.threshold, int(_opt(cfg, "tile_height", 128)), names)
    summary = evaluate(
        loaded.model, loader, [ev], device=loaded.device, desc=f"visualize {opts.split}", progress=opts.progress
    )["visualize"]
    result.grids.extend(summary["grids"])
    return summary["codes"]


def _write_tsne(
    cfg: Mapping[str, Any], arrays: dict[str, np.ndarray], out: Path, split: str, result: VisualizeResult
) -> None:
    """Save the codes (latents.npz) and a t-SNE scatter of all of them, one colour per code (tsne.png)."""
    from avs.utils.io import atomic_save

    result.latents = out / "latents.npz"
    result.latents.parent.mkdir(parents=True, exist_ok=True)
    atomic_save(result.latents, lambda fh: np.savez(fh, **arrays))
    names = [n for n in CODE_NAMES if n in arrays] + sorted(set(arrays) - set(CODE_NAMES))
    stacked = np.concatenate([arrays[n] for n in names], axis=0)  # [len(names)*N, L]
    labels = np.concatenate([np.full(arrays[n].shape[0], i) for i, n in enumerate(names)])
    try:
        points = tsne_embed(stacked, int(_opt(cfg, "seed", 0)))
    except MissingDependencyError as exc:
        result.tsne_skipped = str(exc)
    else:
        title = f"t-SNE of prior codes ({split}, {stacked.shape[0] // len(names)} frames)"
        result.tsne = save_png(out / "tsne.png", scatter_plot(points, labels, names, title=title))


def _clip_grid(
    out: Path, batch: dict, b: int, probs: torch.Tensor, var: torch.Tensor | None, threshold: float, tile_height: int
) -> Path:
    """One clip: rows frame / GT / prediction [/ variance], columns t = 1..T -> grids/<video_id>.png."""
    frames = denormalize(batch["frames"][b])  # [T,H,W,3]
    gt = batch["masks"][b, :, 0].numpy() > 0.5  # [T,H,W]
    valid = batch["mask_valid"][b].numpy()
    T = frames.shape[0]
    pred = probs[:, 0].numpy() > threshold  # [T,H,W]
    rows = [
        list(frames),
        [tint(frames[t], gt[t], (40, 220, 90)) if valid[t] else np.zeros_like(frames[t]) for t in range(T)],
        [tint(frames[t], pred[t]) for t in range(T)],
    ]
    names = ["frame", "GT", "prediction"]
    if var is not None:
        rows.append([heatmap(var[t, 0].numpy(), VARIANCE_MAX) for t in range(T)])
        names.append("variance")
    grid = image_grid(rows, col_labels=[f"t={t + 1}" for t in range(T)], row_labels=names, tile_height=tile_height)
    vid = str(batch["video_id"][b])
    return save_png(out / "grids" / f"{vid}.png", grid)


def _semantic_clip_grid(
    out: Path,
    batch: dict,
    b: int,
    pred: torch.Tensor,
    var: torch.Tensor | None,
    tile_height: int,
    names: list[str],
    num_classes: int,
) -> Path:
    """AVSS: rows frame / GT / prediction [/ variance of P(foreground)] over the real frames (padded ones left out),
    classes in the palette over the frame, a legend of the classes drawn below -> grids/<video_id>.png.
    pred: class ids [T,H,W]; frames without a mask get a black GT tile."""
    real = [t for t in range(pred.shape[0]) if bool(batch["frame_valid"][b, t])]
    frames = denormalize(batch["frames"][b])  # [T,H,W,3]
    gt, pred = batch["masks"][b].numpy(), pred.numpy()  # [T,H,W] class ids
    labelled = batch["mask_valid"][b].numpy()
    gt_tiles = [blend_labels(frames[t], gt[t], num_classes) if labelled[t] else np.zeros_like(frames[t]) for t in real]
    rows = [[frames[t] for t in real], gt_tiles, [blend_labels(frames[t], pred[t], num_classes) for t in real]]
    names_col = ["frame", "GT", "prediction"]
    if var is not None:
        rows.append([heatmap(var[t, 0].numpy(), VARIANCE_MAX) for t in real])
        names_col.append("variance")
    grid = image_grid(rows, col_labels=[f"t={t + 1}" for t in real], row_labels=names_col, tile_height=tile_height)
    shown = present_classes([gt[t] for t in real if labelled[t]] + [pred[t] for t in real])
    grid = np.concatenate([grid, legend_strip(shown, names, num_classes, grid.shape[1])], axis=0)
    return save_png(out / "grids" / f"{batch['video_id'][b]}.png", grid)
