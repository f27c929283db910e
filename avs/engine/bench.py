"""Benchmark measurements for scripts/benchmark.py: timings (warm-up discarded, median of repeats),
peak memory (CUDA allocator peak, or the peak RSS of a spawned child process on CPU), data-loader
and metric throughput, and side-by-side comparison pairs whose outputs must agree."""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import platform
import queue as queue_mod
import resource
import statistics
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from avs.config_checks import ConfigError
from avs.metrics import MetricAccumulator

log = logging.getLogger(__name__)

#: comparison pairs: name -> (label of variant a, label of variant b)
COMPARISONS: dict[str, tuple[str, str]] = {
    "fusion": ("dense", "factorised"),
    "motion": ("unchunked", "chunked"),
    "audio": ("vggish_on_the_fly", "cached_embedding"),
    "amp": ("fp32", "bf16_autocast"),
    "compile": ("eager", "compiled"),
    "channels_last": ("contiguous", "channels_last"),
}
COMPILE_TIMEOUT_S = 120.0


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


# ------------------------------------------------------------------------------------------------
# model and batch


def bench_model_config(cfg: DictConfig | dict, overrides: dict[str, Any] | None = None) -> DictConfig:
    """Random-init copy of a composed config with the top-level `image_size` / `num_frames` and `overrides` applied."""
    from avs.engine.params import random_init_config

    cfg = OmegaConf.create(cfg) if isinstance(cfg, dict) else cfg.copy()
    cfg = random_init_config(cfg)
    with open_dict(cfg):
        cfg.data.image_size = int(cfg.image_size)
        cfg.data.num_frames = int(cfg.num_frames)
        for key, value in (overrides or {}).items():
            if OmegaConf.select(cfg, key) is None and OmegaConf.select(cfg, key.rsplit(".", 1)[0]) is None:
                raise ConfigError(f"benchmark override {key}: the config has no such node")
            OmegaConf.update(cfg, key, value, force_add=True)
    return cfg


def build_bench_model(cfg: DictConfig, device: torch.device, seed: int = 0) -> torch.nn.Module:
    """AVSegmentor with random weights (seeded, so two builds of the same architecture agree)."""
    from avs.models.build import build_model

    torch.manual_seed(seed)
    return build_model(cfg).to(device)


