"""The built-in evaluators (avs.evaluation.evaluator.DatasetEvaluator): metrics, predicted masks as PNGs
(AVSS: palette PNGs), mask overlays for TensorBoard, and the per-dimension KL of a latent model's codes.

The uncertainty AUROC is avs.evaluation.uncertainty.UncertaintyEvaluator, the visualisation grids
avs.inference.visualize.VisualizeEvaluator. A user's evaluator is a DatasetEvaluator subclass in their
own file, added from config (`eval.evaluators`, docs/architecture.md).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from avs.engine import distributed as D
from avs.evaluation.evaluator import DatasetEvaluator, metrics_of
from avs.metrics import MetricAccumulator


class MetricsEvaluator(DatasetEvaluator):
    """mIoU / F-score per protocol (avs.metrics): summary {protocol: metrics} of the whole split (all ranks)."""

    name = "metrics"

    def __init__(self, protocols: list[str], legacy_batch_size: int, split: str = "the") -> None:
        self.protocols, self.legacy_batch_size, self.split = list(protocols), int(legacy_batch_size), split
        self.accumulator = MetricAccumulator()

    def reset(self) -> None:
        self.accumulator = MetricAccumulator()

    def process(self, batch: dict[str, Any], output: dict[str, Any]) -> None:
        self.accumulator.update(output["logits"], batch["masks"], indices=batch["index"])

    def summarize(self) -> dict[str, dict[str, float]]:
        return metrics_of(self.accumulator, self.protocols, self.legacy_batch_size, self.split, D.is_initialized())


class SemanticMetricsEvaluator(MetricsEvaluator):
    """AVSS mIoU / F per protocol (avs.metrics_avss: per_class, avsbench_legacy) over `num_classes` classes;
    padded frames (frame_valid false) and frames without a mask enter `per_class` never (docs/avss.md)."""

    name = "metrics"

    def __init__(self, num_classes: int, protocols: list[str], legacy_batch_size: int, split: str = "the") -> None:
        self.num_classes = int(num_classes)
        super().__init__(protocols, legacy_batch_size, split)

    def reset(self) -> None:
        from avs.metrics_avss import SemanticAccumulator

        self.accumulator = SemanticAccumulator(self.num_classes)

    def process(self, batch: dict[str, Any], output: dict[str, Any]) -> None:
        self.accumulator.update(
            output["logits"],
            batch["masks"],
            indices=batch["index"],
            mask_valid=batch["mask_valid"],
            frame_valid=batch["frame_valid"],
        )


def metrics_evaluator(cfg: Any, legacy_batch_size: int, split: str) -> MetricsEvaluator:
    """The metrics evaluator of `cfg.data`: AVSS (data.subset=avss) -> SemanticMetricsEvaluator."""
    protocols = list(cfg.eval.protocols)
    if str(cfg.data.subset) == "avss":
        return SemanticMetricsEvaluator(int(cfg.data.num_classes), protocols, legacy_batch_size, split)
    return MetricsEvaluator(protocols, legacy_batch_size, split)


class MaskWriter(DatasetEvaluator):
    """Predicted masks as PNGs in the AVSBench layout (avs.evaluation.outputs.save_pred_masks): summary = folder."""

    name = "masks"

    def __init__(self, out_dir: str | Path, dataset: Any) -> None:
        self.out_dir, self.dataset = Path(out_dir), dataset

    def process(self, batch: dict[str, Any], output: dict[str, Any]) -> None:
        from avs.evaluation.outputs import save_pred_masks

        save_pred_masks(self.out_dir, self.dataset, batch, output["logits"])

    def summarize(self) -> Path:
        return self.out_dir


class SemanticMaskWriter(MaskWriter):
    """AVSS: the predicted class ids of every real frame as palette PNGs in the AVSS palette, named as MaskWriter
    names its masks (avs.evaluation.outputs.save_pred_labels); padded frames get no file. Summary = folder."""

    def process(self, batch: dict[str, Any], output: dict[str, Any]) -> None:
        from avs.evaluation.outputs import save_pred_labels

        save_pred_labels(self.out_dir, self.dataset, batch, output["logits"])


def mask_writer(cfg: Any, out_dir: str | Path, dataset: Any) -> MaskWriter:
    """The save_masks evaluator of `cfg.data`: AVSS (data.subset=avss) -> SemanticMaskWriter."""
    if str(cfg.data.subset) == "avss":
        return SemanticMaskWriter(out_dir, dataset)
    return MaskWriter(out_dir, dataset)


class OverlayImages(DatasetEvaluator):
    """frame | GT | prediction overlays of the first batch, handed to `write(grid [3,H',W'])` (TensorBoard)."""

    name = "overlays"

    def __init__(self, write: Callable[[torch.Tensor], None], max_clips: int = 2) -> None:
        self.write, self.max_clips, self.done = write, max_clips, False

    def reset(self) -> None:
        self.done = False

    def process(self, batch: dict[str, Any], output: dict[str, Any]) -> None:
        from avs.evaluation.visuals import overlay_grid

        if not self.done:
            self.write(overlay_grid(batch["frames"], batch["masks"], output["logits"], self.max_clips))
            self.done = True

    def summarize(self) -> bool:
        return self.done


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The segmentor inside torch.compile / DDP wrappers."""
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)


