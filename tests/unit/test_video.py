"""Video decoding, window plans and overlay helpers of the demo (avs.inference.video / overlay)."""

from __future__ import annotations

import sys
from fractions import Fraction

import numpy as np
import pytest

from avs.data.audio import MIN_SAMPLES, SAMPLE_RATE, logmel_clip, waveform_to_examples
from avs.inference.overlay import OverlayVideoWriter, heatmap, image_grid, mask_to_size, scatter_plot, tint
from avs.inference.video import (
    MissingDependencyError,
    VideoError,
    iter_frames,
    load_audio,
    load_video_audio,
    plan_windows,
    probe_video,
    require_av,
    to_model_frame,
    window_logmel,
)

av = pytest.importorskip("av", reason="PyAV (the avs[video] extra) is not installed")


def write_video(path, frames: np.ndarray, fps: int, audio: np.ndarray | None = None, sr: int = SAMPLE_RATE) -> None:
    """Lossless test video: ffv1 (bgr0) frames uint8 [N,H,W,3] + optional int16 mono PCM, in Matroska."""
    with av.open(str(path), "w") as c:
        vs = c.add_stream("ffv1", rate=fps)
        vs.width, vs.height, vs.pix_fmt = frames.shape[2], frames.shape[1], "bgr0"
        ast = c.add_stream("pcm_s16le", rate=sr, layout="mono") if audio is not None else None
        for f in frames:
            for p in vs.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")):
                c.mux(p)
        for p in vs.encode():
            c.mux(p)
        if ast is not None:
            af = av.AudioFrame.from_ndarray(audio[None].astype(np.int16), format="s16", layout="mono")
            af.sample_rate = sr
            for p in list(ast.encode(af)) + list(ast.encode()):
                c.mux(p)


# ------------------------------------------------------------------------------------ plans
def test_avsbench_plan_takes_the_frame_at_15_16_of_each_second():
    plan = plan_windows(125, 25.0, 5 * SAMPLE_RATE, num_frames=5)
    # AVSBench: int(l*fps + 15/16*fps) for l in 0..4 at 25 fps
    assert [s.frame for s in plan.slots] == [int(k * 25 + 15 / 16 * 25) for k in range(5)] == [23, 48, 73, 98, 123]
    assert len(plan.windows) == 1
    w = plan.windows[0]
    assert w.frames == (23, 48, 73, 98, 123) and w.slots == (0, 1, 2, 3, 4)
    assert w.audio_span == (0, 5 * SAMPLE_RATE)
    assert plan.coverage == [1] * 5


