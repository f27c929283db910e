"""Segmentation and audio-visual losses (AVSBench BCE, F3Net structure loss, A-V mapping KL).

All losses take frame-batched tensors (N = B*T frames) and an optional ``valid [N]`` bool mask:
frames with ``valid=False`` (e.g. the unlabelled frames 1..T-1 of S4 training) contribute
nothing. If no frame is valid the loss is an exact 0 that is still attached to the graph
(so ``backward()`` works and gives zero gradients), never NaN. Each loss returns an unweighted
scalar; the trainer applies the config weights.

Reference bugs are reproduced only behind ``legacy_*`` flags (see docs/protocols.md):
``structure_loss(legacy_mean_bce=True)`` (BCE mean-reduced before the pixel weighting, so the
weights have no effect on it) and ``av_mapping_loss(legacy_sum=True)`` (KL summed over frames,
``reduction='sum'``, so the scale grows with the batch).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "bce_loss",
    "structure_loss",
    "av_mapping_loss",
    "semantic_ce_loss",
    "BCESegLoss",
    "StructureLoss",
    "SemanticCELoss",
]


def _check_pair(name: str, logits: Tensor, masks: Tensor) -> None:
    """Raise ValueError unless logits and masks are both [N,1,H,W] of the same shape."""
    if logits.dim() != 4 or logits.shape[1] != 1:
        raise ValueError(f"{name}: logits must be [N,1,H,W], got {tuple(logits.shape)}")
    if masks.shape != logits.shape:
        raise ValueError(f"{name}: masks must match logits {tuple(logits.shape)}, got {tuple(masks.shape)}")


def _valid_index(name: str, valid: Tensor | None, n: int, device: torch.device) -> Tensor:
    """valid [N] bool | None -> bool [N] on `device` (None means every frame is labelled)."""
    if valid is None:
        return torch.ones(n, dtype=torch.bool, device=device)
    if valid.dim() != 1 or valid.shape[0] != n:
        raise ValueError(f"{name}: valid must be a [N]={n} bool vector, got {tuple(valid.shape)}")
    return valid.to(device=device, dtype=torch.bool)


def _frame_mean(values: Tensor, keep: Tensor) -> Tensor:
    """Mean over the kept frames of per-frame values [N] / [N,1]; 0 (attached) when none is kept.

    Arithmetic masking instead of `values[keep]`: boolean-mask indexing (and `bool(keep.any())`)
    makes the host wait for the device, in the forward and again in the backward.
    """
    v = values.reshape(values.shape[0])
    return torch.where(keep, v, 0.0).sum() / keep.sum().clamp(min=1).to(v.dtype)


def _zero_like_graph(*tensors: Tensor) -> Tensor:
    """An exact scalar 0 connected to the graph of every tensor given (zero gradients)."""
    return sum((t.sum() * 0.0 for t in tensors), torch.zeros((), device=tensors[0].device))


def box_mean(x: Tensor, kernel: int) -> Tensor:
    """`F.avg_pool2d(x, kernel, stride=1, padding=kernel // 2)` (count_include_pad=True, as the F3Net
    reference) computed separably: [N,C,H,W] -> [N,C,H,W].

    A window sum over k rows, then over k columns (zero padding, `unfold` views summed), divided by
    k*k: 2k additions per pixel instead of k*k. On CPU the direct 31 x 31 pool of a 224 px mask batch
    takes hundreds of ms (its kernel is not vectorised for one channel); this takes about 1 ms. With
    stride 1 and padding k // 2 every window holds k*k cells (zero padding counted), so the divisor is
    always k*k, as in avg_pool2d. On binary masks both sums are exact integers in float32, so the
    result is bit-identical to the direct pool; on soft masks it agrees to float rounding.
    """
    if kernel == 1:
        return x
    pad = kernel // 2
    # half precision: the window sums run in float32 (avg_pool2d accumulates in float32 too)
    xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    s = F.pad(xf, (0, 0, pad, pad)).unfold(2, kernel, 1).sum(-1)  # [N,C,H,W]: sums over k rows
    s = F.pad(s, (pad, pad)).unfold(3, kernel, 1).sum(-1)  # then over k columns
    return (s / float(kernel * kernel)).to(x.dtype)


def bce_loss(logits: Tensor, masks: Tensor, valid: Tensor | None = None) -> Tensor:
    """AVSBench BCE: logits, masks [N,1,H,W], valid [N] bool -> mean BCE over labelled pixels (scalar)."""
    _check_pair("bce_loss", logits, masks)
    keep = _valid_index("bce_loss", valid, logits.shape[0], logits.device)
    # every frame has H*W pixels: the mean over labelled pixels is the mean of the labelled frames' means
    bce = F.binary_cross_entropy_with_logits(logits, masks.to(logits.dtype), reduction="none")  # [N,1,H,W]
    return _frame_mean(bce.mean(dim=(1, 2, 3)), keep)


def structure_loss(
    logits: Tensor,
    masks: Tensor,
    valid: Tensor | None = None,
    legacy_mean_bce: bool = False,
    smoothing: float = 0.0,
    kernel: int = 31,
) -> Tensor:
    """F3Net structure loss: logits, masks [N,1,H,W], valid [N] -> mean_frames(wBCE + wIoU) (scalar).

    weit = 1 + 5|avgpool_k(mask) - mask| (zero padding counted in the average). The BCE target
    is ``(1-smoothing)·mask + smoothing/2`` (ECMVAE / AVS-BG use smoothing=0.001; default 0 = no
    smoothing); the IoU term uses the unsmoothed mask. ``legacy_mean_bce=True`` reproduces the
    reference bug: the BCE is mean-reduced over all labelled pixels before weighting, which makes
    the pixel weights a no-op (loss = plain mean BCE + mean weighted IoU).
    """
    _check_pair("structure_loss", logits, masks)
    if kernel < 1 or kernel % 2 == 0:
        raise ValueError(f"structure_loss: kernel must be odd and >= 1, got {kernel}")
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"structure_loss: smoothing must be in [0, 1), got {smoothing}")
    keep = _valid_index("structure_loss", valid, logits.shape[0], logits.device)
    pred = logits  # [N',1,H,W] with N' = N: every frame, the unlabelled ones weighted 0 in the means below
    mask = masks.to(pred.dtype)
    weit = 1.0 + 5.0 * torch.abs(box_mean(mask, kernel) - mask)  # [N',1,H,W]
    target = mask * (1.0 - smoothing) + smoothing / 2.0 if smoothing > 0 else mask
    if legacy_mean_bce:  # scalar mean over the labelled pixels: weights have no effect
        wbce = _frame_mean(F.binary_cross_entropy_with_logits(pred, target, reduction="none").mean(dim=(1, 2, 3)), keep)
    else:
        bce = F.binary_cross_entropy_with_logits(pred, target, reduction="none")
        wbce = (weit * bce).sum(dim=(2, 3)) / weit.sum(dim=(2, 3))  # [N',1]
    prob = torch.sigmoid(pred)
    inter = (prob * mask * weit).sum(dim=(2, 3))  # [N',1]
    union = ((prob + mask) * weit).sum(dim=(2, 3))
    wiou = 1.0 - (inter + 1.0) / (union - inter + 1.0)  # [N',1]
    if legacy_mean_bce:
        return wbce + _frame_mean(wiou, keep)
    return _frame_mean(wbce + wiou, keep)


def av_mapping_loss(
    logits: Tensor,
    visual_feats: Sequence[Tensor],
    audio_feats: Sequence[Tensor | None],
    stages: Sequence[int] | None = None,
    normalize: bool = False,
    valid: Tensor | None = None,
    legacy_sum: bool = False,
    mask_is_prob: bool = False,
) -> Tensor:
    """A-V mapping loss (L_AVM): logits [N,1,H,W], stage maps [N,C,h,w], audio [N,C] -> scalar.

    Per stage: m = sigmoid(adaptive_avg_pool(logits, (h,w))) (pool, then sigmoid; not detached)
    (``mask_is_prob=True``: `logits` holds a mask in [0,1], e.g. the hard AVSS foreground, and
    m = adaptive_avg_pool(mask, (h,w)) without the sigmoid, as the released AVSS loss pools its mask),
    v = mean_hw(V·m) [N,C], optionally L2-normalise v and a (``normalize``, F.normalize),
    KL(softmax(a) || softmax(v)) summed over channels; averaged over valid frames
    (``legacy_sum=True``: summed over them, the reference's reduction='sum'); averaged over stages.
    ``stages=None`` uses every stage whose audio feature is not None (0 if there is none).
    """
    if logits.dim() != 4 or logits.shape[1] != 1:
        raise ValueError(f"av_mapping_loss: logits must be [N,1,H,W], got {tuple(logits.shape)}")
    n = logits.shape[0]
    stages = _avm_stages("av_mapping_loss", visual_feats, audio_feats, stages, n)
    keep = _valid_index("av_mapping_loss", valid, n, logits.device)
    if not stages:
        return _zero_like_graph(logits)
    per_stage = []
    for s in stages:
        vmap, audio = visual_feats[s], audio_feats[s]
        m = F.adaptive_avg_pool2d(logits, vmap.shape[-2:])  # [N,1,h,w]
        if not mask_is_prob:
            m = torch.sigmoid(m)
        v = (vmap * m).mean(dim=(2, 3))  # [N,C,h,w] -> [N,C]
        a = audio
        if normalize:
            v = F.normalize(v, dim=-1)
            a = F.normalize(a, dim=-1)
        log_pa = F.log_softmax(a, dim=-1)
        kl = (log_pa.exp() * (log_pa - F.log_softmax(v, dim=-1))).sum(dim=-1)  # [N]
        # no valid frame -> 0, attached to the graph
        per_stage.append(torch.where(keep, kl, 0.0).sum() if legacy_sum else _frame_mean(kl, keep))
    return torch.stack(per_stage).mean()


def _avm_stages(
    name: str,
    visual_feats: Sequence[Tensor],
    audio_feats: Sequence[Tensor | None],
    stages: Sequence[int] | None,
    n: int,
) -> list[int]:
    """The stages an A-V loss runs on (all with audio when None), each checked: [N,C,h,w] maps, [N,C] audio."""
    if len(visual_feats) != len(audio_feats):
        raise ValueError(f"{name}: got {len(visual_feats)} visual stage maps but {len(audio_feats)} audio features")
    chosen = [i for i, a in enumerate(audio_feats) if a is not None] if stages is None else [int(s) for s in stages]
    for s in chosen:
        if not 0 <= s < len(audio_feats) or audio_feats[s] is None:
            raise ValueError(f"{name}: stage {s} has no audio feature (is fusion enabled on it?)")
        vmap, audio = visual_feats[s], audio_feats[s]
        if vmap.dim() != 4 or vmap.shape[0] != n or tuple(audio.shape) != (n, vmap.shape[1]):
            raise ValueError(
                f"{name}: stage {s} needs a [N={n},C,h,w] map and [N,C] audio, "
                f"got {tuple(vmap.shape)} and {tuple(audio.shape)}"
            )
    return chosen


def av_cosine_loss(
    logits: Tensor,
    visual_feats: Sequence[Tensor],
    audio_feats: Sequence[Tensor | None],
    stages: Sequence[int] | None = None,
    eps: float = 1e-6,
) -> Tensor:
    """AVSBench S4 variant of L_AVM ("sa" loss): logits [N,1,H,W], maps [N,C,h,w], audio [N,C] -> scalar.

    Per stage: m = [avg_pool(sigmoid(logits), (h,w)) > 0.5] (a hard mask: sigmoid first, then pool,
    then threshold), v = sum_hw(V*m) / (sum_hw m + eps), cos = <v/|v|, a/|a|>, loss = mean_N
    -log(relu(cos) + eps); averaged over stages. No gradient reaches the logits (the mask is hard).
    """
    if logits.dim() != 4 or logits.shape[1] != 1:
        raise ValueError(f"av_cosine_loss: logits must be [N,1,H,W], got {tuple(logits.shape)}")
    n = logits.shape[0]
    chosen = _avm_stages("av_cosine_loss", visual_feats, audio_feats, stages, n)
    if not chosen:
        return _zero_like_graph(logits)
    prob = torch.sigmoid(logits)
    per_stage = []
    for s in chosen:
        vmap, audio = visual_feats[s], audio_feats[s]
        m = (F.adaptive_avg_pool2d(prob, vmap.shape[-2:]) > 0.5).to(vmap.dtype)  # [N,1,h,w]
        v = (vmap * m).sum(dim=(2, 3)) / (m.sum(dim=(2, 3)) + eps)  # [N,C]
        cos = (F.normalize(v, dim=-1) * F.normalize(audio, dim=-1)).sum(dim=-1)  # [N]
        per_stage.append((-torch.log(F.relu(cos) + eps)).mean())
    return torch.stack(per_stage).mean()


def av_closer_loss(
    logits: Tensor,
    visual_feats: Sequence[Tensor],
    audio_feats: Sequence[Tensor | None],
    stages: Sequence[int] | None = None,
    normalize: bool = False,
    distance: str = "kl",
    legacy_sum: bool = False,
) -> Tensor:
    """AVSBench ``closer_loss`` (L_AVM "VV"): pull each frame's masked visual feature towards the frame
    with the nearest audio. logits [N,1,H,W], maps [N,C,h,w], audio [N,C] -> scalar.

    Per stage: m = sigmoid(avg_pool(logits, (h,w))), v = mean_hw(V*m) [N,C] (L2-normalised with
    ``normalize``, as is the audio for the pairing), j(i) = argmin_{j != i} |a_i - a_j| over the
    whole frame batch, target = v[j(i)] (not detached); ``distance="kl"``: KL(softmax(target) ||
    softmax(v_i)) averaged over frames (summed with ``legacy_sum``, the release's reduction='sum');
    ``"euclidean"``: mean |target - v_i|_2. Averaged over stages. Needs N >= 2.
    """
    if distance not in ("kl", "euclidean"):
        raise ValueError(f"av_closer_loss: distance must be 'kl' or 'euclidean', got {distance!r}")
    if logits.dim() != 4 or logits.shape[1] != 1:
        raise ValueError(f"av_closer_loss: logits must be [N,1,H,W], got {tuple(logits.shape)}")
    n = logits.shape[0]
    if n < 2:
        raise ValueError("av_closer_loss: needs at least 2 frames in the batch (each frame is paired with another)")
    chosen = _avm_stages("av_closer_loss", visual_feats, audio_feats, stages, n)
    if not chosen:
        return _zero_like_graph(logits)
    per_stage = []
    for s in chosen:
        vmap, audio = visual_feats[s], audio_feats[s]
        a = F.normalize(audio, dim=-1) if normalize else audio
        dist = torch.cdist(a, a, p=2) + 10.0 * torch.eye(n, device=a.device, dtype=a.dtype)  # [N,N]
        partner = dist.argmin(dim=0)  # [N]
        m = torch.sigmoid(F.adaptive_avg_pool2d(logits, vmap.shape[-2:]))  # [N,1,h,w]
        v = (vmap * m).mean(dim=(2, 3))  # [N,C]
        if normalize:
            v = F.normalize(v, dim=-1)
        target = v[partner]
        if distance == "euclidean":
            per_stage.append(F.pairwise_distance(target, v, p=2).mean())
            continue
        log_pt = F.log_softmax(target, dim=-1)
        kl = (log_pt.exp() * (log_pt - F.log_softmax(v, dim=-1))).sum(dim=-1)  # [N]
        per_stage.append(kl.sum() if legacy_sum else kl.mean())
    return torch.stack(per_stage).mean()


class BCESegLoss(torch.nn.Module):
    """AVSBench segmentation loss (`bce_loss`) as a module: (logits, masks, valid) -> scalar."""

    def forward(self, logits: Tensor, masks: Tensor, valid: Tensor | None = None) -> Tensor:
        return bce_loss(logits, masks, valid)


class StructureLoss(torch.nn.Module):
    """F3Net structure loss (`structure_loss`) as a module; the options are fixed at construction."""

    def __init__(self, smoothing: float = 0.0, legacy_mean_bce: bool = False, kernel: int = 31) -> None:
        super().__init__()
        if kernel < 1 or kernel % 2 == 0:
            raise ValueError(f"structure_loss: kernel must be odd and >= 1, got {kernel}")
        if not 0.0 <= smoothing < 1.0:
            raise ValueError(f"structure_loss: smoothing must be in [0, 1), got {smoothing}")
        self.smoothing = float(smoothing)
        self.legacy_mean_bce = bool(legacy_mean_bce)
        self.kernel = int(kernel)

    def forward(self, logits: Tensor, masks: Tensor, valid: Tensor | None = None) -> Tensor:
        return structure_loss(
            logits, masks, valid, legacy_mean_bce=self.legacy_mean_bce, smoothing=self.smoothing, kernel=self.kernel
        )

    def extra_repr(self) -> str:
        return f"smoothing={self.smoothing}, legacy_mean_bce={self.legacy_mean_bce}, kernel={self.kernel}"


def semantic_ce_loss(logits: Tensor, labels: Tensor, valid: Tensor | None = None) -> Tensor:
    """AVSS loss as released: logits [N,C,H,W], labels [N,H,W] int class indices, valid [N] -> scalar.

    Per-pixel cross-entropy with no ignore index (class 0, the background, is a normal class), the
    mean over H,W per frame, then the mean over the `valid` frames (the released sum of flag-weighted
    frame means / sum of flags): padded and unlabelled frames count in nothing.
    """
    if logits.dim() != 4 or logits.shape[1] < 2:
        raise ValueError(f"semantic_ce_loss: logits must be [N,C,H,W] with C >= 2, got {tuple(logits.shape)}")
    if labels.shape != (logits.shape[0], *logits.shape[2:]):
        raise ValueError(
            f"semantic_ce_loss: labels must be [N,H,W]={tuple(logits.shape[:1] + logits.shape[2:])}, "
            f"got {tuple(labels.shape)}"
        )
    keep = _valid_index("semantic_ce_loss", valid, logits.shape[0], logits.device)
    ce = F.cross_entropy(logits, labels.long(), reduction="none")  # [N,H,W]
    return _frame_mean(ce.mean(dim=(1, 2)), keep)


def foreground_logit(logits: Tensor) -> Tensor:
    """Class logits [N,C,H,W] -> the foreground logit [N,1,H,W], log(sum_{c>0} e^l_c) - l_0 =
    logit(1 - softmax(l)_0): its sigmoid is P(label != background)."""
    return torch.logsumexp(logits[:, 1:], dim=1, keepdim=True) - logits[:, :1]


def foreground_view(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Class logits [N,C,H,W] and labels [N,H,W] -> (foreground logit, foreground mask label != 0), both [N,1,H,W]."""
    fg = foreground_logit(logits)
    return fg, (labels != 0).unsqueeze(1).to(fg.dtype)


class SemanticCELoss(torch.nn.Module):
    """The AVSS segmentation loss (`semantic_ce_loss`) as a module: (logits [N,C,H,W], labels [N,H,W], valid).

    `foreground` (default None = the released loss alone): a binary seg loss (e.g. `StructureLoss`) on the
    foreground view (`foreground_view`), added with `foreground_weight`, over the same valid frames.
    """

    semantic = True  # takes class-index labels and C-channel logits (Segmentor checks it)

    def __init__(self, foreground: torch.nn.Module | None = None, foreground_weight: float = 1.0) -> None:
        super().__init__()
        self.foreground = foreground
        self.foreground_weight = float(foreground_weight)

    def forward(self, logits: Tensor, masks: Tensor, valid: Tensor | None = None) -> Tensor:
        loss = semantic_ce_loss(logits, masks, valid)
        if self.foreground is None:
            return loss
        fg_logits, fg_masks = foreground_view(logits, masks)
        return loss + self.foreground_weight * self.foreground(fg_logits, fg_masks, valid)


SEG_LOSSES: dict[str, type[torch.nn.Module]] = {"bce": BCESegLoss, "structure": StructureLoss}


def make_seg_loss(name: str, options: dict | None = None) -> torch.nn.Module:
    """The segmentation loss registered as `name` (bce | structure) built with `options`."""
    if name not in SEG_LOSSES:
        raise ValueError(f"model.seg_loss must be one of {list(SEG_LOSSES)}, got {name!r}")
    return SEG_LOSSES[name](**(options or {}))
