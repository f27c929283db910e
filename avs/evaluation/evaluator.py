"""Evaluation as a free function: `evaluate(model, loader, accumulator)` scores every batch of a loader.

Used by training (validation, test at the end), checkpoint evaluation (scripts/eval.py) and the
benchmark. Under DDP the loader holds a shard (padded with repeats that the accumulator drops by
clip index) and `metrics_of` gathers the per-frame statistics first, so every rank returns the
metrics of the whole split, exactly as a single process would.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from tqdm import tqdm

from avs.engine import distributed as D
from avs.engine.sampler import ResumableSampler
from avs.errors import AVSError, ExitCode
from avs.metrics import MetricAccumulator


class EvaluationError(AVSError, RuntimeError, code=ExitCode.RUN_FAILED):
    """Nothing of a split could be evaluated."""


def move_to(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The batch's tensors on `device` (non-blocking from pinned memory on CUDA)."""
    nb = device.type == "cuda"
    return {k: v.to(device, non_blocking=nb) if torch.is_tensor(v) else v for k, v in batch.items()}


def pad_batch(batch: dict[str, Any], size: int) -> dict[str, Any]:
    """A copy of `batch` grown to `size` clips by repeating its last clip (tensors and lists; other values kept)."""
    n = int(batch["frames"].shape[0])
    extra = size - n
    out: dict[str, Any] = {}
    for k, v in batch.items():
        if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == n:
            out[k] = torch.cat([v, v[-1:].expand(extra, *v.shape[1:])])
        elif isinstance(v, list) and len(v) == n:
            out[k] = v + v[-1:] * extra
        else:
            out[k] = v
    return out


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    loader: Any,
    accumulator: MetricAccumulator,
    *,
    device: torch.device | str = "cpu",
    batch_size: int | None = None,
    autocast: Callable[[], AbstractContextManager] = nullcontext,
    on_batch: Callable[[dict[str, Any]], None] | None = None,
    on_output: Callable[[dict[str, Any], torch.Tensor], None] | None = None,
    desc: str = "eval",
    progress: bool = False,
) -> MetricAccumulator:
    """Run `model` (eval mode) over `loader` and add every clip's logits to `accumulator`.

    `batch_size`: with a compiled model, a shorter batch is padded to it (outputs dropped before
    scoring) so one graph serves every batch. `on_batch(batch)` sees each batch as loaded (e.g. to
    record clips data.on_error=skip dropped); `on_output(batch, logits)` each scored batch.
    Batches without frames (every clip skipped) are passed over.
    """
    device = torch.device(device)
    compiled = hasattr(model, "_orig_mod")  # a torch.compile wrapper
    getattr(model, "_orig_mod", model).eval()  # a compiled wrapper: its module, as training switches it back
    total = len(loader) if hasattr(loader, "__len__") else None
    for batch in tqdm(loader, total=total, desc=desc, leave=False, disable=not progress):
        if on_batch is not None:
            on_batch(batch)
        if "frames" not in batch:
            continue
        batch = move_to(batch, device)
        n = int(batch["frames"].shape[0])
        with autocast():
            out = model(pad_batch(batch, batch_size) if compiled and batch_size and n < batch_size else batch)
        logits = out["logits"][:n].float()
        accumulator.update(logits, batch["masks"], indices=batch["index"])
        if on_output is not None:
            on_output(batch, logits)
    return accumulator


def metrics_of(
    accumulator: MetricAccumulator,
    protocols: list[str],
    legacy_batch_size: int,
    split: str = "the",
    distributed: bool = False,
) -> dict[str, dict[str, float]]:
    """{protocol: metrics} of the accumulated clips (gathered over every rank when `distributed`)."""
    if distributed:
        accumulator = accumulator.all_gather()
    if len(accumulator) == 0:
        raise EvaluationError(f"no clip of the {split} split could be evaluated (all skipped? see run_report.json)")
    return {p: accumulator.compute(p, legacy_batch_size=legacy_batch_size) for p in protocols}


def evaluate_split(
    net: torch.nn.Module,
    data: Any,
    split: str,
    cfg: Any,
    *,
    device: torch.device,
    dist: D.DistInfo,
    model: torch.nn.Module | None = None,
    autocast: Callable[[], AbstractContextManager] = nullcontext,
    state: Any = None,
    on_output: Callable[[dict[str, Any], torch.Tensor], None] | None = None,
    progress: bool = False,
) -> dict[str, dict[str, float]]:
    """Metrics of `net` on `split` of `data` (avs.data.loaders.RunData) under every protocol of `cfg.eval`.

    Under DDP each rank scores a shard of the split and the statistics are gathered; `model` (the
    module `net` runs, default `net`) first gets rank 0's BatchNorm statistics, which drift per rank
    in DDP training. `state` (avs.engine.state.RunState) records the clips data.on_error=skip dropped.
    """
    ds = data.dataset(split)
    sampler = None
    if dist.enabled:
        sampler = ResumableSampler(len(ds), shuffle=False, num_replicas=dist.world_size, rank=dist.rank)
        D.broadcast_buffers(model if model is not None else net)
    batch_size = int(cfg.data.eval_batch_size)
    loader = data.loader(split, sampler=sampler, batch_size=batch_size)
    (model if model is not None else net).eval()
    on_batch = (lambda batch: state.note_skipped(split, batch)) if state is not None else None
    it = iter(loader)
    failed = True
    try:
        acc = evaluate(
            net,
            it,
            MetricAccumulator(),
            device=device,
            batch_size=batch_size,
            autocast=autocast,
            on_batch=on_batch,
            on_output=on_output,
            desc=f"eval {split}",
            progress=progress,
        )
        failed = False
    finally:
        data.end_pass(it, loader, failed)
    if dist.enabled:
        acc = acc.all_gather()
        if state is not None:
            state.merge_skipped(split, True)
    legacy = int(cfg.eval.get("legacy_batch_size", cfg.data.eval_batch_size))
    return metrics_of(acc, list(cfg.eval.protocols), legacy, split)
