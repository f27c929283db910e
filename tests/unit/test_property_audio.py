"""Property tests (hypothesis) of the VGGish log-mel front end: any length >= 1 s, common rates, any
channel count, integer or float samples, silence, clipping -> finite float32 [T,1,96,64]; too short ->
the front end's own "too short" error (docs/reliability.md)."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from avs.data.audio import MIN_SAMPLES, logmel_clip, wav_to_logmel, waveform_to_examples

RATES = [8000, 11025, 16000, 22050, 32000, 44100, 48000]
DTYPES = ["int16", "int32", "float32", "float64"]
KINDS = ["silence", "noise", "clipped", "sine", "dc"]
FAST = settings(max_examples=40, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


def _signal(kind: str, n: int, channels: int, rate: int, dtype: str, seed: int) -> np.ndarray:
    """Samples [n] (channels == 1) or [n, channels] of the given dtype; ints use their full range."""
    rng = np.random.default_rng(seed)
    t = np.arange(n) / rate
    if kind == "silence":
        x = np.zeros((n, channels))
    elif kind == "noise":
        x = rng.uniform(-1, 1, (n, channels))
    elif kind == "clipped":  # a loud sine hard-clipped at full scale
        x = np.clip(8.0 * np.sin(2 * np.pi * 440 * t)[:, None].repeat(channels, 1), -1, 1)
    elif kind == "sine":
        x = 0.5 * np.sin(2 * np.pi * rng.uniform(50, rate / 2.5) * t)[:, None].repeat(channels, 1)
    else:
        x = np.full((n, channels), rng.choice([-1.0, 1.0]))
    if dtype.startswith("int"):
        info = np.iinfo(dtype)
        x = np.clip(np.round(x * info.max), info.min, info.max)
    x = x.astype(dtype)
    return x[:, 0] if channels == 1 else x


@FAST
@given(
    rate=st.sampled_from(RATES),
    seconds=st.floats(min_value=1.0, max_value=3.0),
    channels=st.integers(1, 4),
    dtype=st.sampled_from(DTYPES),
    kind=st.sampled_from(KINDS),
    num_frames=st.integers(1, 6),
    seed=st.integers(0, 2**16),
)
def test_logmel_clip_is_finite_and_shaped(rate, seconds, channels, dtype, kind, num_frames, seed):
    n = int(np.ceil(seconds * rate))
    x = _signal(kind, n, channels, rate, dtype, seed)
    out = logmel_clip(x, rate, num_frames)
    assert out.shape == (num_frames, 1, 96, 64) and out.dtype == np.float32
    assert np.isfinite(out).all()
    if kind == "silence":  # log(0 + 0.01): the floor of the VGGish log-mel
        np.testing.assert_allclose(out, np.log(0.01), rtol=1e-6)


@settings(max_examples=25, deadline=None, database=None)
@given(rate=st.sampled_from(RATES), channels=st.integers(1, 3), seconds=st.floats(min_value=1.0, max_value=4.0))
def test_examples_count_follows_duration(rate, channels, seconds):
    n = int(np.ceil(seconds * rate))
    ex = waveform_to_examples(np.zeros((n, channels)) if channels > 1 else np.zeros(n), rate)
    n16 = int(np.ceil(n * 16000 / rate))  # samples after resampling (torchaudio's output length)
    expected = 1 + ((n16 - 400) // 160 + 1 - 96) // 96
    assert ex.shape[1:] == (1, 96, 64) and abs(ex.shape[0] - expected) <= 1 and ex.shape[0] >= 1


@settings(max_examples=25, deadline=None, database=None)
@given(rate=st.sampled_from(RATES), fraction=st.floats(min_value=0.0, max_value=0.9), dtype=st.sampled_from(DTYPES))
def test_too_short_input_raises_the_front_ends_error(rate, fraction, dtype):
    n = max(1, int(fraction * MIN_SAMPLES * rate / 16000))  # below one VGGish example after resampling
    x = _signal("noise", n, 1, rate, dtype, 0)
    with pytest.raises(ValueError, match="audio clip too short for one VGGish example"):
        logmel_clip(x, rate, 5)


@settings(
    max_examples=15,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    rate=st.sampled_from([8000, 16000, 22050, 44100, 48000]),
    channels=st.integers(1, 3),
    subtype=st.sampled_from(["PCM_16", "PCM_24", "PCM_32", "PCM_U8", "FLOAT", "DOUBLE"]),
    kind=st.sampled_from(KINDS),
    seconds=st.floats(min_value=1.0, max_value=3.0),
)
def test_wav_files_of_any_encoding_give_finite_logmel(tmp_path, rate, channels, subtype, kind, seconds):
    n = int(np.ceil(seconds * rate))
    x = _signal(kind, n, channels, rate, "float64", 1)
    path = tmp_path / f"clip_{subtype}_{channels}_{rate}.wav"
    sf.write(path, x, rate, subtype=subtype)
    out = wav_to_logmel(path, 5)
    assert out.shape == (5, 1, 96, 64) and np.isfinite(out).all()


def test_empty_waveform_at_another_rate_raises_too_short():
    with pytest.raises(ValueError, match="too short"):
        logmel_clip(np.zeros(0), 8000, 5)


def test_non_finite_samples_are_not_silently_accepted():
    """NaN / inf samples (a float wav can hold them) must not give a finite-looking spectrogram."""
    x = np.zeros(32000)
    x[1000] = np.nan
    out = logmel_clip(x, 16000, 2)
    assert not np.isfinite(out).all()  # the NaN propagates; the trainer's non-finite guard then skips the step
