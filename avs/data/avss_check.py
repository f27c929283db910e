"""Walk an AVSBench-semantic (AVSS) folder and report every problem in one run (scripts/check_data.py data=avss).

Checked: metadata.csv (columns uid/label/split, split and source values, duplicate uids),
label2idx.json (data.num_classes entries on 0..n-1), per clip the frame count of its source
subset (v1s / v1m: 5, v2: 10), the colour masks the loader reads (v1s train: frame 0, otherwise
every frame), colours outside the palette, mask and frame sizes, and audio.wav (readable, long
enough for one VGGish example per frame). Paths and rules come from avs.data.avss_layout, so the
check and the loader cannot disagree.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from avs.data.avss_layout import (
    CSV_NAME,
    LABELS_NAME,
    NUM_CLASSES,
    SOURCE_FRAMES,
    SOURCES,
    AVSSRecord,
    clip_dir,
    colours_to_labels,
    frame_path,
    labelled_frames,
    mask_path,
    read_label2idx,
    read_metadata,
    wav_path,
)
from avs.data.check import DatasetReport
from avs.data.layout import SPLITS, AVSDataError

__all__ = ["check_avss"]


def _csv_problems(report: DatasetReport, csv_p: Path, records: list[AVSSRecord]) -> list[AVSSRecord]:
    """Report bad source / split values and duplicate uids; return the rows a loader would read."""
    good, seen = [], set()
    for r in records:
        if r.source not in SOURCES:
            report.add(
                csv_p, f"line {r.line}: clip {r.uid!r} has label {r.source!r}; expected one of {', '.join(SOURCES)}"
            )
        elif r.split not in SPLITS:
            report.add(
                csv_p, f"line {r.line}: clip {r.uid!r} has split {r.split!r}; expected one of {', '.join(SPLITS)}"
            )
        elif (r.source, r.uid) in seen:
            report.add(csv_p, f"line {r.line}: duplicate row for clip {r.uid!r} ({r.source})")
        else:
            good.append(r)
        seen.add((r.source, r.uid))
    return good


def _image(report: DatasetReport, path: Path, what: str) -> Image.Image | None:
    if not path.is_file():
        report.add(path, f"missing {what}")
        return None
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB")
    except Exception as exc:
        report.add(path, f"unreadable/truncated {what} ({type(exc).__name__}: {exc})")
        return None


def _check_frames(report: DatasetReport, root: Path, rec: AVSSRecord) -> tuple[int, int] | None:
    n = SOURCE_FRAMES[rec.source]
    folder = frame_path(root, rec, 0).parent
    if folder.is_dir():
        found = len(list(folder.iterdir()))
        if found != n:
            report.add(folder, f"{found} frame file(s) for {rec.tag()}; a {rec.source} clip has {n}")
    sizes = set()
    for k in range(n):
        img = _image(report, frame_path(root, rec, k), f"frame {k} of {rec.tag()}")
        if img is not None:
            sizes.add(img.size[::-1])
    if len(sizes) > 1:
        report.add(folder, f"frames of {rec.tag()} differ in size: {sorted(sizes)} (H, W)")
    return next(iter(sizes)) if len(sizes) == 1 else None


def _check_masks(
    report: DatasetReport, root: Path, rec: AVSSRecord, num_classes: int, size: tuple[int, int] | None
) -> None:
    folder = mask_path(root, rec, 0).parent
    need = labelled_frames(rec.source, rec.split)
    if folder.is_dir():
        found = len([p for p in folder.iterdir() if p.suffix == ".png"])
        if found < len(need) or (found != len(need) and not (rec.source == "v1s" and rec.split == "train")):
            report.add(folder, f"{found} colour mask(s) for {rec.tag()}; expected {len(need)}")
    for k in need:
        p = mask_path(root, rec, k)
        img = _image(report, p, f"colour mask {k} of {rec.tag()}")
        if img is None:
            continue
        if size is not None and img.size[::-1] != size:
            report.add(p, f"mask size {img.size[::-1]} differs from the frame size {size} (H, W)")
        _, unknown = colours_to_labels(np.asarray(img), num_classes)
        if unknown:
            shown = ", ".join(str(c) for c in unknown[:5]) + (" ..." if len(unknown) > 5 else "")
            report.add(
                p,
                f"{len(unknown)} colour(s) not in the {num_classes}-class palette (class ids out of "
                f"range or foreign colours): {shown}",
            )


def _check_wav(report: DatasetReport, root: Path, rec: AVSSRecord) -> None:
    from avs.data.audio import MIN_SAMPLES, read_wav

    p = wav_path(root, rec)
    if not p.is_file():
        report.add(p, f"missing wav of {rec.tag()}")
        return
    try:
        samples, sr = read_wav(p)
    except (ValueError, OSError) as exc:
        report.add(p, f"unreadable wav ({exc})")
        return
    n = SOURCE_FRAMES[rec.source]
    if len(samples) * 16000 < MIN_SAMPLES * sr:
        report.add(p, f"wav too short for one VGGish example ({len(samples) / sr:.3f} s)")
    elif len(samples) / sr < 0.96 * (n - 1) + 0.975:
        report.add(
            p,
            f"wav of {len(samples) / sr:.3f} s gives fewer than {n} VGGish examples (the loader repeats the last one)",
        )


def check_avss(root: str | os.PathLike, num_classes: int = NUM_CLASSES, progress: bool = False) -> DatasetReport:
    """Every problem of the AVSS folder `root` (see the module doc); counts are clips per split."""
    from tqdm import tqdm

    root_p = Path(root).expanduser()
    report = DatasetReport(root=str(root_p), subset="avss")
    if not root_p.is_dir():
        report.add(root_p, "data.root does not exist")
        return report
    try:
        read_label2idx(root_p / LABELS_NAME, num_classes)
    except AVSDataError as exc:
        report.add(root_p / LABELS_NAME, str(exc).removeprefix(f"{root_p / LABELS_NAME}: "))
    try:
        records = read_metadata(root_p / CSV_NAME)
    except AVSDataError as exc:
        report.add(root_p / CSV_NAME, str(exc).removeprefix(f"{root_p / CSV_NAME}: "))
        return report
    good = _csv_problems(report, root_p / CSV_NAME, records)
    for split in SPLITS:
        report.counts[split] = sum(r.split == split for r in good)
    for rec in tqdm(good, desc="check avss", unit="clip", disable=not progress):
        if not clip_dir(root_p, rec).is_dir():
            report.add(clip_dir(root_p, rec), f"missing clip folder of {rec.tag()}")
            continue
        size = _check_frames(report, root_p, rec)
        _check_masks(report, root_p, rec, num_classes, size)
        _check_wav(report, root_p, rec)
    return report
