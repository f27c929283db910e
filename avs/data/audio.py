"""wav -> VGGish log-mel examples, following the VGGish `mel_features` / `vggish_input` recipe in NumPy.

Recipe (the released VGGish front end): mono, 16 kHz; 25 ms periodic-Hann frames (400 samples) every
10 ms (160 samples); 512-point rFFT magnitude (257 bins); 64-band HTK mel filterbank over
125-7500 Hz with the DC row zeroed; log(mel + 0.01); non-overlapping 96-frame (0.96 s) examples,
incomplete tail dropped; float32 ``[n_examples, 1, 96, 64]``.
"""

from __future__ import annotations

import logging
import os
from functools import lru_cache

import numpy as np

from avs.data.layout import AVSDataError

log = logging.getLogger(__name__)

# VGGish constants (vggish_params.py).
SAMPLE_RATE = 16000
STFT_WINDOW_SECONDS = 0.025
STFT_HOP_SECONDS = 0.010
NUM_MEL_BINS = 64
MEL_MIN_HZ = 125.0
MEL_MAX_HZ = 7500.0
LOG_OFFSET = 0.01
EXAMPLE_WINDOW_SECONDS = 0.96
EXAMPLE_HOP_SECONDS = 0.96
NUM_FRAMES = 96  # STFT frames per example
NUM_BANDS = 64

WINDOW_LENGTH = int(round(SAMPLE_RATE * STFT_WINDOW_SECONDS))  # 400
HOP_LENGTH = int(round(SAMPLE_RATE * STFT_HOP_SECONDS))  # 160
FFT_LENGTH = 2 ** int(np.ceil(np.log(WINDOW_LENGTH) / np.log(2.0)))  # 512
EXAMPLE_FRAMES = int(round(EXAMPLE_WINDOW_SECONDS / STFT_HOP_SECONDS))  # 96
EXAMPLE_HOP_FRAMES = int(round(EXAMPLE_HOP_SECONDS / STFT_HOP_SECONDS))  # 96
# Fewest 16 kHz samples that give one example: 400 + 95 * 160 = 15600 (0.975 s).
LOGMEL_SHAPE = (1, NUM_FRAMES, NUM_BANDS)  # one example as stored in the released pkls
EMBEDDING_DIM = 128  # cached VGGish embeddings
MIN_SAMPLES = WINDOW_LENGTH + (EXAMPLE_FRAMES - 1) * HOP_LENGTH

# Kaiser-windowed sinc settings that match resampy's default 'kaiser_best' filter (the values the
# torchaudio resampling tutorial gives for that comparison).
_KAISER_BEST = dict(
    lowpass_filter_width=64,
    rolloff=0.9475937167399596,
    resampling_method="sinc_interp_kaiser",
    beta=14.769656459379492,
)

__all__ = [
    "SAMPLE_RATE",
    "MIN_SAMPLES",
    "read_wav",
    "resampler_name",
    "resample_to_16k",
    "mel_matrix",
    "waveform_to_examples",
    "fit_num_examples",
    "logmel_clip",
    "wav_to_logmel",
]


MIN_RATE, MAX_RATE = 1_000, 768_000  # Hz: the rates a wav header may give (real files: 8 to 384 kHz)
MAX_SAMPLES_PER_BYTE = 8  # PCM holds at most one sample per byte (8-bit); lossless compression far less than 8


class BadHeader(ValueError):
    """An audio header that cannot describe real audio (read_wav)."""


def _check_header(path: str, rate: int, samples: int) -> None:
    if not MIN_RATE <= rate <= MAX_RATE:
        raise BadHeader(f"{path}: the header gives a sample rate of {rate} Hz; expected {MIN_RATE} to {MAX_RATE} Hz")
    size = os.path.getsize(path)
    if samples > MAX_SAMPLES_PER_BYTE * size:
        raise BadHeader(f"{path}: the header claims {samples} samples, more than a {size}-byte file can hold")


def read_wav(path: str | os.PathLike) -> tuple[np.ndarray, int]:
    """Read a wav (any rate; mono or multi-channel; int16/int32/float) -> (float64 [n] in [-1,1], sr).

    PCM_16 files are read as int16 and divided by 32768, exactly like VGGish's `wavfile_to_examples`.
    A header that cannot describe real audio is refused (ValueError) before any sample is read: a
    sample rate outside [MIN_RATE, MAX_RATE] (resampling 5 s written at 1 Hz to 16 kHz would need
    10 GB), or more samples than `MAX_SAMPLES_PER_BYTE` per byte of the file.
    Other encodings are read by soundfile as float64 in [-1, 1] (int32 -> /2**31, float as stored).
    VGGish's reader (`sf.read(dtype='int16')`, then /32768) differs there: on a PCM_24/32 file it
    keeps the top 16 bits (a quantisation), but on a float file soundfile returns the float values
    themselves, only cast to int16 (-1, 0 or 1 for audio in [-1, 1]), so after /32768 the released
    front end sees near-silence. We read the real signal instead. Channels are averaged to mono.
    """
    import soundfile as sf

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"wav file not found: {path}")
    try:
        info = sf.info(path)
        _check_header(path, info.samplerate, info.frames * info.channels)
        if info.subtype == "PCM_16":
            data, sr = sf.read(path, dtype="int16", always_2d=True)
            samples = data.astype(np.float64) / 32768.0
        else:
            samples, sr = sf.read(path, dtype="float64", always_2d=True)
    except BadHeader:
        raise
    except Exception as exc:  # soundfile raises LibsndfileError / RuntimeError / TypeError
        raise ValueError(f"cannot read wav file {path}: {exc}") from exc
    if samples.shape[0] == 0:
        raise ValueError(f"wav file {path} holds no samples")
    # [n, channels] -> [n]
    return samples.mean(axis=1), int(sr)


