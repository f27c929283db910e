"""What a run has done so far: counters, selection, loss history and every fault met.

A checkpoint stores it (`RunState.checkpoint_entries`) and a resumed run restores it (`restore`);
run_report.json and metrics.json are written from it.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from avs.engine import distributed as D
from avs.engine.syncs import LossLog

log = logging.getLogger("avs.engine.loop")  # the step's warnings, under the loop's name


def empty_faults() -> dict[str, Any]:
    return {
        "nonfinite_steps": [],  # {step, epoch, kind: loss|grad|amp_overflow, video_ids, terms}
        "skipped_clips": {},  # split -> {video_id: error}
        "interruptions": [],  # {step, epoch, reason}
        "resumed_from": [],  # {path, step, changes}
    }


class RunState:
    """Counters (step, epoch, batch in epoch), best selection, histories, skipped clips, faults."""

    def __init__(self) -> None:
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.best: dict[str, Any] = {"metric": -math.inf, "epoch": None, "step": None}
        self.history: list[dict[str, Any]] = []
        self.loss_history: list[float] = []
        self.loss_log = LossLog()  # this run's latest losses, still on the device (flushed into loss_history)
        self.skipped: list[str] = []  # clips dropped with data.on_error=skip
        self.faults: dict[str, Any] = empty_faults()
        self.consecutive_nonfinite = 0
        self.last_saved: dict[str, int] = {}  # checkpoint name -> step it was written at by this process

    def flush_losses(self) -> list[float]:
        return self.loss_log.flush(self.loss_history)

    # ------------------------------------------------------------------ skipped clips
    def note_skipped(self, split: str, batch: dict[str, Any]) -> None:
        """Record the clips a batch dropped (data.on_error=skip) with the reason of each."""
        ids = [v for v in batch.get("skipped", []) if v is not None]
        if not ids:
            return
        self.skipped += ids
        errors = batch.get("skipped_errors", {}) or {}
        table = self.faults["skipped_clips"].setdefault(split, {})
        for vid in ids:
            table.setdefault(vid, errors.get(vid, "unreadable"))

    def merge_skipped(self, split: str, distributed: bool) -> None:
        """Under DDP: every rank's skipped clips of `split` on every rank (collective)."""
        if not distributed:
            return
        merged: dict[str, str] = {}
        for part in D.gather_objects(self.faults["skipped_clips"].get(split, {})):
            merged.update(part)
        if merged:
            self.faults["skipped_clips"][split] = merged
            self.skipped = sorted(set(self.skipped) | set(merged))

    def bad_steps(self) -> list[dict[str, Any]]:
        """Non-finite steps without the fp16 overflows the GradScaler handles itself."""
        return [f for f in self.faults["nonfinite_steps"] if f["kind"] != "amp_overflow"]

    def interrupted(self, reason: str) -> None:
        self.faults["interruptions"].append({"step": self.step, "epoch": self.epoch, "reason": reason})

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_entries(self) -> dict[str, Any]:
        """The checkpoint keys this state fills (their names are the checkpoint format)."""
        return {
            "epoch": self.epoch,
            "step": self.step,
            "batch_in_epoch": self.batch_in_epoch,
            "best": dict(self.best),
            "history": list(self.history),
            "loss_history": list(self.loss_history),
            "faults": self.faults,
            "consecutive_nonfinite": self.consecutive_nonfinite,
        }

    def restore(self, state: dict[str, Any]) -> None:
        self.epoch, self.step, self.batch_in_epoch = state["epoch"], state["step"], state["batch_in_epoch"]
        self.best = dict(state["best"])
        self.history = list(state["history"])
        self.loss_history = list(state["loss_history"])
        self.faults = state.get("faults") or empty_faults()
        self.consecutive_nonfinite = int(state.get("consecutive_nonfinite", 0))
        for table in self.faults.get("skipped_clips", {}).values():
            self.skipped += list(table)

    def record_nonfinite(
        self,
        kind: str,
        video_ids: list[str],
        terms: dict[str, float],
        loss_value: float,
        dist: D.DistInfo,
        amp_scale: float | None = None,
    ) -> None:
        """Record (faults.nonfinite_steps) and log a skipped update: its kind, clips (of every rank) and bad terms."""
        s = self
        ids = list(dict.fromkeys(video_ids))
        if dist.enabled:  # the clips of every rank
            ids = list(dict.fromkeys(v for part in D.gather_objects(ids) for v in part))
        entry = {
            "step": s.step,
            "epoch": s.epoch,
            "kind": kind,
            "video_ids": ids,
            "terms": {k: (v if math.isfinite(v) else str(v)) for k, v in terms.items()},
        }
        s.faults["nonfinite_steps"].append(entry)
        if kind == "amp_overflow":
            log.info(
                "step %d: fp16 gradient overflow, update skipped by the GradScaler (scale now %.1f)",
                s.step,
                amp_scale,
            )
            return
        what = f"loss {loss_value}" if kind == "loss" else "gradient"
        log.warning(
            "step %d: non-finite %s%s; optimizer update skipped (%d in a row). clips: %s",
            s.step,
            what,
            f" (terms {entry['terms']})" if terms else "",
            s.consecutive_nonfinite,
            ", ".join(ids),
        )
