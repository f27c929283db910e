"""Sounding Shapes: a procedural dataset in the AVSBench-object layout where only the audio says what to segment.

Each category is a coloured, textured shape paired with a tonal sound (its own fundamental,
partials and amplitude pattern). A clip shows 2-4 objects of distinct categories moving over a
low-contrast noise background. S4: one object sounds for the whole clip; MS3: each audio segment
has its own non-empty set of sounding on-screen objects, sometimes plus an off-screen sound. Which
object sounds is independent of everything visible (category, size, position, motion, draw order),
so visual-only predictors are capped (`compute_ceilings`) while audio + vision can reach 100 %.

Audio segment t is the VGGish example window [0.96 t, 0.96 (t+1)) s (the last one runs to the end
of the clip); frame t (file index t+1) and its mask belong to segment t.
See docs/synthetic.md for the layout, the world and the measured ceilings.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import logging
import os
import shutil
import time
import wave
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from avs.errors import ConfigError
from avs.utils.io import atomic_write_bytes, atomic_write_text

__all__ = [
    "GENERATOR_VERSION",
    "SHAPES",
    "COLOURS",
    "SOUNDS",
    "Category",
    "SyntheticConfig",
    "build_categories",
    "config_hash",
    "generate",
    "compute_ceilings",
    "ensure_synthetic",
    "is_complete",
    "rle_encode",
    "rle_decode",
    "video_id",
]

log = logging.getLogger(__name__)

# Bump when the generator's output for a given config changes: a new version invalidates
# every cached root (its `_COMPLETE` hash no longer matches).
GENERATOR_VERSION = 1

SPLITS = ("train", "val", "test")
COMPLETE_MARKER = "_COMPLETE"
META_DIRNAME = "synthetic_meta"
# subset -> (folder under root, prefix of the data folder and csv)
SUBSET_DIRS = {"s4": "Single-source", "ms3": "Multi-sources"}

SHAPES = ("circle", "square", "triangle", "diamond", "cross", "ring", "star", "hexagon", "crescent", "frame")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (225, 45, 40),
    "green": (40, 185, 70),
    "blue": (45, 85, 235),
    "yellow": (240, 215, 35),
    "magenta": (215, 55, 205),
    "cyan": (35, 205, 215),
    "orange": (250, 140, 25),
    "white": (245, 245, 245),
}
TEXTURES = ("solid", "stripes", "checker", "dots")
# Sound families: partial frequency ratios and weights, and the amplitude / frequency pattern.
# Every temporal pattern repeats well within one 0.96 s segment, so each segment sounds alike.
SOUNDS: dict[str, dict[str, Any]] = {
    "bell": dict(ratios=(1.0, 2.76, 5.40, 8.93), weights=(1.0, 0.6, 0.4, 0.25), strike=0.24, decay=0.07),
    "horn": dict(ratios=(1, 2, 3, 4, 5, 6), weights=(1.0, 0.9, 0.7, 0.5, 0.35, 0.2), vibrato=(5.0, 0.008)),
    "flute": dict(ratios=(1, 2, 3), weights=(1.0, 0.25, 0.08), am=(3.125, 0.35)),
    "buzz": dict(ratios=tuple(range(1, 13)), weights=tuple(1.0 / k for k in range(1, 13)), am=(10.4, 0.9)),
    "organ": dict(ratios=(1, 3, 5, 7, 9), weights=(1.0, 1 / 3, 1 / 5, 1 / 7, 1 / 9)),
    "chime": dict(ratios=(1.0, 4.2), weights=(1.0, 0.5), strike=0.32, decay=0.12),
    "drone": dict(ratios=(1, 2, 3, 4), weights=(1.0, 0.7, 0.5, 0.3), am=(2.083, 0.5)),
    "whistle": dict(ratios=(1,), weights=(1.0,), vibrato=(6.25, 0.03)),
    "pulse": dict(ratios=(1, 2, 3), weights=(1.0, 0.5, 0.3), gate=6.25),
    "hum": dict(ratios=(1, 2, 3), weights=(1.0, 0.6, 0.4), am=(16.7, 0.6)),
}
_F0_RANGE = (160.0, 1800.0)  # fundamentals, log-spaced over the categories
_MAX_PARTIAL_HZ = 7000.0  # partials above this are dropped (VGGish mel tops out at 7.5 kHz)
_WORLD_SEED = 20240611  # fixed: the world (category -> f0 assignment) does not depend on cfg.seed
_SOURCE_RMS = 0.1


@dataclass(frozen=True)
class Category:
    """One Sounding Shapes category: a visual identity and a sound identity."""

    index: int
    name: str
    shape: str
    colour: str
    rgb: tuple[int, int, int]
    texture: str
    sound: str
    f0: float


def build_categories(num_categories: int) -> list[Category]:
    """The fixed world of `num_categories` categories (same list for every seed)."""
    max_k = len(SHAPES) * 3
    if not 2 <= num_categories <= max_k:
        raise ConfigError(f"num_categories must be in [2, {max_k}], got {num_categories}")
    colour_names = list(COLOURS)
    sound_names = list(SOUNDS)
    # Fundamentals on a log grid, assigned by a fixed permutation so pitch is not ordered by shape.
    f0_grid = np.geomspace(_F0_RANGE[0], _F0_RANGE[1], num_categories)
    perm = np.random.default_rng(_WORLD_SEED).permutation(num_categories)
    cats = []
    for i in range(num_categories):
        rep = i // len(SHAPES)  # 0, 1, 2: shapes repeat with a shifted colour so (shape, colour) stay unique
        shape = SHAPES[i % len(SHAPES)]
        colour = colour_names[(i + 5 * rep) % len(colour_names)]
        sound = sound_names[i % len(sound_names)]
        texture = TEXTURES[(i + rep) % len(TEXTURES)]
        name = f"{colour}_{shape}_{sound}"
        f0 = float(round(f0_grid[perm[i]], 2))
        cats.append(Category(i, name, shape, colour, COLOURS[colour], texture, sound, f0))
    return cats


# ------------------------------------------------------------------------------------------------
# configuration


def _pair(value: Any, key: str, cast: type) -> tuple:
    if not isinstance(value, Sequence) or isinstance(value, str) or len(value) != 2:
        raise ConfigError(f"{key}: expected a [low, high] pair, got {value!r}")
    lo, hi = cast(value[0]), cast(value[1])
    if lo > hi:
        raise ConfigError(f"{key}: low {lo} > high {hi}")
    return (lo, hi)


@dataclass(frozen=True)
class SyntheticConfig:
    """Generation parameters of one Sounding Shapes root (every field enters `config_hash`)."""

    seed: int = 0
    subset: str = "s4"  # 's4' | 'ms3'
    clips: Mapping[str, int] = field(default_factory=lambda: {"train": 160, "val": 32, "test": 32})
    image_size: int = 96
    num_frames: int = 5
    num_categories: int = 8
    # objects per clip [min, max]; None -> (2, 4) for s4, (3, 4) for ms3 (see docs/synthetic.md)
    num_objects: tuple[int, int] | None = None
    object_area: tuple[float, float] = (0.08, 0.16)  # fraction of the image per object (unoccluded)
    min_visible: float = 0.6  # every object keeps >= this fraction of its area visible in every frame
    max_speed: float = 0.06  # fraction of the image side per frame
    frame_noise: float = 2.0  # std of per-frame pixel noise (0-255 scale)
    sample_rate: int = 16000
    snr_db: tuple[float, float] = (5.0, 20.0)  # sources vs background noise, per clip
    crossfade_ms: float = 15.0
    # MS3: probabilities of 1, 2, 3, ... sounding on-screen objects per segment (truncated at the count)
    ms3_sounding_probs: tuple[float, ...] = (0.6, 0.3, 0.1)
    offscreen_prob: float = 0.25  # MS3: chance that a clip also carries an off-screen category's sound

    def __post_init__(self) -> None:
        if self.subset not in SUBSET_DIRS:
            raise ConfigError(f"subset: expected one of {sorted(SUBSET_DIRS)}, got {self.subset!r}")
        clips = dict(self.clips)
        if set(clips) - set(SPLITS):
            raise ConfigError(f"clips: keys must be among {SPLITS}, got {sorted(clips)}")
        clips = {s: int(clips.get(s, 0)) for s in SPLITS}
        if any(v < 0 for v in clips.values()) or sum(clips.values()) == 0:
            raise ConfigError(f"clips: expected non-negative counts with at least one clip, got {clips}")
        object.__setattr__(self, "clips", clips)
        if int(self.image_size) < 32:
            raise ConfigError(f"image_size: expected >= 32, got {self.image_size}")
        if int(self.num_frames) < 1:
            raise ConfigError(f"num_frames: expected >= 1, got {self.num_frames}")
        if int(self.sample_rate) < 16000:
            raise ConfigError(f"sample_rate: expected >= 16000 (VGGish input), got {self.sample_rate}")
        build_categories(int(self.num_categories))  # validates the range
        n_obj = self.num_objects
        if n_obj is None:
            n_obj = (2, 4) if self.subset == "s4" else (3, 4)
        n_obj = _pair(n_obj, "num_objects", int)
        if n_obj[0] < 1 or n_obj[1] > self.num_categories:
            raise ConfigError(f"num_objects: expected 1 <= min <= max <= num_categories, got {n_obj}")
        object.__setattr__(self, "num_objects", n_obj)
        area = _pair(self.object_area, "object_area", float)
        if not 0.0 < area[0] <= area[1] <= 0.5:
            raise ConfigError(f"object_area: expected 0 < low <= high <= 0.5, got {area}")
        object.__setattr__(self, "object_area", area)
        object.__setattr__(self, "snr_db", _pair(self.snr_db, "snr_db", float))
        probs = tuple(float(p) for p in self.ms3_sounding_probs)
        if not probs or any(p < 0 for p in probs) or sum(probs) <= 0 or probs[0] <= 0:
            raise ConfigError(f"ms3_sounding_probs: expected non-negative weights with p(1) > 0, got {probs}")
        object.__setattr__(self, "ms3_sounding_probs", probs)
        if not 0.0 <= self.offscreen_prob <= 1.0:
            raise ConfigError(f"offscreen_prob: expected a probability, got {self.offscreen_prob}")
        if not 0.0 <= self.min_visible <= 1.0:
            raise ConfigError(f"min_visible: expected a fraction in [0, 1], got {self.min_visible}")
        for name in ("seed", "image_size", "num_frames", "num_categories", "sample_rate"):
            object.__setattr__(self, name, int(getattr(self, name)))

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], key: str = "data.synthetic") -> SyntheticConfig:
        """Build from a plain mapping (e.g. a resolved config node); `name` is ignored, unknown keys raise."""
        values = dict(values)
        values.pop("name", None)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"{key}: unknown key(s) {unknown}; expected some of {sorted(known)}")
        for name in ("num_objects", "object_area", "snr_db", "ms3_sounding_probs"):
            if values.get(name) is not None:
                values[name] = tuple(values[name])
        try:
            return cls(**values)
        except ValueError as exc:
            raise ConfigError(f"{key}.{exc}") from exc

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of every field (tuples as lists)."""
        out = dataclasses.asdict(self)
        return json.loads(json.dumps(out))


