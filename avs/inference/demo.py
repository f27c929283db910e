"""Run a trained checkpoint on a video: masks per analysed frame, an overlay video with sound, a contact sheet.

Pass 1 streams the decoded frames through the window plan (avs.inference.video) and the model,
writing each mask as soon as every window covering it has run (memory stays bounded by the
frames of the windows in flight). Pass 2 decodes the video again and writes the overlay video
(mask of each frame's slot tinted over it, audio muxed back) and the contact sheet.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from avs.inference.model import LoadedModel, load_model
from avs.inference.overlay import OverlayVideoWriter, heatmap, image_grid, mask_to_size, save_png, tint
from avs.inference.video import (
    VideoError,
    VideoInfo,
    Window,
    WindowPlan,
    audio_to_16k,
    check_duration,
    fit_audio_to_video,
    iter_frames,
    load_audio,
    load_video_audio,
    plan_windows,
    probe_video,
    seconds_label,
    to_model_frame,
    window_logmel,
)
from avs.utils.io import atomic_write_text

log = logging.getLogger(__name__)

__all__ = ["DemoResult", "run_demo", "predict_video"]

VARIANCE_MAX = 0.25  # the largest variance of a probability in [0, 1]


@dataclass
class DemoResult:
    """Where the demo wrote its outputs, the plan it followed and (optionally) the probabilities."""

    out_dir: Path
    plan: WindowPlan
    info: VideoInfo
    masks: list[Path]
    variance: list[Path] = field(default_factory=list)
    overlay_video: Path | None = None
    contact_sheet: Path | None = None
    summary: Path | None = None
    probs: np.ndarray | None = None  # float32 [num_slots,H,W] at model resolution (return_probs=True)
    variance_maps: np.ndarray | None = None  # float32 [num_slots,H,W] when K > 1 and return_probs


def _opt(cfg: Mapping[str, Any], key: str, default: Any) -> Any:
    value = cfg.get(key, default) if hasattr(cfg, "get") else default
    return default if value is None else value


class _SlotAccumulator:
    """Averages probabilities (and variances) over the windows covering each slot; finalises when complete."""

    def __init__(self, plan: WindowPlan, on_done) -> None:
        self.plan = plan
        self.on_done = on_done
        self.sums: dict[int, list] = {}

    def add(self, key: int, prob: torch.Tensor, var: torch.Tensor | None) -> None:
        entry = self.sums.setdefault(key, [torch.zeros_like(prob), None if var is None else torch.zeros_like(var), 0])
        entry[0] += prob
        if var is not None:
            entry[1] += var
        entry[2] += 1
        if entry[2] == self.plan.coverage[key]:
            del self.sums[key]
            n = float(entry[2])
            self.on_done(key, entry[0] / n, None if entry[1] is None else entry[1] / n)


def predict_video(
    loaded: LoadedModel,
    video: Path,
    plan: WindowPlan,
    samples16k: np.ndarray,
    on_slot,
    batch_size: int = 1,
    progress: bool = True,
) -> None:
    """Run every window of `plan` on the decoded frames; call on_slot(key, prob [H,W], var [H,W] | None) per slot."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    windows = sorted(plan.windows, key=lambda w: max(w.frames))
    need = Counter(f for w in windows for f in w.frames)
    frames: dict[int, torch.Tensor] = {}
    acc = _SlotAccumulator(plan, on_slot)
    size = loaded.image_size
    bar = tqdm(total=len(windows), desc="windows", disable=not progress, dynamic_ncols=True)

    def run(batch: list[Window]) -> None:
        x = torch.stack([torch.stack([frames[f] for f in w.frames]) for w in batch])  # [B,T,3,H,W]
        a = torch.from_numpy(np.stack([window_logmel(w, samples16k, plan.num_frames) for w in batch]))  # [B,T,1,96,64]
        with torch.no_grad():
            out = loaded.model({"frames": x.to(loaded.device), "audio": a.to(loaded.device)})
        probs = torch.sigmoid(out["logits"].float())[:, :, 0].cpu()  # [B,T,1,H,W] -> [B,T,H,W]
        var = out.get("variance")
        var = var.float()[:, :, 0].cpu() if var is not None else None
        for b, w in enumerate(batch):
            for pos, key in enumerate(w.slots):
                if key is not None:
                    acc.add(key, probs[b, pos], None if var is None else var[b, pos])
            for f in w.frames:
                need[f] -= 1
                if need[f] == 0:
                    frames.pop(f, None)
        bar.update(len(batch))

    queue: list[Window] = []
    next_window = 0
    last: tuple[int, np.ndarray] | None = None
    for idx, rgb in iter_frames(video):
        last = (idx, rgb)
        if need.get(idx, 0) > 0:
            frames[idx] = to_model_frame(rgb, size)
        while next_window < len(windows) and max(windows[next_window].frames) <= idx:
            queue.append(windows[next_window])
            next_window += 1
            if len(queue) == batch_size:
                run(queue)
                queue = []
    if last is None:
        raise VideoError(f"{video}: no frame could be decoded")
    if next_window < len(windows):  # the stream decoded to fewer frames than it has packets
        log.warning(
            "%s: decoded %d frames, fewer than the %d packets; later frames repeat the last one",
            video,
            last[0] + 1,
            plan.video_frames,
        )
        last_frame = to_model_frame(last[1], size)
        for w in windows[next_window:]:
            for f in w.frames:
                frames.setdefault(f, last_frame)
        queue += windows[next_window:]
    for i in range(0, len(queue), batch_size):
        run(queue[i : i + batch_size])
    bar.close()


