"""AVSBench-semantic (AVSS) metrics: per-frame per-class pixel counts reduced under two protocols.

Every frame is reduced to three integer vectors over the C classes: `inter` (pixels of class c in
both prediction and label), `pred` (predicted c) and `lab` (labelled c). The prediction is
``argmax(softmax(logits.float()))`` over the class axis, in that order (logits that tie after the
float32 softmax go to the lower class, as in the released metric).

``avsbench_legacy``
    The released AVSS ``calc_color_miou_fscore`` + test.py aggregation, bit for bit. Clips are
    sorted by index and grouped into batches of ``legacy_batch_size`` clips; every frame of a
    clip enters, labelled or not (the released metric sees no flags): a frame without a mask
    scores its label-0 map, and a padded frame (``frame_valid`` False) is scored as the released
    model's exactly-zero logits give it, prediction class 0 against label 0 (perfect background).
    Per frame (float32): IoU_c = inter / (2.220446049250313e-16 + union), F_c = 1.3 P R / (0.3 P + R)
    with P = inter/pred, R = inter/lab, NaN -> 0; a class's count grows when it is in the
    prediction OR the label of the frame. Per batch the frames' values are summed in order, then
    added to the run totals. Per class: total / count, never-seen classes (0/0) -> 0, and
    ``miou`` / ``fscore`` are means over ALL C classes; ``miou_nobg_legacy`` /
    ``fscore_nobg_legacy`` drop the LAST class (the released "noBg", which drops class 70, not the
    background class 0). Also ``num_classes_seen``, ``num_batches``, ``num_frames``.

``per_class`` (dataset level)
    Only frames with a mask (``mask_valid``) count; padded and unlabelled frames never do. Per
    class: IoU_c = sum(inter) / sum(union) and F_c (beta^2 = 0.3) from sum(inter), sum(pred),
    sum(lab) over the whole set (float64). ``miou`` / ``fscore``: means over the foreground classes
    (1..C-1) present in the scored labels; ``iou_background`` / ``fscore_background``: class 0;
    ``num_classes_present`` (foreground), ``num_frames``. A class only predicted (never labelled)
    does not enter the means; its false positives still lower the IoU of the classes they cover.

`class_table` / `write_class_table` give one row per class (name from label2idx.json, IoU, F,
pixel counts) for either protocol, as csv or markdown. docs/avss.md and docs/protocols.md explain
the choice.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["SEMANTIC_PROTOCOLS", "SemanticAccumulator", "semantic_frame_counts", "class_table", "write_class_table"]

SEMANTIC_PROTOCOLS: tuple[str, ...] = ("avsbench_legacy", "per_class")
_EPS = 2.220446049250313e-16  # the released IoU denominator offset (float64 machine epsilon)
_BETA2 = 0.3


def semantic_frame_counts(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """logits [N,C,H,W], labels [N,H,W] in 0..C-1 -> (inter, pred, lab) int64 [N,C] (CPU)."""
    if logits.dim() != 4 or labels.dim() != 3 or labels.shape != logits.shape[:1] + logits.shape[2:]:
        raise ValueError(
            f"expected logits [N,C,H,W] and labels [N,H,W], got {tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    n, c = int(logits.shape[0]), int(logits.shape[1])
    labels = labels.long()
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= c):
        raise ValueError(
            f"labels must be class indices in 0..{c - 1}, got values in [{int(labels.min())}, {int(labels.max())}]"
        )
    pred = torch.argmax(torch.softmax(logits.float(), dim=1), dim=1)  # [N,H,W]
    offset = (torch.arange(n, device=labels.device) * c).view(n, 1, 1)

    def count(values: Tensor) -> Tensor:
        return torch.bincount(values.reshape(-1), minlength=n * c).view(n, c).to("cpu", torch.int64)

    hit = pred == labels
    inter = torch.bincount((labels + offset)[hit], minlength=n * c).view(n, c).to("cpu", torch.int64)
    return inter, count(pred + offset), count(labels + offset)


def _as_frames(x: Tensor, b: int, t: int) -> Tensor:
    return x.reshape(b * t, *x.shape[2:])


class SemanticAccumulator:
    """Per-frame class counts of an AVSS evaluation (CPU, int64), reduced per protocol on `compute`."""

    def __init__(self, num_classes: int) -> None:
        if int(num_classes) < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        self.num_classes = int(num_classes)
        self.reset()

    def reset(self) -> None:
        self._rows: list[dict[str, Tensor]] = []
        self._seen: set[int] = set()

    def __len__(self) -> int:
        return sum(int(r["clip"].numel()) for r in self._rows)

    def update(
        self,
        logits: Tensor,
        masks: Tensor,
        indices: Sequence[int] | Tensor,
        mask_valid: Tensor | None = None,
        frame_valid: Tensor | None = None,
    ) -> None:
        """Add a batch: logits [B,T,C,H,W], masks [B,T,H,W] class indices, clip `indices` [B],
        mask_valid / frame_valid bool [B,T] (None: all True). A clip seen before is ignored."""
        if logits.dim() != 5 or masks.dim() != 4 or logits.shape[2] != self.num_classes:
            raise ValueError(
                f"expected logits [B,T,{self.num_classes},H,W] and masks [B,T,H,W], got "
                f"{tuple(logits.shape)} and {tuple(masks.shape)}"
            )
        b, t = int(logits.shape[0]), int(logits.shape[1])
        clip_ids = torch.as_tensor(indices).detach().to("cpu", torch.int64).reshape(-1)
        if clip_ids.numel() != b:
            raise ValueError(f"indices has {clip_ids.numel()} entries, expected one per clip ({b})")
        ones = torch.ones(b, t, dtype=torch.bool)
        mv = ones if mask_valid is None else torch.as_tensor(mask_valid).detach().to("cpu").bool().reshape(b, t)
        fv = ones if frame_valid is None else torch.as_tensor(frame_valid).detach().to("cpu").bool().reshape(b, t)
        inter, pred, lab = semantic_frame_counts(_as_frames(logits, b, t), _as_frames(masks, b, t))
        pad = ~fv.reshape(-1)
        if bool(pad.any()):  # released model: exactly-zero logits -> class 0 everywhere, label 0
            pixels = int(masks.shape[-1] * masks.shape[-2])
            for x in (inter, pred, lab):
                x[pad] = 0
                x[pad, 0] = pixels
        keep = torch.tensor([int(i) not in self._seen for i in clip_ids.tolist()]).repeat_interleave(t)
        self._seen.update(int(i) for i in clip_ids.tolist())
        row = {
            "clip": clip_ids.repeat_interleave(t),
            "frame": torch.arange(t).repeat(b),
            "inter": inter,
            "pred": pred,
            "lab": lab,
            "mask_valid": mv.reshape(-1),
            "frame_valid": fv.reshape(-1),
        }
        self._rows.append({k: v[keep] for k, v in row.items()})

    def merge(self, other: SemanticAccumulator) -> SemanticAccumulator:
        """Add `other`'s frames (clips already here win); returns self."""
        if other.num_classes != self.num_classes:
            raise ValueError(f"cannot merge {self.num_classes}- and {other.num_classes}-class accumulators")
        for row in other._rows:
            keep = torch.tensor([int(c) not in self._seen for c in row["clip"].tolist()], dtype=torch.bool)
            self._rows.append({k: v[keep] for k, v in row.items()})
        for row in other._rows:
            self._seen.update(int(c) for c in row["clip"].tolist())
        return self

    def to_tensor(self) -> Tensor:
        """Stored frames as an int64 table [M, 4 + 3C]: clip, frame, mask_valid, frame_valid, inter, pred, lab."""
        if not self._rows:
            return torch.zeros((0, 4 + 3 * self.num_classes), dtype=torch.int64)
        t = {k: torch.cat([r[k] for r in self._rows]) for k in self._rows[0]}
        head = torch.stack([t["clip"], t["frame"], t["mask_valid"].long(), t["frame_valid"].long()], 1)
        return torch.cat([head, t["inter"], t["pred"], t["lab"]], 1)

    @classmethod
    def from_tensor(cls, table: Tensor, num_classes: int) -> SemanticAccumulator:
        """Inverse of `to_tensor` of one accumulator (each (clip, frame) pair at most once)."""
        c = int(num_classes)
        if table.dim() != 2 or table.shape[1] != 4 + 3 * c:
            raise ValueError(f"expected a [M, {4 + 3 * c}] table from to_tensor(), got {tuple(table.shape)}")
        acc = cls(c)
        table = table.detach().to("cpu", torch.int64)
        row = {
            "clip": table[:, 0],
            "frame": table[:, 1],
            "mask_valid": table[:, 2].bool(),
            "frame_valid": table[:, 3].bool(),
            "inter": table[:, 4 : 4 + c],
            "pred": table[:, 4 + c : 4 + 2 * c],
            "lab": table[:, 4 + 2 * c :],
        }
        pairs = torch.stack([row["clip"], row["frame"]], 1)
        if table.shape[0] and torch.unique(pairs, dim=0).shape[0] != table.shape[0]:
            raise ValueError("the table holds a (clip, frame) pair twice; merge() accumulators instead")
        acc._rows.append(row)
        acc._seen.update(row["clip"].tolist())
        return acc

    def all_gather(self) -> SemanticAccumulator:
        """Accumulator holding every rank's frames (rank order, repeated clips kept once); self if not distributed."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self
        parts: list = [None] * dist.get_world_size()
        dist.all_gather_object(parts, self.to_tensor())
        out = SemanticAccumulator(self.num_classes)
        for part in parts:
            out.merge(SemanticAccumulator.from_tensor(part, self.num_classes))
        return out

    def _table(self) -> dict[str, Tensor]:
        if not self._rows or len(self) == 0:
            raise ValueError("no frames to evaluate: call update() before compute()")
        cat = {k: torch.cat([r[k] for r in self._rows]) for k in self._rows[0]}
        order = torch.argsort(cat["clip"] * (int(cat["frame"].max()) + 1) + cat["frame"])
        return {k: v[order] for k, v in cat.items()}

    def compute(self, protocol: str | Sequence[str] = "per_class", legacy_batch_size: int = 4) -> dict:
        """Metrics of one protocol (flat dict, with per-class lists) or of several (protocol -> dict)."""
        names = [protocol] if isinstance(protocol, str) else list(protocol)
        for name in names:
            if name not in SEMANTIC_PROTOCOLS:
                raise ValueError(
                    f"unknown AVSS metric protocol {name!r}; expected one of {', '.join(SEMANTIC_PROTOCOLS)}"
                )
        if not isinstance(legacy_batch_size, int) or legacy_batch_size < 1:
            raise ValueError(f"legacy_batch_size must be an int >= 1, got {legacy_batch_size!r}")
        table = self._table()
        out = {}
        for name in names:
            res = _legacy(table, legacy_batch_size) if name == "avsbench_legacy" else _per_class(table)
            out[name] = {**res, "protocol": name}
        return out[protocol] if isinstance(protocol, str) else out


def _legacy_frame_values(inter: Tensor, pred: Tensor, lab: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Released per-frame float32 IoU, F and count increments, [N,C] each."""
    i, p, la = inter.float(), pred.float(), lab.float()
    union = p + la - i
    iou = 1.0 * i / (_EPS + union)
    precision = i / p
    recall = i / la
    f = (1 + _BETA2) * precision * recall / (_BETA2 * precision + recall)
    f[torch.isnan(f)] = 0.0
    return iou, f, (union != 0).float()