def config_hash(cfg: SyntheticConfig) -> str:
    """sha256 (hex) of the generator version and every generation parameter."""
    payload = json.dumps({"generator_version": GENERATOR_VERSION, **cfg.to_dict()}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


# ------------------------------------------------------------------------------------------------
# shapes


def _inside(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Point-in-shape for local coordinates (unit disc, v up): [...] float -> [...] bool."""
    au, av = np.abs(u), np.abs(v)
    r2 = u * u + v * v
    if shape == "circle":
        return r2 <= 1.0
    if shape == "square":
        return np.maximum(au, av) <= 0.7071
    if shape == "triangle":  # equilateral, inscribed in the unit circle, apex up
        return (v >= -0.5) & (v <= 1.0 - np.sqrt(3.0) * au)
    if shape == "diamond":
        return au / 0.7 + av <= 1.0
    if shape == "cross":
        return ((au <= 0.3) & (av <= 0.95)) | ((av <= 0.3) & (au <= 0.95))
    if shape == "ring":
        return (r2 <= 1.0) & (r2 >= 0.55**2)
    if shape == "star":  # five points, inner radius 0.45
        sector = 2.0 * np.pi / 5.0
        phi = np.abs(np.mod(np.arctan2(u, v), sector) - sector / 2.0)  # [0, sector/2]; 0 at an inner vertex
        # edge from the inner vertex (angle 0, radius 0.45) to the outer vertex (angle sector/2, radius 1)
        r = np.sqrt(r2)
        x, y = r * np.cos(phi), r * np.sin(phi)
        p1 = np.array([0.45, 0.0])
        p2 = np.array([np.cos(sector / 2.0), np.sin(sector / 2.0)])
        d = p2 - p1
        # the origin lies on the positive side of the edge
        return d[0] * (y - p1[1]) - d[1] * (x - p1[0]) >= 0.0
    if shape == "hexagon":  # vertices at (+-1, 0)
        h = np.sqrt(3.0) / 2.0
        return (av <= h) & (h * au + 0.5 * av <= h)
    if shape == "crescent":
        return (r2 <= 1.0) & ((u - 0.45) ** 2 + v * v > 0.75**2)
    if shape == "frame":
        m = np.maximum(au, av)
        return (m <= 0.7071) & (m >= 0.4)
    raise ValueError(f"unknown shape {shape!r}")


@functools.cache
def _unit_area(shape: str) -> float:
    """Area of `shape` in local units (the unit disc has area pi)."""
    g = (np.arange(801) - 400) / 400.0
    u, v = np.meshgrid(g, g)
    return float(_inside(shape, u, v).mean() * 4.0)


def _texture(kind: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Brightness multiplier of a texture in local coordinates: [...] -> [...] float."""
    if kind == "solid":
        return np.ones_like(u)
    if kind == "stripes":
        return np.where(np.sin(u * np.pi * 3.5) > 0.0, 1.0, 0.72)
    if kind == "checker":
        return np.where((np.floor(u * 2.5) + np.floor(v * 2.5)) % 2 == 0, 1.0, 0.75)
    if kind == "dots":
        fu, fv = np.mod(u * 3.0, 1.0) - 0.5, np.mod(v * 3.0, 1.0) - 0.5
        return np.where(fu * fu + fv * fv < 0.07, 0.65, 1.0)
    raise ValueError(f"unknown texture {kind!r}")


def _reflect(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Fold positions into [lo, hi] as if bouncing off walls."""
    span = hi - lo
    if span <= 0:
        return np.full_like(x, (lo + hi) / 2.0)
    y = np.mod(x - lo, 2.0 * span)
    return lo + np.where(y > span, 2.0 * span - y, y)


# ------------------------------------------------------------------------------------------------
# one clip


@dataclass
class _Clip:
    video_id: str
    split: str
    frames: np.ndarray  # [T,S,S,3] uint8
    masks: np.ndarray  # [T,S,S] bool
    waveform: np.ndarray  # [n] int16
    meta: dict[str, Any]


def _sample_tracks(rng: np.random.Generator, cats: list[Category], cfg: SyntheticConfig) -> dict[str, np.ndarray]:
    """Smooth trajectories for n objects -> dict of [n,T] arrays (cx, cy, radius, angle).

    Start positions are spread out by best-candidate sampling; objects then drift in straight lines
    (bouncing off the borders) while slowly rotating and breathing in scale. Up to 25 % of an
    object's radius may leave the frame.
    """
    S, T, n = cfg.image_size, cfg.num_frames, len(cats)
    t = np.arange(T, dtype=np.float64)  # [T]
    area = rng.uniform(*cfg.object_area, size=n)
    unit = np.array([_unit_area(c.shape) for c in cats])
    r0 = np.sqrt(area * S * S / unit)  # radius in px so that the unoccluded area matches
    wobble = rng.uniform(0.0, 0.06, size=n)[:, None] * np.sin(
        rng.uniform(0.4, 1.2, size=n)[:, None] * t[None, :] + rng.uniform(0, 2 * np.pi, size=n)[:, None]
    )
    radius = r0[:, None] * (1.0 + wobble)  # [n,T]
    margin = np.minimum(0.75 * radius.max(axis=1), S / 2.0 - 1.0)  # centre keeps this far from the border
    cx0, cy0 = np.empty(n), np.empty(n)
    for i in range(n):  # best of 16 candidates: largest clearance to the objects placed so far
        cand = rng.uniform(0, 1, size=(16, 2)) * (S - 2 * margin[i]) + margin[i]
        if i == 0:
            pick = cand[0]
        else:
            d = np.hypot(cand[:, None, 0] - cx0[None, :i], cand[:, None, 1] - cy0[None, :i])  # [16,i]
            clearance = (d / (r0[i] + r0[None, :i])).min(axis=1)
            pick = cand[int(clearance.argmax())]
        cx0[i], cy0[i] = pick
    speed = rng.uniform(0.25, 1.0, size=n) * cfg.max_speed * S
    heading = rng.uniform(0, 2 * np.pi, size=n)
    cx = np.stack([_reflect(cx0[i] + speed[i] * np.cos(heading[i]) * t, margin[i], S - margin[i]) for i in range(n)])
    cy = np.stack([_reflect(cy0[i] + speed[i] * np.sin(heading[i]) * t, margin[i], S - margin[i]) for i in range(n)])
    angle = rng.uniform(0, 2 * np.pi, size=n)[:, None] + rng.uniform(-0.25, 0.25, size=n)[:, None] * t[None, :]
    return {"cx": cx, "cy": cy, "radius": radius, "angle": angle}


def _local_coords(S: int, cx: float, cy: float, radius: float, angle: float) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre grid -> object-local (u, v), each [S,S], v pointing up."""
    g = np.arange(S, dtype=np.float64) + 0.5
    dx = (g[None, :] - cx) / radius  # [1,S]
    dy = (cy - g[:, None]) / radius  # [S,1] (image y points down)
    c, s = np.cos(angle), np.sin(angle)
    return c * dx + s * dy, -s * dx + c * dy  # [S,S] each


def _object_masks(tracks: dict[str, np.ndarray], cats: list[Category], S: int) -> np.ndarray:
    """Full (unoccluded) masks -> bool [n,T,S,S]."""
    n, T = tracks["cx"].shape
    out = np.zeros((n, T, S, S), dtype=bool)
    for i in range(n):
        for t in range(T):
            u, v = _local_coords(S, *(tracks[k][i, t] for k in ("cx", "cy", "radius", "angle")))
            out[i, t] = _inside(cats[i].shape, u, v)
    return out


def _visible_masks(full: np.ndarray, order: np.ndarray) -> np.ndarray:
    """Occlusion by draw order (order[j] = object drawn j-th, later on top): [n,T,S,S] -> [n,T,S,S]."""
    visible = np.zeros_like(full)
    covered = np.zeros(full.shape[1:], dtype=bool)  # [T,S,S]
    for obj in order[::-1]:
        visible[obj] = full[obj] & ~covered
        covered |= full[obj]
    return visible


def _background(rng: np.random.Generator, S: int) -> np.ndarray:
    """Low-contrast smooth noise texture -> float [S,S,3] (0-255 scale)."""
    import cv2

    base = rng.uniform(95.0, 150.0) + rng.uniform(-8.0, 8.0, size=3)
    coarse = rng.normal(0.0, 1.0, size=(max(2, S // 12), max(2, S // 12))).astype(np.float32)
    smooth = cv2.resize(coarse, (S, S), interpolation=cv2.INTER_CUBIC).astype(np.float64)  # [S,S]
    fine = rng.normal(0.0, 1.0, size=(S, S))
    tex = 10.0 * smooth + 3.0 * fine
    return base[None, None, :] + tex[:, :, None] * np.array([1.0, 0.95, 0.9])[None, None, :]


def _render_frames(
    rng: np.random.Generator,
    tracks: dict[str, np.ndarray],
    cats: list[Category],
    order: np.ndarray,
    full: np.ndarray,
    cfg: SyntheticConfig,
) -> np.ndarray:
    """Paint background + objects in draw order -> uint8 [T,S,S,3]."""
    S, T = cfg.image_size, cfg.num_frames
    bg = _background(rng, S)
    jitter = rng.uniform(0.85, 1.08, size=len(cats))
    frames = np.empty((T, S, S, 3), dtype=np.uint8)
    for t in range(T):
        img = bg.copy()
        for obj in order:
            inside = full[obj, t]
            if not inside.any():
                continue
            u, v = _local_coords(S, *(tracks[k][obj, t] for k in ("cx", "cy", "radius", "angle")))
            shade = _texture(cats[obj].texture, u, v) * (1.0 + 0.12 * (v - u) / 2.0) * jitter[obj]  # [S,S]
            colour = np.asarray(cats[obj].rgb, dtype=np.float64)
            img[inside] = shade[inside][:, None] * colour[None, :]
        img += rng.normal(0.0, cfg.frame_noise, size=img.shape)
        frames[t] = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    return frames


def _segment_bounds(cfg: SyntheticConfig) -> np.ndarray:
    """Sample index of each audio segment start, plus the end: [T+1]; segment t = VGGish example t."""
    n = cfg.num_frames * cfg.sample_rate
    starts = [int(round(0.96 * t * cfg.sample_rate)) for t in range(cfg.num_frames)]
    return np.array(starts + [n], dtype=np.int64)


def _category_signal(rng: np.random.Generator, cat: Category, n: int, sr: int) -> np.ndarray:
    """A category's sound for n samples, RMS-normalised -> float [n]."""
    spec = SOUNDS[cat.sound]
    t = np.arange(n, dtype=np.float64) / sr
    f0 = cat.f0 * rng.uniform(0.985, 1.015)
    vib_rate, vib_depth = spec.get("vibrato", (0.0, 0.0))
    if vib_depth > 0:  # instantaneous frequency f (1 + d sin(2 pi r t)) integrated to a phase
        vib = np.cos(2 * np.pi * vib_rate * t + rng.uniform(0, 2 * np.pi))
        base_phase = 2 * np.pi * f0 * (t - vib_depth / (2 * np.pi * vib_rate) * vib)
    else:
        base_phase = 2 * np.pi * f0 * t
    sig = np.zeros(n)
    for ratio, weight in zip(spec["ratios"], spec["weights"]):
        if ratio * f0 > _MAX_PARTIAL_HZ:
            continue
        sig += weight * rng.uniform(0.85, 1.15) * np.sin(ratio * base_phase + rng.uniform(0, 2 * np.pi))
    if "am" in spec:
        rate, depth = spec["am"]
        sig *= 1.0 - depth * 0.5 * (1.0 + np.sin(2 * np.pi * rate * t + rng.uniform(0, 2 * np.pi)))
    if "strike" in spec:
        period = spec["strike"]
        sig *= np.exp(-np.mod(t + rng.uniform(0, period), period) / spec["decay"])
    if "gate" in spec:
        ramp = np.sin(2 * np.pi * spec["gate"] * t + rng.uniform(0, 2 * np.pi))
        sig *= np.clip(ramp * 4.0 + 0.5, 0.0, 1.0)  # soft square gate
    rms = np.sqrt(np.mean(sig * sig))
    return sig / max(rms, 1e-8)


def _pink_noise(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    """Pink-ish (1/f power) background noise, RMS 1 -> float [n]."""
    spec = np.fft.rfft(rng.normal(0.0, 1.0, size=n))
    f = np.fft.rfftfreq(n, 1.0 / sr)
    spec /= np.sqrt(np.maximum(f, 30.0))
    x = np.fft.irfft(spec, n=n)
    return x / max(np.sqrt(np.mean(x * x)), 1e-12)


def _gain_curve(active: np.ndarray, bounds: np.ndarray, crossfade: int) -> np.ndarray:
    """Per-segment on/off [T] -> per-sample gain [n]; raised-cosine crossfades centred on segment starts."""
    n = int(bounds[-1])
    gain = np.zeros(n)
    for t, on in enumerate(active):
        if on:
            gain[bounds[t] : bounds[t + 1]] = 1.0
    if crossfade < 2:
        return gain
    ramp = 0.5 - 0.5 * np.cos(np.pi * (np.arange(crossfade) + 0.5) / crossfade)  # 0 -> 1
    for t in range(1, len(active)):
        if active[t] == active[t - 1]:
            continue
        lo = int(bounds[t]) - crossfade // 2
        gain[lo : lo + crossfade] = ramp if active[t] else ramp[::-1]
    return gain


def _mix_audio(
    rng: np.random.Generator,
    sources: list[tuple[Category, np.ndarray]],
    cfg: SyntheticConfig,
) -> tuple[np.ndarray, float]:
    """Sum sources gated per segment (cat, active [T]) + noise at a random SNR -> (int16 [n], snr_db)."""
    sr = cfg.sample_rate
    bounds = _segment_bounds(cfg)
    n = int(bounds[-1])
    crossfade = int(round(cfg.crossfade_ms * sr / 1000.0))
    mix = np.zeros(n)
    for cat, active in sources:
        level = _SOURCE_RMS * rng.uniform(0.6, 1.0)
        mix += level * _category_signal(rng, cat, n, sr) * _gain_curve(active, bounds, crossfade)
    snr = float(rng.uniform(*cfg.snr_db))
    signal_rms = np.sqrt(np.mean(mix * mix))
    mix += _pink_noise(rng, n, sr) * signal_rms / (10.0 ** (snr / 20.0))
    peak = np.abs(mix).max()
    if peak > 0.9:
        mix *= 0.9 / peak
    return np.clip(np.rint(mix * 32768.0), -32768, 32767).astype(np.int16), snr


def rle_encode(mask: np.ndarray) -> list[int]:
    """Bool [H,W] -> flat [start0, len0, start1, len1, ...] runs of True in row-major order."""
    flat = np.concatenate([[0], mask.reshape(-1).astype(np.int8), [0]])
    edges = np.flatnonzero(np.diff(flat))
    starts, ends = edges[0::2], edges[1::2]
    return np.stack([starts, ends - starts], axis=1).reshape(-1).tolist()


def rle_decode(runs: Sequence[int], shape: tuple[int, int]) -> np.ndarray:
    """Inverse of `rle_encode`: flat runs -> bool [H,W]."""
    flat = np.zeros(shape[0] * shape[1], dtype=bool)
    runs = np.asarray(runs, dtype=np.int64).reshape(-1, 2)
    for start, length in runs:
        flat[start : start + length] = True
    return flat.reshape(shape)


def _clip_rng(cfg: SyntheticConfig, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([cfg.seed, list(SUBSET_DIRS).index(cfg.subset), SPLITS.index(split), index])


def video_id(subset: str, split: str, index: int) -> str:
    """Deterministic, unique id of clip `index` of `split`."""
    return f"shapes_{subset}_{split}_{index:05d}"


def _make_clip(cfg: SyntheticConfig, cats_all: list[Category], split: str, index: int) -> _Clip:
    """Sample and render one clip (deterministic in (seed, subset, split, index))."""
    rng = _clip_rng(cfg, split, index)
    S, T = cfg.image_size, cfg.num_frames
    n = int(rng.integers(cfg.num_objects[0], cfg.num_objects[1] + 1))
    chosen = rng.choice(len(cats_all), size=n, replace=False)  # chosen[0] is uniform over categories
    cats = [cats_all[i] for i in chosen]
    order = rng.permutation(n)  # draw order, independent of who sounds

    # layout: rejection-sample trajectories until every object stays mostly visible
    best = None
    for _ in range(64):
        tracks = _sample_tracks(rng, cats, cfg)
        full = _object_masks(tracks, cats, S)
        visible = _visible_masks(full, order)
        full_px = full.sum(axis=(2, 3))
        frac = np.where(full_px > 0, visible.sum(axis=(2, 3)) / np.maximum(full_px, 1), 0.0)  # [n,T]
        score = float(frac.min())
        if best is None or score > best[0]:
            best = (score, tracks, full, visible)
        if score >= cfg.min_visible:
            break
    _, tracks, full, visible = best

    # who sounds: [n,T] on-screen activity and optional off-screen source
    active = np.zeros((n, T), dtype=bool)
    offscreen: Category | None = None
    off_active = np.zeros(T, dtype=bool)
    if cfg.subset == "s4":
        active[0] = True
    else:
        probs = np.asarray(cfg.ms3_sounding_probs[:n], dtype=np.float64)
        probs /= probs.sum()
        for t in range(T):
            k = int(rng.choice(len(probs), p=probs)) + 1
            active[rng.choice(n, size=k, replace=False), t] = True
        if rng.uniform() < cfg.offscreen_prob:
            others = [c for c in cats_all if c.index not in set(chosen.tolist())]
            if others:
                offscreen = others[int(rng.integers(len(others)))]
                off_active = rng.uniform(size=T) < 0.5
                off_active[int(rng.integers(T))] = True

    frames = _render_frames(rng, tracks, cats, order, full, cfg)
    masks = np.einsum("nt,nthw->thw", active.astype(np.int32), visible.astype(np.int32)) > 0  # [T,S,S]
    sources = [(cats[i], active[i]) for i in range(n) if active[i].any()]
    if offscreen is not None:
        sources.append((offscreen, off_active))
    waveform, snr = _mix_audio(rng, sources, cfg)

    vid = video_id(cfg.subset, split, index)
    r4 = lambda a: [round(float(x), 3) for x in a]  # noqa: E731
    meta = {
        "video_id": vid,
        "subset": cfg.subset,
        "split": split,
        "image_size": S,
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
            for i in range(n)
        ],
        "offscreen": None if offscreen is None else {"category": offscreen.name, "sounding": off_active.tolist()},
        "gt_pixels": masks.sum(axis=(1, 2)).tolist(),
    }
    return _Clip(vid, split, frames, masks, waveform, meta)


# ------------------------------------------------------------------------------------------------
# writing


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


def _clip_paths(root: Path, subset: str, split: str, category: str, vid: str) -> dict[str, Any]:
    """AVSBench paths of one clip (spec §1.2); frame/mask paths are functions of k = 1..T."""
    base = root / SUBSET_DIRS[subset] / f"{subset}_data"
    if subset == "s4":
        frame_dir = base / "visual_frames" / split / category / vid
        mask_dir = base / "gt_masks" / split / category / vid
        return {
            "frame": lambda k: frame_dir / f"{vid}_{k}.png",
            "mask": lambda k: mask_dir / f"{vid}_{k}.png",
            "wav": base / "audio_wav" / split / category / f"{vid}.wav",
            "pkl": base / "audio_log_mel" / split / category / f"{vid}.pkl",
        }
    return {
        "frame": lambda k: base / "visual_frames" / vid / f"{vid}.mp4_{k}.png",
        "mask": lambda k: base / "gt_masks" / split / vid / f"{vid}_{k}.png",
        "wav": base / "audio_wav" / split / f"{vid}.wav",
        "pkl": base / "audio_log_mel" / split / f"{vid}.pkl",
    }


def _write_clip(root: Path, cfg: SyntheticConfig, clip: _Clip) -> None:
    from avs.data.audio import logmel_clip
    from avs.data.safe_pickle import dump_logmel_pkl

    paths = _clip_paths(root, cfg.subset, clip.split, clip.meta["category"], clip.video_id)
    T = cfg.num_frames
    labelled = [1] if (cfg.subset == "s4" and clip.split == "train") else range(1, T + 1)
    for k in range(1, T + 1):
        atomic_write_bytes(paths["frame"](k), _png_bytes(clip.frames[k - 1], "RGB"))
    for k in labelled:
        atomic_write_bytes(paths["mask"](k), _png_bytes(clip.masks[k - 1].astype(np.uint8) * 255, "L"))
    atomic_write_bytes(paths["wav"], _wav_bytes(clip.waveform, cfg.sample_rate))
    # exactly what reading the wav back gives (int16 / 32768), so wav and pkl audio agree
    dump_logmel_pkl(paths["pkl"], logmel_clip(clip.waveform.astype(np.float64) / 32768.0, cfg.sample_rate, T))
    meta_path = root / SUBSET_DIRS[cfg.subset] / META_DIRNAME / clip.split / f"{clip.video_id}.json"
    atomic_write_text(meta_path, json.dumps(clip.meta, sort_keys=True, separators=(",", ":")))


def generate(root: str | os.PathLike, cfg: SyntheticConfig, progress: bool = True) -> Path:
    """Write a complete Sounding Shapes root (AVSBench layout, sidecars, `_COMPLETE` last) -> root."""
    from tqdm import tqdm

    root = Path(root)
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise FileExistsError(f"{root}: synthetic data root must be new or an empty directory")
    root.mkdir(parents=True, exist_ok=True)
    cats = build_categories(cfg.num_categories)
    subset_dir = root / SUBSET_DIRS[cfg.subset]
    jobs = [(split, i) for split in SPLITS for i in range(cfg.clips[split])]
    rows: list[str] = []
    for split, i in tqdm(jobs, desc=f"Sounding Shapes {cfg.subset}", unit="clip", disable=not progress):
        clip = _make_clip(cfg, cats, split, i)
        _write_clip(root, cfg, clip)
        if cfg.subset == "s4":
            rows.append(f"{clip.video_id},0,{clip.meta['category']},{split}")
        else:
            rows.append(f"{clip.video_id},{split}")
    header = "name,start_time,category,split" if cfg.subset == "s4" else "video_id,split"
    atomic_write_text(subset_dir / f"{cfg.subset}_meta_data.csv", "\n".join([header, *rows]) + "\n")
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


# ------------------------------------------------------------------------------------------------
# ceilings


def _frame_iou(pred: np.ndarray, gt: np.ndarray) -> float:
    """AVSBench per-frame IoU of bool [H,W] masks; an empty GT scores the true-negative fraction."""
    if not gt.any():
        return float((~pred).mean())
    return float((pred & gt).sum() / (pred | gt).sum())


def _load_sidecars(root: Path, subset: str, split: str) -> list[dict[str, Any]]:
    meta_dir = root / SUBSET_DIRS[subset] / META_DIRNAME / split
    if not meta_dir.is_dir():
        raise FileNotFoundError(f"{meta_dir}: no Sounding Shapes sidecars (is {root} a generated {subset} root?)")
    return [json.loads(p.read_text()) for p in sorted(meta_dir.glob("*.json"))]


def compute_ceilings(root: str | os.PathLike, subset: str, split: str) -> dict[str, Any]:
    """mIoU (0-100) of visual-only predictors and of the stored GT on one split, from the sidecars.

    Visual-only predictors know every object's exact visible mask but not the audio: `all_objects`,
    `largest_object`, and `prior_top<m>` (the m on-screen objects whose categories sound most
    often in train). `visual_only_ceiling` is the best of them. `oracle` scores the GT PNGs on
    disk against the GT rebuilt from the sidecars (100 when they agree). All T frames of every
    clip count (per-frame AVSBench IoU, mean over frames).
    """
    root = Path(root)
    if subset not in SUBSET_DIRS:
        raise ConfigError(f"subset: expected one of {sorted(SUBSET_DIRS)}, got {subset!r}")
    clips = _load_sidecars(root, subset, split)
    if not clips:
        raise ValueError(f"{root}: split {split!r} of {subset} has no clips")
    # category prior: P(sounds | on screen), counted over train frames
    try:
        train = clips if split == "train" else _load_sidecars(root, subset, "train")
    except FileNotFoundError:
        train = []
    present: dict[str, int] = {}
    sounding: dict[str, int] = {}
    for clip in train:
        for obj in clip["objects"]:
            present[obj["category"]] = present.get(obj["category"], 0) + len(obj["sounding"])
            sounding[obj["category"]] = sounding.get(obj["category"], 0) + int(sum(obj["sounding"]))
    prior = {c: sounding.get(c, 0) / present[c] for c in sorted(present)}

    max_objects = max(len(c["objects"]) for c in clips)
    names = ["all_objects", "largest_object"] + [f"prior_top{m}" for m in range(1, max_objects)]
    scores: dict[str, list[float]] = {k: [] for k in names}
    oracle: list[float] = []
    for clip in clips:
        S, T = clip["image_size"], clip["num_frames"]
        objs = clip["objects"]
        rank = sorted(range(len(objs)), key=lambda i: (-prior.get(objs[i]["category"], 0.0), objs[i]["category"]))
        paths = _clip_paths(root, subset, split, clip["category"], clip["video_id"])
        for t in range(T):
            vis = np.stack([rle_decode(o["visible_rle"][t], (S, S)) for o in objs])  # [n,S,S]
            snd = np.array([o["sounding"][t] for o in objs], dtype=bool)
            gt = vis[snd].any(axis=0)
            scores["all_objects"].append(_frame_iou(vis.any(axis=0), gt))
            scores["largest_object"].append(_frame_iou(vis[int(vis.sum(axis=(1, 2)).argmax())], gt))
            for m in range(1, max_objects):
                scores[f"prior_top{m}"].append(_frame_iou(vis[rank[:m]].any(axis=0), gt))
            mask_path = paths["mask"](t + 1)
            if mask_path.is_file():
                with Image.open(mask_path) as im:
                    disk = np.asarray(im.convert("L")) > 127
                oracle.append(_frame_iou(disk, gt) if disk.shape == gt.shape else 0.0)
    miou = {k: 100.0 * float(np.mean(v)) for k, v in scores.items()}
    best = max(miou, key=miou.get)
    return {
        "subset": subset,
        "split": split,
        "num_clips": len(clips),
        "num_frames": sum(c["num_frames"] for c in clips),
        "visual_only": miou,
        "visual_only_best": best,
        "visual_only_ceiling": miou[best],
        "oracle": 100.0 * float(np.mean(oracle)) if oracle else float("nan"),
        "oracle_frames": len(oracle),
        "category_prior": prior,
    }


# ------------------------------------------------------------------------------------------------
# cached roots


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


def ensure_synthetic(data_cfg: Any, force: bool = False, progress: bool = True) -> Path:
    """Make sure `data_cfg.root` holds the Sounding Shapes data described by `data_cfg.synthetic` -> root.

    Complete root with the same config hash: returned as is. Otherwise the data are generated into
    `<root>.tmp-<pid>` and renamed into place; a previous synthetic root (different hash, or
    `force`) is moved aside and deleted only after the new one is in place. A non-empty root
    without a `_COMPLETE` marker is not ours and raises instead of being touched.
    """
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
    root = Path(data["root"]).expanduser()
    if not force and is_complete(root, cfg):
        log.info("Sounding Shapes at %s is complete (hash %s)", root, config_hash(cfg)[:12])
        return root
    if root.exists():
        if not root.is_dir():
            raise FileExistsError(f"data.root={root} exists and is not a directory")
        if any(root.iterdir()) and not (root / COMPLETE_MARKER).is_file():
            raise FileExistsError(
                f"data.root={root} is a non-empty directory without a {COMPLETE_MARKER} marker; "
                "refusing to overwrite it (remove it or choose another data.synthetic.name)"
            )
    log.warning(
        "generating Sounding Shapes at %s (%s, %s clips, %d px, T=%d)",
        root, cfg.subset, cfg.clips, cfg.image_size, cfg.num_frames,
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
    old = None
    if root.exists():
        if not force and is_complete(root, cfg):  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
            return root
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
    log.warning("Sounding Shapes ready at %s (%.1f s)", root, time.perf_counter() - start)
    return root
