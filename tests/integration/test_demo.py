"""Demo on a Sounding Shapes clip turned into a video; visualize and export on tiny trained checkpoints."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from avs.engine.trainer import Trainer
from tests.conftest import compose_cfg, run_script, tiny_overrides

av = pytest.importorskip("av", reason="PyAV (the avs[video] extra) is not installed")

from avs.data import build_dataset  # noqa: E402
from avs.inference.demo import run_demo  # noqa: E402
from avs.inference.model import load_model  # noqa: E402
from avs.inference.video import VideoError, load_video_audio, probe_video  # noqa: E402
from avs.utils.allocator import process_glibc  # noqa: E402

FPS = 4  # each stored frame is held for one second (4 video frames); AVSBench sampling takes frame 4l+3
T = 3  # tiny_overrides: data.num_frames=3, image_size 64
SMALL = {
    "tpavi": ["model=tpavi", "model.channels=32"],
    "ecmvae": ["model=ecmvae", "model.channels=32", "model.audio_dim=32", "audio.embed_dim=32"],
}


def _checkpoint(data_dir: Path, run: Path, model: str) -> Path:
    cfg = compose_cfg(
        "train", tiny_overrides(data_dir, "s4") + SMALL[model] + ["trainer.max_steps=1", "trainer.test_at_end=false"]
    )
    Trainer(cfg, run).fit()
    return run / "checkpoints" / "best.ckpt"


@pytest.fixture(scope="module")
def tpavi_ckpt(synth_data_dir, tmp_path_factory) -> Path:
    return _checkpoint(synth_data_dir, tmp_path_factory.mktemp("tpavi"), "tpavi")


@pytest.fixture(scope="module")
def ecmvae_ckpt(synth_data_dir, tmp_path_factory) -> Path:
    return _checkpoint(synth_data_dir, tmp_path_factory.mktemp("ecmvae"), "ecmvae")


def write_video(
    path: Path, frames: list[np.ndarray], audio: np.ndarray | None, sr: int = 16000, hold: int = FPS
) -> None:
    """Lossless mkv: ffv1 (bgr0) video, each frame repeated `hold` times at FPS, int16 PCM audio."""
    with av.open(str(path), "w") as c:
        vs = c.add_stream("ffv1", rate=FPS)
        vs.width, vs.height, vs.pix_fmt = frames[0].shape[1], frames[0].shape[0], "bgr0"
        ast = c.add_stream("pcm_s16le", rate=sr, layout="mono") if audio is not None else None
        for f in frames:
            for _ in range(hold):
                for p in vs.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                    c.mux(p)
        for p in vs.encode():
            c.mux(p)
        if ast is not None:
            af = av.AudioFrame.from_ndarray(audio[None], format="s16", layout="mono")
            af.sample_rate = sr
            for p in list(ast.encode(af)) + list(ast.encode()):
                c.mux(p)


@pytest.fixture(scope="module")
def clip(synth_data_dir, tmp_path_factory) -> dict:
    """The first S4 test clip as a lossless 3-second video with its wav."""
    import soundfile as sf

    from avs.data.avsbench import frame_path, get_layout, split_records, wav_path

    cfg = compose_cfg("train", tiny_overrides(synth_data_dir, "s4"))
    root = Path(cfg.data.root)
    layout = get_layout("s4")
    rec = split_records(root, "s4", "test")[0]
    frames = [np.array(Image.open(frame_path(root, layout, rec, k)).convert("RGB")) for k in range(1, T + 1)]
    wav = wav_path(root, layout, rec)
    audio, sr = sf.read(wav, dtype="int16")
    out = tmp_path_factory.mktemp("video")
    write_video(out / "clip.mkv", frames, audio, sr)
    write_video(out / "silent.mkv", frames, None)
    write_video(out / "short.mkv", frames[:1], audio, sr, hold=3)  # 0.75 s
    return {
        "video": out / "clip.mkv",
        "silent": out / "silent.mkv",
        "short": out / "short.mkv",
        "wav": wav,
        "frames": frames,
        "dir": out,
    }


def _demo_cfg(video: Path, ckpt: Path, *extra: str):
    return compose_cfg("demo", [f"video={video}", f"checkpoint={ckpt}", "device=cpu", "progress=false", *extra])


def test_demo_matches_the_dataset_path_and_writes_every_output(clip, tpavi_ckpt, tmp_path):
    result = run_demo(_demo_cfg(clip["video"], tpavi_ckpt), tmp_path, return_probs=True)
    # AVSBench sampling: one frame per second at 15/16 s -> video frames 3, 7, 11 = the stored PNGs 1..3
    assert [s.frame for s in result.plan.slots] == [3, 7, 11]
    # the same clip through the dataset path (PNG frames + log-mel pkl) and the same model
    loaded = load_model(tpavi_ckpt, "cpu")
    item = build_dataset(loaded.cfg.data, "test", train=False)[0]
    with torch.no_grad():
        ref = torch.sigmoid(loaded.model({"frames": item["frames"][None], "audio": item["audio"][None]})["logits"])
    ref = ref[0, :, 0].numpy()  # [T,H,W]
    assert result.probs.shape == ref.shape == (T, 64, 64)
    np.testing.assert_allclose(result.probs, ref, atol=1e-6, rtol=0)
    for k, path in enumerate(result.masks):
        mask = np.asarray(Image.open(path)) > 127
        decided = np.abs(ref[k] - 0.5) > 1e-5  # pixels not within rounding of the threshold
        np.testing.assert_array_equal(mask[decided], (ref[k] > 0.5)[decided])
    # overlay video: every frame, same rate and duration, audio muxed back
    info = probe_video(result.overlay_video)
    assert (info.num_frames, info.fps, info.has_audio) == (3 * FPS, FPS, True)
    assert info.duration == pytest.approx(3.0)
    samples, sr = load_video_audio(result.overlay_video)
    assert abs(samples.shape[0] / sr - 3.0) < 0.1
    sheet = np.asarray(Image.open(result.contact_sheet))
    assert sheet.ndim == 3 and sheet.shape[1] > 3 * 64
    summary = json.loads(result.summary.read_text())
    assert summary["method"] == "tpavi" and summary["num_frames"] == T and summary["video_frames"] == 12
    assert [s["frame"] for s in summary["slots"]] == [3, 7, 11]


def test_demo_hydra_entry_point_dense(clip, tpavi_ckpt, tmp_path):
    out = tmp_path / "dense"
    args = [
        f"video={clip['video']}",
        f"checkpoint={tpavi_ckpt}",
        "sampling=dense",
        "device=cpu",
        "progress=false",
        f"out_dir={out}",
        "mask_resolution=video",
        "overlay.max_size=48",
        f"hydra.run.dir={tmp_path / 'hydra'}",
    ]
    proc = run_script("demo.py", args, tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    masks = sorted((out / "masks").glob("clip_*.png"))
    assert len(masks) == 3 * FPS  # dense: every frame
    assert np.asarray(Image.open(masks[0])).shape == (64, 64)  # video size (= the PNG size here)
    info = probe_video(out / "clip_overlay.mp4")
    assert (info.num_frames, info.width, info.height) == (12, 48, 48)
    summary = json.loads((out / "demo.json").read_text())
    assert summary["sampling"] == "dense" and len(summary["slots"]) == 12
    glibc = process_glibc() is not None  # runtime.allocator (default auto) applied on glibc, recorded
    assert summary["allocator"]["setting"] == "auto" and summary["allocator"]["applied"] is glibc
    assert (out / "contact_sheet.png").is_file()


def test_demo_errors_and_separate_audio(clip, tpavi_ckpt, tmp_path):
    with pytest.raises(VideoError, match="no audio track.*audio_file=PATH"):
        run_demo(_demo_cfg(clip["silent"], tpavi_ckpt), tmp_path / "a")
    with pytest.raises(VideoError, match="shorter than one second"):
        run_demo(_demo_cfg(clip["short"], tpavi_ckpt), tmp_path / "b")
    bad = clip["dir"] / "broken.mp4"
    bad.write_bytes(b"\x00\x01 definitely not a video" * 64)
    with pytest.raises(VideoError, match="broken.mp4: unreadable"):
        run_demo(_demo_cfg(bad, tpavi_ckpt), tmp_path / "c")
    ok = run_demo(
        _demo_cfg(clip["silent"], tpavi_ckpt, f"audio_file={clip['wav']}", "overlay.enabled=false"),
        tmp_path / "d",
        return_probs=True,
    )
    assert len(ok.masks) == T and ok.overlay_video is None and ok.contact_sheet is not None
    with_track = run_demo(
        _demo_cfg(clip["video"], tpavi_ckpt, "overlay.enabled=false", "contact_sheet.enabled=false"),
        tmp_path / "e",
        return_probs=True,
    )
    np.testing.assert_array_equal(ok.probs, with_track.probs)  # the wav is the clip's own track


def test_demo_latent_samples_give_variance_maps(clip, ecmvae_ckpt, tmp_path):
    result = run_demo(
        _demo_cfg(clip["video"], ecmvae_ckpt, "num_samples=3", "overlay.enabled=false"), tmp_path, return_probs=True
    )
    assert len(result.variance) == T and all(p.is_file() for p in result.variance)
    v = result.variance_maps
    assert v.shape == (T, 64, 64) and v.min() >= 0 and v.max() <= 0.25 and v.max() > 0
    again = run_demo(
        _demo_cfg(clip["video"], ecmvae_ckpt, "num_samples=3", "overlay.enabled=false", "contact_sheet.enabled=false"),
        tmp_path / "again",
        return_probs=True,
    )
    np.testing.assert_array_equal(result.probs, again.probs)  # seeded samples


def test_visualize_grids_latents_and_tsne(synth_data_dir, ecmvae_ckpt, tpavi_ckpt, tmp_path, monkeypatch):
    from avs.inference.visualize import visualize_split

    def vcfg(ckpt, *extra):
        return compose_cfg("visualize", [f"checkpoint={ckpt}", "split=test", "device=cpu", "progress=false", *extra])

    monkeypatch.setitem(sys.modules, "sklearn", None)  # the viz extra missing
    res = visualize_split(vcfg(ecmvae_ckpt, "num_samples=2"), tmp_path / "a")
    assert len(res.grids) == 2 and all(p.is_file() for p in res.grids)
    grid = np.asarray(Image.open(res.grids[0]))
    assert grid.shape[0] > 4 * 64  # frame / GT / prediction / variance rows
    codes = np.load(res.latents)
    assert set(codes.files) == {"c", "s_a", "s_v"} and codes["c"].shape[0] == 2 * T
    assert res.tsne is None and "avs[viz]" in res.tsne_skipped

    class FakeTSNE:  # stands in for scikit-learn's TSNE (not installed here)
        def __init__(self, n_components, perplexity, init, random_state):
            assert n_components == 2 and perplexity > 0

        def fit_transform(self, x):
            return np.asarray(x)[:, :2]

    manifold = types.ModuleType("sklearn.manifold")
    manifold.TSNE = FakeTSNE
    monkeypatch.setitem(sys.modules, "sklearn", types.ModuleType("sklearn"))
    monkeypatch.setitem(sys.modules, "sklearn.manifold", manifold)
    res = visualize_split(vcfg(ecmvae_ckpt, "num_clips=1"), tmp_path / "b")
    assert len(res.grids) == 1 and res.tsne is not None and np.asarray(Image.open(res.tsne)).shape == (480, 480, 3)
    plain = visualize_split(vcfg(tpavi_ckpt, "num_clips=1"), tmp_path / "c")
    assert plain.latents is None and "no latent codes" in plain.tsne_skipped


def test_export_checkpoint(tpavi_ckpt, tmp_path):
    from avs.inference.export import example_inputs, export_checkpoint, load_exported

    cfg = compose_cfg("export", [f"checkpoint={tpavi_ckpt}", "num_checks=0"])
    result = export_checkpoint(cfg, tmp_path)
    meta = json.loads(result.meta_path.read_text())
    assert meta["method"] == "tpavi" and meta["num_frames"] == T and meta["image_size"] == [64, 64]
    frames, audio = example_inputs(1, T, (64, 64), seed=7)
    loaded = load_model(tpavi_ckpt, "cpu")
    with torch.no_grad():
        eager = loaded.model({"frames": frames, "audio": audio})["logits"]
        got = load_exported(result.path)(frames, audio)
    assert torch.allclose(got, eager, atol=1e-4, rtol=0)


def test_export_script_onnx_from_a_trained_checkpoint(tpavi_ckpt, tmp_path):
    """scripts/export.py format=onnx on a trained best.ckpt: prints the difference, writes .onnx + .onnx.json."""
    args = [f"checkpoint={tpavi_ckpt}", "format=onnx", f"out_dir={tmp_path}/out"]
    proc = run_script("export.py", args, tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "max |exported - eager| = " in proc.stdout and "relative" in proc.stdout
    (onnx_file,) = (tmp_path / "out").glob("*.onnx")
    meta = json.loads(onnx_file.with_name(onnx_file.name + ".json").read_text())
    assert meta["format"] == "onnx" and meta["method"] == "tpavi" and meta["max_rel_diff_vs_eager"] <= 1e-4
    assert meta["dynamic_axes"] == {"0": "batch"}


def test_demo_on_a_lossy_mp4_with_aac_audio(clip, tpavi_ckpt, tmp_path):
    """The common case: an H.264 + AAC mp4. Lossy, so masks are compared with a tolerance."""
    path = tmp_path / "clip.mp4"
    with av.open(str(path), "w") as c:
        vs = c.add_stream("libx264", rate=FPS)
        vs.width, vs.height, vs.pix_fmt = 64, 64, "yuv420p"
        ast = c.add_stream("aac", rate=16000, layout="mono")
        for f in clip["frames"]:
            for _ in range(FPS):
                for p in vs.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                    c.mux(p)
        for p in vs.encode():
            c.mux(p)
        import soundfile as sf

        audio, sr = sf.read(clip["wav"], dtype="float32")
        for start in range(0, len(audio), 1024):  # AAC takes fixed-size frames
            chunk = np.zeros((1, 1024), np.float32)
            part = audio[start : start + 1024]
            chunk[0, : len(part)] = part
            af = av.AudioFrame.from_ndarray(chunk, format="fltp", layout="mono")
            af.sample_rate = sr
            for p in ast.encode(af):
                c.mux(p)
        for p in ast.encode():
            c.mux(p)
    info = probe_video(path)
    assert info.has_audio and info.num_frames == 3 * FPS
    result = run_demo(_demo_cfg(path, tpavi_ckpt), tmp_path / "out", return_probs=True)
    assert len(result.masks) == T and result.probs.shape == (T, 64, 64)
    lossless = run_demo(_demo_cfg(clip["video"], tpavi_ckpt), tmp_path / "ref", return_probs=True)
    assert np.abs(result.probs - lossless.probs).mean() < 0.05  # lossy video + AAC, same masks up to codec noise
    out = probe_video(result.overlay_video)
    assert out.num_frames == 3 * FPS and out.has_audio


def test_demo_short_audio_gets_silence_and_long_audio_is_cut(clip, tpavi_ckpt, tmp_path, caplog):
    import soundfile as sf

    audio, sr = sf.read(clip["wav"], dtype="int16")
    half = audio[: int(1.5 * sr)]  # 1.5 s of sound under the 3 s video
    write_video(tmp_path / "short_audio.mkv", clip["frames"], half, sr)
    quiet = dict(overlay="overlay.enabled=false", sheet="contact_sheet.enabled=false")
    with caplog.at_level("WARNING", logger="avs.inference.demo"):
        silence = run_demo(
            _demo_cfg(tmp_path / "short_audio.mkv", tpavi_ckpt, *quiet.values()), tmp_path / "s", return_probs=True
        )
    assert any(
        "short_audio.mkv: the audio (1.50 s) is shorter than the video (3.00 s): seconds 1.50-3.00 have no "
        "sound; they get silence" in r.getMessage()
        for r in caplog.records
    )
    assert json.loads(silence.summary.read_text())["audio_uncovered_s"] == [1.5, 3.0]
    # the same as giving the model the sound followed by real silence
    padded = np.concatenate([half, np.zeros(3 * sr - half.shape[0], np.int16)])
    sf.write(tmp_path / "padded.wav", padded, sr, subtype="PCM_16")
    ref = run_demo(
        _demo_cfg(clip["silent"], tpavi_ckpt, f"audio_file={tmp_path / 'padded.wav'}", *quiet.values()),
        tmp_path / "r",
        return_probs=True,
    )
    np.testing.assert_array_equal(silence.probs, ref.probs)
    repeat = run_demo(
        _demo_cfg(tmp_path / "short_audio.mkv", tpavi_ckpt, "short_audio=repeat", *quiet.values()),
        tmp_path / "p",
        return_probs=True,
    )
    assert not np.array_equal(repeat.probs, silence.probs)  # the old behaviour, on request
    with pytest.raises(VideoError, match=r"seconds 1.50-3.00 have no sound"):
        run_demo(_demo_cfg(tmp_path / "short_audio.mkv", tpavi_ckpt, "short_audio=error"), tmp_path / "e")
    # 5 s of sound under the 3 s video: the overlay stays 3 s long
    longer = np.concatenate([audio, audio[: 2 * sr]])
    write_video(tmp_path / "long_audio.mkv", clip["frames"], longer, sr)
    result = run_demo(_demo_cfg(tmp_path / "long_audio.mkv", tpavi_ckpt, quiet["sheet"]), tmp_path / "l")
    samples, rate = load_video_audio(result.overlay_video)
    assert abs(samples.shape[0] / rate - 3.0) < 0.1
    assert probe_video(result.overlay_video).duration == pytest.approx(3.0)
