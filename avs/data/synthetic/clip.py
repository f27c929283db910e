"""One Sounding Shapes clip: sample the objects and who sounds, render frames, masks and audio."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from avs.data.layout import SPLITS
from avs.data.synthetic.render import (
    _object_masks,
    _render_frames,
    _sample_tracks,
    _visible_masks,
    rle_encode,
)
from avs.data.synthetic.sound import _mix_audio, _segment_bounds
from avs.data.synthetic.world import Category, SyntheticConfig


@dataclass
class _Clip:
    video_id: str
    split: str
    frames: np.ndarray  # [T,S,S,3] uint8
    masks: np.ndarray  # [T,S,S] bool
    waveform: np.ndarray  # [n] int16
    meta: dict[str, Any]


_SUBSET_SEED = {"s4": 0, "ms3": 1}  # enters each clip's seed: changing it changes every clip


def _clip_rng(cfg: SyntheticConfig, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([cfg.seed, _SUBSET_SEED[cfg.subset], SPLITS.index(split), index])


def video_id(subset: str, split: str, index: int) -> str:
    """Deterministic, unique id of clip `index` of `split`."""
    return f"shapes_{subset}_{split}_{index:05d}"


def _place_objects(rng: np.random.Generator, cats: list[Category], order: np.ndarray, cfg: SyntheticConfig):
    """Rejection-sample trajectories until every object stays mostly visible -> (tracks, full, visible)."""
    best = None
    for _ in range(64):
        tracks = _sample_tracks(rng, cats, cfg)
        full = _object_masks(tracks, cats, cfg.image_size)
        visible = _visible_masks(full, order)
        full_px = full.sum(axis=(2, 3))
        frac = np.where(full_px > 0, visible.sum(axis=(2, 3)) / np.maximum(full_px, 1), 0.0)  # [n,T]
        score = float(frac.min())
        if best is None or score > best[0]:
            best = (score, tracks, full, visible)
        if score >= cfg.min_visible:
            break
    return best[1:]


def _who_sounds(rng: np.random.Generator, cfg: SyntheticConfig, cats_all: list[Category], chosen: np.ndarray):
    """[n,T] on-screen activity, and an optional off-screen category with its [T] activity.

    MS3: each segment keeps the previous segment's set of sounding on-screen objects with
    probability `cfg.persistence`, else draws a new set (1, 2, 3 sources with `ms3_sounding_probs`).
    """
    n, T = len(chosen), cfg.num_frames
    active = np.zeros((n, T), dtype=bool)
    offscreen: Category | None = None
    off_active = np.zeros(T, dtype=bool)
    if cfg.subset == "s4":
        active[0] = True
        return active, offscreen, off_active
    probs = np.asarray(cfg.ms3_sounding_probs[:n], dtype=np.float64)
    probs /= probs.sum()
    for t in range(T):
        # persistence 0 (the default) draws nothing here: the random stream of older data is unchanged
        if t > 0 and cfg.persistence > 0 and rng.uniform() < cfg.persistence:
            active[:, t] = active[:, t - 1]  # this segment keeps the previous segment's sounding set
            continue
        k = int(rng.choice(len(probs), p=probs)) + 1
        active[rng.choice(n, size=k, replace=False), t] = True
    if rng.uniform() < cfg.offscreen_prob:
        others = [c for c in cats_all if c.index not in set(chosen.tolist())]
        if others:
            offscreen = others[int(rng.integers(len(others)))]
            off_active = rng.uniform(size=T) < 0.5
            off_active[int(rng.integers(T))] = True
    return active, offscreen, off_active


def _clip_meta(
    cfg: SyntheticConfig,
    vid: str,
    split: str,
    cats: list[Category],
    order: np.ndarray,
    tracks: dict[str, np.ndarray],
    visible: np.ndarray,
    active: np.ndarray,
    offscreen: Category | None,
    off_active: np.ndarray,
    masks: np.ndarray,
    snr: float,
) -> dict[str, Any]:
    """The clip's sidecar: everything needed to rebuild its GT and score visual-only predictors."""
    T = cfg.num_frames
    r4 = lambda a: [round(float(x), 3) for x in a]  # noqa: E731
    return {
        "video_id": vid,
        "subset": cfg.subset,
        "split": split,
        "image_size": cfg.image_size,
        "num_frames": T,
        "sample_rate": cfg.sample_rate,
        "segment_starts_s": [round(b / cfg.sample_rate, 4) for b in _segment_bounds(cfg)[:-1].tolist()],
        "category": cats[0].name if cfg.subset == "s4" else "",
        "snr_db": round(snr, 3),
        "objects": [
            {
                "category": cats[i].name,
                "draw_rank": int(np.flatnonzero(order == i)[0]),
                "cx": r4(tracks["cx"][i]),
                "cy": r4(tracks["cy"][i]),
                "radius": r4(tracks["radius"][i]),
                "angle": r4(tracks["angle"][i]),
                "sounding": active[i].tolist(),
                "visible_pixels": visible[i].sum(axis=(1, 2)).tolist(),
                "visible_rle": [rle_encode(visible[i, t]) for t in range(T)],
            }
            for i in range(len(cats))
        ],
        "offscreen": None if offscreen is None else {"category": offscreen.name, "sounding": off_active.tolist()},
        "gt_pixels": masks.sum(axis=(1, 2)).tolist(),
    }


def _make_clip(cfg: SyntheticConfig, cats_all: list[Category], split: str, index: int) -> _Clip:
    """Sample and render one clip (deterministic in (seed, subset, split, index))."""
    rng = _clip_rng(cfg, split, index)
    n = int(rng.integers(cfg.num_objects[0], cfg.num_objects[1] + 1))
    chosen = rng.choice(len(cats_all), size=n, replace=False)  # chosen[0] is uniform over categories
    cats = [cats_all[i] for i in chosen]
    order = rng.permutation(n)  # draw order, independent of who sounds
    tracks, full, visible = _place_objects(rng, cats, order, cfg)
    active, offscreen, off_active = _who_sounds(rng, cfg, cats_all, chosen)

    frames = _render_frames(rng, tracks, cats, order, full, cfg)
    masks = np.einsum("nt,nthw->thw", active.astype(np.int32), visible.astype(np.int32)) > 0  # [T,S,S]
    sources = [(cats[i], active[i]) for i in range(n) if active[i].any()]
    if offscreen is not None:
        sources.append((offscreen, off_active))
    waveform, snr = _mix_audio(rng, sources, cfg)

    vid = video_id(cfg.subset, split, index)
    meta = _clip_meta(cfg, vid, split, cats, order, tracks, visible, active, offscreen, off_active, masks, snr)
    return _Clip(vid, split, frames, masks, waveform, meta)
