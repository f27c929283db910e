"""The Sounding Shapes world (categories: shape, colour, texture, sound) and the generation config."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from avs.data.audio import SAMPLE_RATE
from avs.data.layout import LAYOUTS, SPLITS
from avs.errors import ConfigError

# Bump when the generator's output for a given config changes: a new version invalidates
# every cached root (its `_COMPLETE` hash no longer matches).
GENERATOR_VERSION = 1

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
_WORLD_SEED = 20240611  # fixed: the world (category -> f0 assignment) does not depend on cfg.seed


def config_fields(cls: type, values: Mapping[str, Any], key: str) -> dict[str, Any]:
    """`values` as a dict without `name`; ConfigError naming `key` when one is not a field of dataclass `cls`."""
    values = dict(values)
    values.pop("name", None)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{key}: unknown key(s) {unknown}; expected some of {sorted(known)}")
    return values


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
    sample_rate: int = SAMPLE_RATE
    snr_db: tuple[float, float] = (5.0, 20.0)  # sources vs background noise, per clip
    crossfade_ms: float = 15.0
    # MS3: probabilities of 1, 2, 3, ... sounding on-screen objects per segment (truncated at the count)
    ms3_sounding_probs: tuple[float, ...] = (0.6, 0.3, 0.1)
    offscreen_prob: float = 0.25  # MS3: chance that a clip also carries an off-screen category's sound
    # MS3: probability that a segment keeps the previous segment's sounding set (0 = a new set in
    # every segment, the data of generator version 1; a value of 0 is left out of `to_dict` and the hash)
    persistence: float = 0.0

    def __post_init__(self) -> None:
        if self.subset not in LAYOUTS:
            raise ConfigError(f"subset: expected one of {sorted(LAYOUTS)}, got {self.subset!r}")
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
        if int(self.sample_rate) < SAMPLE_RATE:
            raise ConfigError(f"sample_rate: expected >= {SAMPLE_RATE} (VGGish input), got {self.sample_rate}")
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
        if not 0.0 <= float(self.persistence) <= 1.0:
            raise ConfigError(f"persistence: expected a probability in [0, 1], got {self.persistence}")
        object.__setattr__(self, "persistence", float(self.persistence))
        if not 0.0 <= self.min_visible <= 1.0:
            raise ConfigError(f"min_visible: expected a fraction in [0, 1], got {self.min_visible}")
        for name in ("seed", "image_size", "num_frames", "num_categories", "sample_rate"):
            object.__setattr__(self, name, int(getattr(self, name)))

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], key: str = "data.synthetic") -> SyntheticConfig:
        """Build from a plain mapping (e.g. a resolved config node); `name` is ignored, unknown keys raise."""
        values = config_fields(cls, values, key)
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
        if out["persistence"] == 0.0:  # neutral: the same dict (and hash) as before the knob existed
            del out["persistence"]
        return json.loads(json.dumps(out))


def config_hash(cfg: SyntheticConfig) -> str:
    """sha256 (hex) of the generator version and every generation parameter."""
    payload = json.dumps({"generator_version": GENERATOR_VERSION, **cfg.to_dict()}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()