def _legacy(t: dict[str, Tensor], batch_size: int) -> dict:
    """test.py: per-batch float32 sums frame by frame, added to the run totals; unseen classes -> 0."""
    iou, f, seen = _legacy_frame_values(t["inter"], t["pred"], t["lab"])
    _, rank = torch.unique_consecutive(t["clip"], return_inverse=True)
    batch = rank // batch_size
    c = iou.shape[1]
    iou_tot, f_tot, cnt_tot = (torch.zeros(c, dtype=torch.float32) for _ in range(3))
    num_batches = int(batch.max()) + 1
    for bi in range(num_batches):
        rows = torch.nonzero(batch == bi).squeeze(1).tolist()
        iou_b, f_b, cnt_b = (torch.zeros(c, dtype=torch.float32) for _ in range(3))
        for r in rows:
            iou_b += iou[r]
            f_b += f[r]
            cnt_b += seen[r]
        iou_tot += iou_b
        cnt_tot += cnt_b
        f_tot += f_b
    miou_pc = iou_tot / cnt_tot
    miou_pc[torch.isnan(miou_pc)] = 0
    f_pc = f_tot / cnt_tot
    f_pc[torch.isnan(f_pc)] = 0
    return {
        "miou": torch.mean(miou_pc).item(),
        "fscore": torch.mean(f_pc).item(),
        "miou_nobg_legacy": torch.mean(miou_pc[:-1]).item(),
        "fscore_nobg_legacy": torch.mean(f_pc[:-1]).item(),
        "num_classes_seen": int((cnt_tot != 0).sum()),
        "num_batches": num_batches,
        "num_frames": int(t["clip"].numel()),
        "eval_batch_size": batch_size,
        "iou_per_class": miou_pc.tolist(),
        "fscore_per_class": f_pc.tolist(),
        "count_per_class": [int(v) for v in cnt_tot.tolist()],
    }


