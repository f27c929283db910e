"""Timings (warm-up discarded, median of repeats) and peak memory (CUDA allocator peak, or the peak
RSS of a spawned child process on CPU) of one model variant."""

from __future__ import annotations

import multiprocessing as mp
import queue as queue_mod
import resource
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from avs.benchmark.models import (
    _autocast,
    _prepare,
    _sync,
    bench_model_config,
    build_bench_model,
    make_batch,
    perturb_zero_init,
)
from avs.errors import ConfigError


def median_time(
    fn: Callable[[], Any], repeats: int = 5, warmup: int = 1, sync: Callable[[], None] | None = None
) -> float:
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


def _proc_status_kib(field: str) -> int | None:
    """A `/proc/self/status` field in KiB (Linux), else None."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def peak_rss_start() -> int:
    """Baseline (KiB) for `peak_rss_mb`: resets the peak RSS where Linux allows it.

    On Linux `ru_maxrss` survives fork+exec, so a spawned child would report the parent's peak;
    the per-process VmHWM (reset through /proc/self/clear_refs) is used there instead.
    """
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # reset VmHWM to the current RSS
        rss = _proc_status_kib("VmRSS")
        if rss is not None:
            return rss
    except OSError:
        pass
    hwm = _proc_status_kib("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def peak_rss_mb(baseline_kib: int) -> float:
    """Peak RSS growth since `peak_rss_start()` in MiB."""
    hwm = _proc_status_kib("VmHWM")
    if hwm is None:
        hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (hwm - baseline_kib) / 1024


def _timed_fn(
    kind: str, m: torch.nn.Module, batch: dict[str, torch.Tensor], cfg, device: torch.device, runtime: dict[str, Any]
) -> tuple[Callable[[], Any], Callable[..., Any]]:
    """(the function timed for measurement `kind`, the forward it calls: compiled when asked)."""
    amp = bool(runtime.get("amp"))
    x = batch["frames"].flatten(0, 1)  # [B,T,3,S,S] -> [B*T,3,S,S]
    if kind == "backbone_fwd":
        m.backbone.eval()

        def fn():
            with torch.no_grad(), _autocast(device, amp):
                return m.backbone(x)

        return fn, m
    if kind == "backbone_fwdbwd":
        m.backbone.train()

        def fn():
            m.backbone.zero_grad(set_to_none=True)
            with _autocast(device, amp):
                feats = m.backbone(x)
            sum(f.float().mean() for f in feats).backward()

        return fn, m
    if kind == "train_step":
        from avs.engine.optim import build_optimizer

        m.train()
        opt = build_optimizer(m.parameters(), {**dict(cfg.get("trainer") or {}), "lr": 1e-5})  # the trainer's optimizer

        def fn():
            with _autocast(device, amp):
                terms = m(batch)
            loss = sum(v.float() for v in terms.values())
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return fn, m
    if kind == "infer_clip":
        m.eval()
        fwd = torch.compile(m) if runtime.get("compile") else m

        def fn():
            with torch.no_grad(), _autocast(device, amp):
                return fwd(batch)

        return fn, fwd
    raise ConfigError(f"unknown benchmark measurement {kind!r}")


def run_measurement(spec: dict[str, Any]) -> dict[str, Any]:
    """Time `spec['kinds']` (backbone_fwd | backbone_fwdbwd | train_step | infer_clip) of one model variant."""
    device = torch.device(spec["device"])
    rss0 = peak_rss_start()  # KiB, after imports
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    cfg = bench_model_config(spec["cfg"], spec.get("overrides"))
    runtime = dict(spec.get("runtime") or {})
    B, T, S = int(cfg.batch_size), int(cfg.num_frames), int(cfg.image_size)
    model = perturb_zero_init(build_bench_model(cfg, device, int(spec.get("seed", 0))))
    out: dict[str, Any] = {}
    for kind in spec["kinds"]:
        bsz = 1 if kind in ("infer_clip", "backbone_fwd") else B
        batch = make_batch(bsz, T, S, "logmel", device, int(cfg.model.get("audio_dim", 128)))
        m, batch = _prepare(model, batch, runtime)
        fn, fwd = _timed_fn(kind, m, batch, cfg, device, runtime)
        t0 = time.perf_counter()
        seconds = median_time(fn, repeats=int(cfg.repeats), warmup=int(cfg.warmup), sync=_sync(device))
        out[kind] = {"seconds": seconds, "wall_incl_warmup_s": time.perf_counter() - t0, "batch_size": bsz}
        if runtime.get("compile") and kind == "infer_clip":  # outputs must match the eager model
            with torch.no_grad():
                ref = m(batch)["logits"]
                got = fwd(batch)["logits"]
            out["max_abs_diff"] = float((ref - got).abs().max())
        model.zero_grad(set_to_none=True)
    if device.type == "cuda":
        out["peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        out["memory_source"] = "cuda max_memory_allocated"
    else:
        out["peak_mb"] = peak_rss_mb(rss0)
        out["memory_source"] = "spawned child: peak RSS (VmHWM) minus the RSS after imports"
    return out


def _child(spec: dict[str, Any], q) -> None:
    try:
        from avs.utils.allocator import configure

        configure(spec["cfg"]["runtime"]["allocator"])  # a spawned child starts with glibc's defaults
        import avs.models.build  # noqa: F401  (imports before the memory baseline)
        from avs.engine.params import random_init_config  # noqa: F401

        bench_model_config(spec["cfg"])  # resolves and instantiates nothing, but loads hydra/omegaconf paths
        q.put(("ok", run_measurement(spec)))
    except Exception as exc:  # reported to the parent, which records it
        q.put(("error", f"{type(exc).__name__}: {exc}"))


def measure(spec: dict[str, Any], memory: bool, timeout: float | None = None) -> dict[str, Any]:
    """Run `run_measurement(spec)` in a spawned child when a CPU memory number is wanted, else in-process."""
    if not memory or str(spec["device"]).startswith("cuda"):
        if timeout is None:
            return run_measurement(spec)
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_child, args=(spec, q), daemon=True)
    p.start()
    try:
        status, payload = q.get(timeout=timeout)
    except queue_mod.Empty:
        p.terminate()
        p.join()
        return {"error": f"timed out after {timeout:.0f} s"}
    p.join()
    if status == "error":
        return {"error": payload}
    if not memory:
        payload.pop("peak_mb", None)
    return payload
