"""Demo throughput (`demo=true`, docs/performance.md): frames per second of scripts/demo.py's first pass
(decode the video, wav -> log-mel -> audio encoder (VGGish by default), the model) and the share of
each, on a video generated here and a random-init model of the configured method. The demo's own
functions run; they are timed by wrapping the names avs.inference.demo calls (restored afterwards)
and by hooks on the model."""

from __future__ import annotations

import contextlib
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from avs.benchmark.models import bench_model_config, build_bench_model, perturb_zero_init

SHARES = (
    "probe + plan",
    "audio decode + resample",
    "video decode",
    "frame resize",
    "log-mel",
    "audio encoder",
    "model (excl. audio encoder)",
    "other",
)


def make_demo_video(path: Path, seconds: float, fps: int, size: tuple[int, int], seed: int = 0) -> Path:
    """An H.264/AAC mp4 (a moving disc over a gradient, a tone that swells and fades) like a user's video."""
    from avs.inference.video import require_av

    av = require_av()
    H, W = size
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:H, 0:W]
    base = np.stack([xx * 255 // max(1, W - 1), yy * 255 // max(1, H - 1), np.full_like(xx, 90)], -1).astype(np.uint8)
    sr, n = 16000, int(seconds * 16000)
    t = np.arange(n) / sr
    audio = (0.3 * np.sin(2 * np.pi * 440 * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 0.5 * t))).astype(np.float32)
    with av.open(str(path), "w") as c:
        vs = c.add_stream("libx264" if "libx264" in av.codecs_available else "mpeg4", rate=fps)
        vs.width, vs.height, vs.pix_fmt = W, H, "yuv420p"
        ast = c.add_stream("aac", rate=sr, layout="mono")
        for i in range(int(seconds * fps)):
            frame = base.copy()
            cy, cx = H // 2 + int(H / 4 * np.sin(i / fps)), int((i / max(1, seconds * fps)) * W)
            frame[(yy - cy) ** 2 + (xx - cx) ** 2 < (min(H, W) // 8) ** 2] = rng.integers(0, 255, 3)
            for p in vs.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                c.mux(p)
        for p in vs.encode():
            c.mux(p)
        af = av.AudioFrame.from_ndarray(audio[None], format="flt", layout="mono")
        af.sample_rate = sr
        for p in list(ast.encode(af)) + list(ast.encode()):
            c.mux(p)
    return path


class _Times:
    """Seconds per share of one pass, from wrapped demo functions and model hooks."""

    def __init__(self, sync) -> None:
        self.s: dict[str, float] = defaultdict(float)
        self.sync = sync
        self.t_model = self.t_vggish = 0.0

    @contextlib.contextmanager
    def timed(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.s[name] += time.perf_counter() - t0

    def wrap(self, fn, name: str):
        def timed(*args, **kwargs):
            with self.timed(name):
                return fn(*args, **kwargs)

        return timed

    def frames(self, gen_fn):
        def timed(*args, **kwargs) -> Iterator:
            it = iter(gen_fn(*args, **kwargs))
            while True:
                with self.timed("video decode"):
                    item = next(it, None)
                if item is None:
                    return
                yield item

        return timed


@contextlib.contextmanager
def _instrumented(model: torch.nn.Module, times: dict[str, _Times]):
    """Wrap what avs.inference.demo calls; `times['now']` is the pass being measured."""
    import avs.inference.demo as demo_mod

    def cur() -> _Times:
        return times["now"]

    originals = {n: getattr(demo_mod, n) for n in ("iter_frames", "to_model_frame", "window_logmel")}
    demo_mod.iter_frames = lambda *a, **k: cur().frames(originals["iter_frames"])(*a, **k)
    demo_mod.to_model_frame = lambda *a, **k: cur().wrap(originals["to_model_frame"], "frame resize")(*a, **k)
    demo_mod.window_logmel = lambda *a, **k: cur().wrap(originals["window_logmel"], "log-mel")(*a, **k)
    handles = []
    for mod, name in ((model, "model"), (model.audio_encoder, "vggish")):
        if mod is None:
            continue

        def pre(*_, name=name) -> None:
            cur().sync()
            setattr(cur(), f"t_{name}", time.perf_counter())

        def post(*_, name=name) -> None:
            cur().sync()
            key = "model (excl. audio encoder)" if name == "model" else "audio encoder"
            cur().s[key] += time.perf_counter() - getattr(cur(), f"t_{name}")

        handles += [mod.register_forward_pre_hook(pre), mod.register_forward_hook(post)]
    try:
        yield
    finally:
        for n, fn in originals.items():
            setattr(demo_mod, n, fn)
        for h in handles:
            h.remove()


def _one_pass(loaded, video: Path, times: dict[str, _Times], sync) -> tuple[_Times, Any]:
    """The demo's first pass as run_demo takes it: probe, audio, plan, then every window through the model."""
    from avs.inference.demo import _demo_audio, _demo_plan, predict_video
    from avs.inference.video import probe_video

    t = times["now"] = _Times(sync)
    t0 = time.perf_counter()
    with t.timed("probe + plan"):
        info = probe_video(video)
    with t.timed("audio decode + resample"):
        audio = _demo_audio({"short_audio": "silence"}, video, info)
    with t.timed("probe + plan"):
        plan = _demo_plan({"sampling": "avsbench"}, video, info, audio.samples16k.shape[0], loaded)
    predict_video(loaded, video, plan, audio.samples16k, lambda *a: None, batch_size=1, progress=False)
    sync()
    t.s["whole"] = time.perf_counter() - t0
    t.s["model (excl. audio encoder)"] -= t.s["audio encoder"]  # the model hook spans the audio encoder's
    t.s["other"] = t.s["whole"] - sum(t.s[k] for k in SHARES if k != "other")
    return t, (info, plan)


def _loaded(cfg: DictConfig, device: torch.device):
    from avs.inference.model import LoadedModel

    c = bench_model_config(cfg)
    model = perturb_zero_init(build_bench_model(c, device, int(cfg.get("seed", 0)))).eval()
    S = int(c.image_size)
    return LoadedModel(model, c, Path("random-init"), device, int(c.num_frames), (S, S)), c


def run_demo_benchmark(cfg: DictConfig) -> dict[str, Any]:
    """Median (over `repeats`, after `warmup`) of the demo's first pass on a generated video -> JSON-ready dict."""
    from avs.benchmark.probes import hardware_info
    from avs.benchmark.profile import pin_threads

    threads = pin_threads(cfg)
    device = torch.device(str(cfg.device))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    loaded, c = _loaded(cfg, device)
    size = tuple(int(v) for v in cfg.demo_size)
    with tempfile.TemporaryDirectory(prefix="avs_demo_bench_") as tmp:
        t0 = time.perf_counter()
        video = make_demo_video(Path(tmp) / "demo.mp4", float(cfg.demo_seconds), int(cfg.demo_fps), size)
        make_s = time.perf_counter() - t0
        times: dict[str, _Times] = {}
        with _instrumented(loaded.model, times):
            for _ in range(int(c.warmup)):
                _one_pass(loaded, video, times, sync)
            runs = [_one_pass(loaded, video, times, sync) for _ in range(max(1, int(c.repeats)))]
    wholes = [r[0].s["whole"] for r in runs]
    (t, (info, plan)) = sorted(runs, key=lambda r: r[0].s["whole"])[(len(runs) - 1) // 2]
    whole = t.s["whole"]
    return {
        "hardware": {**hardware_info(device), **threads},
        "config": {
            "model": str(c.model.name),
            "backbone": str(c.backbone.name),
            "audio": str(c.audio._target_),
            "image_size": int(c.image_size),
            "num_frames": int(c.num_frames),
            "repeats": int(c.repeats),
            "warmup": int(c.warmup),
            "video": {"seconds": float(cfg.demo_seconds), "fps": int(cfg.demo_fps), "size": list(size)},
            "sampling": "avsbench",
            "note": "the demo's first pass (batch_size=1); mask PNGs, overlay video and contact sheet not included",
        },
        "video_frames": info.num_frames,
        "analysed_frames": len(plan.slots),
        "windows": len(plan.windows),
        "whole_s": whole,
        "wholes_s": wholes,
        "median_whole_s": statistics.median(wholes),
        "video_frames_per_s": info.num_frames / whole,
        "analysed_frames_per_s": len(plan.slots) / whole,
        "realtime_factor": info.duration / whole,
        "shares": {k: {"seconds": t.s[k], "share": t.s[k] / whole} for k in SHARES},
        "video_generation_s": make_s,
    }


def format_demo_report(res: dict[str, Any]) -> str:
    """Plain-text table of a run_demo_benchmark result."""
    c, h = res["config"], res["hardware"]
    v = c["video"]
    L = [
        f"demo throughput: model={c['model']} backbone={c['backbone']} size={c['image_size']} T={c['num_frames']} "
        f"audio={c['audio'].rsplit('.', 1)[-1]} device={h['device']} threads={h['threads']} repeats={c['repeats']}",
        f"video {v['size'][1]}x{v['size'][0]} {v['fps']} fps {v['seconds']:.0f} s ({res['video_frames']} frames), "
        f"{c['sampling']} sampling: {res['analysed_frames']} analysed frames in {res['windows']} windows",
        f"{'share':<28}{'seconds':>10}{'share':>8}",
    ]
    for k, e in res["shares"].items():
        L.append(f"{k:<28}{e['seconds']:>10.3f}{e['share'] * 100:>7.1f}%")
    L.append(f"{'whole pass':<28}{res['whole_s']:>10.3f}")
    L.append(
        f"{res['video_frames_per_s']:.1f} video frames/s, {res['analysed_frames_per_s']:.2f} analysed frames/s, "
        f"{res['realtime_factor']:.2f}x real time"
    )
    return "\n".join(L)
