"""Mask overlays, heat maps, labelled image grids (contact sheets) and the overlay video writer."""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image

from avs.data.audio import SAMPLE_RATE
from avs.utils.io import atomic_write_bytes

__all__ = [
    "tint",
    "heatmap",
    "mask_to_size",
    "image_grid",
    "png_bytes",
    "save_png",
    "scatter_plot",
    "OverlayVideoWriter",
]

_BG = (24, 24, 24)
_FG = (235, 235, 235)
_PALETTE = [(255, 99, 71), (65, 160, 255), (80, 200, 120), (255, 200, 40), (190, 110, 255), (0, 200, 200)]


def tint(
    rgb: np.ndarray, mask: np.ndarray, color: Sequence[int] = (255, 40, 120), alpha: float = 0.5, outline: bool = True
) -> np.ndarray:
    """Blend `color` over the foreground of bool mask [H,W] on uint8 RGB [H,W,3] (+ 1-px outline) -> uint8 [H,W,3]."""
    if rgb.shape[:2] != mask.shape[:2]:
        raise ValueError(f"tint: image {rgb.shape[:2]} and mask {mask.shape[:2]} differ in size")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"overlay alpha must be in [0, 1], got {alpha}")
    out = rgb.astype(np.float32)
    col = np.asarray(color, dtype=np.float32).reshape(1, 3)
    m = mask.astype(bool)
    out[m] = (1.0 - alpha) * out[m] + alpha * col
    out = np.ascontiguousarray(out.round().clip(0, 255).astype(np.uint8))
    if outline and m.any():
        contours, _ = cv2.findContours(m.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(out, contours, -1, tuple(int(c) for c in color), 1)
    return out


def heatmap(values: np.ndarray, vmax: float = 1.0) -> np.ndarray:
    """Float [H,W] in [0, vmax] -> uint8 RGB [H,W,3] (inferno colour map)."""
    scaled = np.clip(np.asarray(values, dtype=np.float32) / max(vmax, 1e-12), 0.0, 1.0)
    bgr = cv2.applyColorMap((scaled * 255.0).round().astype(np.uint8), cv2.COLORMAP_INFERNO)
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def mask_to_size(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """bool/uint8 mask [h,w] -> bool [H,W]: bilinear on 0/255 then > 127 (smooth edges when upscaling)."""
    m = mask.astype(np.uint8) * (255 if mask.dtype == bool or mask.max() <= 1 else 1)
    if m.shape[:2] != tuple(size):
        m = cv2.resize(m, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)
    return m > 127


def _to_rgb(img: np.ndarray) -> np.ndarray:
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    if img.dtype != np.uint8:
        img = (np.clip(img, 0.0, 1.0) * 255.0).round().astype(np.uint8)
    return img


def _label(width: int, text: str, height: int = 18) -> np.ndarray:
    bar = np.full((height, width, 3), _BG, dtype=np.uint8)
    scale = 0.4
    (tw, th), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
    x = max(0, (width - tw) // 2)
    cv2.putText(bar, text, (x, (height + th) // 2), cv2.FONT_HERSHEY_SIMPLEX, scale, _FG, 1, cv2.LINE_AA)
    return bar


def image_grid(
    rows: Sequence[Sequence[np.ndarray]],
    col_labels: Sequence[str] | None = None,
    row_labels: Sequence[str] | None = None,
    tile_height: int | None = None,
    pad: int = 2,
) -> np.ndarray:
    """Grid of images (rows x cols; uint8 RGB, gray, or float in [0,1]) with optional labels -> uint8 [H,W,3].

    Every tile is resized to the height of the first tile (or `tile_height`), keeping its aspect ratio.
    """
    if not rows or not rows[0]:
        raise ValueError("image_grid needs at least one tile")
    th = int(tile_height or rows[0][0].shape[0])
    ncols = max(len(r) for r in rows)
    tiles = [[_to_rgb(t) for t in r] for r in rows]
    tw = max(int(round(t.shape[1] * th / t.shape[0])) for r in tiles for t in r)

    def fit(img: np.ndarray) -> np.ndarray:
        w = int(round(img.shape[1] * th / img.shape[0]))
        if img.shape[:2] != (th, w):
            interp = cv2.INTER_AREA if img.shape[0] > th else cv2.INTER_NEAREST
            img = cv2.resize(img, (w, th), interpolation=interp)
        canvas = np.full((th, tw, 3), _BG, dtype=np.uint8)
        canvas[:, :w] = img
        return canvas

    label_w = 0
    if row_labels:
        label_w = max(cv2.getTextSize(s, cv2.FONT_HERSHEY_SIMPLEX, 0.4, 1)[0][0] for s in row_labels) + 8
    lines = []
    if col_labels:
        head = [np.full((18, label_w, 3), _BG, np.uint8)] if label_w else []
        for c in range(ncols):
            text = col_labels[c] if c < len(col_labels) else ""
            head += [np.full((18, pad, 3), _BG, np.uint8), _label(tw, text)]
        lines.append(np.concatenate(head, axis=1))
    for r, row in enumerate(tiles):
        parts = []
        if label_w:
            parts.append(_row_label(label_w, th, row_labels[r] if r < len(row_labels) else ""))
        for c in range(ncols):
            parts.append(np.full((th, pad, 3), _BG, np.uint8))
            parts.append(fit(row[c]) if c < len(row) else np.full((th, tw, 3), _BG, np.uint8))
        lines.append(np.full((pad, sum(p.shape[1] for p in parts), 3), _BG, np.uint8))
        lines.append(np.concatenate(parts, axis=1))
    width = max(line.shape[1] for line in lines)
    lines = [np.pad(line, ((0, 0), (0, width - line.shape[1]), (0, 0)), constant_values=_BG[0]) for line in lines]
    return np.ascontiguousarray(np.concatenate(lines, axis=0))


def _row_label(width: int, height: int, text: str) -> np.ndarray:
    bar = np.full((height, width, 3), _BG, dtype=np.uint8)
    (_, th), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, 0.4, 1)
    cv2.putText(bar, text, (3, (height + th) // 2), cv2.FONT_HERSHEY_SIMPLEX, 0.4, _FG, 1, cv2.LINE_AA)
    return bar


def scatter_plot(
    points: np.ndarray, labels: np.ndarray, names: Sequence[str], size: int = 480, title: str = ""
) -> np.ndarray:
    """2-D points [N,2] coloured by integer label [N] (legend from `names`) -> uint8 RGB [size,size,3]."""
    points = np.asarray(points, dtype=np.float64)
    if points.ndim != 2 or points.shape[1] != 2:
        raise ValueError(f"scatter_plot expects points [N,2], got {points.shape}")
    img = np.full((size, size, 3), 255, dtype=np.uint8)
    margin = 24
    lo, hi = points.min(0), points.max(0)
    span = np.where(hi - lo > 0, hi - lo, 1.0)
    xy = margin + (points - lo) / span * (size - 2 * margin)
    for (x, y), lab in zip(xy, labels):
        cv2.circle(img, (int(round(x)), int(round(size - y))), 3, _PALETTE[int(lab) % len(_PALETTE)], -1, cv2.LINE_AA)
    for i, name in enumerate(names):
        col = _PALETTE[i % len(_PALETTE)]
        cv2.circle(img, (10, 12 + 16 * i), 5, col, -1, cv2.LINE_AA)
        cv2.putText(img, name, (20, 16 + 16 * i), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    if title:
        cv2.putText(img, title, (size // 3, size - 6), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    return img


def png_bytes(image: np.ndarray) -> bytes:
    """uint8 [H,W] (L) or [H,W,3] (RGB) -> PNG bytes."""
    buf = io.BytesIO()
    mode = "L" if image.ndim == 2 else "RGB"
    Image.fromarray(np.ascontiguousarray(image), mode=mode).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def save_png(path: str | os.PathLike, image: np.ndarray) -> Path:
    """Write uint8 [H,W] or [H,W,3] as PNG atomically."""
    atomic_write_bytes(path, png_bytes(image))
    return Path(path)


class OverlayVideoWriter:
    """H.264 (yuv420p) + AAC mp4 writer fed RGB frames in order, with the audio muxed in step.

    `audio` is mono float [n] at `sample_rate` (or None for a silent video); audio past the last
    frame's end is dropped, so the file never outlasts its frames. Frame sizes are rounded down to
    even numbers (yuv420p needs them). Written to a temp file and renamed on close.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        rate: Any,
        size: tuple[int, int],
        audio: np.ndarray | None = None,
        sample_rate: int = SAMPLE_RATE,
        crf: int = 20,
        codec: str = "libx264",
    ) -> None:
        from avs.inference.video import require_av

        av = require_av()
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self.path.with_name(f".{self.path.name}.tmp{self.path.suffix}")
        self.rate = Fraction(rate).limit_denominator(100000)
        self.height, self.width = (int(size[0]) // 2) * 2, (int(size[1]) // 2) * 2
        if self.height < 2 or self.width < 2:
            raise ValueError(f"overlay video size {size} is too small")
        self._av = av
        if codec not in av.codecs_available:  # FFmpeg builds without libx264: MPEG-4 part 2 still plays everywhere
            codec = "mpeg4"
        self._container = av.open(str(self._tmp), "w")
        try:
            self._video = self._container.add_stream(codec, rate=self.rate)
            self._video.width, self._video.height, self._video.pix_fmt = self.width, self.height, "yuv420p"
            if codec == "libx264":
                self._video.options = {"crf": str(int(crf))}
            else:
                self._video.bit_rate = 4_000_000
            self._audio_stream = None
            self._audio = None
            if audio is not None and len(audio) > 0:
                self._audio_stream = self._container.add_stream("aac", rate=int(sample_rate), layout="mono")
                self._audio = np.clip(np.asarray(audio, dtype=np.float32), -1.0, 1.0)
            self.sample_rate = int(sample_rate)
        except BaseException:
            self._container.close()
            self._tmp.unlink(missing_ok=True)
            raise
        self._frames = 0
        self._audio_pos = 0

    def _mux(self, packets: Any) -> None:
        for packet in packets:
            self._container.mux(packet)

    def _push_audio(self, until: int) -> None:
        if self._audio_stream is None:
            return
        until = min(until, self._audio.shape[0])
        if until <= self._audio_pos:
            return
        chunk = self._audio[None, self._audio_pos : until]  # [1, n]
        frame = self._av.AudioFrame.from_ndarray(np.ascontiguousarray(chunk), format="flt", layout="mono")
        frame.sample_rate = self.sample_rate
        frame.pts = self._audio_pos
        frame.time_base = Fraction(1, self.sample_rate)
        self._mux(self._audio_stream.encode(frame))
        self._audio_pos = until

    def write(self, rgb: np.ndarray) -> None:
        """Append one uint8 RGB frame [h,w,3] (cropped to the even size)."""
        rgb = np.ascontiguousarray(rgb[: self.height, : self.width])
        frame = self._av.VideoFrame.from_ndarray(rgb, format="rgb24")
        frame.pts = self._frames
        frame.time_base = 1 / self.rate
        self._mux(self._video.encode(frame))
        self._frames += 1
        self._push_audio(int(round(self._frames / self.rate * self.sample_rate)))

    def close(self) -> Path:
        """Flush encoders, write the audio up to the end of the last frame, move the file into place."""
        self._push_audio(int(round(self._frames / self.rate * self.sample_rate)))
        self._mux(self._video.encode())
        if self._audio_stream is not None:
            self._mux(self._audio_stream.encode())
        self._container.close()
        os.replace(self._tmp, self.path)
        return self.path

    def abort(self) -> None:
        """Close and delete the partial file."""
        try:
            self._container.close()
        finally:
            self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> OverlayVideoWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
