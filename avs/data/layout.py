"""The AVSBench-object folder layout and which frames carry a GT mask: written by the Sounding
Shapes generator, read by the dataset and the layout checker, all through this module.

Layout of the released AVSBench-object folder, relative to `root` (the folder holding Single-source/
and Multi-sources/):

    Single-source/s4_meta_data.csv                      columns: 0 = video id, 2 = category, `split`
    Single-source/s4_data/visual_frames/<split>/<category>/<vid>/<vid>_<k>.png
    Single-source/s4_data/gt_masks/<split>/<category>/<vid>/<vid>_<k>.png   (train: k = 1 only)
    Single-source/s4_data/audio_wav/<split>/<category>/<vid>.wav
    Single-source/s4_data/audio_log_mel/<split>/<category>/<vid>.pkl
    Multi-sources/ms3_meta_data.csv                     columns: 0 = video id, `split`
    Multi-sources/ms3_data/visual_frames/<vid>/<vid>.mp4_<k>.png           (no split folder, ".mp4_")
    Multi-sources/ms3_data/gt_masks/<split>/<vid>/<vid>_<k>.png            (k = 1..T, every split)
    Multi-sources/ms3_data/audio_wav/<split>/<vid>.wav
    Multi-sources/ms3_data/audio_log_mel/<split>/<vid>.pkl

Cached VGGish embeddings (scripts/extract_audio.py) mirror the pkl paths with `.npy` under
`<subset dir>/audio_vggish_embedding/` (or `embedding_dir`).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from avs.errors import AVSError, ExitCode

__all__ = [
    "AVSDataError",
    "SPLITS",
    "EMBEDDING_DIRNAME",
    "SubsetLayout",
    "LAYOUTS",
    "ClipRecord",
    "get_layout",
    "frame_path",
    "mask_path",
    "wav_path",
    "logmel_path",
    "embedding_root",
    "embedding_path",
    "labelled_frames",
    "labelled_frames_name",
    "read_meta_csv",
    "meta_csv_text",
    "check_split_values",
    "split_records",
    "check_root",
]

SPLITS = ("train", "val", "test")
EMBEDDING_DIRNAME = "audio_vggish_embedding"


class AVSDataError(AVSError, code=ExitCode.DATA):
    """A dataset file is missing, unreadable or malformed; the message names the path (and clip)."""


@dataclass(frozen=True)
class SubsetLayout:
    """Folder and file names of one AVSBench-object subset."""

    name: str
    folder: str  # under root
    csv_name: str
    csv_header: tuple[str, ...]  # as the released csv (and the generator) writes it
    data_folder: str  # under folder
    has_category: bool  # csv column 2 is the category, which is also a folder level
    frame_split_folder: bool  # MS3 frames have no <split>/ level
    frame_pattern: str  # format with vid, k
    mask_pattern: str

    def subset_dir(self, root: Path) -> Path:
        return root / self.folder

    def data_dir(self, root: Path) -> Path:
        return root / self.folder / self.data_folder

    def csv_path(self, root: Path) -> Path:
        return root / self.folder / self.csv_name


LAYOUTS: dict[str, SubsetLayout] = {
    "s4": SubsetLayout(
        name="s4",
        folder="Single-source",
        csv_name="s4_meta_data.csv",
        csv_header=("name", "start_time", "category", "split"),
        data_folder="s4_data",
        has_category=True,
        frame_split_folder=True,
        frame_pattern="{vid}_{k}.png",
        mask_pattern="{vid}_{k}.png",
    ),
    "ms3": SubsetLayout(
        name="ms3",
        folder="Multi-sources",
        csv_name="ms3_meta_data.csv",
        csv_header=("video_id", "split"),
        data_folder="ms3_data",
        has_category=False,
        frame_split_folder=False,
        frame_pattern="{vid}.mp4_{k}.png",
        mask_pattern="{vid}_{k}.png",
    ),
}


@dataclass(frozen=True)
class ClipRecord:
    """One CSV row: a clip of `split` (category '' for MS3)."""

    video_id: str
    category: str
    split: str
    line: int = field(default=0, compare=False)  # line number in the csv (0: not from a csv)

    def rel_dir(self) -> Path:
        """<split>/[<category>/] -- the folder of this clip's audio files / masks."""
        return Path(self.split, self.category) if self.category else Path(self.split)

    def tag(self) -> str:
        """How error messages name the clip: clip '<id>' (<split>[/<category>])."""
        return f"clip {self.video_id!r} ({self.split}{'/' + self.category if self.category else ''})"


