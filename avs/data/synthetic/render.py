"""Sounding Shapes pictures: shapes, textures, trajectories, occlusion, frames and mask run-lengths."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np

from avs.data.synthetic.world import Category, SyntheticConfig


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

