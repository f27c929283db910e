"""Sounding Shapes audio: each category's tone, per-segment gating and the noisy mix."""

from __future__ import annotations

import numpy as np

from avs.data.synthetic.world import SOUNDS, Category, SyntheticConfig

_MAX_PARTIAL_HZ = 7000.0  # partials above this are dropped (VGGish mel tops out at 7.5 kHz)
_SOURCE_RMS = 0.1


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

