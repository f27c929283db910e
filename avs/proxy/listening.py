"""Does a proxy run listen? One checkpoint scored on val, test, and test with the audio shuffled across clips.

Three readings per split, so that a calibration effect is not read as a listening effect:
mIoU at p > 0.5, mIoU at the threshold that maximises mIoU on val (the sweep is over the 255
F-measure thresholds of avs.metrics, applied unchanged to test) and the threshold-free max F
(beta^2 = 0.3). The shuffled pass (avs.data.shuffled_audio) pairs every test clip with another
clip's audio (a seeded derangement): a model that listens loses accuracy there.

    python -m avs.proxy.listening <checkpoint> <out.json> [seed]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch

from avs.metrics import FrameStats, frame_stats, fscore_thresholds
from avs.utils.io import atomic_write_text

LISTENING_FILE = "listening.json"
NUM_THRESHOLDS = 255


@torch.no_grad()
def split_stats(model: torch.nn.Module, dataset: Any, batch_size: int) -> FrameStats:
    """Per-frame counts of the model's predictions over a dataset (annotated frames only)."""
    from torch.utils.data import DataLoader

    from avs.data.avsbench import collate_skip_none

    model.eval()
    device = next(model.parameters()).device
    stats = []
    for batch in DataLoader(dataset, batch_size=batch_size, num_workers=0, collate_fn=collate_skip_none):
        if "frames" not in batch:
            continue
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        logits = model(batch)["logits"].float().flatten(0, 1)  # [B*T,1,H,W]
        masks = batch["masks"].flatten(0, 1) > 0.5
        if batch.get("mask_valid") is not None:
            keep = batch["mask_valid"].reshape(-1).bool()
            logits, masks = logits[keep], masks[keep]
        stats.append(frame_stats(logits.cpu(), masks.cpu(), NUM_THRESHOLDS))
    return FrameStats.cat(stats)


def miou_curve(s: FrameStats) -> torch.Tensor:
    """mIoU (0-100) of the masks p >= th[k] for every threshold k -> float64 [K] (empty GT: TN fraction)."""
    tp, pp = s.tp.double(), s.pred_pos.double()
    gt, hw = s.gt_area.double()[:, None], s.num_pixels.double()[:, None]
    empty = (s.gt_area == 0)[:, None]
    iou = torch.where(empty, (hw - pp) / hw, tp / (pp + gt - tp).clamp_min(1.0))
    return 100.0 * iou.mean(dim=0)


def fscore_max(s: FrameStats) -> float:
    """Max over thresholds of the mean F-curve of the non-empty-GT frames (0-100; 0 without such frames)."""
    keep = s.gt_area > 0
    if not bool(keep.any()):
        return 0.0
    tp, pp, gt = s.tp[keep].double(), s.pred_pos[keep].double(), s.gt_area[keep].double()[:, None]
    prec, rec = tp / (pp + 1e-20), tp / (gt + 1e-20)
    f = torch.nan_to_num(1.3 * prec * rec / (0.3 * prec + rec))
    return 100.0 * float(f.mean(dim=0).max())


def readings(s: FrameStats, k: int) -> dict[str, float]:
    """mIoU at p > 0.5, mIoU at threshold index k, max F (all 0-100)."""
    miou_05 = 100.0 * float((s.inter.double() / s.union.double()).mean())
    return {
        "miou_05": round(miou_05, 4),
        "miou_val_threshold": round(float(miou_curve(s)[k]), 4),
        "fscore": round(fscore_max(s), 4),
    }


def listening_record(checkpoint: str | Path, seed: int = 0, device: str = "cpu") -> dict[str, Any]:
    """The three readings on val, test and shuffled-audio test of one checkpoint, and the val threshold."""
    from avs.data import build_dataset
    from avs.data.shuffled_audio import ShuffledAudio
    from avs.inference.model import load_model

    loaded = load_model(checkpoint, device=device)
    data_cfg = loaded.cfg.data
    if data_cfg.get("synthetic"):
        from avs.data.synthetic import ensure_synthetic

        ensure_synthetic(data_cfg, progress=False)
    size = int(data_cfg.get("eval_batch_size", 1) or 1)
    val, test = (build_dataset(data_cfg, split, train=False) for split in ("val", "test"))
    stats = {
        "val": split_stats(loaded.model, val, size),
        "test": split_stats(loaded.model, test, size),
        "test_shuffled_audio": split_stats(loaded.model, ShuffledAudio(test, seed), size),
    }
    k = int(miou_curve(stats["val"]).argmax())
    record: dict[str, Any] = {"checkpoint": str(checkpoint), "shuffle_seed": int(seed)}
    record["val_threshold"] = round(float(fscore_thresholds(NUM_THRESHOLDS)[k]), 6)
    record.update({name: readings(s, k) for name, s in stats.items()})
    return record


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3):
        print("usage: python -m avs.proxy.listening <checkpoint> <out.json> [seed]", file=sys.stderr)
        return 2
    from avs.errors import AVSError, report

    try:
        record = listening_record(argv[0], int(argv[2]) if len(argv) == 3 else 0)
    except AVSError as exc:  # a user error: one line naming what, not a traceback
        return report(exc)
    atomic_write_text(Path(argv[1]), json.dumps(record, indent=2) + "\n")
    t, s = record["test"], record["test_shuffled_audio"]
    print(f"test mIoU@0.5 {t['miou_05']:.2f}, shuffled audio {s['miou_05']:.2f}; threshold {record['val_threshold']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