_announced: set[str] = set()


def _resampy():
    """The resampy module, or None when it is not installed (the `avs[audio-exact]` extra)."""
    try:
        import resampy
    except ImportError:
        return None
    return resampy


def resampler_name() -> str:
    """Which resampler `resample_to_16k` uses for non-16 kHz audio: 'resampy' (kaiser_best) or 'torchaudio'."""
    return "resampy" if _resampy() is not None else "torchaudio"


def resample_to_16k(samples: np.ndarray, sample_rate: int) -> np.ndarray:
    """Resample float [n] at `sample_rate` to 16 kHz -> float64 [m]; identity when already 16 kHz.

    With resampy installed (`pip install 'avs[audio-exact]'`) this is `resampy.resample(...,
    filter='kaiser_best')`, exactly what the released VGGish front end calls. Without it,
    `torchaudio.functional.resample` with a Kaiser-windowed sinc of width 64, rolloff 0.9476 and
    beta 14.77 (torchaudio's documented equivalent of 'kaiser_best'), in float64: close to resampy
    but not identical, the log-mel differing mostly in the top mel bands (docs/architecture.md gives
    the measured gap). `resampler_name()` says which one is in use; the first call logs it.
    """
    samples = np.asarray(samples, dtype=np.float64)
    if sample_rate == SAMPLE_RATE or samples.size == 0:  # nothing to resample; length checks come later
        return samples
    if sample_rate <= 0:
        raise ValueError(f"sample rate must be positive, got {sample_rate}")
    if int(samples.size * SAMPLE_RATE / sample_rate) < 1:  # not one output sample (resampy refuses these)
        return np.zeros(0, dtype=np.float64)
    resampy = _resampy()
    name = "torchaudio" if resampy is None else "resampy"
    if name not in _announced:
        _announced.add(name)
        log.info("resampling %d Hz audio to 16 kHz with %s", sample_rate,
                 "resampy (kaiser_best, as the released VGGish front end)" if resampy is not None else
                 "torchaudio's Kaiser sinc (install avs[audio-exact] for resampy, as the released front end)")
    if resampy is not None:
        return np.asarray(resampy.resample(samples, int(sample_rate), SAMPLE_RATE, filter="kaiser_best"),
                          dtype=np.float64)
    import torch
    import torchaudio.functional as AF

    wave = torch.from_numpy(np.ascontiguousarray(samples))
    out = AF.resample(wave, int(sample_rate), SAMPLE_RATE, **_KAISER_BEST)
    return out.numpy()


@lru_cache(maxsize=4)
def mel_matrix(
    num_mel_bins: int = NUM_MEL_BINS,
    num_spectrogram_bins: int = FFT_LENGTH // 2 + 1,
    sample_rate: int = SAMPLE_RATE,
    lower_hz: float = MEL_MIN_HZ,
    upper_hz: float = MEL_MAX_HZ,
) -> np.ndarray:
    """VGGish HTK mel weight matrix -> float64 [num_spectrogram_bins, num_mel_bins], DC row zeroed."""
    if not 0.0 <= lower_hz < upper_hz <= sample_rate / 2.0:
        raise ValueError(f"mel band edges must satisfy 0 <= {lower_hz} < {upper_hz} <= {sample_rate / 2}")

    def hz_to_mel(f: np.ndarray) -> np.ndarray:
        return 1127.0 * np.log(1.0 + f / 700.0)

    bins_mel = hz_to_mel(np.linspace(0.0, sample_rate / 2.0, num_spectrogram_bins))  # [S]
    edges = np.linspace(hz_to_mel(np.float64(lower_hz)), hz_to_mel(np.float64(upper_hz)), num_mel_bins + 2)
    lower, center, upper = edges[:-2], edges[1:-1], edges[2:]  # each [M]
    rising = (bins_mel[:, None] - lower[None, :]) / (center - lower)[None, :]  # [S,M]
    falling = (upper[None, :] - bins_mel[:, None]) / (upper - center)[None, :]  # [S,M]
    weights = np.maximum(0.0, np.minimum(rising, falling))
    weights[0, :] = 0.0  # VGGish zeroes the DC bin
    weights.setflags(write=False)
    return weights