def _display_size(width: int, height: int, max_size: int | None) -> tuple[int, int]:
    if max_size and max(width, height) > max_size:
        s = max_size / max(width, height)
        width, height = max(2, int(round(width * s))), max(2, int(round(height * s)))
    return height, width


def run_demo(cfg: Mapping[str, Any], out_dir: str | Path, return_probs: bool = False) -> DemoResult:
    """Segment the sounding objects of `cfg.video` with `cfg.checkpoint`; write everything under `out_dir`.

    Keys (configs/demo.yaml): video, checkpoint, audio_file, short_audio, sampling, stride, dense_spacing, num_samples,
    batch_size, device, threshold, seed, mask_resolution, overlay.{enabled,color,alpha,max_size,crf},
    contact_sheet.{columns,max_tiles,tile_height}, progress.
    """
    if not cfg.get("video"):
        raise ValueError("video=PATH is required (the video file to segment)")
    if not cfg.get("checkpoint"):
        raise ValueError("checkpoint=PATH is required (an avs checkpoint, e.g. outputs/.../checkpoints/best.ckpt)")
    out = Path(out_dir)
    video = Path(str(cfg["video"])).expanduser()
    progress = bool(_opt(cfg, "progress", True))
    threshold = float(_opt(cfg, "threshold", 0.5))
    mask_res = str(_opt(cfg, "mask_resolution", "model"))
    if mask_res not in ("model", "video"):
        raise ValueError(f"mask_resolution must be 'model' or 'video', got {mask_res!r}")

    info = probe_video(video)
    if cfg.get("audio_file"):
        samples, rate = load_audio(str(cfg["audio_file"]))
        audio_source = str(cfg["audio_file"])
    else:
        if not info.has_audio:
            raise VideoError(f"{video}: the video has no audio track; give a separate audio file with audio_file=PATH")
        samples, rate = load_video_audio(video)
        audio_source = str(video)
    samples16k = audio_to_16k(samples, rate)
    check_duration(info.num_frames, info.fps, samples16k.shape[0], str(video), audio_source)
    audio_seconds = samples16k.shape[0] / 16000.0
    short_audio = str(_opt(cfg, "short_audio", "silence"))
    # within one video frame counts as covering the video (container and codec rounding)
    samples16k, uncovered = fit_audio_to_video(samples16k, info.duration, short_audio, audio_source, 1.0 / info.fps)
    if uncovered is not None:
        log.warning(
            "%s: the audio (%.2f s) is shorter than the video (%.2f s): seconds %.2f-%.2f have no sound; %s",
            audio_source,
            audio_seconds,
            info.duration,
            *uncovered,
            "they get silence (short_audio=silence; short_audio=repeat reuses the last 0.975 s of audio)"
            if short_audio == "silence"
            else "they reuse the last 0.975 s of audio (short_audio=repeat)",
        )

    num_samples = int(_opt(cfg, "num_samples", 1))
    loaded = load_model(str(cfg["checkpoint"]), _opt(cfg, "device", "auto"), num_samples)
    plan = plan_windows(
        info.num_frames,
        info.fps,
        samples16k.shape[0],
        loaded.num_frames,
        sampling=str(_opt(cfg, "sampling", "avsbench")),
        stride=cfg.get("stride"),
        spacing=float(_opt(cfg, "dense_spacing", 1.0)),
        source=str(video),
    )
    log.info(
        "%s: %d frames at %.3f fps (%.2f s); %s sampling -> %d analysed frames in %d windows of T=%d",
        video,
        info.num_frames,
        info.fps,
        info.duration,
        plan.sampling,
        len(plan.slots),
        len(plan.windows),
        plan.num_frames,
    )

    stem = video.stem
    masks_dir, var_dir = out / "masks", out / "variance"
    H, W = loaded.image_size
    probs_all = np.zeros((len(plan.slots), H, W), np.float32) if return_probs else None
    sampled = num_samples > 1 and loaded.has_latent
    var_all = np.zeros((len(plan.slots), H, W), np.float32) if (return_probs and sampled) else None
    fg_fraction = [0.0] * len(plan.slots)
    mask_paths = [masks_dir / f"{stem}_{s.key + 1}.png" for s in plan.slots]
    var_paths = [var_dir / f"{stem}_{s.key + 1}.png" for s in plan.slots] if sampled else []
    tile_keys = _tile_keys(len(plan.slots), int(_opt(_opt(cfg, "contact_sheet", {}), "max_tiles", 20)))
    tile_var: dict[int, np.ndarray] = {}

    def on_slot(key: int, prob: torch.Tensor, var: torch.Tensor | None) -> None:
        if mask_res == "video" and (info.height, info.width) != (H, W):
            prob_out = F.interpolate(
                prob[None, None], size=(info.height, info.width), mode="bilinear", align_corners=False
            )[0, 0]
        else:
            prob_out = prob
        mask = (prob_out > threshold).numpy()
        fg_fraction[key] = float(mask.mean())
        save_png(mask_paths[key], mask.astype(np.uint8) * 255)
        if probs_all is not None:
            probs_all[key] = prob.numpy()
        if var is not None:
            v = var.numpy()
            save_png(var_paths[key], (np.clip(v / VARIANCE_MAX, 0, 1) * 255).round().astype(np.uint8))
            if var_all is not None:
                var_all[key] = v
            if key in tile_keys:
                tile_var[key] = v

    torch.manual_seed(int(_opt(cfg, "seed", 0)))
    predict_video(loaded, video, plan, samples16k, on_slot, int(_opt(cfg, "batch_size", 1)), progress)

    result = DemoResult(out, plan, info, mask_paths, var_paths, probs=probs_all, variance_maps=var_all)
    _write_visuals(cfg, result, video, stem, samples, rate, tile_keys, tile_var, progress)
    summary = {
        "video": str(video),
        "audio": audio_source,
        "checkpoint": str(loaded.checkpoint),
        "method": loaded.method,
        "backbone": str(loaded.cfg.backbone.get("name", "")),
        "num_frames": plan.num_frames,
        "image_size": [H, W],
        "sampling": plan.sampling,
        "fps": info.fps,
        "video_frames": info.num_frames,
        "duration_s": info.duration,
        "audio_duration_s": audio_seconds,
        "short_audio": short_audio,
        "audio_uncovered_s": [round(t, 4) for t in uncovered] if uncovered is not None else None,
        "windows": len(plan.windows),
        "num_samples": num_samples if sampled else 1,
        "threshold": threshold,
        "mask_resolution": mask_res,
        "slots": [
            {
                "k": s.key + 1,
                "frame": s.frame,
                "time_s": round(s.time, 4),
                "mask": str(mask_paths[i].relative_to(out)),
                "foreground_fraction": round(fg_fraction[i], 5),
            }
            for i, s in enumerate(plan.slots)
        ],
        "overlay_video": str(result.overlay_video) if result.overlay_video else None,
        "contact_sheet": str(result.contact_sheet) if result.contact_sheet else None,
    }
    result.summary = out / "demo.json"
    atomic_write_text(result.summary, json.dumps(summary, indent=2))
    return result


