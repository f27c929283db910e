"""The AVSBench-semantic (AVSS) folder layout, its palette, the colour -> class rule and the frame flags.

Layout of the released AVSS folder (`data.root`):

    metadata.csv                         columns read by name: `uid`, `label` (source subset), `split`
    label2idx.json                       {class name: index}; index 0 = background
    <source>/<uid>/frames/<k>.jpg        k = 0..n-1 (n = 5 for v1s / v1m, 10 for v2)
    <source>/<uid>/labels_rgb/<k>.png    RGB colour masks in the palette below (v1s train: k = 0 only)
    <source>/<uid>/audio.wav

`<source>` is the csv's `label` column: v1s (AVSBench-object single source, 5 s), v1m (multi
source, 5 s) or v2 (new 10 s clips). Other csv columns are ignored. Semantic Sounding Shapes
(avs.data.synthetic.semantic) writes the same layout. docs/avss.md describes the padding and flags.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from avs.data.layout import SPLITS, AVSDataError

__all__ = [
    "NUM_CLASSES",
    "SOURCES",
    "SOURCE_FRAMES",
    "PAD_FRAMES",
    "CSV_NAME",
    "LABELS_NAME",
    "CSV_COLUMNS",
    "AVSSRecord",
    "palette",
    "colour_keys",
    "colours_to_labels",
    "labels_to_colours",
    "labelled_frames",
    "read_metadata",
    "metadata_text",
    "read_label2idx",
    "frame_path",
    "mask_path",
    "wav_path",
    "clip_dir",
]

NUM_CLASSES = 71  # 70 sounding categories + background (class 0)
SOURCES = ("v1s", "v1m", "v2")
SOURCE_FRAMES = {"v1s": 5, "v1m": 5, "v2": 10}
PAD_FRAMES = 10  # every clip is padded to this many frames (the released loader's MASK_NUM)
CSV_NAME = "metadata.csv"
LABELS_NAME = "label2idx.json"
CSV_COLUMNS = ("uid", "label", "split")  # the columns read (by name)


@dataclass(frozen=True)
class AVSSRecord:
    """One metadata.csv row: clip `uid` of source subset `source` in `split`."""

    uid: str
    source: str
    split: str
    line: int = field(default=0, compare=False)

    def tag(self) -> str:
        return f"clip {self.uid!r} ({self.source}, {self.split})"


def palette(num_classes: int = NUM_CLASSES) -> np.ndarray:
    """The released bit-interleaved (VOC-style) palette -> uint8 [num_classes, 3]; class 0 is black.

    Bits 0, 3, 6, .. of the class index fill R from its most significant bit down, bits 1, 4, .. G
    and bits 2, 5, .. B: 1 -> (128, 0, 0), 2 -> (0, 128, 0), 70 -> (32, 128, 128).
    """
    out = np.zeros((num_classes, 3), dtype=np.uint8)
    for j in range(num_classes):
        lab, i, rgb = j, 0, [0, 0, 0]
        while lab > 0:
            for c in range(3):
                rgb[c] |= ((lab >> c) & 1) << (7 - i)
            i += 1
            lab >>= 3
        out[j] = rgb
    return out


def colour_keys(rgb: np.ndarray) -> np.ndarray:
    """uint8 [..., 3] -> int64 [...] key R*65536 + G*256 + B."""
    rgb = np.asarray(rgb).astype(np.int64)
    return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]


def colours_to_labels(rgb: np.ndarray, num_classes: int = NUM_CLASSES) -> tuple[np.ndarray, list[tuple[int, ...]]]:
    """RGB colour mask uint8 [H,W,3] -> (class indices int64 [H,W], sorted colours not in the palette).

    A pixel whose colour equals palette entry j gets class j; any other colour gets class 0 (the
    released rule, an argmax over all-False matches) and is listed so the caller can refuse it.
    """
    pal_keys = colour_keys(palette(num_classes))
    keys = colour_keys(rgb)
    order = np.argsort(pal_keys)
    sorted_keys = pal_keys[order]
    pos = np.clip(np.searchsorted(sorted_keys, keys), 0, len(sorted_keys) - 1)
    found = sorted_keys[pos] == keys
    labels = np.where(found, order[pos], 0).astype(np.int64)
    unknown = np.unique(keys[~found])
    colours = [(int(k >> 16), int((k >> 8) & 255), int(k & 255)) for k in unknown.tolist()]
    return labels, colours


def labels_to_colours(labels: np.ndarray, num_classes: int = NUM_CLASSES) -> np.ndarray:
    """Class indices [H,W] -> uint8 [H,W,3] in the palette (what the writer stores as labels_rgb)."""
    return palette(num_classes)[np.asarray(labels)]


def labelled_frames(source: str, split: str) -> list[int]:
    """0-based frames of a clip that carry a colour mask: v1s train -> [0]; otherwise all real frames."""
    if source == "v1s" and split == "train":
        return [0]
    return list(range(SOURCE_FRAMES[source]))


# --------------------------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------------------------
def clip_dir(root: Path, rec: AVSSRecord) -> Path:
    return Path(root) / rec.source / rec.uid


def frame_path(root: Path, rec: AVSSRecord, k: int) -> Path:
    """Frame k (0-based) of a clip."""
    return clip_dir(root, rec) / "frames" / f"{k}.jpg"


def mask_path(root: Path, rec: AVSSRecord, k: int) -> Path:
    """Colour mask k (0-based) of a clip."""
    return clip_dir(root, rec) / "labels_rgb" / f"{k}.png"


def wav_path(root: Path, rec: AVSSRecord) -> Path:
    return clip_dir(root, rec) / "audio.wav"


def read_metadata(path: str | os.PathLike) -> list[AVSSRecord]:
    """metadata.csv -> records (columns `uid`, `label`, `split` by name); AVSDataError naming the file otherwise.

    Values are returned as written: `check_values` judges the source and split values.
    """
    path = Path(path)
    if not path.is_file():
        raise AVSDataError(f"{path}: AVSS metadata csv not found (expected {CSV_NAME} under data.root)")
    with open(path, newline="", encoding="utf-8-sig") as fh:
        rows = list(csv.reader(fh))
    if not rows:
        raise AVSDataError(f"{path}: metadata csv is empty")
    header = [h.strip() for h in rows[0]]
    missing = [c for c in CSV_COLUMNS if c not in header]
    if missing:
        raise AVSDataError(
            f"{path}: metadata csv lacks column(s) {missing} (header: {header}); AVSS needs {', '.join(CSV_COLUMNS)}"
        )
    cols = [header.index(c) for c in CSV_COLUMNS]
    records = []
    for line_no, row in enumerate(rows[1:], start=2):
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) <= max(cols):
            raise AVSDataError(f"{path}:{line_no}: expected at least {max(cols) + 1} columns, got {len(row)}")
        uid, source, split = (row[c].strip() for c in cols)
        records.append(AVSSRecord(uid, source, split, line_no))
    return records


def check_values(records: Sequence[AVSSRecord], path: str | os.PathLike) -> None:
    """AVSDataError naming the csv rows whose `label` is not v1s/v1m/v2 or whose `split` is not train/val/test."""
    bad = [r for r in records if r.source not in SOURCES or r.split not in SPLITS]
    if bad:
        shown = ", ".join(f"line {r.line} ({r.uid!r}: label {r.source!r}, split {r.split!r})" for r in bad[:5])
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise AVSDataError(
            f"{path}: unknown label/split value in {len(bad)} row(s): {shown}{more}; "
            f"label allows {', '.join(SOURCES)}, split allows {', '.join(SPLITS)}"
        )


def metadata_text(records: Sequence[AVSSRecord]) -> str:
    """metadata.csv text of `records` (columns uid, label, split)."""
    rows = [f"{r.uid},{r.source},{r.split}" for r in records]
    return "\n".join([",".join(CSV_COLUMNS), *rows]) + "\n"


def read_label2idx(path: str | os.PathLike, num_classes: int = NUM_CLASSES) -> list[str]:
    """label2idx.json -> class names by index; AVSDataError unless it maps `num_classes` names onto 0..n-1."""
    path = Path(path)
    if not path.is_file():
        raise AVSDataError(f"{path}: {LABELS_NAME} not found under data.root")
    try:
        table = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise AVSDataError(f"{path}: unreadable {LABELS_NAME} ({exc})") from exc
    if not isinstance(table, dict):
        raise AVSDataError(f"{path}: expected a JSON object {{class name: index}}")
    if len(table) != num_classes:
        raise AVSDataError(f"{path}: {len(table)} entries, data.num_classes={num_classes} expected")
    names = [None] * num_classes
    for name, idx in table.items():
        if not isinstance(idx, int) or not 0 <= idx < num_classes or names[idx] is not None:
            raise AVSDataError(
                f"{path}: class {name!r} has index {idx!r}; indices must be 0..{num_classes - 1}, each once"
            )
        names[idx] = name
    return names  # type: ignore[return-value]
