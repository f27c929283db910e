"""Video and audio decoding (PyAV) and the frame / audio window plans of the demo.

Two ways to turn a video into model clips of T frames (T = the checkpoint's data.num_frames):

* ``avsbench`` (as AVSBench's preprocessing): one frame per second, the one at 15/16 of the second
  (frame index ``int((l + 15/16) * fps)``, identical to AVSBench's ``int(l*fps + 15/16*fps)`` for
  an integer fps); windows of T consecutive seconds, each cut from the window start into T
  non-overlapping 0.96 s VGGish examples (``avs.data.audio.logmel_clip``: too few examples ->
  the last one is repeated). The last window is padded (last analysed frame repeated).
* ``dense``: every frame is analysed, with its own 0.96 s (15600-sample, one VGGish example)
  audio window centred on the middle of the frame. A window holds T frames ``spacing`` seconds
  apart (the temporal spacing the models were trained with), so every frame lands in exactly one
  window; windows running past the end repeat their last real frame.

Frame indices in a plan count decoded frames from 0. The frame count comes from demuxing
(`probe_video`); a stream that decodes to fewer frames than it has packets is handled the
AVSBench way: indices past the end stand for the last decoded frame.

Audio shorter than the video (`fit_audio_to_video`, demo key ``short_audio``): by default the
uncovered seconds get silence (zero samples), with a warning naming them; ``repeat`` lets the windows
past the end reuse the last 0.975 s of audio, ``error`` refuses the video.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from avs.data.audio import MIN_SAMPLES, SAMPLE_RATE, logmel_clip, resample_to_16k, waveform_to_examples
from avs.data.transforms import normalize_frames, resize_frames
from avs.errors import AVSError, ExitCode, MissingFileError

__all__ = [
    "MissingDependencyError",
    "VideoError",
    "require_av",
    "VideoInfo",
    "probe_video",
    "iter_frames",
    "load_audio",
    "to_model_frame",
    "Slot",
    "Window",
    "WindowPlan",
    "check_duration",
    "SHORT_AUDIO",
    "fit_audio_to_video",
    "plan_windows",
    "window_logmel",
    "AVSBENCH_OFFSET",
]

SAMPLINGS = ("avsbench", "dense")
SHORT_AUDIO = ("silence", "repeat", "error")
AVSBENCH_OFFSET = 15.0 / 16.0  # AVSBench keeps candidate i = 15 of 16 per second
_SOUNDFILE_SUFFIXES = {".wav", ".flac", ".ogg", ".aiff", ".aif"}


class MissingDependencyError(AVSError, ImportError, code=ExitCode.MISSING_FILE):
    """An optional dependency (extra) is not installed; the message names the extra."""


class VideoError(AVSError, ValueError, code=ExitCode.DATA):
    """A video or audio file is unreadable, has no audio track, or is too short; the message names it."""


def require_av() -> Any:
    """Import PyAV or raise MissingDependencyError naming the `avs[video]` extra."""
    try:
        import av
    except ImportError as exc:
        raise MissingDependencyError(
            "decoding and writing video needs PyAV, which is not installed: "
            "pip install 'avs[video]'  (or: pip install av)"
        ) from exc
    return av


# ----------------------------------------------------------------------------------- decoding
@dataclass(frozen=True)
class VideoInfo:
    """What the demo needs to know about a video file before decoding it."""

    path: Path
    num_frames: int
    fps: float
    width: int
    height: int
    has_audio: bool
    rate: Any = None  # the stream's exact frame rate (fractions.Fraction) for writing the overlay video

    @property
    def duration(self) -> float:
        """Seconds of video (num_frames / fps)."""
        return self.num_frames / self.fps


def _check_file(path: str | os.PathLike, what: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_file():
        raise MissingFileError(f"{what} not found: {p}")
    return p


def probe_video(path: str | os.PathLike) -> VideoInfo:
    """Frame count (demuxed packets), frame rate, size and whether an audio track exists."""
    av = require_av()
    p = _check_file(path, "video file")
    try:
        with av.open(str(p)) as container:
            if not container.streams.video:
                raise VideoError(f"{p}: the file has no video stream")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate or stream.base_rate
            width, height = int(stream.codec_context.width), int(stream.codec_context.height)
            has_audio = bool(container.streams.audio)
            count = sum(1 for packet in container.demux(stream) if packet.size > 0)
    except VideoError:
        raise
    except (av.FFmpegError, UnicodeDecodeError) as exc:
        raise VideoError(f"{p}: unreadable video file ({type(exc).__name__}: {exc})") from exc
    if not rate or float(rate) <= 0:
        raise VideoError(f"{p}: cannot determine the frame rate of the video stream")
    if count == 0:
        raise VideoError(f"{p}: the video stream holds no frames")
    return VideoInfo(p, count, float(rate), width, height, has_audio, rate)


def iter_frames(path: str | os.PathLike, size: tuple[int, int] | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """Decode the first video stream -> (index, uint8 [h,w,3] RGB); `size` (H, W) resizes with INTER_AREA."""
    av = require_av()
    p = _check_file(path, "video file")
    try:
        with av.open(str(p)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for i, frame in enumerate(container.decode(stream)):
                rgb = frame.to_ndarray(format="rgb24")  # [h,w,3]
                if size is not None and rgb.shape[:2] != tuple(size):
                    import cv2

                    rgb = cv2.resize(rgb, (size[1], size[0]), interpolation=cv2.INTER_AREA)
                yield i, rgb
    except av.FFmpegError as exc:
        raise VideoError(f"{p}: error while decoding video ({type(exc).__name__}: {exc})") from exc


def _frame_samples(frame: Any) -> np.ndarray:
    """One decoded audio frame -> float64 [n, channels] in [-1, 1] (int16 / 32768 like VGGish)."""
    arr = frame.to_ndarray()
    channels = len(frame.layout.channels)
    if frame.format.is_planar:
        arr = arr.T  # [channels, n] -> [n, channels]
    else:
        arr = arr.reshape(-1, channels)  # [1, n*channels] -> [n, channels]
    kind = frame.format.name.rstrip("p")
    if kind == "s16":
        return arr.astype(np.float64) / 32768.0
    if kind == "s32":
        return arr.astype(np.float64) / 2.0**31
    if kind == "u8":
        return (arr.astype(np.float64) - 128.0) / 128.0
    if kind == "s64":
        return arr.astype(np.float64) / 2.0**63
    return arr.astype(np.float64)  # flt / dbl


def _decode_audio_av(path: Path, source: str) -> tuple[np.ndarray, int]:
    av = require_av()
    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                hint = "; give a separate audio file with audio_file=PATH" if source == "video" else ""
                raise VideoError(f"{path}: the {source} has no audio track{hint}")
            stream = container.streams.audio[0]
            chunks = [_frame_samples(frame) for frame in container.decode(stream)]
            rate = int(stream.rate or stream.codec_context.sample_rate)
    except VideoError:
        raise
    except (av.FFmpegError, UnicodeDecodeError) as exc:
        raise VideoError(f"{path}: unreadable {source} ({type(exc).__name__}: {exc})") from exc
    if not chunks:
        raise VideoError(f"{path}: the audio track of the {source} holds no samples")
    return np.concatenate(chunks, axis=0).mean(axis=1), rate  # [n, channels] -> [n]


def load_audio(path: str | os.PathLike, source: str = "audio file") -> tuple[np.ndarray, int]:
    """Audio file -> (mono float64 [n], rate): wav/flac via soundfile (like the dataset), others via FFmpeg."""
    p = _check_file(path, source)
    if p.suffix.lower() in _SOUNDFILE_SUFFIXES:
        from avs.data.audio import read_wav

        try:
            return read_wav(p)
        except ValueError as exc:
            raise VideoError(str(exc)) from exc
    return _decode_audio_av(p, source)


def load_video_audio(path: str | os.PathLike) -> tuple[np.ndarray, int]:
    """The first audio track of a video -> (mono float64 [n], rate); VideoError when there is none."""
    return _decode_audio_av(_check_file(path, "video file"), "video")


def to_model_frame(rgb: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """uint8 [h,w,3] RGB -> float32 [3,H,W] ImageNet-normalised, through the dataset's resize (AVSBenchDataset)."""
    t = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).float().div_(255.0)  # [h,w,3] -> [3,h,w]
    if tuple(t.shape[-2:]) != tuple(size):
        t = resize_frames(t[None], tuple(size))[0]
    return normalize_frames(t[None])[0]


