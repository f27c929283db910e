"""Whole-system probes: host syncs and graph breaks of a training step, data-loader and metric
throughput, and the hardware the numbers were measured on."""

from __future__ import annotations

import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from avs.benchmark.models import _autocast
from avs.benchmark.timing import median_time
from avs.metrics import MetricAccumulator


def metrics_throughput(
    num_frames: int = 1000,
    size: int = 224,
    clip_len: int = 5,
    batch_clips: int = 4,
    repeats: int = 3,
    device: str = "cpu",
) -> dict[str, float]:
    """Frames/s of MetricAccumulator update (in eval batches) + compute of all three protocols."""
    g = torch.Generator().manual_seed(0)
    clips = max(1, num_frames // clip_len)
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


def train_step_syncs(model: torch.nn.Module, batch: dict[str, torch.Tensor], amp: bool = False) -> dict[str, Any]:
    """Host syncs of one training step as the trainer takes it: forward, loss, backward, the non-finite
    guard (loss and gradient-norm flags, read together) and the trainer's Adam step (counted after one
    warm-up step; a dispatch-mode count, so it works on CPU too)."""
    from avs.engine.optim import build_optimizer
    from avs.engine.syncs import LossWindow, SyncCounter, read_step_flags

    device = next(model.parameters()).device
    model.train()
    opt = build_optimizer(model.parameters(), {"lr": 1e-5})

    def step() -> None:
        window = LossWindow()
        with _autocast(device, amp):
            terms = model(batch)
        loss = sum(v.float() for v in terms.values())
        window.add(loss, terms)
        loss.backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        read_step_flags(window.nonfinite(), torch.nn.utils.get_total_norm(grads))
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    with SyncCounter() as counter:
        step()
    model.zero_grad(set_to_none=True)
    return {
        "per_step": counter.total,
        "kinds": dict(counter.counts),
        "note": "forward + loss + backward + non-finite check + Adam, after one warm-up step; the trainer "
        "also reads the loss at logging steps (trainer.log_every_steps), and fp16 AMP adds the "
        "GradScaler's overflow check",
    }


def graph_breaks(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    """torch.compile graphs and graph breaks of one training forward (loss terms included).

    Counted by torch._dynamo.explain."""
    model.train()
    torch._dynamo.reset()
    try:
        ex = torch._dynamo.explain(model)(batch)
    except Exception as exc:  # report, do not fail the benchmark
        return {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
    finally:
        model.zero_grad(set_to_none=True)
    reasons = []
    for br in ex.break_reasons:
        frame = br.user_stack[-1] if br.user_stack else None
        where = f" ({Path(frame.filename).name}:{frame.lineno})" if frame is not None else ""
        reasons.append(br.reason.splitlines()[0][:120] + where)
    torch._dynamo.reset()
    return {"graphs": ex.graph_count, "breaks": ex.graph_break_count, "reasons": reasons}


def _write_random_embeddings(ds, num_frames: int, rng: np.random.Generator) -> None:
    """A random [T,128] audio embedding (.npy) for every clip of `ds`, where the embedding source reads them."""
    from avs.data.layout import embedding_path

    for rec in ds.records:
        path = embedding_path(ds.root, ds.layout, rec, None)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, rng.standard_normal((num_frames, 128)).astype(np.float32))


def _clips_per_second(ds, repeats: int) -> dict[str, float]:
    """Median seconds of one in-process pass over `ds` (batch size 1) and the clips/s it gives."""
    from torch.utils.data import DataLoader

    from avs.data.avsbench import collate_skip_none

    loader = DataLoader(ds, batch_size=1, shuffle=False, num_workers=0, collate_fn=collate_skip_none)

    def run() -> None:
        for _ in loader:
            pass

    sec = median_time(run, repeats=repeats, warmup=1)
    return {"seconds": sec, "clips_per_s": len(ds) / sec}


def data_loader_throughput(
    cfg: DictConfig,
    num_clips: int,
    repeats: int,
    sources=("logmel", "wav", "embedding"),
    root: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Clips/s of AVSBenchDataset (num_workers=0, in-process) for each audio source on generated data."""
    from avs.data.avsbench import AVSBenchDataset
    from avs.data.synthetic import SyntheticConfig, generate

    size, T = int(cfg.image_size), int(cfg.num_frames)
    subset = str(cfg.data.get("subset", "ms3"))
    tmp = tempfile.TemporaryDirectory(prefix="avs_bench_") if root is None else None
    base = Path(tmp.name if tmp else root)
    try:
        syn = SyntheticConfig(subset=subset, clips={"train": num_clips}, image_size=size, num_frames=T)
        t0 = time.perf_counter()
        data_root = generate(base / "sounding_shapes", syn, progress=False)
        gen_s = time.perf_counter() - t0
        results: dict[str, Any] = {
            "clips": num_clips,
            "image_size": size,
            "num_frames": T,
            "subset": subset,
            "num_workers": 0,
            "generation_s": gen_s,
            "note": "in-process loading (num_workers=0): clips/s of one worker",
        }

        def dataset(audio_source: str) -> AVSBenchDataset:
            return AVSBenchDataset(
                root=data_root, subset=subset, split="train", num_frames=T, image_size=size, audio_source=audio_source
            )

        rng = np.random.default_rng(0)
        for source in sources:
            if source == "embedding":  # the embeddings are written next to the clips the log-mel dataset finds
                _write_random_embeddings(dataset("logmel"), T, rng)
            results[source] = _clips_per_second(dataset(source), repeats)
        return results
    finally:
        if tmp:
            tmp.cleanup()


def hardware_info(device: torch.device) -> dict[str, Any]:
    """Platform, CPU count, torch version, threads and (on CUDA) the GPU name."""
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": str(device),
        "dtype": "float32",
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info