# --------------------------------------------------------------------------------------------
# paths
# --------------------------------------------------------------------------------------------
def get_layout(subset: str) -> SubsetLayout:
    """Layout for 's4' or 'ms3'; ValueError naming `data.subset` otherwise."""
    try:
        return LAYOUTS[subset]
    except KeyError:
        raise ValueError(f"data.subset must be one of {sorted(LAYOUTS)}, got {subset!r}") from None


def frame_path(root: Path, layout: SubsetLayout, rec: ClipRecord, k: int) -> Path:
    """Path of frame k (1-based) of a clip."""
    base = layout.data_dir(root) / "visual_frames"
    if layout.frame_split_folder:
        base = base / rec.rel_dir()
    return base / rec.video_id / layout.frame_pattern.format(vid=rec.video_id, k=k)


def mask_path(root: Path, layout: SubsetLayout, rec: ClipRecord, k: int) -> Path:
    """Path of GT mask k (1-based) of a clip."""
    name = layout.mask_pattern.format(vid=rec.video_id, k=k)
    return layout.data_dir(root) / "gt_masks" / rec.rel_dir() / rec.video_id / name


def wav_path(root: Path, layout: SubsetLayout, rec: ClipRecord) -> Path:
    """Path of a clip's 16 kHz wav."""
    return layout.data_dir(root) / "audio_wav" / rec.rel_dir() / f"{rec.video_id}.wav"


def logmel_path(root: Path, layout: SubsetLayout, rec: ClipRecord) -> Path:
    """Path of a clip's released log-mel pkl."""
    return layout.data_dir(root) / "audio_log_mel" / rec.rel_dir() / f"{rec.video_id}.pkl"


def embedding_root(root: Path, layout: SubsetLayout, embedding_dir: str | os.PathLike | None) -> Path:
    """Folder of cached VGGish embeddings: `embedding_dir`, else <subset dir>/audio_vggish_embedding."""
    return Path(embedding_dir) if embedding_dir else layout.subset_dir(root) / EMBEDDING_DIRNAME


def embedding_path(root: Path, layout: SubsetLayout, rec: ClipRecord, embedding_dir: str | os.PathLike | None) -> Path:
    """Path of a clip's cached VGGish embedding `.npy` (same relative path as the pkl)."""
    return embedding_root(root, layout, embedding_dir) / rec.rel_dir() / f"{rec.video_id}.npy"


def labelled_frames(subset: str, split: str, num_frames: int) -> list[int]:
    """1-based frame numbers that have a GT mask: S4 train -> [1]; otherwise 1..num_frames.

    The one rule for the generator (which masks it writes), the loader (`mask_valid`), the layout
    check and the trainer's metrics (which frames are scored).
    """
    if subset == "s4" and split == "train":
        return [1]
    return list(range(1, num_frames + 1))


def labelled_frames_name(subset: str, split: str) -> str:
    """`labelled_frames` in a word, for run records: 'first' (frame 1 of each clip only) or 'all'."""
    return "first" if labelled_frames(subset, split, 2) == [1] else "all"


# --------------------------------------------------------------------------------------------
# csv
# --------------------------------------------------------------------------------------------
def read_meta_csv(path: str | os.PathLike, subset: str) -> list[ClipRecord]:
    """Read an AVSBench meta csv -> records (S4: id col 0, category col 2; MS3: id col 0; `split` by name).

    AVSDataError on the first malformed row (`parse_meta_csv` reports them all)."""
    records, malformed = parse_meta_csv(path, subset)
    if malformed:
        raise AVSDataError(malformed[0])
    return records


