"""Evaluation as a free function: `evaluate(model, loader, evaluators)` runs the model once over a loader and
hands every evaluator each batch and the whole model output (detectron2's `DatasetEvaluator` pattern).

Metrics, saved masks, TensorBoard overlays, the uncertainty AUROC, the latent KL and the visualisation
grids are evaluators (avs.evaluation.evaluators, avs.evaluation.uncertainty, avs.inference.visualize);
this is the one evaluation loop of the code base. Used by training (validation, test at the end),
checkpoint evaluation (scripts/eval.py), scripts/uncertainty.py, scripts/latent_kl.py,
scripts/visualize.py and the benchmark. Under DDP the loader holds a shard (padded with repeats) and
each evaluator's `summarize` runs on every rank and gathers what it needs, so every rank returns the
result of the whole split, exactly as a single process would.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from tqdm import tqdm

from avs.engine import distributed as D
from avs.engine.sampler import ResumableSampler
from avs.errors import AVSError, ConfigError, ExitCode


class EvaluationError(AVSError, RuntimeError, code=ExitCode.RUN_FAILED):
    """Nothing of a split could be evaluated."""


class DatasetEvaluator:
    """One thing computed over a split: `reset()`, then `process(batch, output)` per batch, then `summarize()`.

    `evaluate()` sets `model` (the module whose outputs are handed over, unwrapped from torch.compile)
    before `reset()`. `batch` holds the loaded keys on the evaluation device (frames [B,T,3,H,W],
    masks [B,T,1,H,W], mask_valid [B,T], audio, index [B], video_id, ...); `output` is the model's whole
    eval output (`logits` [B,T,1,H,W] as float32, and e.g. `variance`, `samples`, `latents`), cut to the
    batch's clips. `summarize()` runs on every rank under DDP (collectives allowed) and returns what
    `evaluate` reports under `name`.
    """

    name: str = "evaluator"
    model: torch.nn.Module | None = None

    def reset(self) -> None: ...

    def process(self, batch: dict[str, Any], output: dict[str, Any]) -> None: ...

    def summarize(self) -> Any:
        return None


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


def _cut(value: Any, size: int, n: int, frames: int) -> Any:
    """A padded output value back to `n` clips: [size,...] -> [n,...], [size*T,...] -> [n*T,...]; dicts recursively."""
    if isinstance(value, Mapping):
        return {k: _cut(v, size, n, frames) for k, v in value.items()}
    if torch.is_tensor(value) and value.dim() > 0:
        if value.shape[0] == size:
            return value[:n]
        if value.shape[0] == size * frames:
            return value[: n * frames]
    return value


def _as_list(evaluators: DatasetEvaluator | Iterable[DatasetEvaluator]) -> list[DatasetEvaluator]:
    items = [evaluators] if isinstance(evaluators, DatasetEvaluator) else list(evaluators)
    names = [ev.name for ev in items]
    if len(set(names)) != len(names):
        raise ConfigError(f"evaluators need distinct names, got {names}")
    return items


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    loader: Any,
    evaluators: DatasetEvaluator | Iterable[DatasetEvaluator],
    *,
    device: torch.device | str = "cpu",
    batch_size: int | None = None,
    autocast: Callable[[], AbstractContextManager] = nullcontext,
    on_batch: Callable[[dict[str, Any]], None] | None = None,
    desc: str = "eval",
    progress: bool = False,
) -> dict[str, Any]:
    """Run `model` (eval mode) once over `loader`; every evaluator sees each batch and output -> {name: summary}.

    `batch_size`: with a compiled model, a shorter batch is padded to it (the padded clips' outputs are
    cut off before the evaluators see them) so one graph serves every batch. `on_batch(batch)` sees each
    batch as loaded (e.g. to record clips data.on_error=skip dropped). Batches without frames (every
    clip skipped) are passed over.
    """
    items = _as_list(evaluators)
    device = torch.device(device)
    compiled = hasattr(model, "_orig_mod")  # a torch.compile wrapper
    module = getattr(model, "_orig_mod", model)
    module.eval()  # a compiled wrapper: its module, as training switches it back
    for ev in items:
        ev.model = module
        ev.reset()
    total = len(loader) if hasattr(loader, "__len__") else None
    for batch in tqdm(loader, total=total, desc=desc, leave=False, disable=not progress):
        if on_batch is not None:
            on_batch(batch)
        if "frames" not in batch:
            continue
        batch = move_to(batch, device)
        n, frames = int(batch["frames"].shape[0]), int(batch["frames"].shape[1])
        padded = compiled and batch_size is not None and n < batch_size
        with autocast():
            out = model(pad_batch(batch, batch_size) if padded else batch)
        out = _cut(dict(out), batch_size, n, frames) if padded else dict(out)
        out["logits"] = out["logits"].float()
        for ev in items:
            ev.process(batch, out)
    return {ev.name: ev.summarize() for ev in items}


def metrics_of(
    accumulator: Any,
    protocols: list[str],
    legacy_batch_size: int,
    split: str = "the",
    distributed: bool = False,
) -> dict[str, dict[str, float]]:
    """{protocol: metrics} of an avs.metrics.MetricAccumulator (gathered over every rank when `distributed`)."""
    if distributed:
        accumulator = accumulator.all_gather()
    if len(accumulator) == 0:
        raise EvaluationError(f"no clip of the {split} split could be evaluated (all skipped? see run_report.json)")
    return {p: accumulator.compute(p, legacy_batch_size=legacy_batch_size) for p in protocols}


def build_evaluators(nodes: Any, key: str = "eval.evaluators") -> list[DatasetEvaluator]:
    """The user's evaluators from config: a mapping name -> `_target_` node (or a list of nodes).

    A mapping's key becomes the evaluator's `name`; a null entry is skipped (a way to drop one).
    Refuses (ConfigError, naming the key) a node that does not build an avs DatasetEvaluator.
    """
    from hydra.utils import instantiate

    if not nodes:
        return []
    named = list(nodes.items()) if isinstance(nodes, Mapping) else [(None, n) for n in nodes]
    out = []
    for i, (name, node) in enumerate(named):
        if node is None:
            continue
        where = f"{key}.{name}" if name is not None else f"{key}[{i}]"
        try:
            ev = instantiate(node)
        except Exception as exc:  # noqa: BLE001  (an import or argument error of the user's node)
            first = str(exc).splitlines()[0] if str(exc) else ""
            raise ConfigError(f"{where}: could not be built ({type(exc).__name__}: {first})") from exc
        if not isinstance(ev, DatasetEvaluator):
            raise ConfigError(f"{where}: {type(ev).__name__} is not an avs.evaluation.DatasetEvaluator")
        if name is not None:
            ev.name = str(name)
        out.append(ev)
    return out


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
    evaluators: Iterable[DatasetEvaluator] = (),
    progress: bool = False,
) -> dict[str, Any]:
    """Evaluate `net` on `split` of `data` (avs.data.loaders.RunData) -> {name: summary}.

    The result's "metrics" entry is {protocol: metrics} under every protocol of `cfg.eval`; `evaluators`
    add their own entries. Under DDP each rank scores a shard of the split and the evaluators gather;
    `model` (the module `net` runs, default `net`) first gets rank 0's BatchNorm statistics, which drift
    per rank in DDP training. `state` (avs.engine.state.RunState) records the clips data.on_error=skip dropped.
    """
    from avs.evaluation.evaluators import metrics_evaluator

    ds = data.dataset(split)
    sampler = None
    if dist.enabled:
        sampler = ResumableSampler(len(ds), shuffle=False, num_replicas=dist.world_size, rank=dist.rank)
        D.broadcast_buffers(model if model is not None else net)
    batch_size = int(cfg.data.eval_batch_size)
    loader = data.loader(split, sampler=sampler, batch_size=batch_size)
    (model if model is not None else net).eval()
    on_batch = (lambda batch: state.note_skipped(split, batch)) if state is not None else None
    legacy = int(cfg.eval.get("legacy_batch_size", cfg.data.eval_batch_size))
    metrics = metrics_evaluator(cfg, legacy, split)
    it = iter(loader)
    failed = True
    try:
        kw = {"device": device, "batch_size": batch_size, "autocast": autocast, "on_batch": on_batch}
        results = evaluate(net, it, [metrics, *evaluators], desc=f"eval {split}", progress=progress, **kw)
        failed = False
    finally:
        data.end_pass(it, loader, failed)
    if dist.enabled and state is not None:
        state.merge_skipped(split, True)
    return results
