"""Walk an AVSBench-object folder and report every missing or malformed file (scripts/check_data.py).

Paths and the labelled-frames rule come from avs.data.layout, audio shapes from the loader's own
rule (`fit_audio_array`), so the check and the loader cannot disagree.

`check_dataset` runs a list of independent checks (`CHECKS`: the csv rows, the folders, every clip's
files), each adding what it finds to one report, so one problem never hides another: a malformed csv
row is reported and the other rows are still checked. Another layout adds its own checks by passing
`checks=`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from avs.data.audio import LOGMEL_SHAPE, MIN_SAMPLES, SAMPLE_RATE, fit_audio_array, read_wav
from avs.data.layout import (
    SPLITS,
    AVSDataError,
    ClipRecord,
    SubsetLayout,
    check_split_values,
    frame_path,
    get_layout,
    labelled_frames,
    logmel_path,
    mask_path,
    parse_meta_csv,
    wav_path,
)
from avs.data.transforms import as_size

__all__ = ["CHECKS", "Problem", "DatasetReport", "check_dataset"]

_FOLDERS = ("visual_frames", "gt_masks", "audio_log_mel", "audio_wav")


@dataclass
class Problem:
    """One thing wrong with the dataset on disk."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


@dataclass
class DatasetReport:
    """Result of `check_dataset`: clips per split and every problem found."""

    root: str
    subset: str
    counts: dict[str, int] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def add(self, path: Path | str, message: str) -> None:
        self.problems.append(Problem(str(path), message))

    def format(self) -> str:
        """Human-readable multi-line summary."""
        lines = [f"AVSBench {self.subset} at {self.root}"]
        lines += [f"  {s}: {n} clips" for s, n in self.counts.items()]
        lines.append(f"  {len(self.problems)} problem(s)")
        lines += [f"  - {p}" for p in self.problems]
        return "\n".join(lines)


@dataclass
class _Walk:
    """What every check needs: the report it adds to, the folder, the csv rows and the options."""

    report: DatasetReport
    root: Path
    layout: SubsetLayout
    num_frames: int
    size: tuple[int, int] | None
    pad_short_audio: bool
    present: dict[str, bool]
    records: list[ClipRecord] = field(default_factory=list)
    malformed: list[str] = field(default_factory=list)
    progress: bool = False


def _image_size_or_problem(report: DatasetReport, path: Path, what: str) -> tuple[int, int] | None:
    if not path.is_file():
        report.add(path, f"missing {what}")
        return None
    try:
        with Image.open(path) as img:
            img.load()  # full decode: catches truncated PNGs
            return img.size[1], img.size[0]  # (H, W)
    except Exception as exc:
        report.add(path, f"unreadable/truncated {what} ({type(exc).__name__}: {exc})")
        return None


def _read_records(report: DatasetReport, root: Path, layout: SubsetLayout) -> tuple[list[ClipRecord], list[str]] | None:
    """(records of the well-formed rows, malformed-row messages); None (reported) when there is no csv to read."""
    if not root.is_dir():
        report.add(root, "data.root does not exist")
        return None
    csv_p = layout.csv_path(root)
    if not csv_p.is_file():
        report.add(csv_p, "metadata csv missing")
        return None
    try:
        return parse_meta_csv(csv_p, layout.name)
    except AVSDataError as exc:
        report.add(csv_p, str(exc))
        return None


def _check_rows(w: _Walk) -> None:
    """Malformed rows, unknown split values and duplicate rows of the meta csv."""
    report, csv_p = w.report, w.layout.csv_path(w.root)
    for message in w.malformed:
        report.add(csv_p, message.removeprefix(f"{csv_p}:"))
    try:
        check_split_values(w.records, csv_p)
    except AVSDataError as exc:
        report.add(csv_p, str(exc).removeprefix(f"{csv_p}: "))
    seen: set[tuple[str, str]] = set()
    for rec in w.records:
        if (rec.split, rec.video_id) in seen:
            report.add(csv_p, f"duplicate row for video {rec.video_id!r} in split {rec.split!r}")
        seen.add((rec.split, rec.video_id))


def _present_folders(root: Path, layout: SubsetLayout) -> dict[str, bool]:
    data_dir = layout.data_dir(root)
    return {name: (data_dir / name).is_dir() for name in _FOLDERS}


def _check_folders(w: _Walk) -> None:
    """The frame, mask and audio folders of the subset."""
    data_dir = w.layout.data_dir(w.root)
    for name in ("visual_frames", "gt_masks"):
        if not w.present[name]:
            w.report.add(data_dir / name, "missing folder")
    if not (w.present["audio_log_mel"] or w.present["audio_wav"]):
        w.report.add(data_dir / "audio_log_mel", "missing folder (and no audio_wav/ either)")