def _ratio(num: float, den: float) -> float:
    return num / den if den > 0 else math.nan


def _per_class(t: dict[str, Tensor]) -> dict:
    """Dataset-level per-class IoU and F over the frames with a mask (float64)."""
    keep = t["mask_valid"] & t["frame_valid"]
    inter, pred, lab = (t[k][keep].sum(0).double() for k in ("inter", "pred", "lab"))
    union = pred + lab - inter
    ious, fs = [], []
    for c in range(inter.numel()):
        ious.append(_ratio(float(inter[c]), float(union[c])))
        p, r = _ratio(float(inter[c]), float(pred[c])), _ratio(float(inter[c]), float(lab[c]))
        p, r = (0.0 if math.isnan(p) else p), (0.0 if math.isnan(r) else r)
        den = _BETA2 * p + r
        fs.append((1 + _BETA2) * p * r / den if den > 0 else 0.0)
    present = [c for c in range(1, inter.numel()) if lab[c] > 0]
    mean = lambda xs: sum(xs) / len(xs) if xs else math.nan  # noqa: E731
    return {
        "miou": mean([ious[c] for c in present]),
        "fscore": mean([fs[c] for c in present]),
        "iou_background": ious[0],
        "fscore_background": fs[0],
        "num_classes_present": len(present),
        "num_frames": int(keep.sum()),
        "iou_per_class": ious,
        "fscore_per_class": fs,
        "label_pixels_per_class": [int(v) for v in lab.tolist()],
        "pred_pixels_per_class": [int(v) for v in pred.tolist()],
    }


