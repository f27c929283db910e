"""Write Sounding Shapes roots in the AVSBench layout (paths from avs.data.layout), and keep a
cached root in step with its config (`_COMPLETE` holds the config hash)."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import shutil
import time
import wave
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from avs.data.layout import (
    SPLITS,
    ClipRecord,
    frame_path,
    get_layout,
    labelled_frames,
    logmel_path,
    mask_path,
    meta_csv_text,
    wav_path,
)
from avs.data.synthetic.clip import _Clip, _make_clip
from avs.data.synthetic.world import GENERATOR_VERSION, SyntheticConfig, build_categories, config_hash
from avs.errors import ConfigError
from avs.utils.io import atomic_write_bytes, atomic_write_text

log = logging.getLogger(__name__)

COMPLETE_MARKER = "_COMPLETE"
META_DIRNAME = "synthetic_meta"


def _png_bytes(array: np.ndarray, mode: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def _wav_bytes(samples: np.ndarray, sample_rate: int) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(samples.astype("<i2").tobytes())
    return buf.getvalue()


def _write_clip(root: Path, cfg: SyntheticConfig, clip: _Clip) -> None:
    from avs.data.audio import logmel_clip
    from avs.data.safe_pickle import dump_logmel_pkl

    layout = get_layout(cfg.subset)
    rec = ClipRecord(clip.video_id, clip.meta["category"], clip.split)
    T = cfg.num_frames
    for k in range(1, T + 1):
        atomic_write_bytes(frame_path(root, layout, rec, k), _png_bytes(clip.frames[k - 1], "RGB"))
    for k in labelled_frames(cfg.subset, clip.split, T):
        mask = clip.masks[k - 1].astype(np.uint8) * 255
        atomic_write_bytes(mask_path(root, layout, rec, k), _png_bytes(mask, "L"))
    atomic_write_bytes(wav_path(root, layout, rec), _wav_bytes(clip.waveform, cfg.sample_rate))
    # exactly what reading the wav back gives (int16 / 32768), so wav and pkl audio agree
    logmel = logmel_clip(clip.waveform.astype(np.float64) / 32768.0, cfg.sample_rate, T)
    dump_logmel_pkl(logmel_path(root, layout, rec), logmel)
    meta_path = meta_dir(root, cfg.subset, clip.split) / f"{clip.video_id}.json"
    atomic_write_text(meta_path, json.dumps(clip.meta, sort_keys=True, separators=(",", ":")))


def new_root(root: str | os.PathLike) -> Path:
    """Make the folder a generator writes into; FileExistsError unless it is new or empty."""
    root = Path(root)
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise FileExistsError(f"{root}: synthetic data root must be new or an empty directory")
    root.mkdir(parents=True, exist_ok=True)
    return root


def meta_dir(root: Path, subset: str, split: str) -> Path:
    """Folder of the per-clip sidecars (json) of one split of a generated root."""
    return get_layout(subset).subset_dir(root) / META_DIRNAME / split


def generate(root: str | os.PathLike, cfg: SyntheticConfig, progress: bool = True) -> Path:
    """Write a complete Sounding Shapes root (AVSBench layout, sidecars, `_COMPLETE` last) -> root."""
    from tqdm import tqdm

    root = new_root(root)
    cats = build_categories(cfg.num_categories)
    layout = get_layout(cfg.subset)
    jobs = [(split, i) for split in SPLITS for i in range(cfg.clips[split])]
    rows: list[ClipRecord] = []
    for split, i in tqdm(jobs, desc=f"Sounding Shapes {cfg.subset}", unit="clip", disable=not progress):
        clip = _make_clip(cfg, cats, split, i)
        _write_clip(root, cfg, clip)
        rows.append(ClipRecord(clip.video_id, clip.meta["category"], split))
    atomic_write_text(layout.csv_path(root), meta_csv_text(cfg.subset, rows))
    subset_dir = layout.subset_dir(root)
    world = {
        "generator_version": GENERATOR_VERSION,
        "config": cfg.to_dict(),
        "config_hash": config_hash(cfg),
        "categories": [dataclasses.asdict(c) for c in cats],
        "segments": "audio segment t = VGGish example t = [0.96 t, 0.96 (t+1)) s; last runs to the clip end",
    }
    atomic_write_text(subset_dir / META_DIRNAME / "generation.json", json.dumps(world, indent=1, sort_keys=True))
    atomic_write_text(root / COMPLETE_MARKER, config_hash(cfg) + "\n")
    return root


def is_complete(root: str | os.PathLike, cfg: SyntheticConfig) -> bool:
    """True when `root/_COMPLETE` exists and holds `config_hash(cfg)`."""
    marker = Path(root) / COMPLETE_MARKER
    return marker.is_file() and marker.read_text().strip() == config_hash(cfg)


def _to_plain(node: Any) -> Any:
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(node, (DictConfig, ListConfig)):
            return OmegaConf.to_container(node, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    return node


def _synthetic_config(data_cfg: Any) -> tuple[SyntheticConfig, Path]:
    """(generation config, root) of a `data` config node; ConfigError naming the key when it cannot be one."""
    data = _to_plain(data_cfg)
    if not isinstance(data, Mapping):
        raise ConfigError(f"data config: expected a mapping, got {type(data).__name__}")
    syn = data.get("synthetic")
    if syn is None:
        raise ConfigError("data.synthetic is not set: this data config does not describe a synthetic dataset")
    if data.get("root") in (None, ""):
        raise ConfigError("data.root: expected the directory to generate Sounding Shapes into")
    cfg = SyntheticConfig.from_mapping(syn)
    for key in ("subset", "image_size", "num_frames"):
        if key in data and data[key] != getattr(cfg, key):
            raise ConfigError(f"data.{key}={data[key]!r} differs from data.synthetic.{key}={getattr(cfg, key)!r}")
    return cfg, Path(data["root"]).expanduser()


def _refuse_foreign(root: Path) -> None:
    """FileExistsError unless `root` is absent, empty, or a synthetic root (it has the marker)."""
    if root.exists():
        if not root.is_dir():
            raise FileExistsError(f"data.root={root} exists and is not a directory")
        if any(root.iterdir()) and not (root / COMPLETE_MARKER).is_file():
            raise FileExistsError(
                f"data.root={root} is a non-empty directory without a {COMPLETE_MARKER} marker; "
                "refusing to overwrite it (remove it or choose another data.synthetic.name)"
            )


def _move_into_place(tmp: Path, root: Path, cfg: SyntheticConfig, force: bool) -> bool:
    """Rename the generated `tmp` to `root` (False: another process put the same data there first).

    An old root is moved aside first and deleted last."""
    old = None
    if root.exists():
        if not force and is_complete(root, cfg):  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
            return False
        if any(root.iterdir()):
            old = root.parent / f"{root.name}.old-{os.getpid()}"
            os.replace(root, old)
        else:
            root.rmdir()
    try:
        os.replace(tmp, root)
    except OSError:
        if is_complete(root, cfg):  # lost a race against an identical generation
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return True


def ensure_synthetic(data_cfg: Any, force: bool = False, progress: bool = True) -> Path:
    """Make sure `data_cfg.root` holds the Sounding Shapes data described by `data_cfg.synthetic` -> root.

    Complete root with the same config hash: returned as is. Otherwise the data are generated into
    `<root>.tmp-<pid>` and renamed into place; a previous synthetic root (different hash, or
    `force`) is moved aside and deleted only after the new one is in place. A non-empty root
    without a `_COMPLETE` marker is not ours and raises instead of being touched.
    """
    plain = _to_plain(data_cfg)
    if isinstance(plain, Mapping) and plain.get("subset") == "avss":  # semantic Sounding Shapes (AVSS layout)
        from avs.data.synthetic.semantic import ensure_semantic

        return ensure_semantic(data_cfg, force=force, progress=progress)
    cfg, root = _synthetic_config(data_cfg)
    if not force and is_complete(root, cfg):
        log.info("Sounding Shapes at %s is complete (hash %s)", root, config_hash(cfg)[:12])
        return root
    _refuse_foreign(root)
    log.warning(
        "generating Sounding Shapes at %s (%s, %s clips, %d px, T=%d)",
        root,
        cfg.subset,
        cfg.clips,
        cfg.image_size,
        cfg.num_frames,
    )
    tmp = root.parent / f"{root.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    start = time.perf_counter()
    try:
        generate(tmp, cfg, progress=progress)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if _move_into_place(tmp, root, cfg, force):
        log.warning("Sounding Shapes ready at %s (%.1f s)", root, time.perf_counter() - start)
    return root
