"""Semantic Sounding Shapes: the Sounding Shapes world written in the AVSBench-semantic (AVSS) layout.

Classes are the world's categories (class i + 1 = category i, class 0 = background); a mask pixel
carries the class of the sounding object visible there, stored as a colour of the AVSS palette.
Clip i of a split comes from source `SOURCES[i % 3]`: v1s (5 frames, one object sounds
throughout, as S4; train keeps only frame 0's mask), v1m (5 frames, per-segment sounding sets, as
MS3) and v2 (10 frames, as MS3). Objects, motion, rendering and audio are the Sounding Shapes ones
(avs.data.synthetic.clip / render / sound); the S4/MS3 generator's output is unchanged by this module.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from avs.data.avss_layout import (
    CSV_NAME,
    LABELS_NAME,
    SOURCE_FRAMES,
    SOURCES,
    AVSSRecord,
    frame_path,
    labelled_frames,
    labels_to_colours,
    mask_path,
    metadata_text,
    wav_path,
)
from avs.data.layout import SPLITS
from avs.data.synthetic.clip import _place_objects, _who_sounds
from avs.data.synthetic.render import _render_frames, rle_encode
from avs.data.synthetic.sound import _mix_audio
from avs.data.synthetic.world import SyntheticConfig, build_categories, config_fields, config_hash
from avs.data.synthetic.writer import (
    COMPLETE_MARKER,
    _move_into_place,
    _refuse_foreign,
    _wav_bytes,
    is_complete,
    new_root,
)
from avs.errors import ConfigError
from avs.utils.io import atomic_write_bytes, atomic_write_text

log = logging.getLogger(__name__)

__all__ = ["SemanticConfig", "generate_semantic", "ensure_semantic", "semantic_video_id", "SEMANTIC_META_DIRNAME"]

SEMANTIC_META_DIRNAME = "synthetic_meta"
_SEMANTIC_SEED = 2  # S4 and MS3 use 0 and 1 in their clip seeds
_JPEG_QUALITY = 95


@dataclass(frozen=True)
class SemanticConfig:
    """Generation parameters of one semantic Sounding Shapes root (every field enters the config hash)."""

    seed: int = 0
    clips: Mapping[str, int] = field(default_factory=lambda: {"train": 48, "val": 12, "test": 12})
    image_size: int = 64
    num_categories: int = 8  # classes = num_categories + 1 (background)
    num_objects: tuple[int, int] = (2, 4)
    object_area: tuple[float, float] = (0.08, 0.16)
    min_visible: float = 0.6
    max_speed: float = 0.06
    frame_noise: float = 2.0
    sample_rate: int = 16000
    snr_db: tuple[float, float] = (5.0, 20.0)
    crossfade_ms: float = 15.0
    sounding_probs: tuple[float, ...] = (0.6, 0.3, 0.1)  # v1m / v2: P(1, 2, 3 sounding objects) per segment
    offscreen_prob: float = 0.25  # v1m / v2: chance of an extra off-screen sound

    def __post_init__(self) -> None:
        clips = dict(self.clips)
        if set(clips) - set(SPLITS):
            raise ConfigError(f"clips: keys must be among {SPLITS}, got {sorted(clips)}")
        object.__setattr__(self, "clips", {s: int(clips.get(s, 0)) for s in SPLITS})
        for name in ("num_objects", "object_area", "snr_db", "sounding_probs"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        self.source_config("v2")  # validates the shared fields through SyntheticConfig

    def source_config(self, source: str) -> SyntheticConfig:
        """The S4 (v1s) or MS3 (v1m / v2) Sounding Shapes config of one source subset."""
        return SyntheticConfig(
            seed=self.seed,
            subset="s4" if source == "v1s" else "ms3",
            clips=self.clips,
            image_size=self.image_size,
            num_frames=SOURCE_FRAMES[source],
            num_categories=self.num_categories,
            num_objects=self.num_objects,
            object_area=self.object_area,
            min_visible=self.min_visible,
            max_speed=self.max_speed,
            frame_noise=self.frame_noise,
            sample_rate=self.sample_rate,
            snr_db=self.snr_db,
            crossfade_ms=self.crossfade_ms,
            ms3_sounding_probs=self.sounding_probs,
            offscreen_prob=self.offscreen_prob,
        )

    @property
    def num_classes(self) -> int:
        return self.num_categories + 1

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], key: str = "data.synthetic") -> SemanticConfig:
        values = config_fields(cls, values, key)
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "avss", **json.loads(json.dumps(dataclasses.asdict(self)))}


def semantic_video_id(source: str, split: str, index: int) -> str:
    return f"shapes_avss_{source}_{split}_{index:05d}"


def _make_clip(cfg: SemanticConfig, cats_all: list, split: str, index: int) -> dict[str, Any]:
    """Sample and render clip `index` of `split` -> dict(source, uid, frames, labels, waveform, meta)."""
    source = SOURCES[index % len(SOURCES)]
    scfg = cfg.source_config(source)
    rng = np.random.default_rng([cfg.seed, _SEMANTIC_SEED, SPLITS.index(split), index])
    n = int(rng.integers(cfg.num_objects[0], cfg.num_objects[1] + 1))
    chosen = rng.choice(len(cats_all), size=n, replace=False)
    cats = [cats_all[i] for i in chosen]
    order = rng.permutation(n)
    tracks, full, visible = _place_objects(rng, cats, order, scfg)
    active, offscreen, off_active = _who_sounds(rng, scfg, cats_all, chosen)
    frames = _render_frames(rng, tracks, cats, order, full, scfg)
    labels = np.zeros(frames.shape[:3], dtype=np.int64)  # [T,S,S]; visible masks are disjoint
    for i, cat in enumerate(cats):
        for t in range(scfg.num_frames):
            if active[i, t]:
                labels[t][visible[i, t]] = cat.index + 1
    sources = [(cats[i], active[i]) for i in range(n) if active[i].any()]
    if offscreen is not None:
        sources.append((offscreen, off_active))
    waveform, snr = _mix_audio(rng, sources, scfg)
    uid = semantic_video_id(source, split, index)
    meta = {
        "video_id": uid,
        "source": source,
        "split": split,
        "image_size": cfg.image_size,
        "num_frames": scfg.num_frames,
        "snr_db": round(snr, 3),
        "objects": [
            {
                "category": c.name,
                "class": c.index + 1,
                "sounding": active[i].tolist(),
                "visible_rle": [rle_encode(visible[i, t]) for t in range(scfg.num_frames)],
            }
            for i, c in enumerate(cats)
        ],
        "offscreen": None if offscreen is None else {"category": offscreen.name, "sounding": off_active.tolist()},
    }
    return {"source": source, "uid": uid, "frames": frames, "labels": labels, "waveform": waveform, "meta": meta}


def _image_bytes(array: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    kwargs = {"quality": _JPEG_QUALITY} if fmt == "JPEG" else {"compress_level": 6}
    Image.fromarray(array, mode="RGB").save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _write_clip(root: Path, cfg: SemanticConfig, clip: dict[str, Any], split: str) -> AVSSRecord:
    rec = AVSSRecord(clip["uid"], clip["source"], split)
    for k, frame in enumerate(clip["frames"]):
        atomic_write_bytes(frame_path(root, rec, k), _image_bytes(frame, "JPEG"))
    for k in labelled_frames(rec.source, split):
        atomic_write_bytes(mask_path(root, rec, k), _image_bytes(labels_to_colours(clip["labels"][k]), "PNG"))
    atomic_write_bytes(wav_path(root, rec), _wav_bytes(clip["waveform"], cfg.sample_rate))
    meta_path = root / SEMANTIC_META_DIRNAME / split / f"{rec.uid}.json"
    atomic_write_text(meta_path, json.dumps(clip["meta"], sort_keys=True, separators=(",", ":")))
    return rec


def generate_semantic(root: str | os.PathLike, cfg: SemanticConfig, progress: bool = True) -> Path:
    """Write a complete semantic Sounding Shapes root (AVSS layout, sidecars, `_COMPLETE` last) -> root."""
    from tqdm import tqdm

    root = new_root(root)
    cats = build_categories(cfg.num_categories)
    jobs = [(split, i) for split in SPLITS for i in range(cfg.clips[split])]
    rows = [
        _write_clip(root, cfg, _make_clip(cfg, cats, split, i), split)
        for split, i in tqdm(jobs, desc="Sounding Shapes avss", unit="clip", disable=not progress)
    ]
    atomic_write_text(root / CSV_NAME, metadata_text(rows))
    names = {"background": 0, **{c.name: c.index + 1 for c in cats}}
    atomic_write_text(root / LABELS_NAME, json.dumps(names, indent=1))
    world = {
        "config": cfg.to_dict(),
        "config_hash": config_hash(cfg),
        "categories": [dataclasses.asdict(c) for c in cats],
    }
    atomic_write_text(root / SEMANTIC_META_DIRNAME / "generation.json", json.dumps(world, indent=1, sort_keys=True))
    atomic_write_text(root / COMPLETE_MARKER, config_hash(cfg) + "\n")
    return root


def semantic_config(data_cfg: Any) -> tuple[SemanticConfig, Path]:
    """(generation config, root) of an AVSS synthetic `data` node; ConfigError naming the key otherwise."""
    from omegaconf import DictConfig, OmegaConf

    data = OmegaConf.to_container(data_cfg, resolve=True) if isinstance(data_cfg, DictConfig) else dict(data_cfg)
    if data.get("synthetic") is None:
        raise ConfigError("data.synthetic is not set: this data config does not describe a synthetic dataset")
    if data.get("root") in (None, ""):
        raise ConfigError("data.root: expected the directory to generate Sounding Shapes into")
    cfg = SemanticConfig.from_mapping(data["synthetic"])
    for key, value in (("image_size", cfg.image_size), ("num_classes", cfg.num_classes)):
        if key in data and data[key] != value:
            raise ConfigError(f"data.{key}={data[key]!r} differs from the generated {value!r} (data.synthetic sets it)")
    return cfg, Path(data["root"]).expanduser()


def ensure_semantic(data_cfg: Any, force: bool = False, progress: bool = True) -> Path:
    """Make sure `data_cfg.root` holds the semantic Sounding Shapes of `data_cfg.synthetic` -> root
    (same caching and replacement rules as avs.data.synthetic.ensure_synthetic)."""
    cfg, root = semantic_config(data_cfg)
    if not force and is_complete(root, cfg):
        log.info("semantic Sounding Shapes at %s is complete (hash %s)", root, config_hash(cfg)[:12])
        return root
    _refuse_foreign(root)
    log.warning("generating semantic Sounding Shapes at %s (%s clips, %d px)", root, cfg.clips, cfg.image_size)
    tmp = root.parent / f"{root.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        generate_semantic(tmp, cfg, progress=progress)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _move_into_place(tmp, root, cfg, force)
    return root