def _frame(data: np.ndarray, window: int, hop: int) -> np.ndarray:
    """Strided view of non-padded frames: [n, ...] -> [num_frames, window, ...]."""
    num_frames = max(0, 1 + (data.shape[0] - window) // hop)
    shape = (num_frames, window) + data.shape[1:]
    strides = (data.strides[0] * hop,) + data.strides
    return np.lib.stride_tricks.as_strided(data, shape=shape, strides=strides, writeable=False)


def waveform_to_examples(samples: np.ndarray, sample_rate: int) -> np.ndarray:
    """Waveform [n] or [n, channels] at `sample_rate` -> VGGish log-mel float32 [n_examples,1,96,64].

    Returns zero examples (shape [0,1,96,64]) when the 16 kHz signal is shorter than MIN_SAMPLES.
    """
    samples = np.asarray(samples, dtype=np.float64)
    if samples.ndim == 2:
        samples = samples.mean(axis=1)  # [n, channels] -> [n]
    elif samples.ndim != 1:
        raise ValueError(f"expected a waveform shaped [n] or [n, channels], got {samples.shape}")
    samples = np.ascontiguousarray(resample_to_16k(samples, sample_rate))

    window = 0.5 - 0.5 * np.cos(2.0 * np.pi / WINDOW_LENGTH * np.arange(WINDOW_LENGTH))  # periodic Hann
    frames = _frame(samples, WINDOW_LENGTH, HOP_LENGTH)  # [F, 400]
    spectrum = np.abs(np.fft.rfft(frames * window, n=FFT_LENGTH, axis=1))  # [F, 257]
    log_mel = np.log(spectrum @ mel_matrix() + LOG_OFFSET)  # [F, 64]
    examples = _frame(log_mel, EXAMPLE_FRAMES, EXAMPLE_HOP_FRAMES)  # [E, 96, 64]
    return np.ascontiguousarray(examples[:, None], dtype=np.float32)  # [E,96,64] -> [E,1,96,64]


def fit_num_examples(examples: np.ndarray, num_frames: int) -> np.ndarray:
    """[E, ...] -> [num_frames, ...]: keep the first `num_frames`, or repeat the last example to pad."""
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    n = examples.shape[0]
    if n == 0:
        raise ValueError("no audio examples to fit")
    if n >= num_frames:
        return examples[:num_frames]
    pad = np.repeat(examples[-1:], num_frames - n, axis=0)
    return np.concatenate([examples, pad], axis=0)


def fit_audio_array(arr: np.ndarray, num_frames: int, path: str | os.PathLike,
                    tail: tuple[int, ...] = LOGMEL_SHAPE, pad_short: bool = False) -> np.ndarray:
    """Audio read from a file, [n,*tail] -> [num_frames,*tail]; the one rule for log-mel pkls and cached embeddings.

    More than `num_frames` examples: the first `num_frames` are kept. Fewer: AVSDataError naming the
    file, the shape found and the examples expected, unless `pad_short` (config `data.pad_short_audio`),
    which repeats the last example as the wav front end does. Wrong dtype or shape: AVSDataError.
    """
    shape = "[n," + ",".join(map(str, tail)) + "]"
    if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
        raise AVSDataError(f"{path}: expected real numbers, got dtype {arr.dtype}")
    if arr.ndim != 1 + len(tail) or tuple(arr.shape[1:]) != tuple(tail) or arr.shape[0] == 0:
        raise AVSDataError(f"{path}: expected audio shaped {shape}, got {list(arr.shape)}")
    if arr.shape[0] < num_frames and not pad_short:
        raise AVSDataError(
            f"{path}: audio shaped {list(arr.shape)} has {arr.shape[0]} example(s), data.num_frames={num_frames} "
            f"needs {num_frames}; set data.pad_short_audio=true to repeat the last example instead")
    return fit_num_examples(arr, num_frames)  # [n,...] -> [T,...]


def logmel_clip(samples: np.ndarray, sample_rate: int, num_frames: int) -> np.ndarray:
    """Waveform -> float32 [num_frames,1,96,64] under the AVSBench convention.

    Fewer than `num_frames` examples: the last one is repeated. More: the first `num_frames` are
    kept (AVSBench's preprocess_*.py raises in its padding line there and writes no pkl; we keep
    the clip usable instead). A clip too short for one example (< 15600 samples at 16 kHz, about
    0.975 s) raises ValueError.
    """
    examples = waveform_to_examples(samples, sample_rate)
    if examples.shape[0] == 0:
        n = np.asarray(samples).shape[0]
        raise ValueError(
            f"audio clip too short for one VGGish example: {n} samples at {sample_rate} Hz "
            f"({n / sample_rate:.4f} s); need at least {MIN_SAMPLES} samples at 16 kHz (0.975 s)"
        )
    return fit_num_examples(examples, num_frames)


def wav_to_logmel(path: str | os.PathLike, num_frames: int) -> np.ndarray:
    """wav file -> float32 [num_frames,1,96,64] (read_wav + logmel_clip; errors name the file)."""
    samples, sr = read_wav(path)
    try:
        return logmel_clip(samples, sr, num_frames)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from exc