def parse_meta_csv(path: str | os.PathLike, subset: str) -> tuple[list[ClipRecord], list[str]]:
    """-> (records of the well-formed rows, one message per malformed row); AVSDataError when the file itself
    cannot be read as a meta csv (missing, empty, no `split` column)."""
    layout = get_layout(subset)
    path = Path(path)
    if not path.is_file():
        raise AVSDataError(
            f"{path}: metadata csv not found (expected {layout.folder}/{layout.csv_name} under data.root)"
        )
    with open(path, newline="", encoding="utf-8-sig") as fh:
        rows = list(csv.reader(fh))
    if not rows:
        raise AVSDataError(f"{path}: metadata csv is empty")
    header = [h.strip() for h in rows[0]]
    if "split" not in header:
        raise AVSDataError(f"{path}: metadata csv has no 'split' column (header: {header})")
    split_col = header.index("split")
    need = max(split_col, 2 if layout.has_category else 0)
    records, malformed = [], []
    for line_no, row in enumerate(rows[1:], start=2):
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) <= need:
            malformed.append(f"{path}:{line_no}: expected at least {need + 1} columns, got {len(row)}: {row}")
            continue
        vid = row[0].strip()
        category = row[2].strip() if layout.has_category else ""
        records.append(ClipRecord(video_id=vid, category=category, split=row[split_col].strip(), line=line_no))
    return records, malformed


def meta_csv_text(subset: str, records: Sequence[ClipRecord]) -> str:
    """The meta csv of `records` as the released files lay it out (S4 start_time is 0)."""
    layout = get_layout(subset)
    if layout.has_category:
        rows = [f"{r.video_id},0,{r.category},{r.split}" for r in records]
    else:
        rows = [f"{r.video_id},{r.split}" for r in records]
    return "\n".join([",".join(layout.csv_header), *rows]) + "\n"


def check_split_values(records: Sequence[ClipRecord], csv_path: str | os.PathLike) -> None:
    """AVSDataError naming the csv, its rows and the allowed values when a row's split is not train/val/test."""
    bad = [r for r in records if r.split not in SPLITS]
    if not bad:
        return
    shown = ", ".join(f"line {r.line} (video {r.video_id!r}: {r.split!r})" for r in bad[:5])
    more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
    raise AVSDataError(
        f"{csv_path}: unknown split value in {len(bad)} row(s): {shown}{more}; "
        f"the 'split' column allows {', '.join(SPLITS)}"
    )


def split_records(root: str | os.PathLike, subset: str, split: str) -> list[ClipRecord]:
    """CSV rows of one split, in file order; AVSDataError when any row has an unknown split value."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
    layout = get_layout(subset)
    csv_path = layout.csv_path(Path(root))
    records = read_meta_csv(csv_path, subset)
    check_split_values(records, csv_path)
    return [r for r in records if r.split == split]


def check_root(root: str | os.PathLike, subset: str) -> Path:
    """Validate that `root` holds the subset's csv and data folder -> root as Path."""
    layout = get_layout(subset)
    root = Path(root).expanduser()
    if not root.is_dir():
        raise AVSDataError(
            f"data.root {root} does not exist (expected the AVSBench-object folder "
            "holding Single-source/ and Multi-sources/)"
        )
    sub = layout.subset_dir(root)
    if not sub.is_dir():
        raise AVSDataError(f"{sub}: missing; data.root {root} must hold {layout.folder}/ for subset {subset!r}")
    if not layout.csv_path(root).is_file():
        raise AVSDataError(f"{layout.csv_path(root)}: metadata csv not found for subset {subset!r}")
    data_dir = layout.data_dir(root)
    for name in ("visual_frames", "gt_masks"):
        if not (data_dir / name).is_dir():
            raise AVSDataError(f"{data_dir / name}: missing folder for subset {subset!r}")
    return root
