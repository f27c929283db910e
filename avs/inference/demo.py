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

from avs.data.audio import SAMPLE_RATE
from avs.evaluation.outputs import label_png_bytes
from avs.inference.model import LoadedModel, load_model
from avs.inference.overlay import OverlayVideoWriter, heatmap, image_grid, mask_to_size, save_png, tint
from avs.inference.semantic import (
    SlotLegend,
    blend_labels,
    class_names_for,
    legend_strip,
    present_classes,
    read_label_png,
)
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
from avs.utils.allocator import state as allocator_state
from avs.utils.io import atomic_write_bytes, atomic_write_text

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


class _WindowRunner:
    """Runs batches of windows through the model and frees each decoded frame once no pending window needs it."""

    def __init__(
        self, loaded: LoadedModel, plan: WindowPlan, samples16k: np.ndarray, on_slot, windows, progress: bool
    ) -> None:
        self.loaded, self.plan, self.samples16k = loaded, plan, samples16k
        self.need = Counter(f for w in windows for f in w.frames)
        self.frames: dict[int, torch.Tensor] = {}
        self.acc = _SlotAccumulator(plan, on_slot)
        self.bar = tqdm(total=len(windows), desc="windows", disable=not progress, dynamic_ncols=True)

    def keep(self, idx: int, rgb: np.ndarray) -> None:
        """Hold decoded frame `idx` (at model size) when some window reads it."""
        if self.need.get(idx, 0) > 0:
            self.frames[idx] = to_model_frame(rgb, self.loaded.image_size)

    def repeat_last(self, windows: list[Window], rgb: np.ndarray) -> None:
        """Give every frame of `windows` that was never decoded the last decoded frame `rgb`."""
        last_frame = to_model_frame(rgb, self.loaded.image_size)
        for w in windows:
            for f in w.frames:
                self.frames.setdefault(f, last_frame)

    def _forward(self, batch: list[Window]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Probabilities [B,T,H,W] (AVSS: class probabilities [B,T,C,H,W]) and variances [B,T,H,W] (or None)
        of a batch of windows."""
        loaded = self.loaded
        x = torch.stack([torch.stack([self.frames[f] for f in w.frames]) for w in batch])  # [B,T,3,H,W]
        logmels = [window_logmel(w, self.samples16k, self.plan.num_frames) for w in batch]
        a = torch.from_numpy(np.stack(logmels))  # [B,T,1,96,64]
        with torch.no_grad():
            out = loaded.model({"frames": x.to(loaded.device), "audio": a.to(loaded.device)})
        logits = out["logits"].float()
        if loaded.num_classes > 1:  # AVSS: softmax over the classes, averaged over windows like P(foreground)
            probs = torch.softmax(logits, dim=2).cpu()
        else:
            probs = torch.sigmoid(logits)[:, :, 0].cpu()  # [B,T,1,H,W] -> [B,T,H,W]
        var = out.get("variance")
        var = var.float()[:, :, 0].cpu() if var is not None else None
        return probs, var

    def run(self, batch: list[Window]) -> None:
        """Add the batch's predictions to their slots; drop the frames no later window reads."""
        probs, var = self._forward(batch)
        for b, w in enumerate(batch):
            for pos, key in enumerate(w.slots):
                if key is not None:
                    self.acc.add(key, probs[b, pos], None if var is None else var[b, pos])
            for f in w.frames:
                self.need[f] -= 1
                if self.need[f] == 0:
                    self.frames.pop(f, None)
        self.bar.update(len(batch))


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
    runner = _WindowRunner(loaded, plan, samples16k, on_slot, windows, progress)
    queue: list[Window] = []
    next_window = 0
    last: tuple[int, np.ndarray] | None = None
    for idx, rgb in iter_frames(video):
        last = (idx, rgb)
        runner.keep(idx, rgb)
        while next_window < len(windows) and max(windows[next_window].frames) <= idx:
            queue.append(windows[next_window])
            next_window += 1
            if len(queue) == batch_size:
                runner.run(queue)
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
        runner.repeat_last(windows[next_window:], last[1])
        queue += windows[next_window:]
    for i in range(0, len(queue), batch_size):
        runner.run(queue[i : i + batch_size])
    runner.bar.close()


def _display_size(width: int, height: int, max_size: int | None) -> tuple[int, int]:
    if max_size and max(width, height) > max_size:
        s = max_size / max(width, height)
        width, height = max(2, int(round(width * s))), max(2, int(round(height * s)))
    return height, width


@dataclass
class _DemoAudio:
    """The sound the demo feeds the model: as loaded, at 16 kHz fitted to the video, and where it came from."""

    samples: np.ndarray  # as loaded (muxed back into the overlay video)
    rate: int
    samples16k: np.ndarray  # resampled and fitted to the video's duration
    source: str
    seconds: float  # duration before fitting
    short_audio: str
    uncovered: tuple[float, float] | None  # seconds of video the audio did not reach


def _check_required(cfg: Mapping[str, Any]) -> None:
    if not cfg.get("video"):
        raise ValueError("video=PATH is required (the video file to segment)")
    if not cfg.get("checkpoint"):
        raise ValueError("checkpoint=PATH is required (an avs checkpoint, e.g. outputs/.../checkpoints/best.ckpt)")


def _demo_audio(cfg: Mapping[str, Any], video: Path, info: VideoInfo) -> _DemoAudio:
    """Load the audio (audio_file or the video's own track), resample to 16 kHz, fit it to the video."""
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
    audio_seconds = samples16k.shape[0] / float(SAMPLE_RATE)
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
    return _DemoAudio(samples, rate, samples16k, audio_source, audio_seconds, short_audio, uncovered)


def _demo_plan(
    cfg: Mapping[str, Any], video: Path, info: VideoInfo, audio_samples: int, loaded: LoadedModel
) -> WindowPlan:
    """The window plan over the video for the model's clip length (logged)."""
    plan = plan_windows(
        info.num_frames,
        info.fps,
        audio_samples,
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
    return plan


class _SlotWriter:
    """on_slot of predict_video: writes each finished slot's mask (and variance) PNG and keeps what the summary,
    the contact sheet and return_probs need."""

    def __init__(
        self,
        out: Path,
        stem: str,
        plan: WindowPlan,
        info: VideoInfo,
        image_size: tuple[int, int],
        threshold: float,
        mask_res: str,
        sampled: bool,
        return_probs: bool,
        tile_keys: list[int],
        num_classes: int = 1,
    ) -> None:
        H, W = image_size
        self.info, self.image_size, self.threshold, self.mask_res = info, (H, W), threshold, mask_res
        self.num_classes = num_classes  # > 1: AVSS, class ids as palette PNGs (threshold not used)
        self.classes: list[list[int]] = [[] for _ in plan.slots]  # AVSS: foreground classes per slot
        shape = (len(plan.slots), num_classes, H, W) if num_classes > 1 else (len(plan.slots), H, W)
        self.probs_all = np.zeros(shape, np.float32) if return_probs else None
        self.var_all = np.zeros((len(plan.slots), H, W), np.float32) if (return_probs and sampled) else None
        self.fg_fraction = [0.0] * len(plan.slots)
        self.mask_paths = [out / "masks" / f"{stem}_{s.key + 1}.png" for s in plan.slots]
        self.var_paths = [out / "variance" / f"{stem}_{s.key + 1}.png" for s in plan.slots] if sampled else []
        self.tile_keys = tile_keys
        self.tile_var: dict[int, np.ndarray] = {}

    def _at_output_resolution(self, prob: torch.Tensor) -> torch.Tensor:
        """[H,W] or [C,H,W] probabilities at the video's size (mask_resolution=video), bilinear."""
        size = (self.info.height, self.info.width)
        if self.mask_res == "video" and size != self.image_size:
            x = prob if prob.dim() == 3 else prob[None]
            x = F.interpolate(x[None], size=size, mode="bilinear", align_corners=False)[0]
            return x if prob.dim() == 3 else x[0]
        return prob

    def _write_mask(self, key: int, prob: torch.Tensor) -> None:
        """Binary: (P > threshold) * 255; AVSS: the argmax class ids as a palette PNG (label_png_bytes)."""
        if self.num_classes > 1:
            labels = self._at_output_resolution(prob).argmax(dim=0).numpy()  # ties go to the lower class
            self.classes[key] = present_classes([labels])
            self.fg_fraction[key] = float((labels != 0).mean())
            atomic_write_bytes(self.mask_paths[key], label_png_bytes(labels, self.num_classes))
            return
        mask = (self._at_output_resolution(prob) > self.threshold).numpy()
        self.fg_fraction[key] = float(mask.mean())
        save_png(self.mask_paths[key], mask.astype(np.uint8) * 255)

    def __call__(self, key: int, prob: torch.Tensor, var: torch.Tensor | None) -> None:
        self._write_mask(key, prob)
        if self.probs_all is not None:
            self.probs_all[key] = prob.numpy()
        if var is not None:
            v = var.numpy()
            save_png(self.var_paths[key], (np.clip(v / VARIANCE_MAX, 0, 1) * 255).round().astype(np.uint8))
            if self.var_all is not None:
                self.var_all[key] = v
            if key in self.tile_keys:
                self.tile_var[key] = v


def run_demo(cfg: Mapping[str, Any], out_dir: str | Path, return_probs: bool = False) -> DemoResult:
    """Segment the sounding objects of `cfg.video` with `cfg.checkpoint`; write everything under `out_dir`.

    Keys (configs/demo.yaml): video, checkpoint, audio_file, short_audio, sampling, stride, dense_spacing, num_samples,
    batch_size, device, threshold, seed, mask_resolution, overlay.{enabled,color,alpha,max_size,crf},
    contact_sheet.{columns,max_tiles,tile_height}, progress.
    """
    _check_required(cfg)
    out = Path(out_dir)
    video = Path(str(cfg["video"])).expanduser()
    progress = bool(_opt(cfg, "progress", True))
    threshold = float(_opt(cfg, "threshold", 0.5))
    mask_res = str(_opt(cfg, "mask_resolution", "model"))
    if mask_res not in ("model", "video"):
        raise ValueError(f"mask_resolution must be 'model' or 'video', got {mask_res!r}")

    info = probe_video(video)
    audio = _demo_audio(cfg, video, info)
    num_samples = int(_opt(cfg, "num_samples", 1))
    loaded = load_model(str(cfg["checkpoint"]), _opt(cfg, "device", "auto"), num_samples)
    plan = _demo_plan(cfg, video, info, audio.samples16k.shape[0], loaded)

    sampled = num_samples > 1 and loaded.has_latent
    tile_keys = _tile_keys(len(plan.slots), int(_opt(_opt(cfg, "contact_sheet", {}), "max_tiles", 20)))
    C = loaded.num_classes
    slots = _SlotWriter(
        out, video.stem, plan, info, loaded.image_size, threshold, mask_res, sampled, return_probs, tile_keys, C
    )
    torch.manual_seed(int(_opt(cfg, "seed", 0)))
    predict_video(loaded, video, plan, audio.samples16k, slots, int(_opt(cfg, "batch_size", 1)), progress)

    result = DemoResult(
        out, plan, info, slots.mask_paths, slots.var_paths, probs=slots.probs_all, variance_maps=slots.var_all
    )
    semantic = (C, class_names_for(loaded.cfg.data), slots.classes) if C > 1 else None
    _write_visuals(
        cfg, result, video, video.stem, audio.samples, audio.rate, tile_keys, slots.tile_var, progress, semantic
    )
    summary = _summary(result, video, audio, loaded, slots, num_samples if sampled else 1)
    result.summary = out / "demo.json"
    atomic_write_text(result.summary, json.dumps(summary, indent=2))
    return result


def _summary(
    result: DemoResult, video: Path, audio: _DemoAudio, loaded: LoadedModel, slots: _SlotWriter, num_samples: int
) -> dict[str, Any]:
    """The contents of demo.json: inputs, model, plan, options and one entry per analysed frame."""
    plan, info, out = result.plan, result.info, result.out_dir
    return {
        "video": str(video),
        "audio": audio.source,
        "checkpoint": str(loaded.checkpoint),
        "method": loaded.method,
        "backbone": str(loaded.cfg.backbone.get("name", "")),
        "num_frames": plan.num_frames,
        "image_size": list(loaded.image_size),
        "sampling": plan.sampling,
        "fps": info.fps,
        "video_frames": info.num_frames,
        "duration_s": info.duration,
        "audio_duration_s": audio.seconds,
        "short_audio": audio.short_audio,
        "audio_uncovered_s": [round(t, 4) for t in audio.uncovered] if audio.uncovered is not None else None,
        "windows": len(plan.windows),
        "num_samples": num_samples,
        "threshold": slots.threshold if slots.num_classes == 1 else None,  # AVSS: argmax over the classes
        "num_classes": slots.num_classes,
        "mask_resolution": slots.mask_res,
        "slots": [
            {
                "k": s.key + 1,
                "frame": s.frame,
                "time_s": round(s.time, 4),
                "mask": str(slots.mask_paths[i].relative_to(out)),
                "foreground_fraction": round(slots.fg_fraction[i], 5),
                **({"classes": slots.classes[i]} if slots.num_classes > 1 else {}),
            }
            for i, s in enumerate(plan.slots)
        ],
        "overlay_video": str(result.overlay_video) if result.overlay_video else None,
        "contact_sheet": str(result.contact_sheet) if result.contact_sheet else None,
        "allocator": allocator_state(),  # runtime.allocator: what this process's allocator ran with
    }


def _tile_keys(num_slots: int, max_tiles: int) -> list[int]:
    if num_slots <= max_tiles:
        return list(range(num_slots))
    return sorted({int(round(x)) for x in np.linspace(0, num_slots - 1, max(1, max_tiles))})


class _DisplayMasks:
    """A slot's mask PNG at display size (AVSS: its class ids); the last one read is kept (consecutive frames
    share a slot)."""

    def __init__(self, paths: list[Path], size: tuple[int, int], semantic: bool = False) -> None:
        self.paths, self.size, self.semantic = paths, size, semantic
        self.cached: tuple[int, np.ndarray] | None = None

    def __getitem__(self, slot: int) -> np.ndarray:
        if self.cached is None or self.cached[0] != slot:
            if self.semantic:
                self.cached = (slot, read_label_png(self.paths[slot], self.size))
                return self.cached[1]
            with Image.open(self.paths[slot]) as im:
                self.cached = (slot, mask_to_size(np.asarray(im) > 127, self.size))
        return self.cached[1]


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
    semantic: tuple[int, list[str], list[list[int]]] | None = None,
) -> None:
    """Pass 2: overlay video (with audio) and contact sheet. `semantic` (AVSS): (num_classes, class names, classes
    per slot): the classes are drawn in the palette (overlay.color is not used), the video frames get a legend
    strip of their slot's classes below them, the contact sheet one of all classes it shows."""
    info, out = result.info, result.out_dir
    ocfg = _opt(cfg, "overlay", {})
    scfg = _opt(cfg, "contact_sheet", {})
    color = tuple(int(c) for c in _opt(ocfg, "color", (255, 40, 120)))
    alpha = float(_opt(ocfg, "alpha", 0.5))
    write_video = bool(_opt(ocfg, "enabled", True))
    write_sheet = bool(_opt(scfg, "enabled", True))
    if not (write_video or write_sheet):
        return
    disp = _display_size(info.width, info.height, ocfg.get("max_size") if hasattr(ocfg, "get") else None)
    masks = _DisplayMasks(result.masks, disp, semantic is not None)
    legend = None if semantic is None else SlotLegend(semantic[2], semantic[1], semantic[0], disp[1])

    def paint(rgb: np.ndarray, slot: int) -> np.ndarray:
        if semantic is None:
            return tint(rgb, masks[slot], color, alpha)
        return blend_labels(rgb, masks[slot], semantic[0], alpha)

    writer = None
    if write_video:
        writer = OverlayVideoWriter(
            out / f"{stem}_overlay.mp4",
            info.rate or info.fps,
            disp if legend is None else (disp[0] + legend.height, disp[1]),
            audio=samples,
            sample_rate=rate,
            crf=int(_opt(ocfg, "crf", 20)),
        )
    tiles, last = _overlay_pass(video, result, disp, writer, paint, tile_keys, progress, legend)
    if writer is not None:
        result.overlay_video = writer.close()
    if not write_sheet or last is None:
        return
    for k in tile_keys:  # tiles whose frame was never decoded (fewer frames than packets)
        if k not in tiles:
            tiles[k] = (last, paint(last, k))
    columns = max(1, int(_opt(scfg, "columns", 5)))
    sheet = _contact_sheet(result.plan, tile_keys, tiles, tile_var, columns, int(_opt(scfg, "tile_height", 160)))
    if semantic is not None:  # a legend of every class the sheet shows
        C, names, classes = semantic
        shown = sorted({c for k in tile_keys for c in classes[k]})
        sheet = np.concatenate([sheet, legend_strip(shown, names, C, sheet.shape[1])], axis=0)
    result.contact_sheet = save_png(out / "contact_sheet.png", sheet)


def _overlay_pass(
    video: Path,
    result: DemoResult,
    disp: tuple[int, int],
    writer: OverlayVideoWriter | None,
    paint,
    tile_keys: list[int],
    progress: bool,
    legend: SlotLegend | None = None,
) -> tuple[dict[int, tuple[np.ndarray, np.ndarray]], np.ndarray | None]:
    """Decode the video at display size, write each frame tinted with its slot's mask (when `writer` is given;
    AVSS: with its `legend` strip below) and keep the frames of the contact sheet. Returns {slot: (frame, tinted
    frame)} and the last decoded frame."""
    plan, info = result.plan, result.info
    tile_frames = {plan.slots[k].frame: k for k in tile_keys}
    tiles: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    last: np.ndarray | None = None
    try:
        for idx, rgb in tqdm(
            iter_frames(video, disp), total=info.num_frames, desc="overlay", disable=not progress, dynamic_ncols=True
        ):
            last = rgb
            if writer is None and len(tiles) == len(tile_frames):
                break
            slot = plan.slot_for_frame(idx)
            over = paint(rgb, slot)
            if writer is not None:
                writer.write(over if legend is None else legend.under(over, slot))
            if idx in tile_frames:
                tiles[tile_frames[idx]] = (rgb, over)
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    return tiles, last


def _contact_sheet(
    plan: WindowPlan,
    tile_keys: list[int],
    tiles: dict[int, tuple[np.ndarray, np.ndarray]],
    tile_var: dict[int, np.ndarray],
    columns: int,
    tile_height: int,
) -> np.ndarray:
    """Rows frame / prediction [/ variance] per group of `columns` tiles, labelled with the slots' times."""
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
    return image_grid(rows, col_labels=labels, row_labels=row_labels, tile_height=tile_height)
