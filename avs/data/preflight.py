"""Checks of a run's data before its first step: every file the splits name exists, and evaluation never
generates data.

`missing_split_files` stats no file one by one: it lists each folder the splits' files live in once
(`os.scandir`) and looks the names up (25,000 files in 5,000 folders, the size of AVSBench S4, took
1.6 s on a busy 2-core CPU with a warm file cache). Nothing is decoded: unreadable files are
`scripts/check_data.py`'s job.

`data.on_error` decides what a missing file means: `raise` (the default) refuses the run before step 1
(`AVSDataError`, exit code 3) with the count and the first few paths; `skip` logs the same line and
goes on, since the loader then skips those clips and records them (run_report.json).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from avs.data.layout import (
    AVSDataError,
    embedding_path,
    frame_path,
    labelled_frames,
    logmel_path,
    mask_path,
    wav_path,
)
from avs.errors import MissingFileError

log = logging.getLogger(__name__)

SHOWN = 3  # missing paths named in the message


def clip_files(ds: Any) -> Iterable[Path]:
    """Every file an `AVSBenchDataset` reads: T frames, the labelled masks and the audio of each clip."""
    if hasattr(ds, "clip_files"):  # a dataset that lists its own files (AVSS, avs.data.avss)
        yield from ds.clip_files()
        return
    audio = {"logmel": logmel_path, "wav": wav_path}.get(ds.audio_source)
    labelled = labelled_frames(ds.subset, ds.split, ds.num_frames)
    for rec in ds.records:
        for k in range(1, ds.num_frames + 1):
            yield frame_path(ds.root, ds.layout, rec, k)
        for k in labelled:
            yield mask_path(ds.root, ds.layout, rec, k)
        if audio is not None:
            yield audio(ds.root, ds.layout, rec)
        else:
            yield embedding_path(ds.root, ds.layout, rec, ds.embedding_dir)


def _names(folder: Path, cache: dict[Path, set[str]]) -> set[str]:
    if folder not in cache:
        try:
            with os.scandir(folder) as entries:
                cache[folder] = {e.name for e in entries}
        except OSError:  # missing folder (or not a folder): none of its files exist
            cache[folder] = set()
    return cache[folder]


def missing_files(paths: Iterable[Path]) -> list[Path]:
    """The `paths` that do not exist, in order (one directory listing per folder)."""
    cache: dict[Path, set[str]] = {}
    return [p for p in paths if p.name not in _names(p.parent, cache)]


def missing_split_files(datasets: Mapping[str, Any], on_error: str = "raise") -> list[Path]:
    """Missing files of the `datasets` ({split: AVSBenchDataset}); refused (AVSDataError) unless on_error=skip."""
    missing = missing_files(p for ds in datasets.values() for p in clip_files(ds))
    if not missing:
        return []
    shown = ", ".join(str(p) for p in missing[:SHOWN]) + (", ..." if len(missing) > SHOWN else "")
    text = f"{len(missing)} file(s) that the {'/'.join(datasets)} split(s) name are missing: {shown}"
    if on_error == "skip":
        log.warning("%s; data.on_error=skip: their clips are skipped when read and recorded", text)
        return missing
    raise AVSDataError(
        f"{text} (scripts/check_data.py lists every problem; data.on_error=skip trains without those clips)"
    )


def require_synthetic(data_cfg: Any) -> None:
    """For evaluation: a synthetic data config's root must already hold that data (it is never generated here)."""
    from avs.data.synthetic.writer import _synthetic_config, is_complete

    if data_cfg.get("subset") == "avss":  # semantic Sounding Shapes (avs.data.synthetic.semantic)
        from avs.data.synthetic.semantic import semantic_config

        cfg, root = semantic_config(data_cfg)
    else:
        cfg, root = _synthetic_config(data_cfg)
    if not is_complete(root, cfg):
        differ = _generated_differences(Path(root), cfg.to_dict())
        what = (
            f"the data there was made with other data.synthetic keys ({differ})"
            if differ
            else "no complete Sounding Shapes data of this config there"
        )
        raise MissingFileError(
            f"data.root={root}: {what}; evaluation never generates data (check data.root, or generate it with "
            "scripts/make_synthetic.py or a training run)"
        )


def _generated_differences(root: Path, wanted: dict[str, Any], shown: int = 4) -> str:
    """'key: there X, asked Y; ...' between the config a generated root records (its generation.json) and
    `wanted`; empty when the root records none."""
    patterns = (
        "synthetic_meta/generation.json",
        "*/synthetic_meta/generation.json",
        "*/*/synthetic_meta/generation.json",
    )
    records = sorted(p for pattern in patterns for p in root.glob(pattern)) if root.is_dir() else []
    if not records:
        return ""
    try:
        there = json.loads(records[0].read_text()).get("config") or {}
    except (OSError, ValueError):
        return ""
    there, wanted = _flat(there), _flat(json.loads(json.dumps(wanted)))  # tuples as the record's lists
    keys = sorted(set(there) | set(wanted))
    diffs = [f"{k}: there {there.get(k)!r}, asked {wanted.get(k)!r}" for k in keys if there.get(k) != wanted.get(k)]
    return "; ".join(diffs[:shown]) + ("; ..." if len(diffs) > shown else "")


def _flat(node: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'clips.val': 64, ...} of a nested dict."""
    out: dict[str, Any] = {}
    for key, value in node.items():
        name = f"{prefix}{key}"
        out.update(_flat(value, f"{name}.") if isinstance(value, dict) else {name: value})
    return out
