"""avs.data.audio against an independent, loop-based NumPy implementation of the VGGish recipe.

The reference below is written from the recipe (mel_features.py steps), not from avs.data.audio:
an explicit DFT with cos/sin sums per frame, a per-(bin, band) triangle loop, and example slicing
by index. For the 44.1 kHz case both sides use `avs.data.audio.resample_to_16k`; the comparison is
made after resampling. The resampler itself is tested against resampy (when installed) below.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import soundfile as sf

from avs.data import audio


def _reference_logmel(x16k: np.ndarray) -> np.ndarray:
    """Loop-based VGGish log-mel of a 16 kHz mono float signal -> [E,1,96,64]."""
    win, hop, nfft, nmel = 400, 160, 512, 64
    hann = np.array([0.5 - 0.5 * math.cos(2 * math.pi * i / win) for i in range(win)])
    nbins = nfft // 2 + 1
    # DFT basis (frame is zero-padded to 512, so only the first 400 samples contribute).
    n = np.arange(win)[None, :]
    k = np.arange(nbins)[:, None]
    cos_b = np.cos(2 * math.pi * k * n / nfft)
    sin_b = np.sin(2 * math.pi * k * n / nfft)

    def mel(f: float) -> float:
        return 1127.0 * math.log(1.0 + f / 700.0)

    lo, hi = mel(125.0), mel(7500.0)
    edges = [lo + (hi - lo) * j / (nmel + 1) for j in range(nmel + 2)]
    weights = np.zeros((nbins, nmel))
    for b in range(1, nbins):  # bin 0 (DC) stays zero
        m = mel(8000.0 * b / (nbins - 1))
        for j in range(nmel):
            left, centre, right = edges[j], edges[j + 1], edges[j + 2]
            if left < m <= centre:
                weights[b, j] = (m - left) / (centre - left)
            elif centre < m < right:
                weights[b, j] = (right - m) / (right - centre)

    n_frames = 1 + (len(x16k) - win) // hop
    rows = []
    for f in range(n_frames):
        seg = x16k[f * hop : f * hop + win] * hann
        re = cos_b @ seg
        im = sin_b @ seg
        mag = np.sqrt(re * re + im * im)
        rows.append(np.log(mag @ weights + 0.01))
    logmel = np.stack(rows)
    n_ex = n_frames // 96
    out = np.stack([logmel[e * 96 : (e + 1) * 96] for e in range(n_ex)])
    return out[:, None].astype(np.float32)


def _tone(sr: int, seconds: float, rng: np.random.Generator) -> np.ndarray:
    t = np.arange(int(sr * seconds)) / sr
    return 0.3 * np.sin(2 * np.pi * 440 * t) + 0.2 * np.sin(2 * np.pi * 3100 * t) + 0.05 * rng.standard_normal(t.size)


def test_mel_matrix_shape_and_dc():
    m = audio.mel_matrix()
    assert m.shape == (257, 64)
    assert np.all(m[0] == 0)
    assert m.min() >= 0 and m.max() <= 1
    # every band gets some weight
    assert np.all(m.sum(axis=0) > 0)


def test_16k_mono_float_wav_matches_reference(tmp_path):
    rng = np.random.default_rng(0)
    x = _tone(16000, 5.0, rng).astype(np.float32)
    path = tmp_path / "mono_float.wav"
    sf.write(path, x, 16000, subtype="FLOAT")
    samples, sr = audio.read_wav(path)
    assert sr == 16000 and samples.dtype == np.float64 and samples.shape == (80000,)
    np.testing.assert_array_equal(samples, x.astype(np.float64))
    got = audio.wav_to_logmel(path, 5)
    assert got.shape == (5, 1, 96, 64) and got.dtype == np.float32
    ref = _reference_logmel(samples)
    assert ref.shape == (5, 1, 96, 64)
    assert np.abs(got - ref).max() < 1e-4


def test_44k_stereo_int16_wav_matches_reference(tmp_path):
    rng = np.random.default_rng(1)
    left = _tone(44100, 5.0, rng)
    right = 0.5 * _tone(44100, 5.0, rng)
    pcm = np.round(np.stack([left, right], axis=1) * 32767).astype(np.int16)
    path = tmp_path / "stereo.wav"
    sf.write(path, pcm, 44100, subtype="PCM_16")
    samples, sr = audio.read_wav(path)
    assert sr == 44100
    # int16 scaled by 1/32768 (VGGish), then channels averaged.
    np.testing.assert_array_equal(samples, pcm.astype(np.float64).mean(axis=1) / 32768.0)
    got = audio.wav_to_logmel(path, 5)
    assert got.shape == (5, 1, 96, 64)
    x16 = audio.resample_to_16k(samples, 44100)  # shared resampler (see module docstring)
    assert abs(len(x16) - 80000) <= 1
    ref = _reference_logmel(x16)
    assert np.abs(got - ref[:5]).max() < 1e-4


def test_resampler_preserves_a_tone():
    sr = 44100
    t = np.arange(sr) / sr
    y = audio.resample_to_16k(np.sin(2 * np.pi * 1000 * t), sr)
    t16 = np.arange(len(y)) / 16000
    # away from the edges the resampled signal is the same sine sampled at 16 kHz
    err = np.abs(y[500:-500] - np.sin(2 * np.pi * 1000 * t16[500:-500])).max()
    assert err < 1e-3


def test_short_clip_pads_by_repeating_last():
    rng = np.random.default_rng(2)
    x = _tone(16000, 3.0, rng)
    raw = audio.waveform_to_examples(x, 16000)
    assert raw.shape == (3, 1, 96, 64)
    got = audio.logmel_clip(x, 16000, 5)
    assert got.shape == (5, 1, 96, 64)
    np.testing.assert_array_equal(got[:3], raw)
    np.testing.assert_array_equal(got[3], raw[2])
    np.testing.assert_array_equal(got[4], raw[2])


def test_long_clip_keeps_first_examples():
    rng = np.random.default_rng(3)
    x = _tone(16000, 7.0, rng)
    raw = audio.waveform_to_examples(x, 16000)
    assert raw.shape[0] == 7
    np.testing.assert_array_equal(audio.logmel_clip(x, 16000, 5), raw[:5])


def test_stereo_array_input_is_averaged():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((20000, 2)) * 0.1
    np.testing.assert_array_equal(
        audio.waveform_to_examples(x, 16000), audio.waveform_to_examples(x.mean(axis=1), 16000)
    )


def test_too_short_clip_raises():
    assert audio.waveform_to_examples(np.zeros(audio.MIN_SAMPLES - 1), 16000).shape == (0, 1, 96, 64)
    assert audio.waveform_to_examples(np.zeros(audio.MIN_SAMPLES), 16000).shape == (1, 1, 96, 64)
    with pytest.raises(ValueError, match="too short"):
        audio.logmel_clip(np.zeros(15360), 16000, 5)  # exactly 0.96 s -> 94 STFT frames only


def test_read_wav_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.wav"):
        audio.read_wav(tmp_path / "nope.wav")
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF\x00\x00garbage")
    with pytest.raises(ValueError, match="bad.wav"):
        audio.read_wav(bad)
    short = tmp_path / "short.wav"
    sf.write(short, np.zeros(8000, dtype=np.int16), 16000, subtype="PCM_16")
    with pytest.raises(ValueError, match="short.wav"):
        audio.wav_to_logmel(short, 5)


def test_a_header_that_cannot_be_real_audio_is_refused_before_reading(tmp_path):
    """A sample rate of 1 Hz (one corrupted header byte) would make the 16 kHz front end resample 5 s
    into 80,000 s of audio; read_wav refuses it naming the rate, as it refuses a header that claims more
    samples than the file has bytes for."""
    path = tmp_path / "a.wav"
    sf.write(path, np.zeros(16000, np.int16), 16000, subtype="PCM_16")
    data = bytearray(path.read_bytes())
    assert data[:4] == b"RIFF" and data[24:28] == (16000).to_bytes(4, "little")
    data[24:28] = (1).to_bytes(4, "little")  # the fmt chunk's sample rate
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=rf"{path}: the header gives a sample rate of 1 Hz; expected 1000 to"):
        audio.read_wav(path)
    with pytest.raises(ValueError, match="claims 999999 samples, more than a 10-byte file can hold"):
        (tmp_path / "b.wav").write_bytes(b"0123456789")
        audio._check_header(str(tmp_path / "b.wav"), 16000, 999999)
    audio._check_header(str(tmp_path / "b.wav"), 16000, 80)  # 8 samples per byte at most


def test_int32_wav_scaled_to_unit_range(tmp_path):
    pcm = np.array([0, 2**30, -(2**31), 2**31 - 1] * 100, dtype=np.int32)
    path = tmp_path / "i32.wav"
    sf.write(path, pcm, 16000, subtype="PCM_32")
    samples, _ = audio.read_wav(path)
    np.testing.assert_allclose(samples[:4], [0.0, 0.5, -1.0, (2**31 - 1) / 2**31])


# ------------------------------------------------------------------------- resampler choice
@pytest.mark.parametrize("rate", [44100, 22050, 8000])
def test_resampy_is_used_when_installed_and_matches_a_direct_call(rate, caplog):
    resampy = pytest.importorskip("resampy", reason="resampy (the avs[audio-exact] extra) is not installed")
    x = _tone(rate, 2.0, np.random.default_rng(rate))
    assert audio.resampler_name() == "resampy"
    audio._announced.clear()
    with caplog.at_level("INFO", logger="avs.data.audio"):
        got = audio.resample_to_16k(x, rate)
        audio.resample_to_16k(x, rate)
    np.testing.assert_array_equal(got, resampy.resample(x, rate, 16000, filter="kaiser_best"))
    assert [r.getMessage() for r in caplog.records].count(
        f"resampling {rate} Hz audio to 16 kHz with resampy (kaiser_best, as the released VGGish front end)"
    ) == 1


def test_torchaudio_is_the_fallback_without_resampy(monkeypatch, caplog):
    import sys

    monkeypatch.setitem(sys.modules, "resampy", None)  # import resampy -> ImportError
    audio._announced.clear()
    assert audio.resampler_name() == "torchaudio"
    x = _tone(44100, 2.0, np.random.default_rng(3))
    with caplog.at_level("INFO", logger="avs.data.audio"):
        got = audio.resample_to_16k(x, 44100)
    import torch
    import torchaudio.functional as AF

    ref = AF.resample(torch.from_numpy(x), 44100, 16000, **audio._KAISER_BEST).numpy()
    np.testing.assert_array_equal(got, ref)
    assert any("with torchaudio" in r.getMessage() and "avs[audio-exact]" in r.getMessage() for r in caplog.records)
    audio._announced.clear()