def class_table(result: dict, class_names: Sequence[str]) -> list[dict]:
    """Rows {index, name, iou, fscore, (pixels / count)} of a `compute` result, one per class."""
    ious, fs = result["iou_per_class"], result["fscore_per_class"]
    if len(class_names) != len(ious):
        raise ValueError(f"{len(class_names)} class names for {len(ious)} classes")
    rows = []
    for c, name in enumerate(class_names):
        row = {"index": c, "name": name, "iou": ious[c], "fscore": fs[c]}
        if "count_per_class" in result:
            row["frames_counted"] = result["count_per_class"][c]
        else:
            row["label_pixels"] = result["label_pixels_per_class"][c]
            row["pred_pixels"] = result["pred_pixels_per_class"][c]
        rows.append(row)
    return rows


def _fmt(v) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.6f}"
    return str(v)


def write_class_table(path: str | Path, result: dict, class_names: Sequence[str]) -> Path:
    """Write `class_table` as csv (path ending .csv) or markdown (.md) -> path."""
    path = Path(path)
    rows = class_table(result, class_names)
    cols = list(rows[0])
    if path.suffix == ".csv":
        import csv
        import io

        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
        writer.writeheader()
        writer.writerows({k: _fmt(v) for k, v in r.items()} for r in rows)
        text = buf.getvalue()
    elif path.suffix == ".md":
        lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(_fmt(r[k]) for k in cols) + " |" for r in rows]
        text = "\n".join(lines) + "\n"
    else:
        raise ValueError(f"{path}: class table path must end in .csv or .md")
    from avs.utils.io import atomic_write_text

    atomic_write_text(path, text)
    return path
