"""AVSS (semantic) drawing for scripts/visualize.py and scripts/demo.py: class ids blended over frames in the
AVSS palette (avs.data.avss_layout.palette) and a small legend of the classes present (names from the
dataset's label2idx.json, class ids when there are none). Class 0, the background, is not drawn."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image

from avs.data.avss_layout import palette

log = logging.getLogger(__name__)

__all__ = [
    "blend_labels",
    "class_label",
    "class_names_for",
    "legend_strip",
    "present_classes",
    "read_label_png",
    "SlotLegend",
]

_BG = (24, 24, 24)
_FG = (235, 235, 235)
_FONT, _SCALE, _LINE = cv2.FONT_HERSHEY_SIMPLEX, 0.4, 16
_SWATCH = 10


def class_names_for(data_cfg: Mapping[str, Any]) -> list[str]:
    """Class names by index from `<data.root>/label2idx.json` of a (checkpoint's) data config; [] when the file
    is absent or does not fit `data.num_classes` (the drawings then name classes by id)."""
    from avs.data.avss_layout import LABELS_NAME, read_label2idx
    from avs.data.layout import AVSDataError

    root = data_cfg.get("root")
    if not root:
        return []
    path = Path(str(root)) / LABELS_NAME
    try:
        return read_label2idx(path, int(data_cfg.get("num_classes")))
    except AVSDataError as exc:
        log.info("class names not available (%s): the legend shows class ids", str(exc).splitlines()[0])
        return []


def class_label(c: int, names: Sequence[str]) -> str:
    """'<id> <name>' (or '<id>' without names)."""
    return f"{c} {names[c]}" if 0 <= c < len(names) and names[c] else str(c)


def present_classes(label_maps: Iterable[np.ndarray]) -> list[int]:
    """Sorted foreground class ids (not 0) that occur in any of the maps."""
    found: set[int] = set()
    for labels in label_maps:
        found.update(int(c) for c in np.unique(labels))
    return sorted(found - {0})


def blend_labels(
    rgb: np.ndarray, labels: np.ndarray, num_classes: int, alpha: float = 0.5, outline: bool = True
) -> np.ndarray:
    """Blend each foreground class's palette colour over uint8 RGB [H,W,3] where class ids [H,W] hold it
    (+ a 1-px outline per class) -> uint8 [H,W,3]; background (0) pixels are left as they are."""
    if rgb.shape[:2] != labels.shape[:2]:
        raise ValueError(f"blend_labels: image {rgb.shape[:2]} and labels {labels.shape[:2]} differ in size")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"overlay alpha must be in [0, 1], got {alpha}")
    pal = palette(num_classes)
    labels = np.asarray(labels).astype(np.int64)
    fg = labels != 0
    out = rgb.astype(np.float32)
    out[fg] = (1.0 - alpha) * out[fg] + alpha * pal[labels[fg]].astype(np.float32)
    out = np.ascontiguousarray(out.round().clip(0, 255).astype(np.uint8))
    if outline:
        for c in present_classes([labels]):
            contours, _ = cv2.findContours((labels == c).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
            cv2.drawContours(out, contours, -1, tuple(int(v) for v in pal[c]), 1)
    return out


def _entry(canvas: np.ndarray, x: int, y: int, colour: np.ndarray, text: str) -> None:
    """A swatch with a light border and its label, top-left at (x, y) of a line."""
    top = y + (_LINE - _SWATCH) // 2
    cv2.rectangle(canvas, (x, top), (x + _SWATCH - 1, top + _SWATCH - 1), tuple(int(v) for v in colour), -1)
    cv2.rectangle(canvas, (x, top), (x + _SWATCH - 1, top + _SWATCH - 1), _FG, 1)
    cv2.putText(canvas, text, (x + _SWATCH + 4, y + _LINE - 4), _FONT, _SCALE, _FG, 1, cv2.LINE_AA)


def _entry_width(text: str) -> int:
    return _SWATCH + 4 + cv2.getTextSize(text, _FONT, _SCALE, 1)[0][0] + 10


def legend_strip(classes: Sequence[int], names: Sequence[str], num_classes: int, width: int) -> np.ndarray:
    """A legend of `classes` (swatch + '<id> <name>'), wrapped into lines of `width` px -> uint8 [h,width,3]
    (one line saying 'no foreground class' when `classes` is empty)."""
    pal = palette(num_classes)
    lines: list[list[tuple[int, str]]] = [[]]
    used = 4
    for c in classes:
        text = class_label(c, names)
        w = _entry_width(text)
        if lines[-1] and used + w > width:
            lines.append([])
            used = 4
        lines[-1].append((c, text))
        used += w
    strip = np.full((_LINE * len(lines) + 4, width, 3), _BG, dtype=np.uint8)
    if not classes:
        cv2.putText(strip, "no foreground class", (4, _LINE - 2), _FONT, _SCALE, _FG, 1, cv2.LINE_AA)
    for i, line in enumerate(lines):
        x = 4
        for c, text in line:
            _entry(strip, x, 2 + i * _LINE, pal[c], text)
            x += _entry_width(text)
    return strip


class SlotLegend:
    """Legend strips under the frames of a video (scripts/demo.py): `under(frame, slot)` stacks the legend of
    the slot's classes below a frame, padded to the height the tallest slot legend needs, so every frame of
    the video has one size and the picture itself is not covered."""

    def __init__(self, classes: Sequence[Sequence[int]], names: Sequence[str], num_classes: int, width: int) -> None:
        self.classes = [tuple(c) for c in classes]
        self.strips = {c: legend_strip(list(c), names, num_classes, width) for c in set(self.classes) | {()}}
        self.height = max(strip.shape[0] for strip in self.strips.values())

    def under(self, frame: np.ndarray, slot: int) -> np.ndarray:
        """uint8 RGB [H,W,3] -> [H + height, W, 3]."""
        strip = self.strips[self.classes[slot]]
        pad = np.full((self.height - strip.shape[0], strip.shape[1], 3), _BG, dtype=np.uint8)
        return np.concatenate([frame, strip, pad], axis=0)


def read_label_png(path: str | Path, size: tuple[int, int]) -> np.ndarray:
    """Class ids of a palette PNG (avs.evaluation.outputs.label_png_bytes) at `size` (H, W), nearest -> int64."""
    with Image.open(path) as im:
        ids = np.asarray(im).astype(np.uint8)
    if ids.shape[:2] != tuple(size):
        ids = cv2.resize(ids, (size[1], size[0]), interpolation=cv2.INTER_NEAREST)
    return ids.astype(np.int64)