# ----------------------------------------------------------------------------------- windows
@dataclass(frozen=True)
class Slot:
    """One analysed frame: its output number k (0-based), video frame index and time in seconds."""

    key: int
    frame: int
    time: float


@dataclass(frozen=True)
class Window:
    """T video frames fed to the model together, and the audio they get.

    `slots[l]` is the Slot key that position l predicts (None: padding, discarded).
    `audio_span`: [start, stop) 16 kHz samples cut into T examples (avsbench); `audio_centres`:
    the 16 kHz sample each position's single example is centred on (dense).
    """

    frames: tuple[int, ...]
    slots: tuple[int | None, ...]
    audio_span: tuple[int, int] | None = None
    audio_centres: tuple[int, ...] | None = None


@dataclass
class WindowPlan:
    """The analysed frames (slots) of a video and the windows that predict them."""

    sampling: str
    num_frames: int  # T
    fps: float
    video_frames: int  # frames in the video
    slots: list[Slot]
    windows: list[Window]
    coverage: list[int] = field(default_factory=list)  # windows predicting each slot

    def slot_for_frame(self, index: int) -> int:
        """The slot whose mask is shown on video frame `index` (avsbench: that frame's second)."""
        if self.sampling == "dense":
            return min(index, len(self.slots) - 1)
        return min(int(index / self.fps), len(self.slots) - 1)


