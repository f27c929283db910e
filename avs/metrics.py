"""AVS evaluation metrics: per-frame statistics reduced under three named protocols.

Every protocol is computed from the same per-frame statistics (:class:`FrameStats`), which are
integer pixel counts: the IoU counts at the 0.5 probability threshold and, for each of the
``K = 255`` F-measure thresholds ``torch.linspace(0, 1 - 1e-10, K)`` (float32, so the last one is
1.0), the number of pixels with ``sigmoid(logit) >= tau`` (``pred_pos``) and how many of them are
foreground (``tp``). The probability is ``sigmoid(logits.float())``, in float32 like the reference.
Binarisation for IoU and for every "at 0.5" number is ``p > 0.5`` (strict, as in AVSBench
``mask_iou`` and its saved masks); the F-curves use ``p >= tau`` (as in ``Eval_Fmeasure``).
NaN logits count as background everywhere (the reference's comparisons are False for NaN).
"Empty-GT" frames are frames whose mask has no foreground pixel.

Protocols (``PROTOCOLS``) and the keys of ``MetricAccumulator.compute`` for each:

``avsbench_legacy``
    The published AVSBench ``mask_iou`` + ``Eval_Fmeasure`` + ``AverageMeter`` aggregation of
    ``test.py``. Clips are sorted by clip index and grouped into batches of
    ``legacy_batch_size`` clips (the last batch may be smaller); a batch holds all frames of its
    clips. Per batch: IoU of each frame (empty GT: ``#TN / (H*W + 1e-7)``, else
    ``I / (U + 1e-7)``), their mean; the F-curve of each non-empty-GT frame
    (``prec = tp/(pred_pos + 1e-20)``, ``rec = tp/(gt + 1e-20)``, ``F = 1.3 prec rec /
    (0.3 prec + rec)``, NaN -> 0), their mean, its max over thresholds (0.0 when every frame of
    the batch has empty GT; that 0 is still averaged). Final numbers are means over batches.
    Arithmetic is emulated in float32 in the reference order (per-frame divisions, running sums
    over the frames of a batch, float32 running sum of batch mIoUs, float64 running sum of batch
    F-scores). The F-score equals a line-by-line float32 port of the reference bit for bit; the
    mIoU can differ in the last float32 bit (~6e-8) because ``torch.sum`` over a batch's frames
    reduces in a different order (on CUDA as well as on CPU). Thresholds are made on CPU; a GPU
    sigmoid may round differently from the CPU one in the last bit.
    Keys: ``miou``, ``fscore`` (mean per-batch max-F), ``eval_batch_size`` (clips per batch),
    ``num_batches``, ``num_empty_fscore_batches`` (batches scored F = 0 because all GT empty),
    ``num_clips``, ``num_frames``, ``protocol``.

``per_frame`` (default)
    Independent of batching. ``miou``: mean over all frames of the per-frame IoU with the same
    empty-GT rule as legacy, in float64 without the 1e-7 eps (unions are >= 1). It equals the
    legacy mIoU, up to float32 rounding and the eps (< 2e-7), whenever every legacy batch holds
    the same number of frames: equal-length clips and a clip count divisible by
    ``legacy_batch_size`` (always at ``legacy_batch_size=1``). With a smaller last batch (or
    clips of different lengths) legacy weights some frames more.
    ``fscore_max``: the F-curves of all non-empty-GT frames of the whole set are averaged and the
    max over the K thresholds is taken (one threshold for the set; it equals legacy F when a
    single legacy batch holds the whole set); ``fscore_max_threshold`` is that threshold.
    ``fscore_at_0.5``: per-frame F (beta^2 = 0.3) of the ``p > 0.5`` mask, averaged over
    non-empty-GT frames. ``fscore`` is an alias of ``fscore_max``. Also ``num_frames``,
    ``num_fscore_frames`` (non-empty-GT frames), ``protocol``. With no non-empty-GT frame the F
    values are 0.0 and ``fscore_max_threshold`` is None.

``dataset_level``
    Pixel counts summed over all frames, then one ratio (CAVP-style). ``miou`` is the
    foreground ``sum(I) / sum(U)`` with the plain foreground I and U for every frame, so an
    empty-GT frame adds only its false positives to U (1.0 if ``sum(U) == 0``); ``iou_bg`` is the
    same for the background class and ``miou_fg_bg`` the mean of both (CAVP's two-class mIoU).
    ``precision``/``recall``/``fscore`` come from the summed tp, fp, fn of the ``p > 0.5`` masks
    (beta^2 = 0.3; 0.0 when undefined). Also ``num_frames``, ``protocol``.

Distributed evaluation: each rank feeds its own accumulator with clip ``indices``; the
accumulators are combined with :meth:`MetricAccumulator.merge` (or :meth:`all_gather`, or
``to_tensor``/``from_tensor`` around your own gather). Per-frame counts are combined, never
means, and a clip seen twice (DistributedSampler padding) is kept once (first occurrence).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
from torch import Tensor

__all__ = ["PROTOCOLS", "FrameStats", "MetricAccumulator", "frame_stats", "fscore_thresholds"]

PROTOCOLS: tuple[str, ...] = ("avsbench_legacy", "per_frame", "dataset_level")

_MAX_THRESHOLDS = 10_000  # the one-look-up bucketing below is exact up to this many thresholds
_GUESS_SHRINK = 1e-5  # bucket guess floor(p*(K-1)*(1-shrink)) is never too high, at most one low
_CHUNK_PIXELS = 1 << 20  # frames are counted in chunks of about this many pixels (bounds memory)
_TABLE_CACHE: dict[tuple[int, str], Tensor] = {}


def fscore_thresholds(num_thresholds: int = 255) -> Tensor:
    """The F-measure thresholds [K] float32: torch.linspace(0, 1 - 1e-10, K) made on CPU."""
    if not isinstance(num_thresholds, int) or not 2 <= num_thresholds <= _MAX_THRESHOLDS:
        raise ValueError(f"num_thresholds must be an int in [2, {_MAX_THRESHOLDS}], got {num_thresholds!r}")
    return torch.linspace(0.0, 1.0 - 1e-10, num_thresholds, dtype=torch.float32)


def _threshold_table(num_thresholds: int, device: torch.device) -> Tensor:
    """Look-up table [K+1] float32 on `device`: the K thresholds followed by +inf."""
    key = (num_thresholds, str(device))
    if key not in _TABLE_CACHE:
        th = fscore_thresholds(num_thresholds)
        _TABLE_CACHE[key] = torch.cat([th, torch.tensor([math.inf])]).to(device)
    return _TABLE_CACHE[key]


@dataclass
class FrameStats:
    """Per-frame integer pixel counts (int64), one row per frame; K = number of F thresholds.

    inter, union [N]: IoU counts at p > 0.5 with the legacy empty-GT rule (empty GT: inter =
    #true negatives, union = H*W). fg_inter, fg_union [N]: plain foreground intersection/union
    at p > 0.5 (fg_inter is also the tp at 0.5). gt_area [N]: foreground pixels of the mask.
    pred_area [N]: pixels with p > 0.5 (pred_pos at 0.5). num_pixels [N]: H*W.
    tp, pred_pos [N,K]: foreground pixels / all pixels with p >= th[k].
    """

    inter: Tensor
    union: Tensor
    fg_inter: Tensor
    fg_union: Tensor
    gt_area: Tensor
    pred_area: Tensor
    num_pixels: Tensor
    tp: Tensor
    pred_pos: Tensor

    def __len__(self) -> int:
        return int(self.inter.shape[0])

    @property
    def num_thresholds(self) -> int:
        """K, the number of F thresholds."""
        return int(self.tp.shape[1])

    def to(self, device: torch.device | str) -> FrameStats:
        """Copy of the stats on `device`."""
        return FrameStats(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def select(self, index: Tensor) -> FrameStats:
        """Rows `index` (bool [N] or int64 [M]) of every field."""
        return FrameStats(**{f.name: getattr(self, f.name)[index] for f in fields(self)})

    @staticmethod
    def cat(items: Sequence[FrameStats]) -> FrameStats:
        """Concatenate stats along the frame axis (all on the same device, same K)."""
        if not items:
            raise ValueError("FrameStats.cat needs at least one FrameStats")
        return FrameStats(**{f.name: torch.cat([getattr(s, f.name) for s in items]) for f in fields(FrameStats)})


def _as_frames(x: Tensor, name: str) -> Tensor:
    """[N,H,W] | [N,1,H,W] | [B,T,1,H,W] -> [N,H,W] (a view when possible)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() == 3:
        return x
    if x.dim() == 4 and x.shape[1] == 1:
        return x[:, 0]  # [N,1,H,W] -> [N,H,W]
    if x.dim() == 5 and x.shape[2] == 1:
        return x.reshape(-1, x.shape[-2], x.shape[-1])  # [B,T,1,H,W] -> [B*T,H,W]
    raise ValueError(f"{name} must have shape [N,H,W], [N,1,H,W] or [B,T,1,H,W] (one channel), got {tuple(x.shape)}")


def _bucket(p: Tensor, table: Tensor) -> Tensor:
    """#{k : th[k] <= p} as int32 for p (float32) in [0, 1] or -inf; table = [th, inf]."""
    scale = (table.numel() - 2) * (1.0 - _GUESS_SHRINK)  # (K-1) shrunk
    guess = (p * scale).clamp_(min=-1.0).to(torch.int32).add_(1)  # true bucket or one below
    return guess.add_(table.index_select(0, guess.view(-1)).view_as(p) <= p)


def _checked_frames(logits: Tensor, masks: Tensor) -> tuple[Tensor, Tensor]:
    """Logits and binary masks as [N,H,W] frames on the logits' device; ValueError naming what is wrong."""
    lg = _as_frames(logits, "logits")
    mk = _as_frames(masks, "masks")
    if lg.shape != mk.shape:
        raise ValueError(
            f"logits and masks must describe the same frames, got logits {tuple(logits.shape)} "
            f"and masks {tuple(masks.shape)}"
        )
    if not lg.is_floating_point():
        raise ValueError(f"logits must be a floating-point tensor, got dtype {lg.dtype}")
    if lg.shape[-1] * lg.shape[-2] == 0:
        raise ValueError(f"logits have empty frames (H*W = 0): shape {tuple(logits.shape)}")
    mk = mk.to(lg.device)
    if mk.dtype != torch.bool and bool((mk * (mk - 1)).any()):  # zero iff every value is 0 or 1
        raise ValueError("masks must be binary (values 0 and 1 only)")
    return lg, mk


@torch.no_grad()
def frame_stats(logits: Tensor, masks: Tensor, num_thresholds: int = 255) -> FrameStats:
    """Per-frame counts from logits and binary masks ([N,1,H,W] or [N,H,W]); on the logits' device.

    Each pixel gets a bucket c = #{k : th[k] <= p} (so ``p >= th[k]`` iff ``c > k``), a
    histogram of buckets is taken per frame and split by GT and by ``p > 0.5``, and a reverse
    cumulative sum turns it into the counts at every threshold: O(N*H*W + N*K), no loop over
    frames or thresholds (frames are processed in chunks of ~1M pixels to bound memory). The
    bucket is a guess ``floor(p*(K-1)*(1-1e-5)) + 1``, which is never too high and at most one
    too low, corrected by one look-up ``th[guess] <= p``; so it equals naive ``p >= tau``
    counting exactly, ties included.
    """
    lg, mk = _checked_frames(logits, masks)
    k = num_thresholds
    table = _threshold_table(k, lg.device)  # validates num_thresholds
    n, h, w = lg.shape
    hw = h * w
    nbins = k + 1  # bucket c in [0, K]
    codes = 4 * nbins  # per frame: (gt, p > 0.5, bucket)
    chunk = max(1, min(_CHUNK_PIXELS // max(hw, 1), _CHUNK_PIXELS // codes))
    hists = []
    for start in range(0, n, chunk):  # chunks of frames, not single frames
        p = torch.sigmoid(lg[start : start + chunk].reshape(-1, hw).float())  # [n_c,H*W] float32
        p.nan_to_num_(nan=-math.inf)  # NaN counts as below every threshold, like the reference
        nc = p.shape[0]
        key = _bucket(p, table)  # [n_c,H*W] int32 in [0, K]
        key.add_(mk[start : start + chunk].reshape(-1, hw).to(torch.int32), alpha=nbins)
        key.add_(p > 0.5, alpha=2 * nbins)
        key.add_(torch.arange(nc, dtype=torch.int32, device=key.device)[:, None] * codes)  # frame
        hist = torch.bincount(key.view(-1), minlength=nc * codes)
        hists.append(hist.view(nc, 4, nbins))  # [n_c, gt + 2*(p > 0.5), bucket]
    hist = torch.cat(hists).long() if hists else torch.zeros((0, 4, nbins), dtype=torch.int64, device=lg.device)
    # hist: [N,4,K+1]
    by_gt = hist[:, 0:2] + hist[:, 2:4]  # [N,2(gt),K+1]
    # pixels with p >= th[j] are those in buckets j+1..K: reverse cumulative sum
    ge = by_gt[..., 1:].flip(-1).cumsum(-1).flip(-1)  # [N,2,K]
    tp = ge[:, 1].contiguous()
    pred_pos = ge[:, 0] + ge[:, 1]
    gt_area = by_gt[:, 1].sum(-1)
    pred_area = hist[:, 2:4].sum((-1, -2))
    fg_inter = hist[:, 3].sum(-1)
    fg_union = pred_area + gt_area - fg_inter
    num_pixels = torch.full_like(gt_area, hw)
    empty = gt_area == 0
    inter = torch.where(empty, num_pixels - pred_area, fg_inter)  # empty GT: true negatives
    union = torch.where(empty, num_pixels, fg_union)
    return FrameStats(
        inter=inter,
        union=union,
        fg_inter=fg_inter,
        fg_union=fg_union,
        gt_area=gt_area,
        pred_area=pred_area,
        num_pixels=num_pixels,
        tp=tp,
        pred_pos=pred_pos,
    )


def binary_frame_iou(pred: Tensor, masks: Tensor) -> Tensor:
    """Per-frame IoU of binary predictions [N,H,W] against binary masks -> float64 [N].

    The rule of every protocol's per-frame IoU (`FrameStats.inter / union`): an empty GT frame
    scores the fraction of pixels predicted background.
    """
    s = frame_stats(torch.where(pred.bool(), 1.0, -1.0), masks, num_thresholds=2)  # sigmoid(+-1) is either side of 0.5
    return s.inter.double() / s.union.double()


# column layout of MetricAccumulator.to_tensor(): int64 [N, len(_COLUMNS) + 2K]
_COLUMNS = ("clip", "frame", "inter", "union", "fg_inter", "fg_union", "gt_area", "pred_area", "num_pixels")
_NCOL = len(_COLUMNS)


def _clip_layout(logits: Tensor, masks: Tensor, batch_size_clips: int | None) -> tuple[int, int, int]:
    """(clips B, frames per clip T, frames N) of an update's input."""
    n = _as_frames(logits, "logits").shape[0]
    if logits.dim() == 5:
        b, t = int(logits.shape[0]), int(logits.shape[1])
    elif masks.dim() == 5:
        b, t = int(masks.shape[0]), int(masks.shape[1])
    elif batch_size_clips is not None:
        b = int(batch_size_clips)
        if b < 1 or n % b != 0:
            raise ValueError(f"batch_size_clips={batch_size_clips} must be >= 1 and divide the {n} frames of logits")
        t = n // b
    else:
        b, t = n, 1
    if batch_size_clips is not None and int(batch_size_clips) != b:
        raise ValueError(f"batch_size_clips={batch_size_clips} but the input holds {b} clips")
    if b * t != n:
        raise ValueError(f"masks {tuple(masks.shape)} do not match logits {tuple(logits.shape)}")
    return b, t, n


class MetricAccumulator:
    """Collects per-frame stats (CPU, int64) over an evaluation and reduces them per protocol."""

    def __init__(self, num_thresholds: int = 255) -> None:
        fscore_thresholds(num_thresholds)  # validate
        self.num_thresholds = num_thresholds
        self.reset()

    def reset(self) -> None:
        """Forget every frame."""
        self._stats: list[FrameStats] = []
        self._clip: list[Tensor] = []  # [n] clip index per stored frame
        self._frame: list[Tensor] = []  # [n] position of the frame within its clip
        self._occurrence: list[Tensor] = []  # [n] arrival number of the clip occurrence
        self._num_occurrences = 0
        self._next_auto_clip = 0
        self._auto_indexed = False
        self._cache: tuple[Tensor, Tensor, FrameStats] | None = None

    def __len__(self) -> int:
        """Number of stored frames (before dropping duplicate clips)."""
        return sum(len(s) for s in self._stats)

    # ------------------------------------------------------------------ feeding
    def update(
        self,
        logits: Tensor,
        masks: Tensor,
        batch_size_clips: int | None = None,
        indices: Sequence[int] | Tensor | None = None,
        valid: Tensor | None = None,
    ) -> None:
        """Add a batch: logits/masks [B,T,1,H,W] or flat [N,1,H,W] / [N,H,W] (N = B*T).

        batch_size_clips: B for flat input (frames are clip-major, T = N // B); None means one
        frame per clip. indices: clip (dataset row) index per clip [B]; None numbers clips in
        arrival order (then the accumulator cannot be merged). valid: bool [B,T] or [N];
        frames marked False are not scored (e.g. unlabelled frames).
        """
        b, t, n = _clip_layout(logits, masks, batch_size_clips)

        keep = None
        if valid is not None:
            keep = torch.as_tensor(valid).detach().to("cpu").reshape(-1)
            if keep.numel() != n:
                raise ValueError(f"valid must have one entry per frame ({n}), got shape {tuple(valid.shape)}")
            keep = keep.bool()
        if self._num_occurrences > 0 and (indices is None) != self._auto_indexed:
            raise ValueError("pass clip `indices` to every update() call or to none of them")
        if indices is None:
            clip_ids = torch.arange(self._next_auto_clip, self._next_auto_clip + b, dtype=torch.int64)
            self._next_auto_clip += b
            self._auto_indexed = True
        else:
            clip_ids = torch.as_tensor(indices).detach().to("cpu", torch.int64).reshape(-1)
            if clip_ids.numel() != b:
                raise ValueError(f"indices has {clip_ids.numel()} entries, expected one per clip ({b})")
            if bool((clip_ids < 0).any()):
                raise ValueError("indices must be non-negative clip indices")

        stats = frame_stats(logits, masks, self.num_thresholds).to("cpu")
        clip = clip_ids.repeat_interleave(t)  # [B] -> [B*T]
        frame = torch.arange(t, dtype=torch.int64).repeat(b)  # [B*T]
        occurrence = torch.arange(self._num_occurrences, self._num_occurrences + b).repeat_interleave(t)
        self._num_occurrences += b
        if keep is not None:
            stats, clip, frame, occurrence = stats.select(keep), clip[keep], frame[keep], occurrence[keep]
        self._append(stats, clip, frame, occurrence)

    def _append(self, stats: FrameStats, clip: Tensor, frame: Tensor, occurrence: Tensor) -> None:
        self._stats.append(stats)
        self._clip.append(clip)
        self._frame.append(frame)
        self._occurrence.append(occurrence)
        self._cache = None

    # ------------------------------------------------------------------ combining
    def _consolidated(self) -> tuple[Tensor, Tensor, FrameStats]:
        """(clip [M], frame [M], stats) with duplicate clips dropped, sorted by (clip, frame)."""
        if self._cache is not None:
            return self._cache
        if len(self) == 0:
            empty = torch.zeros(0, dtype=torch.int64)
            k = self.num_thresholds
            z = torch.zeros((0, k), dtype=torch.int64)
            stats = FrameStats(*([empty] * 7), tp=z, pred_pos=z)
            self._cache = (empty, empty, stats)
            return self._cache
        stats = FrameStats.cat(self._stats)
        clip = torch.cat(self._clip)
        frame = torch.cat(self._frame)
        occ = torch.cat(self._occurrence)
        uniq, inv = torch.unique(clip, return_inverse=True)
        first = torch.full((uniq.numel(),), torch.iinfo(torch.int64).max, dtype=torch.int64)
        first = first.scatter_reduce(0, inv, occ, reduce="amin")
        keep = occ == first[inv]  # only the first occurrence of each clip
        clip, frame, stats = clip[keep], frame[keep], stats.select(keep)
        dup = torch.unique(torch.stack([clip, frame], 1), dim=0).shape[0] != clip.numel()
        if dup:
            raise ValueError("a clip holds the same frame position twice; check the update() inputs")
        order = torch.argsort(clip * (int(frame.max()) + 1) + frame)
        self._cache = (clip[order], frame[order], stats.select(order))
        return self._cache

    def merge(self, other: MetricAccumulator) -> MetricAccumulator:
        """Add `other`'s frames to self in place (clips already in self win); returns self."""
        if other.num_thresholds != self.num_thresholds:
            raise ValueError(
                f"cannot merge accumulators with {self.num_thresholds} and {other.num_thresholds} thresholds"
            )
        if len(other) == 0:
            return self
        if len(self) > 0 and (self._auto_indexed or other._auto_indexed):
            raise ValueError(
                "cannot merge accumulators fed without clip `indices` (their clip numbers collide); "
                "pass indices=batch['index'] to update()"
            )
        offset = self._num_occurrences
        parts = list(zip(other._stats, other._clip, other._frame, other._occurrence))  # other may be self
        for stats, clip, frame, occ in parts:
            self._append(stats, clip, frame, occ + offset)
        self._num_occurrences += other._num_occurrences
        self._auto_indexed = self._auto_indexed or other._auto_indexed
        self._next_auto_clip = max(self._next_auto_clip, other._next_auto_clip)
        return self

    def to_tensor(self) -> Tensor:
        """All kept frames as one int64 tensor [M, 9 + 2K] (clip, frame, counts, tp[K], pred_pos[K])."""
        clip, frame, s = self._consolidated()
        cols = [clip, frame, s.inter, s.union, s.fg_inter, s.fg_union, s.gt_area, s.pred_area, s.num_pixels]
        return torch.cat([torch.stack(cols, 1), s.tp, s.pred_pos], 1)

    @classmethod
    def from_tensor(cls, table: Tensor) -> MetricAccumulator:
        """Inverse of `to_tensor` ([M, 9 + 2K] int64); concatenated tables may repeat clips (first kept)."""
        if table.dim() != 2 or table.shape[1] < _NCOL + 4 or (table.shape[1] - _NCOL) % 2:
            raise ValueError(f"expected a [M, {_NCOL} + 2K] table from to_tensor(), got {tuple(table.shape)}")
        k = (table.shape[1] - _NCOL) // 2
        table = table.detach().to("cpu", torch.int64)
        acc = cls(num_thresholds=k)
        if table.shape[0] == 0:
            return acc
        c = {name: table[:, i] for i, name in enumerate(_COLUMNS)}
        stats = FrameStats(
            **{name: c[name].clone() for name in _COLUMNS[2:]},
            tp=table[:, _NCOL : _NCOL + k].clone(),
            pred_pos=table[:, _NCOL + k :].clone(),
        )
        # a clip occurrence is a run of rows of one clip with increasing frame positions (tables
        # are sorted by (clip, frame)); earlier occurrences win over later duplicates
        clip, frame = c["clip"].clone(), c["frame"].clone()
        new = torch.ones_like(clip, dtype=torch.bool)
        new[1:] = (clip[1:] != clip[:-1]) | (frame[1:] <= frame[:-1])
        occurrence = torch.cumsum(new.long(), 0) - 1
        acc._append(stats, clip, frame, occurrence)
        acc._num_occurrences = int(occurrence[-1]) + 1
        return acc

    def state_dict(self) -> dict:
        """Serializable state: {'table': to_tensor(), 'auto_indexed', 'next_auto_clip'}."""
        return {
            "table": self.to_tensor(),
            "auto_indexed": self._auto_indexed,
            "next_auto_clip": self._next_auto_clip,
        }

    def load_state_dict(self, state: dict) -> None:
        """Replace the contents with a `state_dict()`."""
        if "table" not in state:
            raise ValueError("metrics state_dict has no 'table' entry")
        other = MetricAccumulator.from_tensor(state["table"])
        self.num_thresholds = other.num_thresholds
        self.reset()
        self.merge(other)
        self._auto_indexed = bool(state.get("auto_indexed", False))
        self._next_auto_clip = int(state.get("next_auto_clip", 0))

    def all_gather(self, device: torch.device | str | None = None) -> MetricAccumulator:
        """Accumulator holding every rank's frames (rank order, duplicates dropped); self if not distributed.

        device: where the collective runs (default: the current CUDA device for NCCL, else CPU).
        """
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self
        if self._auto_indexed:
            raise ValueError("distributed evaluation needs clip indices: pass indices=batch['index'] to update()")
        if device is None:
            nccl = dist.get_backend() == "nccl"
            device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
        table = self.to_tensor().to(device)
        world = dist.get_world_size()
        size = torch.tensor([table.shape[0]], dtype=torch.int64, device=device)
        sizes = [torch.zeros_like(size) for _ in range(world)]
        dist.all_gather(sizes, size)
        rows = max(int(s.item()) for s in sizes)
        padded = torch.zeros((rows, table.shape[1]), dtype=torch.int64, device=device)
        padded[: table.shape[0]] = table
        gathered = [torch.zeros_like(padded) for _ in range(world)]
        dist.all_gather(gathered, padded)
        out = MetricAccumulator(self.num_thresholds)
        for part, s in zip(gathered, sizes):
            out.merge(MetricAccumulator.from_tensor(part[: int(s.item())]))
        return out

    # ------------------------------------------------------------------ reducing
    def compute(self, protocol: str | Sequence[str] = "per_frame", legacy_batch_size: int = 4) -> dict:
        """Metrics of one protocol (flat dict) or of several (dict protocol -> flat dict); see module doc."""
        names = [protocol] if isinstance(protocol, str) else list(protocol)
        for name in names:
            if name not in PROTOCOLS:
                raise ValueError(f"unknown metric protocol {name!r}; expected one of {', '.join(PROTOCOLS)}")
        if not isinstance(legacy_batch_size, int) or legacy_batch_size < 1:
            raise ValueError(f"legacy_batch_size must be an int >= 1, got {legacy_batch_size!r}")
        clip, _, stats = self._consolidated()
        if len(stats) == 0:
            raise ValueError("no frames to evaluate: call update() before compute()")
        from avs.metric_protocols import reduce_protocol

        out = {}
        for name in names:
            out[name] = reduce_protocol(name, clip, stats, legacy_batch_size)
            out[name]["protocol"] = name
        return out[protocol] if isinstance(protocol, str) else out