def _check_images(w: _Walk, rec: ClipRecord) -> None:
    report, root, layout = w.report, w.root, w.layout
    sizes: dict[Path, tuple[int, int]] = {}
    if w.present["visual_frames"]:
        for k in range(1, w.num_frames + 1):
            p = frame_path(root, layout, rec, k)
            hw = _image_size_or_problem(report, p, f"frame of {rec.tag()}")
            if hw is not None:
                sizes[p] = hw
    frame_sizes = set(sizes.values())
    if len(frame_sizes) > 1:
        report.add(frame_path(root, layout, rec, 1).parent, f"frames of one clip differ in size: {sorted(frame_sizes)}")
    ref = next(iter(sizes.values()), None)
    if w.present["gt_masks"]:
        for k in labelled_frames(layout.name, rec.split, w.num_frames):
            p = mask_path(root, layout, rec, k)
            hw = _image_size_or_problem(report, p, f"mask of {rec.tag()}")
            if hw is not None:
                if ref is not None and hw != ref:
                    report.add(p, f"mask size {hw} differs from frame size {ref} (H, W)")
                sizes[p] = hw
    if w.size is not None:
        for p, hw in sizes.items():
            if hw != w.size:
                report.add(p, f"size {hw} != data.image_size {w.size} (H, W)")


def _check_logmel(w: _Walk, rec: ClipRecord) -> None:
    from avs.data.safe_pickle import load_logmel_pkl

    p = logmel_path(w.root, w.layout, rec)
    if not p.is_file():
        w.report.add(p, f"missing log-mel pkl of {rec.tag()}")
        return
    try:
        arr = load_logmel_pkl(p)
    except AVSDataError as exc:
        w.report.add(p, f"unreadable log-mel pkl ({exc})")
        return
    try:
        arr = fit_audio_array(arr, w.num_frames, p, LOGMEL_SHAPE, w.pad_short_audio)
    except AVSDataError as exc:
        w.report.add(p, str(exc).removeprefix(f"{p}: "))
        return
    if not np.isfinite(arr).all():
        w.report.add(p, "log-mel holds NaN/inf")


def _check_wav(w: _Walk, rec: ClipRecord) -> None:
    p = wav_path(w.root, w.layout, rec)
    if not p.is_file():
        w.report.add(p, f"missing wav of {rec.tag()}")
        return
    try:
        samples, sr = read_wav(p)
        if len(samples) * SAMPLE_RATE < MIN_SAMPLES * sr:
            w.report.add(p, f"wav too short for one VGGish example ({len(samples) / sr:.3f} s)")
    except (ValueError, OSError) as exc:
        w.report.add(p, f"unreadable wav ({exc})")


def _check_clips(w: _Walk) -> None:
    """Every clip of every split: frames, masks (sizes too) and the audio files present."""
    for split in SPLITS:
        recs = [r for r in w.records if r.split == split]
        w.report.counts[split] = len(recs)
        desc = f"check {w.layout.name}/{split}"
        for rec in tqdm(recs, desc=desc, unit="clip", disable=not w.progress or not recs):
            _check_images(w, rec)
            if w.present["audio_log_mel"]:
                _check_logmel(w, rec)
            if w.present["audio_wav"]:
                _check_wav(w, rec)


# Each check takes the walk and adds its findings to w.report; none depends on another's result.
CHECKS: tuple[Callable[[_Walk], None], ...] = (_check_rows, _check_folders, _check_clips)


def check_dataset(
    root: str | os.PathLike,
    subset: str,
    num_frames: int = 5,
    image_size: int | Sequence[int] | None = None,
    progress: bool = False,
    pad_short_audio: bool = False,
    checks: Sequence[Callable[[_Walk], None]] = CHECKS,
) -> DatasetReport:
    """Run every check of `checks` on `subset` under `root` -> counts and every missing / bad file (tqdm if `progress`).

    Csv split values and log-mel pkls are judged by the loader's own rules (`check_split_values`,
    `fit_audio_array` with `pad_short_audio`).
    """
    layout = get_layout(subset)
    root_p = Path(root).expanduser()
    report = DatasetReport(root=str(root_p), subset=subset)
    read = _read_records(report, root_p, layout)
    if read is None:
        return report
    present = _present_folders(root_p, layout)
    w = _Walk(report, root_p, layout, num_frames, as_size(image_size), pad_short_audio, present, *read, progress)
    for check in checks:
        check(w)
    return report