def _avsbench_plan(
    num_video_frames: int, fps: float, num_audio: int, T: int, stride: int, seconds: int
) -> tuple[list[Slot], list[Window]]:
    index = [int((sec + AVSBENCH_OFFSET) * fps) for sec in range(seconds)]
    slots = [Slot(sec, index[sec], index[sec] / fps) for sec in range(seconds)]
    starts = list(range(0, max(1, seconds - T + 1), stride))
    if starts[-1] + T < seconds:
        starts.append(starts[-1] + stride)
    windows = []
    for s in starts:
        secs = [s + k for k in range(T)]
        frames = tuple(index[min(sec, seconds - 1)] for sec in secs)
        keys = tuple(sec if sec < seconds else None for sec in secs)
        span = (s * SAMPLE_RATE, min(num_audio, (s + T) * SAMPLE_RATE))
        windows.append(Window(frames, keys, audio_span=span))
    return slots, windows


def _dense_plan(num_video_frames: int, fps: float, T: int, spacing: float) -> tuple[list[Slot], list[Window]]:
    N = num_video_frames
    step = max(1, int(round(spacing * fps)))  # frames between window positions
    block = T * step
    slots = [Slot(i, i, i / fps) for i in range(N)]
    windows = []
    for b in range(0, N, block):
        for o in range(step):
            first = b + o
            if first >= N:
                break
            idx = [first + k * step for k in range(T)]
            last_real = max(i for i in idx if i < N)
            frames = tuple(min(i, last_real) for i in idx)
            keys = tuple(i if i < N else None for i in idx)
            centres = tuple(int(round((f + 0.5) / fps * SAMPLE_RATE)) for f in frames)
            windows.append(Window(frames, keys, audio_centres=centres))
    return slots, windows


def check_duration(
    num_video_frames: int, fps: float, num_audio_samples: int, source: str = "video", audio_source: str | None = None
) -> int:
    """Number of analysable seconds; VideoError when the video or its 16 kHz audio is shorter than one second.

    AVSBench analyses second l when its frame at (l + 15/16) s exists, and each second needs one
    VGGish example (15600 samples = 0.975 s at 16 kHz).
    """
    duration = num_video_frames / fps
    seconds = sum(1 for sec in range(int(duration) + 1) if int((sec + AVSBENCH_OFFSET) * fps) < num_video_frames)
    if seconds == 0:
        raise VideoError(
            f"{source}: the clip is shorter than one second ({duration:.3f} s, {num_video_frames} frames at "
            f"{fps:.3f} fps); the models take one frame (the one at 15/16 s) and one 0.96 s audio example "
            "per second"
        )
    if num_audio_samples < MIN_SAMPLES:
        raise VideoError(
            f"{audio_source or source}: the audio is shorter than one second "
            f"({num_audio_samples / SAMPLE_RATE:.3f} s at 16 kHz); "
            f"one VGGish example needs {MIN_SAMPLES} samples (0.975 s)"
        )
    return seconds


