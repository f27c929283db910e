"""Reductions of per-frame counts (avs.metrics.FrameStats) to the numbers of each metric protocol.

The protocols and their keys are described in the avs.metrics module docstring.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from avs.metrics import FrameStats, fscore_thresholds

__all__ = ["reduce_protocol"]

_BETA2 = 0.3
_IOU_EPS = 1e-7  # the published mask_iou adds this to the union
_PR_EPS = 1e-20  # the published _eval_pr adds this to both denominators


def reduce_protocol(name: str, clip: Tensor, stats: FrameStats, legacy_batch_size: int) -> dict:
    """Metrics of protocol `name` from the consolidated per-frame stats (`clip`: clip index per frame)."""
    if name == "avsbench_legacy":
        return _legacy(clip, stats, legacy_batch_size)
    if name == "per_frame":
        return {**_per_frame(stats), "miou_se": clip_standard_error(clip, stats)}
    return _dataset_level(stats)


def _fbeta(prec: Tensor, rec: Tensor) -> Tensor:
    """F_beta (beta^2 = 0.3) of same-shaped precision/recall; NaN (0/0) -> 0."""
    f = (1 + _BETA2) * prec * rec / (_BETA2 * prec + rec)
    return torch.nan_to_num(f, nan=0.0)


def _safe_div(num: Tensor, den: Tensor) -> Tensor:
    """num / den in float64, 0 where den == 0."""
    num = num.double()
    den = den.double()
    return torch.where(den > 0, num / den.clamp_min(1), torch.zeros_like(num))


def _legacy_fcurves(s: FrameStats) -> Tensor:
    """Per-frame F-curves [N,K] float32 in the arithmetic of AVSBench _eval_pr / Eval_Fmeasure."""
    tp = s.tp.float()
    prec = tp / (s.pred_pos.float() + _PR_EPS)
    rec = tp / (s.gt_area.float()[:, None] + _PR_EPS)
    f = (1 + _BETA2) * prec * rec / (_BETA2 * prec + rec)
    f[f != f] = 0
    return f


def _legacy(clip: Tensor, s: FrameStats, batch_size: int) -> dict:
    """AVSBench test.py aggregation over batches of `batch_size` clips (clip-index order)."""
    n = len(s)
    _, clip_rank = torch.unique_consecutive(clip, return_inverse=True)  # clip is sorted
    num_clips = int(clip_rank.max()) + 1
    batch = clip_rank // batch_size  # [N] batch of each frame
    nb = int(batch.max()) + 1
    counts = torch.bincount(batch, minlength=nb)  # frames per batch
    starts = torch.cumsum(counts, 0) - counts
    col = torch.arange(n) - starts[batch]  # position of the frame within its batch
    width = int(counts.max())

    # mask_iou: inter / (union + eps) per frame, float32 running sum over the batch, / N_b
    iou = s.inter.float() / (s.union.float() + _IOU_EPS)  # [N] float32
    iou_grid = torch.zeros((nb, width), dtype=torch.float32)
    iou_grid[batch, col] = iou
    # Eval_Fmeasure: per-frame curves, running sum over non-empty-GT frames, / count, max
    nonempty = s.gt_area > 0
    f_grid = torch.zeros((nb, width, s.num_thresholds), dtype=torch.float32)
    f_grid[batch, col] = _legacy_fcurves(s) * nonempty[:, None]  # zeros for skipped frames
    iou_sum = torch.zeros(nb, dtype=torch.float32)
    f_sum = torch.zeros((nb, s.num_thresholds), dtype=torch.float32)
    for j in range(width):  # positions within a batch (<= batch_size * T), vectorised over batches
        iou_sum = iou_sum + iou_grid[:, j]
        f_sum = f_sum + f_grid[:, j]
    batch_miou = iou_sum / counts.float()  # [nb] float32
    f_count = torch.bincount(batch[nonempty], minlength=nb)  # non-empty frames per batch
    f_curve = torch.where(f_count[:, None] > 0, f_sum / f_count.clamp_min(1).float()[:, None], 0.0)
    batch_f = f_curve.max(1).values  # [nb] float32

    # AverageMeter: float32 running sum of the mIoU tensors; float64 sum of F .item() values
    miou_acc = np.float32(0.0)
    for v in batch_miou.numpy():
        miou_acc = np.float32(miou_acc + v)
    miou = float(np.float32(miou_acc / np.float32(nb)))
    f_acc = 0.0
    for v in batch_f.tolist():
        f_acc += v
    return {
        "miou": miou,
        "fscore": f_acc / nb,
        "eval_batch_size": batch_size,
        "num_batches": nb,
        "num_empty_fscore_batches": int((f_count == 0).sum()),
        "num_clips": num_clips,
        "num_frames": n,
    }


def _per_frame(s: FrameStats) -> dict:
    """Batch-independent per-frame means (float64)."""
    iou = s.inter.double() / s.union.double()  # union >= 1 always
    nonempty = s.gt_area > 0
    nf = int(nonempty.sum())
    th = fscore_thresholds(s.num_thresholds).double()
    if nf:
        ne = s.select(nonempty)
        prec = _safe_div(ne.tp, ne.pred_pos)  # [M,K]
        rec = _safe_div(ne.tp, ne.gt_area[:, None].expand_as(ne.tp))
        curve = _fbeta(prec, rec).mean(0)  # [K]
        best = int(torch.argmax(curve))
        f_max, f_max_th = float(curve[best]), float(th[best])
        f05 = _fbeta(_safe_div(ne.fg_inter, ne.pred_area), _safe_div(ne.fg_inter, ne.gt_area))
        f_half = float(f05.mean())
    else:
        f_max, f_max_th, f_half = 0.0, None, 0.0
    return {
        "miou": float(iou.mean()),
        "fscore": f_max,
        "fscore_max": f_max,
        "fscore_max_threshold": f_max_th,
        "fscore_at_0.5": f_half,
        "num_fscore_frames": nf,
        "num_frames": len(s),
    }


def clip_standard_error(clip: Tensor, s: FrameStats) -> float | None:
    """Standard error of the per-frame mIoU over clips (frames of one clip are not independent).

    The per-frame mIoU is the mean of per-clip sums divided by the frame count; its SE is estimated
    from the spread of the clips' IoU sums (ratio estimator): sqrt(n/(n-1) * sum_c (S_c - m F_c)^2) / F,
    with S_c the clip's IoU sum, F_c its frame count, m the mIoU and F the total frame count. None
    with fewer than two clips.
    """
    if len(s) == 0:
        return None
    iou = s.inter.double() / s.union.double()
    uniq, inv = torch.unique(clip, return_inverse=True)
    n = uniq.numel()
    if n < 2:
        return None
    sums = torch.zeros(n, dtype=torch.float64).index_add_(0, inv, iou)
    counts = torch.zeros(n, dtype=torch.float64).index_add_(0, inv, torch.ones_like(iou))
    m = float(iou.mean())
    resid = sums - m * counts
    return float(torch.sqrt(n / (n - 1) * (resid**2).sum()) / counts.sum())


def _dataset_level(s: FrameStats) -> dict:
    """Pixel counts summed over the set, then ratios (float64)."""
    tp = s.fg_inter.sum()
    union = s.fg_union.sum()
    pixels = s.num_pixels.sum()
    pred = s.pred_area.sum()
    gt = s.gt_area.sum()
    iou_fg = float(tp) / float(union) if union > 0 else 1.0
    bg_inter, bg_union = pixels - union, pixels - tp  # true negatives; background in pred or GT
    iou_bg = float(bg_inter) / float(bg_union) if bg_union > 0 else 1.0
    prec = float(tp) / float(pred) if pred > 0 else 0.0
    rec = float(tp) / float(gt) if gt > 0 else 0.0
    den = _BETA2 * prec + rec
    f = (1 + _BETA2) * prec * rec / den if den > 0 else 0.0
    return {
        "miou": iou_fg,
        "iou_bg": iou_bg,
        "miou_fg_bg": 0.5 * (iou_fg + iou_bg),
        "precision": prec,
        "recall": rec,
        "fscore": f,
        "num_frames": len(s),
    }