def make_batch(batch_size: int, num_frames: int, size: int, audio: str, device: torch.device,
               audio_dim: int = 128, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random batch: frames [B,T,3,S,S], masks [B,T,1,S,S], mask_valid [B,T], audio [B,T,1,96,64] | [B,T,D]."""
    g = torch.Generator().manual_seed(seed)
    B, T, S = batch_size, num_frames, size
    if audio == "logmel":
        a = torch.randn(B, T, 1, 96, 64, generator=g)
    elif audio == "embedding":
        a = torch.randn(B, T, audio_dim, generator=g)
    else:
        raise ConfigError(f"benchmark audio batch must be 'logmel' or 'embedding', got {audio!r}")
    batch = {
        "frames": torch.rand(B, T, 3, S, S, generator=g),
        "masks": (torch.rand(B, T, 1, S, S, generator=g) > 0.5).float(),
        "mask_valid": torch.ones(B, T, dtype=torch.bool),
        "audio": a,
    }
    return {k: v.to(device) for k, v in batch.items()}


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


def perturb_zero_init(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Fill all-zero parameters (e.g. zero-init BN gammas) with small seeded noise so every path is live."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.numel() and not bool(p.any()):
                p.copy_(0.1 * torch.randn(p.shape, generator=g).to(p))
    return model


def _sync(device: torch.device) -> Callable[[], None] | None:
    return torch.cuda.synchronize if device.type == "cuda" else None


def _autocast(device: torch.device, amp: bool):
    if not amp:
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def _prepare(model: torch.nn.Module, batch: dict[str, torch.Tensor], runtime: dict[str, Any]):
    if runtime.get("channels_last"):
        from avs.utils.device import to_channels_last

        to_channels_last(model)  # the trainer's conversion: 4-D weights only (Conv3d weights cannot be channels_last)
        # [B,T,3,S,S] with NHWC storage, so the model's flatten(0, 1) gives channels_last frames
        f = batch["frames"].permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)
        batch = {**batch, "frames": f}
    if runtime.get("audio") == "embedding" and batch["audio"].dim() == 5:
        with torch.no_grad():
            emb = model.encode_audio(batch["audio"])  # [B*T,D]
        batch = {**batch, "audio": emb.view(*batch["audio"].shape[:2], -1)}  # [B*T,D] -> [B,T,D]
    return model, batch


# ------------------------------------------------------------------------------------------------
# one measurement (in-process or in a spawned child)


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
    repeats, warmup = int(cfg.repeats), int(cfg.warmup)
    sync = _sync(device)
    model = perturb_zero_init(build_bench_model(cfg, device, int(spec.get("seed", 0))))
    amp = bool(runtime.get("amp"))
    out: dict[str, Any] = {}
    for kind in spec["kinds"]:
        bsz = 1 if kind in ("infer_clip", "backbone_fwd") else B
        batch = make_batch(bsz, T, S, "logmel", device, int(cfg.model.get("audio_dim", 128)))
        m, batch = _prepare(model, batch, runtime)
        x = batch["frames"].flatten(0, 1)  # [B,T,3,S,S] -> [B*T,3,S,S]
        if kind == "backbone_fwd":
            m.backbone.eval()

            def fn():
                with torch.no_grad(), _autocast(device, amp):
                    return m.backbone(x)
        elif kind == "backbone_fwdbwd":
            m.backbone.train()

            def fn():
                m.backbone.zero_grad(set_to_none=True)
                with _autocast(device, amp):
                    feats = m.backbone(x)
                sum(f.float().mean() for f in feats).backward()
        elif kind == "train_step":
            m.train()
            from avs.engine.optim import build_optimizer

            opt = build_optimizer(m.parameters(), {**dict(cfg.get("trainer") or {}), "lr": 1e-5})  # the trainer's optimizer

            def fn():
                with _autocast(device, amp):
                    terms = m(batch)
                loss = sum(v.float() for v in terms.values())
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
        elif kind == "infer_clip":
            m.eval()
            fwd = m
            if runtime.get("compile"):
                fwd = torch.compile(m)

            def fn():
                with torch.no_grad(), _autocast(device, amp):
                    return fwd(batch)
        else:
            raise ConfigError(f"unknown benchmark measurement {kind!r}")
        t0 = time.perf_counter()
        seconds = median_time(fn, repeats=repeats, warmup=warmup, sync=sync)
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


# ------------------------------------------------------------------------------------------------
# host syncs and graph breaks of a training step


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
    return {"per_step": counter.total, "kinds": dict(counter.counts),
            "note": "forward + loss + backward + non-finite check + Adam, after one warm-up step; the trainer "
                    "also reads the loss at logging steps (trainer.log_every_steps), and fp16 AMP adds the "
                    "GradScaler's overflow check"}


def graph_breaks(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    """torch.compile graphs and graph breaks of one training forward (loss terms included), via torch._dynamo.explain."""
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


# ------------------------------------------------------------------------------------------------
# output agreement of a comparison pair


def _pair_specs(name: str) -> tuple[dict, dict, dict, dict]:
    """(overrides a, runtime a, overrides b, runtime b) of a comparison pair."""
    if name == "fusion":
        return {"model.fusion.block.impl": "dense"}, {}, {"model.fusion.block.impl": "factorised"}, {}
    if name == "motion":
        return {"model.motion.chunk_size": 10**9}, {}, {"model.motion.chunk_size": 64}, {}
    if name == "audio":
        return {}, {"audio": "logmel"}, {}, {"audio": "embedding"}
    if name == "amp":
        return {}, {}, {}, {"amp": True}
    if name == "compile":
        return {}, {}, {}, {"compile": True}
    if name == "channels_last":
        return {}, {}, {}, {"channels_last": True}
    raise ConfigError(f"compare: unknown pair {name!r}; expected some of {sorted(COMPARISONS)}")


def pair_applicable(cfg: DictConfig, name: str) -> str | None:
    """None when pair `name` applies to the configured model, else the reason it is skipped."""
    if name == "fusion":
        block = OmegaConf.select(cfg, "model.fusion.block")
        if block is None or "TPAVI" not in str(block.get("_target_", "")):
            return "model has no TPAVI fusion"
    if name == "motion" and cfg.model.get("motion") is None:
        return "model has no motion module"
    if name == "audio" and cfg.model.get("audio_encoder") is None:
        return "model has no audio encoder"
    return None


def output_diff(cfg: DictConfig, name: str, device: torch.device) -> float:
    """Max |logits_a - logits_b| of the two variants of a pair (same weights, same B=1 clip)."""
    ov_a, rt_a, ov_b, rt_b = _pair_specs(name)
    outs = []
    for ov, rt in ((ov_a, rt_a), (ov_b, rt_b)):
        c = bench_model_config(cfg, ov)
        model = perturb_zero_init(build_bench_model(c, device)).eval()
        batch = make_batch(1, int(c.num_frames), int(c.image_size), "logmel", device)
        model, batch = _prepare(model, batch, rt)
        with torch.no_grad(), _autocast(device, bool(rt.get("amp"))):
            outs.append(model(batch)["logits"].float())
    return float((outs[0] - outs[1]).abs().max())


# ------------------------------------------------------------------------------------------------
# data loading


def data_loader_throughput(cfg: DictConfig, num_clips: int, repeats: int, sources=("logmel", "wav", "embedding"),
                           root: str | os.PathLike | None = None) -> dict[str, Any]:
    """Clips/s of AVSBenchDataset (num_workers=0, in-process) for each audio source on generated data."""
    from torch.utils.data import DataLoader

    from avs.data.avsbench import AVSBenchDataset, collate_skip_none, embedding_path
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
        results: dict[str, Any] = {"clips": num_clips, "image_size": size, "num_frames": T, "subset": subset,
                                   "num_workers": 0, "generation_s": gen_s,
                                   "note": "in-process loading (num_workers=0): clips/s of one worker"}
        rng = np.random.default_rng(0)
        for source in sources:
            ds = AVSBenchDataset(root=data_root, subset=subset, split="train", num_frames=T, image_size=size,
                                 audio_source="logmel" if source == "embedding" else source)
            if source == "embedding":
                for rec in ds.records:
                    path = embedding_path(ds.root, ds.layout, rec, None)
                    path.parent.mkdir(parents=True, exist_ok=True)
                    np.save(path, rng.standard_normal((T, 128)).astype(np.float32))
                ds = AVSBenchDataset(root=data_root, subset=subset, split="train", num_frames=T, image_size=size,
                                     audio_source="embedding")
            loader = DataLoader(ds, batch_size=1, shuffle=False, num_workers=0, collate_fn=collate_skip_none)

            def run():
                for _ in loader:
                    pass

            sec = median_time(run, repeats=repeats, warmup=1)
            results[source] = {"seconds": sec, "clips_per_s": len(ds) / sec}
        return results
    finally:
        if tmp:
            tmp.cleanup()


# ------------------------------------------------------------------------------------------------
# the whole benchmark


def hardware_info(device: torch.device) -> dict[str, Any]:
    """Platform, CPU count, torch version, threads and (on CUDA) the GPU name."""
    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "device": str(device), "dtype": "float32"}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


TARGETS = {  # (key, bound, "<=" | ">=")
    "train_ratio": {"tpavi": 1.5, "ecmvae": 2.0, "avsbg": 1.5, "ecmvae_bg": 2.3},
    "inference_ratio": 1.5,
    "factorised_memory_fraction": 0.40,
    "loader_logmel_clips_per_s": 50.0,
    "metrics_frames_per_s": 1000.0,
}


def check_targets(res: dict[str, Any]) -> dict[str, Any]:
    """Each target: value, bound, met (targets are defined for CPU fp32, PVT-v2-b5, 224, T=5, B=1)."""
    out: dict[str, Any] = {}
    name = res["config"]["model"]

    def add(key, value, bound, op):
        if value is None or bound is None:
            return
        met = value <= bound if op == "<=" else value >= bound
        out[key] = {"value": value, "bound": bound, "op": op, "met": bool(met),
                    "margin": (bound - value) if op == "<=" else (value - bound)}

    r = res.get("ratios", {})
    add("train_step/backbone_fwdbwd", r.get("train_step/backbone_fwdbwd"), TARGETS["train_ratio"].get(name), "<=")
    add("infer_clip/backbone_fwd", r.get("infer_clip/backbone_fwd"), TARGETS["inference_ratio"], "<=")
    fus = res.get("comparisons", {}).get("fusion", {})
    if name == "ecmvae" and fus.get("memory_ratio_b_over_a") is not None:
        add("factorised/dense peak memory", fus["memory_ratio_b_over_a"], TARGETS["factorised_memory_fraction"], "<=")
    dl = res.get("data_loader", {}).get("logmel")
    if dl:
        add("loader logmel clips/s/worker", dl["clips_per_s"], TARGETS["loader_logmel_clips_per_s"], ">=")
    if res.get("metrics"):
        add("metrics frames/s", res["metrics"]["frames_per_s"], TARGETS["metrics_frames_per_s"], ">=")
    return out


def apply_quick(cfg: DictConfig) -> DictConfig:
    """`quick=true`: pvt_v2_b0, 64 px, 1 repeat, few clips and frames of data / metrics (used by the tests)."""
    from avs.config import CONFIG_DIR

    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.backbone = OmegaConf.load(Path(CONFIG_DIR) / "backbone" / "pvt_v2_b0.yaml")
        cfg.image_size = 64
        cfg.repeats = 1
        cfg.data_clips = 2
        cfg.metrics_frames = 5 * int(cfg.num_frames)
        cfg.metrics_size = 64
    return cfg


def run_benchmark(cfg: DictConfig) -> dict[str, Any]:
    """Every measurement of scripts/benchmark.py in one run -> a JSON-ready dict."""
    from avs.engine.params import parameter_report

    b = cfg
    device = torch.device(str(b.device))
    memory = bool(b.memory)
    base = OmegaConf.to_container(cfg, resolve=False)  # keeps model.audio_encoder -> ${audio} linked
    for key in ("hydra",):
        base.pop(key, None)
    spec0 = {"cfg": base, "device": str(device), "threads": torch.get_num_threads()}
    res: dict[str, Any] = {
        "hardware": hardware_info(device),
        "config": {"model": str(cfg.model.name), "backbone": str(cfg.backbone.name), "audio": str(cfg.audio._target_),
                   "image_size": int(b.image_size), "num_frames": int(b.num_frames), "batch_size": int(b.batch_size),
                   "repeats": int(b.repeats), "warmup": int(b.warmup), "quick": bool(cfg.quick),
                   "memory": memory, "model_cfg": OmegaConf.to_container(cfg.model, resolve=True)},
    }
    res["params"] = parameter_report(bench_model_config(cfg))
    log.info("backbone forward")
    fwd = measure({**spec0, "kinds": ["backbone_fwd"]}, memory=False)
    log.info("backbone forward+backward")
    fb = measure({**spec0, "kinds": ["backbone_fwdbwd"]}, memory=memory)
    log.info("train step")
    tr = measure({**spec0, "kinds": ["train_step"]}, memory=memory)
    log.info("inference")
    inf = measure({**spec0, "kinds": ["infer_clip"]}, memory=memory)
    T = int(b.num_frames)
    for r in (fwd, fb, tr, inf):
        if "error" in r:
            raise RuntimeError(f"benchmark measurement failed: {r['error']}")
    res["backbone"] = {"fwd_s": fwd["backbone_fwd"]["seconds"], "fwd_batch": 1,
                       "fwdbwd_s": fb["backbone_fwdbwd"]["seconds"], "fwdbwd_batch": int(b.batch_size),
                       "fwdbwd_peak_mb": fb.get("peak_mb")}
    res["train"] = {"step_s": tr["train_step"]["seconds"], "batch_size": int(b.batch_size), "peak_mb": tr.get("peak_mb"),
                    "note": "forward + backward + optimizer step (the trainer's Adam); loss = unweighted sum of the loss terms"}
    clip_s = inf["infer_clip"]["seconds"]
    res["inference"] = {"clip_s": clip_s, "frame_s": clip_s / T, "frames_per_s": T / clip_s, "batch_size": 1,
                        "peak_mb": inf.get("peak_mb")}
    res["memory"] = {"source": tr.get("memory_source", "not measured"), "backbone_train_mb": fb.get("peak_mb"),
                     "train_step_mb": tr.get("peak_mb"), "inference_mb": inf.get("peak_mb")}
    res["ratios"] = {"train_step/backbone_fwdbwd": res["train"]["step_s"] / res["backbone"]["fwdbwd_s"],
                     "infer_clip/backbone_fwd": clip_s / res["backbone"]["fwd_s"]}
    comps: dict[str, Any] = {}
    for name in list(b.compare):
        if name not in COMPARISONS:
            raise ConfigError(f"compare: unknown pair {name!r}; expected some of {sorted(COMPARISONS)}")
        la, lb = COMPARISONS[name]
        entry: dict[str, Any] = {"a": la, "b": lb}
        why = pair_applicable(cfg, name)
        if why:
            comps[name] = {**entry, "skipped": why}
            continue
        log.info("comparison %s: %s vs %s", name, la, lb)
        ov_a, rt_a, ov_b, rt_b = _pair_specs(name)
        if name == "compile":
            kinds = ["infer_clip"]
            ra = {"infer_clip": inf["infer_clip"]}
            rb = measure({**spec0, "kinds": kinds, "overrides": ov_b, "runtime": rt_b}, memory=False,
                         timeout=COMPILE_TIMEOUT_S)
            if "error" in rb:
                comps[name] = {**entry, "skipped": f"torch.compile: {rb['error']}"}
                continue
            entry["max_abs_diff"] = rb.get("max_abs_diff")
        else:
            kinds = ["train_step", "infer_clip"]
            ra = measure({**spec0, "kinds": kinds, "overrides": ov_a, "runtime": rt_a}, memory=memory)
            rb = measure({**spec0, "kinds": kinds, "overrides": ov_b, "runtime": rt_b}, memory=memory)
            bad = [r["error"] for r in (ra, rb) if "error" in r]
            if bad:
                comps[name] = {**entry, "skipped": "; ".join(bad)}
                continue
            entry["max_abs_diff"] = output_diff(cfg, name, device)
        for k in kinds:
            entry[k] = {"a_s": ra[k]["seconds"], "b_s": rb[k]["seconds"], "speedup_b": ra[k]["seconds"] / rb[k]["seconds"]}
        if ra.get("peak_mb") and rb.get("peak_mb"):
            entry["peak_mb"] = {"a": ra["peak_mb"], "b": rb["peak_mb"]}
            entry["memory_ratio_b_over_a"] = rb["peak_mb"] / ra["peak_mb"]
        comps[name] = entry
    res["comparisons"] = comps
    log.info("host syncs and graph breaks of a training step")
    sync_model = perturb_zero_init(build_bench_model(bench_model_config(cfg), device))
    sync_batch = make_batch(int(b.batch_size), T, int(b.image_size), "logmel", device, int(cfg.model.get("audio_dim", 128)))
    res["host_syncs"] = train_step_syncs(sync_model, sync_batch)
    if bool(b.get("graph_breaks", True)):
        res["graph_breaks"] = graph_breaks(sync_model, sync_batch)
    del sync_model
    res["data_loader"] = data_loader_throughput(cfg, int(b.data_clips), max(1, int(b.repeats)))
    res["metrics"] = metrics_throughput(num_frames=int(b.metrics_frames), size=int(b.metrics_size),
                                        clip_len=T, device=str(device))
    res["targets"] = check_targets(res)
    return res


def _f(v: Any, fmt: str = "{:.3f}") -> str:
    return "-" if v is None else fmt.format(v)


def format_report(res: dict[str, Any]) -> str:
    """Plain-text table of a run_benchmark result."""
    c = res["config"]
    L = [f"model={c['model']} backbone={c['backbone']} size={c['image_size']} T={c['num_frames']} "
         f"B={c['batch_size']} repeats={c['repeats']} device={res['hardware']['device']} "
         f"threads={res['hardware']['threads']}",
         f"{'measurement':<34}{'seconds':>10}{'peak MB':>10}{'ratio':>8}",
         f"{'backbone forward (B=1)':<34}{_f(res['backbone']['fwd_s']):>10}{'-':>10}{'':>8}",
         f"{'backbone forward+backward':<34}{_f(res['backbone']['fwdbwd_s']):>10}"
         f"{_f(res['backbone']['fwdbwd_peak_mb'], '{:.0f}'):>10}{'':>8}",
         f"{'train step (fwd+bwd+Adam)':<34}{_f(res['train']['step_s']):>10}{_f(res['train']['peak_mb'], '{:.0f}'):>10}"
         f"{_f(res['ratios']['train_step/backbone_fwdbwd'], '{:.2f}'):>8}",
         f"{'inference per clip (B=1)':<34}{_f(res['inference']['clip_s']):>10}{_f(res['inference']['peak_mb'], '{:.0f}'):>10}"
         f"{_f(res['ratios']['infer_clip/backbone_fwd'], '{:.2f}'):>8}",
         f"{'inference per frame':<34}{_f(res['inference']['frame_s']):>10}",
         "", f"{'pair (a vs b)':<40}{'train a/b s':>16}{'infer a/b s':>16}{'mem b/a':>9}{'max|diff|':>11}"]
    for name, e in res["comparisons"].items():
        label = f"{name}: {e['a']} vs {e['b']}"
        if "skipped" in e:
            L.append(f"{label:<40}skipped ({e['skipped'][:80]})")
            continue
        tr = e.get("train_step")
        inf = e.get("infer_clip")
        trs = f"{tr['a_s']:.3f}/{tr['b_s']:.3f}" if tr else "-"
        ins = f"{inf['a_s']:.3f}/{inf['b_s']:.3f}" if inf else "-"
        L.append(f"{label:<40}{trs:>16}{ins:>16}{_f(e.get('memory_ratio_b_over_a'), '{:.2f}'):>9}"
                 f"{_f(e.get('max_abs_diff'), '{:.1e}'):>11}")
    hs = res.get("host_syncs")
    if hs:
        L.append("")
        L.append(f"host syncs per training step: {hs['per_step']} {hs['kinds'] or ''}".rstrip())
    gb = res.get("graph_breaks")
    if gb:
        L.append(f"torch.compile training forward: {gb['error']}" if "error" in gb else
                 f"torch.compile training forward: {gb['graphs']} graph(s), {gb['breaks']} graph break(s)")
    dl = res["data_loader"]
    L.append("")
    L.append(f"data loader ({dl['clips']} clips, {dl['image_size']} px, num_workers=0 in-process): " + ", ".join(
        f"{s} {dl[s]['clips_per_s']:.1f} clips/s" for s in ("logmel", "wav", "embedding") if s in dl))
    m = res["metrics"]
    L.append(f"metrics: {m['frames']} frames of {m['size']}x{m['size']} -> {m['frames_per_s']:.0f} frames/s")
    if res.get("targets"):
        L.append("")
        for k, t in res["targets"].items():
            L.append(f"target {k}: {t['value']:.3f} {t['op']} {t['bound']} -> {'met' if t['met'] else 'MISSED'}")
    return "\n".join(L)