def _tile_keys(num_slots: int, max_tiles: int) -> list[int]:
    if num_slots <= max_tiles:
        return list(range(num_slots))
    return sorted({int(round(x)) for x in np.linspace(0, num_slots - 1, max(1, max_tiles))})


def _write_visuals(
    cfg,
    result: DemoResult,
    video: Path,
    stem: str,
    samples: np.ndarray,
    rate: int,
    tile_keys: list[int],
    tile_var: dict[int, np.ndarray],
    progress: bool,
) -> None:
    """Pass 2: overlay video (with audio) and contact sheet."""
    plan, info, out = result.plan, result.info, result.out_dir
    ocfg = _opt(cfg, "overlay", {})
    scfg = _opt(cfg, "contact_sheet", {})
    color = tuple(int(c) for c in _opt(ocfg, "color", (255, 40, 120)))
    alpha = float(_opt(ocfg, "alpha", 0.5))
    write_video = bool(_opt(ocfg, "enabled", True))
    write_sheet = bool(_opt(scfg, "enabled", True))
    if not (write_video or write_sheet):
        return
    disp = _display_size(info.width, info.height, ocfg.get("max_size") if hasattr(ocfg, "get") else None)
    tile_frames = {plan.slots[k].frame: k for k in tile_keys}
    tiles: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    cached: tuple[int, np.ndarray] | None = None

    def mask_of(slot: int) -> np.ndarray:
        nonlocal cached
        if cached is None or cached[0] != slot:
            with Image.open(result.masks[slot]) as im:
                cached = (slot, mask_to_size(np.asarray(im) > 127, disp))
        return cached[1]

    writer = None
    if write_video:
        writer = OverlayVideoWriter(
            out / f"{stem}_overlay.mp4",
            info.rate or info.fps,
            disp,
            audio=samples,
            sample_rate=rate,
            crf=int(_opt(ocfg, "crf", 20)),
        )
    last: tuple[int, np.ndarray] | None = None
    try:
        for idx, rgb in tqdm(
            iter_frames(video, disp), total=info.num_frames, desc="overlay", disable=not progress, dynamic_ncols=True
        ):
            last = (idx, rgb)
            if writer is None and len(tiles) == len(tile_frames):
                break
            slot = plan.slot_for_frame(idx)
            over = tint(rgb, mask_of(slot), color, alpha)
            if writer is not None:
                writer.write(over)
            if idx in tile_frames:
                tiles[tile_frames[idx]] = (rgb, over)
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    if writer is not None:
        result.overlay_video = writer.close()
    if not write_sheet or last is None:
        return
    for k in tile_keys:  # tiles whose frame was never decoded (fewer frames than packets)
        if k not in tiles:
            tiles[k] = (last[1], tint(last[1], mask_of(k), color, alpha))
    columns = max(1, int(_opt(scfg, "columns", 5)))
    th = int(_opt(scfg, "tile_height", 160))
    rows, row_labels, col_groups = [], [], []
    for g in range(0, len(tile_keys), columns):
        group = tile_keys[g : g + columns]
        rows.append([tiles[k][0] for k in group])
        row_labels.append("frame")
        rows.append([tiles[k][1] for k in group])
        row_labels.append("prediction")
        if tile_var:
            rows.append([heatmap(tile_var[k], VARIANCE_MAX) if k in tile_var else np.zeros((2, 2)) for k in group])
            row_labels.append("variance")
        col_groups.append(group)
    labels = [seconds_label(plan.slots[k].time) for k in col_groups[0]]
    if len(col_groups) > 1:  # one label row per group: put the times into the row labels instead
        labels = None
        row_labels = []
        per = 3 if tile_var else 2
        for group in col_groups:
            span = f"{seconds_label(plan.slots[group[0]].time)}-{seconds_label(plan.slots[group[-1]].time)}"
            row_labels += [f"frame {span}", "prediction"] + (["variance"] if per == 3 else [])
    sheet = image_grid(rows, col_labels=labels, row_labels=row_labels, tile_height=th)
    result.contact_sheet = save_png(out / "contact_sheet.png", sheet)