def fit_audio_to_video(
    samples16k: np.ndarray, duration: float, mode: str = "silence", source: str = "audio", tolerance: float = 0.0
) -> tuple[np.ndarray, tuple[float, float] | None]:
    """16 kHz audio [n] for a video of `duration` s -> (audio [m], the uncovered (start, end) seconds or None).

    Audio that ends more than `tolerance` s before the video: `mode` 'silence' appends zero samples
    up to the video's end, 'repeat' returns it unchanged (windows past its end then reuse its last
    0.975 s), 'error' raises VideoError naming `source` and the seconds. Longer audio is returned
    unchanged (the plan reads only the seconds the video has; the overlay writer trims it).
    """
    if mode not in SHORT_AUDIO:
        raise ValueError(f"short_audio must be one of {list(SHORT_AUDIO)}, got {mode!r}")
    have = samples16k.shape[0] / SAMPLE_RATE
    if have >= duration - tolerance:
        return samples16k, None
    uncovered = (have, duration)
    if mode == "error":
        raise VideoError(
            f"{source}: the audio ({have:.2f} s) is shorter than the video ({duration:.2f} s): seconds "
            f"{have:.2f}-{duration:.2f} have no sound; set short_audio=silence (zeros) or short_audio=repeat "
            "(reuse the last 0.975 s of audio) to run anyway"
        )
    if mode == "silence":
        need = int(np.ceil(duration * SAMPLE_RATE))
        samples16k = np.concatenate([samples16k, np.zeros(need - samples16k.shape[0], dtype=samples16k.dtype)])
    return samples16k, uncovered


def plan_windows(
    num_video_frames: int,
    fps: float,
    num_audio_samples: int,
    num_frames: int,
    sampling: str = "avsbench",
    stride: int | None = None,
    spacing: float = 1.0,
    source: str = "video",
) -> WindowPlan:
    """Plan the clips for a video of `num_video_frames` at `fps` with `num_audio_samples` 16 kHz samples.

    Raises VideoError for a clip shorter than one second (video or audio) and ValueError for bad
    `sampling` / `stride` / `spacing` (config keys named).
    """
    T = int(num_frames)
    if T < 1:
        raise ValueError(f"num_frames (the checkpoint's data.num_frames) must be >= 1, got {num_frames}")
    if sampling not in SAMPLINGS:
        raise ValueError(f"sampling must be one of {list(SAMPLINGS)}, got {sampling!r}")
    seconds = check_duration(num_video_frames, fps, num_audio_samples, source)
    if sampling == "avsbench":
        stride = T if stride is None else int(stride)
        if not 1 <= stride <= T:
            raise ValueError(f"stride must be in [1, T={T}] seconds for sampling=avsbench, got {stride}")
        slots, windows = _avsbench_plan(num_video_frames, fps, num_audio_samples, T, stride, seconds)
    else:
        if not spacing > 0:
            raise ValueError(f"dense_spacing must be > 0 seconds, got {spacing}")
        slots, windows = _dense_plan(num_video_frames, fps, T, float(spacing))
    coverage = [0] * len(slots)
    for w in windows:
        for k in w.slots:
            if k is not None:
                coverage[k] += 1
    return WindowPlan(sampling, T, fps, num_video_frames, slots, windows, coverage)


def _fit_segment(samples: np.ndarray, start: int, length: int) -> np.ndarray:
    """`length` samples starting near `start`, shifted to stay inside the track; zero-padded if it is shorter."""
    n = samples.shape[0]
    if n < length:
        return np.concatenate([samples, np.zeros(length - n, dtype=samples.dtype)])
    start = min(max(0, start), n - length)
    return samples[start : start + length]


def window_logmel(window: Window, samples16k: np.ndarray, num_frames: int) -> np.ndarray:
    """VGGish log-mel input of one window: 16 kHz mono float [n] -> float32 [T,1,96,64]."""
    if window.audio_span is not None:
        start, stop = window.audio_span
        seg = samples16k[start:stop]
        if seg.shape[0] < MIN_SAMPLES:  # the audio ends inside this (padded) window
            seg = _fit_segment(samples16k, start, MIN_SAMPLES)
        return logmel_clip(seg, SAMPLE_RATE, num_frames)
    if window.audio_centres is None:
        raise ValueError("window has neither audio_span nor audio_centres")
    half = MIN_SAMPLES // 2
    examples = [
        waveform_to_examples(_fit_segment(samples16k, c - half, MIN_SAMPLES), SAMPLE_RATE)[:1]
        for c in window.audio_centres
    ]
    return np.concatenate(examples, axis=0)  # T x [1,1,96,64] -> [T,1,96,64]


def audio_to_16k(samples: np.ndarray, rate: int) -> np.ndarray:
    """Mono float [n] at `rate` -> float64 [m] at 16 kHz (the dataset's resampler)."""
    return resample_to_16k(samples, rate)


def seconds_label(t: float) -> str:
    """Time label for figures, e.g. 3.94 -> '0:03.94'."""
    m = int(t // 60)
    return f"{m}:{t - 60 * m:05.2f}"