class LatentKLEvaluator(DatasetEvaluator):
    """Mean over a split's frames of KL(posterior || prior) per latent dimension of each code -> {code: [L], frames}.

    The eval output holds only the prior, so this evaluator encodes the posterior of each batch with
    the evaluated model's latent part (`model.latent.encode`, which sees the ground truth masks). A
    dimension whose KL stays near 0 carries no information from the ground truth (collapsed). The KL
    is the one between the distributions the codes are drawn from, without free bits. AVSS batches
    (with `frame_valid`): only the real frames count, in the sums and in "frames"; a padded frame is
    left out (docs/avss.md). Under DDP the per-clip sums of every rank are gathered (padded repeats
    dropped by clip index). Empty summary ({}) for a model without a latent part.
    """

    name = "latent_kl"

    def reset(self) -> None:
        self.per_clip: dict[int, dict[str, torch.Tensor]] = {}
        self.frames_per_clip: dict[int, int] = {}

    def process(self, batch: dict[str, Any], output: dict[str, Any]) -> None:
        from avs.engine.diagnostics import gaussian_kl_per_dim

        net = _unwrap(self.model)
        if getattr(net, "latent", None) is None:
            return
        b, t = batch["frames"].shape[:2]
        x = batch["frames"].flatten(0, 1)  # [B,T,3,H,W] -> [B*T,3,H,W]
        audio = net.encode_audio(batch["audio"]) if net.use_audio else None
        masks = net._posterior_masks(batch["masks"].flatten(0, 1), batch["mask_valid"])
        state = net.latent.encode(x, audio, masks)
        index = [int(i) for i in batch["index"]]
        real = batch.get("frame_valid")  # AVSS: [B,T] real frames; S4/MS3: none, every frame counts
        for key, q in (state.posterior or {}).items():
            p = state.prior.get(key)
            if p is None or q.logvar is None or p.logvar is None:
                continue
            kl = gaussian_kl_per_dim(q.mu, q.logvar, p.mu, p.logvar).view(b, t, -1)  # [B,T,L]
            if real is not None:
                kl = torch.where(real.to(kl.device, torch.bool).view(b, t, 1), kl, 0.0)  # padded frames: 0
            for i, row in zip(index, kl.sum(1).double().cpu()):  # [B,L]
                self.per_clip.setdefault(i, {})[key] = row
        counts = [int(t)] * b if real is None else [int(n) for n in real.to(torch.bool).sum(1).tolist()]
        for i, n in zip(index, counts):
            self.frames_per_clip[i] = n

    def summarize(self) -> dict[str, Any]:
        per_clip, frames = self.per_clip, self.frames_per_clip
        if D.is_initialized():
            per_clip, frames = {}, {}
            for part_clips, part_frames in D.gather_objects((self.per_clip, self.frames_per_clip)):
                per_clip.update(part_clips)
                frames.update(part_frames)
        if getattr(_unwrap(self.model), "latent", None) is None:
            return {}
        sums: dict[str, torch.Tensor] = {}
        for i in sorted(per_clip):
            for key, row in per_clip[i].items():
                sums[key] = sums.get(key, 0) + row
        total = sum(frames.values())
        out: dict[str, Any] = {k: (v / max(total, 1)).tolist() for k, v in sums.items()}
        out["frames"] = total
        return out
