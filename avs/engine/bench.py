"""Timing helpers for scripts/benchmark.py (warm-up discarded, median of repeats)."""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import torch

from avs.metrics import MetricAccumulator


def median_time(fn: Callable[[], Any], repeats: int = 5, warmup: int = 1, sync: Callable[[], None] | None = None) -> float:
    """Median wall time of `fn()` in seconds over `repeats` runs after `warmup` discarded runs."""
    for _ in range(warmup):
        fn()
        if sync:
            sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def metrics_throughput(num_frames: int = 1000, size: int = 224, clip_len: int = 5, batch_clips: int = 4,
                       repeats: int = 3, device: str = "cpu") -> dict[str, float]:
    """Frames/s of MetricAccumulator update (in eval batches) + compute of all three protocols."""
    g = torch.Generator().manual_seed(0)
    clips = num_frames // clip_len
    logits = torch.randn(clips, clip_len, 1, size, size, generator=g).to(device)
    masks = (torch.rand(clips, clip_len, 1, size, size, generator=g) > 0.7).float().to(device)

    def run() -> None:
        acc = MetricAccumulator()
        for i in range(0, clips, batch_clips):
            idx = torch.arange(i, min(i + batch_clips, clips))
            acc.update(logits[i : i + batch_clips], masks[i : i + batch_clips], indices=idx)
        acc.compute(["per_frame", "avsbench_legacy", "dataset_level"])

    sync = torch.cuda.synchronize if str(device).startswith("cuda") else None
    seconds = median_time(run, repeats=repeats, warmup=1, sync=sync)
    return {"frames": clips * clip_len, "size": size, "seconds": seconds, "frames_per_s": clips * clip_len / seconds}
