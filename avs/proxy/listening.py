"""Does a proxy run listen? One checkpoint scored on val, test, and test with the audio shuffled across clips.

Three readings per split, so that a calibration effect is not read as a listening effect:
mIoU at p > 0.5, mIoU at the threshold that maximises mIoU on val (the sweep is over the 255
F-measure thresholds of avs.metrics, applied unchanged to test) and the threshold-free max F
(beta^2 = 0.3). The shuffled pass (avs.data.shuffled_audio) pairs every test clip with another
clip's audio (a seeded derangement): a model that listens loses accuracy there.

    python -m avs.proxy.listening <checkpoint> <out.json> [seed]

The proxy runner computes the same record inside the training process instead (`ListeningHook`, added to
every run of a protocol with `listening`): val and test are counted during the trainer's own passes
(the val pass of the best epoch, the final test pass of best.ckpt), so only the shuffled-audio pass is
extra; the command above scores a finished run's checkpoint on its own and gives the same numbers.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import torch

from avs.engine.hooks import HookBase
from avs.evaluation.evaluator import DatasetEvaluator
from avs.metrics import FrameStats, frame_stats, fscore_thresholds
from avs.utils.io import atomic_write_text

LISTENING_FILE = "listening.json"
log = logging.getLogger(__name__)
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
        stats.append(batch_stats(batch, model(batch)["logits"]))
    return FrameStats.cat(stats)


def batch_stats(batch: dict[str, Any], logits: torch.Tensor) -> FrameStats:
    """Per-frame counts of one batch's logits [B,T,1,H,W] against its masks (annotated frames only)."""
    logits = logits.float().flatten(0, 1)  # [B*T,1,H,W]
    masks = batch["masks"].flatten(0, 1) > 0.5
    if batch.get("mask_valid") is not None:
        keep = batch["mask_valid"].reshape(-1).bool()
        logits, masks = logits[keep], masks[keep]
    return frame_stats(logits.cpu(), masks.cpu(), NUM_THRESHOLDS)


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
    return make_record(stats, checkpoint, seed)


def make_record(stats: dict[str, FrameStats], checkpoint: str | Path | None, seed: int) -> dict[str, Any]:
    """The listening record of the val, test and test_shuffled_audio counts: the threshold that maximises
    mIoU on val, and the three readings of each split at it."""
    k = int(miou_curve(stats["val"]).argmax())
    record: dict[str, Any] = {"checkpoint": None if checkpoint is None else str(checkpoint), "shuffle_seed": int(seed)}
    record["val_threshold"] = round(float(fscore_thresholds(NUM_THRESHOLDS)[k]), 6)
    record.update({name: readings(stats[name], k) for name in ("val", "test", "test_shuffled_audio")})
    return record


class FrameStatsEvaluator(DatasetEvaluator):
    """The per-frame counts of a split (`batch_stats` of every batch) -> summary FrameStats (None: no frame)."""

    name = "listening_frame_stats"

    def reset(self) -> None:
        self.parts: list[FrameStats] = []

    def process(self, batch: dict[str, Any], output: dict[str, Any]) -> None:
        self.parts.append(batch_stats(batch, output["logits"]))

    def summarize(self) -> FrameStats | None:
        return FrameStats.cat(self.parts) if self.parts else None


class ListeningHook(HookBase):
    """The listening record of a training run, written to `out` at the end, as `listening_record` would
    write it for the run's best.ckpt: the val counts come from the validation of the best epoch (the
    weights best.ckpt holds), the test counts from the final test evaluation of best.ckpt; the
    shuffled-audio test pass runs after it. A run resumed after its best epoch, or one without
    trainer.test_at_end, scores the missing split with the best weights again. Single process only.

        '+hooks.listening={_target_: avs.proxy.listening.ListeningHook, priority: 205, out: <file>}'
    """

    def __init__(self, out: str, shuffle_seed: int = 0, checkpoint: str | None = None, split: str = "val") -> None:
        self.out, self.shuffle_seed, self.checkpoint, self.split = Path(out), int(shuffle_seed), checkpoint, split
        self._best_val: FrameStats | None = None

    def before_train(self) -> None:
        if self.loop.dist.enabled:
            from avs.errors import ConfigError

            raise ConfigError(
                f"hooks.{self.name or 'listening'}: the listening record is made in one process, not under DDP"
            )

    def evaluators(self, split: str) -> list[Any]:
        return [FrameStatsEvaluator()] if split in (self.split, "test") else []

    def after_epoch(self) -> None:
        s = self.loop.state
        last = s.history[-1] if s.history else {}
        if last.get("step") == s.step and s.best.get("step") == s.step:  # this epoch's validation is the best
            self._best_val = self._counts(self.split)

    def _counts(self, split: str) -> FrameStats | None:
        return (self.loop.evaluations.get(split) or {}).get(FrameStatsEvaluator.name)

    def after_train(self) -> None:
        """After the final evaluation (priority above hooks.final_evaluation's): best.ckpt's weights are loaded."""
        from avs.data.shuffled_audio import ShuffledAudio

        loop = self.loop
        size = int(loop.data.cfg.data.eval_batch_size)
        test_ds = loop.data.dataset("test")
        val = (
            self._best_val
            if self._best_val is not None
            else split_stats(loop.model, loop.data.dataset(self.split), size)
        )
        test = self._counts("test") if loop.result.get("test") else None
        if test is None:
            test = split_stats(loop.model, test_ds, size)
        shuffled = split_stats(loop.model, ShuffledAudio(test_ds, self.shuffle_seed), size)
        stats = {"val": val, "test": test, "test_shuffled_audio": shuffled}
        record = make_record(stats, self.checkpoint, self.shuffle_seed)
        atomic_write_text(self.out, json.dumps(record, indent=2) + "\n")
        t, sh = record["test"], record["test_shuffled_audio"]
        log.info("listening: test mIoU@0.5 %.2f, shuffled audio %.2f -> %s", t["miou_05"], sh["miou_05"], self.out)


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