def test_avsbench_plan_pads_the_last_window_and_maps_frames_to_seconds():
    # 7.5 s at 10 fps -> seconds 0..6 analysed (frame at 6.9375 s = index 69 exists), T=5: windows at 0 and 5
    plan = plan_windows(75, 10.0, 75 * SAMPLE_RATE // 10, num_frames=5)
    assert len(plan.slots) == 7
    assert [w.slots for w in plan.windows] == [(0, 1, 2, 3, 4), (5, 6, None, None, None)]
    assert plan.windows[1].frames == (59, 69, 69, 69, 69)  # padding repeats the last analysed frame
    assert plan.windows[1].audio_span == (5 * SAMPLE_RATE, 75 * SAMPLE_RATE // 10)
    assert plan.slot_for_frame(0) == 0 and plan.slot_for_frame(19) == 1 and plan.slot_for_frame(74) == 6


def test_avsbench_stride_overlaps_are_counted():
    plan = plan_windows(70, 10.0, 7 * SAMPLE_RATE, num_frames=5, stride=1)
    assert [w.slots[0] for w in plan.windows] == [0, 1, 2]
    assert plan.coverage == [1, 2, 3, 3, 3, 2, 1]
    with pytest.raises(ValueError, match="stride"):
        plan_windows(70, 10.0, 7 * SAMPLE_RATE, num_frames=5, stride=6)


def test_dense_plan_covers_every_frame_once_with_one_second_spacing():
    plan = plan_windows(30, 4.0, 8 * SAMPLE_RATE, num_frames=3, sampling="dense")
    assert len(plan.slots) == 30 and plan.coverage == [1] * 30
    assert plan.windows[0].frames == (0, 4, 8) and plan.windows[3].frames == (3, 7, 11)
    # block 2 (frames 24..35) runs past the end: padding repeats the window's last real frame
    tail = [w for w in plan.windows if w.frames[0] == 26][0]
    assert tail.frames == (26, 26, 26) and tail.slots == (26, None, None)
    assert tail.audio_centres[0] == round(26.5 / 4 * SAMPLE_RATE)
    assert plan.slot_for_frame(17) == 17


@pytest.mark.parametrize("frames,samples", [(3, 4 * SAMPLE_RATE), (40, MIN_SAMPLES - 1)])
def test_plans_refuse_clips_shorter_than_one_second(frames, samples):
    with pytest.raises(VideoError, match="shorter than one second"):
        plan_windows(frames, 4.0, samples, num_frames=5, source="x.mp4")


def test_plan_rejects_unknown_sampling():
    with pytest.raises(ValueError, match="sampling"):
        plan_windows(40, 4.0, 10 * SAMPLE_RATE, num_frames=5, sampling="every")


def test_window_logmel_matches_the_dataset_recipe():
    rng = np.random.default_rng(0)
    wave = rng.standard_normal(7 * SAMPLE_RATE) * 0.1
    plan = plan_windows(70, 10.0, wave.shape[0], num_frames=5)
    first = window_logmel(plan.windows[0], wave, 5)
    assert first.shape == (5, 1, 96, 64) and first.dtype == np.float32
    np.testing.assert_array_equal(first, logmel_clip(wave[: 5 * SAMPLE_RATE], SAMPLE_RATE, 5))
    # second window holds 2 s -> 2 examples, padded by repeating the last one
    second = window_logmel(plan.windows[1], wave, 5)
    np.testing.assert_array_equal(second[2], second[1])
    dense = plan_windows(70, 10.0, wave.shape[0], num_frames=5, sampling="dense")
    w = dense.windows[12]
    got = window_logmel(w, wave, 5)
    c = w.audio_centres[0]
    ref = waveform_to_examples(wave[c - MIN_SAMPLES // 2 : c - MIN_SAMPLES // 2 + MIN_SAMPLES], SAMPLE_RATE)
    np.testing.assert_array_equal(got[0], ref[0])
    # a frame at t=0 takes the first 15600 samples (window shifted inside the track)
    start = window_logmel(dense.windows[0], wave, 5)[0]
    np.testing.assert_array_equal(start, waveform_to_examples(wave[:MIN_SAMPLES], SAMPLE_RATE)[0])


# ------------------------------------------------------------------------------------ decoding
def test_lossless_video_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    frames = rng.integers(0, 256, (6, 24, 32, 3), dtype=np.uint8)
    audio = (rng.standard_normal(3 * SAMPLE_RATE) * 3000).astype(np.int16)
    path = tmp_path / "clip.mkv"
    write_video(path, frames, fps=2, audio=audio)
    info = probe_video(path)
    assert (info.num_frames, info.fps, info.width, info.height, info.has_audio) == (6, 2.0, 32, 24, True)
    assert info.duration == pytest.approx(3.0)
    decoded = list(iter_frames(path))
    assert [i for i, _ in decoded] == list(range(6))
    for (_, got), ref in zip(decoded, frames):
        np.testing.assert_array_equal(got, ref)
    samples, sr = load_video_audio(path)
    assert sr == SAMPLE_RATE and samples.dtype == np.float64
    np.testing.assert_array_equal(samples, audio / 32768.0)
    small = next(iter_frames(path, size=(12, 16)))[1]
    assert small.shape == (12, 16, 3)


def test_model_frame_normalises_and_resizes():
    rgb = np.full((10, 20, 3), 255, dtype=np.uint8)
    x = to_model_frame(rgb, (8, 8))
    assert x.shape == (3, 8, 8)
    np.testing.assert_allclose(
        x[:, 0, 0].numpy(), [(1 - 0.485) / 0.229, (1 - 0.456) / 0.224, (1 - 0.406) / 0.225], rtol=1e-5
    )


def test_decoding_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.mp4"):
        probe_video(tmp_path / "missing.mp4")
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"\x00not a video" * 100)
    with pytest.raises(VideoError, match="bad.mp4"):
        probe_video(bad)
    silent = tmp_path / "silent.mkv"
    write_video(silent, np.zeros((4, 16, 16, 3), np.uint8), fps=2)
    assert probe_video(silent).has_audio is False
    with pytest.raises(VideoError, match="no audio track.*audio_file=PATH"):
        load_video_audio(silent)


def test_load_audio_reads_wav_like_the_dataset(tmp_path):
    import soundfile as sf

    from avs.data.audio import read_wav

    wave = (np.random.default_rng(2).standard_normal(SAMPLE_RATE) * 2000).astype(np.int16)
    path = tmp_path / "a.wav"
    sf.write(path, wave, SAMPLE_RATE, subtype="PCM_16")
    got, sr = load_audio(path)
    ref, _ = read_wav(path)
    assert sr == SAMPLE_RATE
    np.testing.assert_array_equal(got, ref)


def test_missing_pyav_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "av", None)
    with pytest.raises(MissingDependencyError, match=r"avs\[video\]"):
        require_av()


# ------------------------------------------------------------------------------------ overlays
def test_tint_blends_only_the_mask():
    rgb = np.zeros((8, 8, 3), np.uint8)
    mask = np.zeros((8, 8), bool)
    mask[2:6, 2:6] = True
    out = tint(rgb, mask, color=(200, 100, 0), alpha=0.5, outline=False)
    assert out[3, 3].tolist() == [100, 50, 0] and out[0, 0].tolist() == [0, 0, 0]
    with pytest.raises(ValueError, match="differ in size"):
        tint(rgb, mask[:4])


def test_mask_resize_heatmap_grid_and_scatter_shapes():
    m = np.zeros((4, 4), bool)
    m[:2] = True
    big = mask_to_size(m, (8, 12))
    assert big.shape == (8, 12) and big[0].all() and not big[-1].any()
    hm = heatmap(np.array([[0.0, 0.25]]), vmax=0.25)
    assert hm.shape == (1, 2, 3) and hm.dtype == np.uint8 and hm[0, 1].sum() > hm[0, 0].sum()
    grid = image_grid(
        [[np.zeros((10, 10, 3), np.uint8)] * 3, [np.ones((10, 10))] * 2],
        col_labels=["a", "b", "c"],
        row_labels=["x", "y"],
        pad=2,
    )
    assert grid.ndim == 3 and grid.shape[0] == 18 + 2 * (10 + 2) and grid.shape[1] > 3 * 12
    plot = scatter_plot(np.random.default_rng(0).standard_normal((20, 2)), np.arange(20) % 3, ["c", "s_a", "s_v"])
    assert plot.shape == (480, 480, 3)


def test_overlay_writer_muxes_audio_and_keeps_the_frame_count(tmp_path):
    path = tmp_path / "o.mp4"
    audio = np.sin(np.arange(2 * SAMPLE_RATE) / SAMPLE_RATE * 2 * np.pi * 440) * 0.3
    with OverlayVideoWriter(path, Fraction(5), (33, 41), audio=audio, sample_rate=SAMPLE_RATE) as w:
        for i in range(10):
            w.write(np.full((33, 41, 3), 20 * i, np.uint8))
    info = probe_video(path)
    assert (info.num_frames, info.width, info.height, info.has_audio) == (10, 40, 32, True)
    assert info.duration == pytest.approx(2.0)
    samples, sr = load_video_audio(path)
    assert sr == SAMPLE_RATE and abs(samples.shape[0] / sr - 2.0) < 0.1  # AAC priming adds a few ms
    assert not list(tmp_path.glob(".*tmp*"))


# ------------------------------------------------------------------------ audio vs video length
def test_short_audio_gets_silence_repeat_or_error_for_the_uncovered_seconds():
    from avs.inference.video import fit_audio_to_video

    x = np.random.default_rng(0).standard_normal(3 * SAMPLE_RATE)
    out, gap = fit_audio_to_video(x, 5.0, "silence", "a.wav", tolerance=0.04)
    assert gap == (3.0, 5.0) and out.shape == (5 * SAMPLE_RATE,)
    np.testing.assert_array_equal(out[: 3 * SAMPLE_RATE], x)
    assert not out[3 * SAMPLE_RATE :].any()  # zeros, not a repeat of the end
    out, gap = fit_audio_to_video(x, 5.0, "repeat", "a.wav", tolerance=0.04)
    assert gap == (3.0, 5.0) and out is x
    with pytest.raises(
        VideoError,
        match=r"a.wav: the audio \(3.00 s\) is shorter than the video \(5.00 s\): "
        r"seconds 3.00-5.00 have no sound; set short_audio=silence",
    ):
        fit_audio_to_video(x, 5.0, "error", "a.wav")
    out, gap = fit_audio_to_video(x, 3.03, "error", "a.wav", tolerance=0.04)  # within one frame: covered
    assert gap is None and out is x
    with pytest.raises(ValueError, match="short_audio must be one of"):
        fit_audio_to_video(x, 5.0, "loop")


def test_short_audio_windows_read_silence_not_the_last_second():
    from avs.inference.video import fit_audio_to_video

    rng = np.random.default_rng(1)
    x = 0.3 * rng.standard_normal(2 * SAMPLE_RATE)  # 2 s of noise under a 4 s video, T = 4
    padded, _ = fit_audio_to_video(x, 4.0, "silence")
    plan = plan_windows(16, 4.0, padded.shape[0], num_frames=4)
    mel = window_logmel(plan.windows[0], padded, 4)
    silent = np.log(0.01)  # log(0 + LOG_OFFSET)
    np.testing.assert_allclose(mel[3], silent, atol=1e-6)  # the 4th second: silence
    assert np.abs(mel[3] - mel[1]).max() > 1.0  # not a copy of an earlier example


def test_overlay_writer_cuts_longer_audio_at_the_last_frame(tmp_path):
    path = tmp_path / "long_audio.mp4"
    audio = np.sin(np.arange(5 * SAMPLE_RATE) / SAMPLE_RATE * 2 * np.pi * 440) * 0.3  # 5 s of sound
    with OverlayVideoWriter(path, Fraction(5), (32, 32), audio=audio, sample_rate=SAMPLE_RATE) as w:
        for i in range(10):  # 2 s of video
            w.write(np.full((32, 32, 3), 20 * i, np.uint8))
    samples, sr = load_video_audio(path)
    assert abs(samples.shape[0] / sr - 2.0) < 0.1  # AAC priming adds a few ms
    with av.open(str(path)) as c:
        assert float(c.duration / 1e6) < 2.1
