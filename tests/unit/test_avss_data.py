"""AVSS layout, colour rule, padding and flags on a hand-made fixture; the folder check finds planted defects."""

from __future__ import annotations

import json
import wave
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from avs.config import CONFIG_DIR
from avs.data.avss import AVSSDataset, build_avss_dataset, release_geometry
from avs.data.avss_check import check_avss
from avs.data.avss_layout import colours_to_labels, palette
from avs.data.layout import AVSDataError
from avs.errors import ConfigError

S = 8
# clip -> (source, split, masks written: {frame: class painted in the left half})
CLIPS = {
    "a": ("v1s", "train", {0: 1}),
    "b": ("v1s", "val", {k: 2 for k in range(5)}),
    "c": ("v1m", "val", {k: k + 1 for k in range(5)}),
    "d": ("v2", "test", {k: 70 for k in range(10)}),
}


def data_node(root: Path, **changes) -> dict:
    """The keys every AVSS data config has (configs/data/base/avss.yaml) on `root`, with `changes`."""
    node = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "data" / "base" / "avss.yaml"))
    return {**node, "root": str(root), **changes}


def _wav(path: Path, seconds: float) -> None:
    rng = np.random.default_rng(0)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes((rng.normal(0, 3000, int(seconds * 16000))).astype("<i2").tobytes())


def make_fixture(root: Path) -> Path:
    """AVSS layout: metadata.csv (extra column too), 71-entry label2idx.json, frames, colour masks, wavs."""
    rows = ["vid,uid,label,split"] + [f"x,{u},{s},{sp}" for u, (s, sp, _) in CLIPS.items()]
    root.mkdir(parents=True, exist_ok=True)
    (root / "metadata.csv").write_text("\n".join(rows) + "\n")
    (root / "label2idx.json").write_text(json.dumps({("background" if i == 0 else f"c{i}"): i for i in range(71)}))
    pal = palette()
    for uid, (source, _, masks) in CLIPS.items():
        d = root / source / uid
        (d / "frames").mkdir(parents=True)
        (d / "labels_rgb").mkdir()
        for k in range(10 if source == "v2" else 5):
            Image.fromarray(np.full((S, S, 3), 20 * k + 10, np.uint8)).save(d / "frames" / f"{k}.jpg")
        for k, cls in masks.items():
            m = np.zeros((S, S, 3), np.uint8)
            m[:, : S // 2] = pal[cls]
            Image.fromarray(m).save(d / "labels_rgb" / f"{k}.png")
        _wav(d / "audio.wav", 10.0 if source == "v2" else 5.0)
    return root


@pytest.fixture
def avss_root(tmp_path):
    return make_fixture(tmp_path / "avss")


def test_palette_and_colour_rule():
    pal = palette()
    assert pal.shape == (71, 3) and tuple(pal[0]) == (0, 0, 0)
    assert tuple(pal[1]) == (128, 0, 0) and tuple(pal[2]) == (0, 128, 0) and tuple(pal[70]) == (32, 128, 128)
    rgb = np.array([[[128, 0, 0], [32, 128, 128], [1, 2, 3], [0, 0, 0]]], np.uint8)
    labels, unknown = colours_to_labels(rgb)
    assert labels.tolist() == [[1, 70, 0, 0]] and unknown == [(1, 2, 3)]
    _, unknown = colours_to_labels(rgb, num_classes=9)  # (32,128,128) is class 70: outside a 9-class palette
    assert (32, 128, 128) in unknown


def test_items_flags_and_padding(avss_root):
    expect = {  # uid -> (mask_valid frames, real frames, class in the left half per labelled frame)
        "a": ([0], 5, {0: 1}),
        "b": (list(range(5)), 5, {k: 2 for k in range(5)}),
        "c": (list(range(5)), 5, {k: k + 1 for k in range(5)}),
        "d": (list(range(10)), 10, {k: 70 for k in range(10)}),
    }
    for split in ("train", "val", "test"):
        ds = AVSSDataset(avss_root, split, image_size=None)
        for i in range(len(ds)):
            it = ds[i]
            valid, n_real, classes = expect[it["video_id"]]
            assert it["frames"].shape == (10, 3, S, S) and it["masks"].shape == (10, S, S)
            assert it["masks"].dtype == torch.int64 and it["audio"].shape == (10, 1, 96, 64)
            assert torch.nonzero(it["mask_valid"]).flatten().tolist() == valid
            assert it["frame_valid"].tolist() == [True] * n_real + [False] * (10 - n_real)
            assert not it["frames"][n_real:].any() and not it["audio"][n_real:].any()
            assert it["audio"][:n_real].abs().sum(dim=(1, 2, 3)).gt(0).all()
            for k in range(10):
                want = np.zeros((S, S), np.int64)
                if k in classes:
                    want[:, : S // 2] = classes[k]
                assert it["masks"][k].numpy().tolist() == want.tolist(), (it["video_id"], k)


def test_sources_filter_and_config(avss_root):
    ds = build_avss_dataset(data_node(avss_root, sources=["v1m"], image_size=None), "val", train=False)
    assert [r.uid for r in ds.records] == ["c"]
    with pytest.raises(ConfigError, match="data.audio_source"):
        build_avss_dataset(data_node(avss_root, audio_source="logmel"), "val", train=False)
    with pytest.raises(ConfigError, match="data.sources"):
        AVSSDataset(avss_root, "val", sources=["v3"])


def test_unknown_colour_refused_unless_legacy(avss_root):
    p = avss_root / "v1m" / "c" / "labels_rgb" / "2.png"
    m = np.array(Image.open(p))
    m[0, -1] = (7, 7, 7)
    Image.fromarray(m).save(p)
    with pytest.raises(AVSDataError, match=r"not in the 71-class AVSS palette: \(7, 7, 7\).*legacy_unknown_colours"):
        AVSSDataset(avss_root, "val", image_size=None, sources=["v1m"])[0]
    it = AVSSDataset(avss_root, "val", image_size=None, sources=["v1m"], legacy_unknown_colours=True)[0]
    assert it["masks"][2, 0, -1] == 0 and it["masks"][2, 0, 0] == 3
    skipped = AVSSDataset(avss_root, "val", image_size=None, sources=["v1m"], on_error="skip")[0]
    assert not skipped and "(7, 7, 7)" in skipped.error


def test_release_train_geometry():
    # 10 x 4 mask, columns coloured with classes 1..10; train crop to 2: short side 4 -> 2, long side
    # int(10 * 2 / 4) = 5 (NEAREST keeps columns 1, 3, 5, 7, 9 -> classes 2, 4, 6, 8, 10), x offset round(1.5) = 2
    pal = palette()
    m = np.stack([np.stack([pal[c + 1] for c in range(10)])] * 4).astype(np.uint8)  # [4,10,3]
    out = release_geometry(Image.fromarray(m), 2, crop=True, nearest=True)
    labels, _ = colours_to_labels(np.asarray(out))
    assert labels.tolist() == [[6, 8], [6, 8]]
    straight = release_geometry(Image.fromarray(m), 2, crop=False, nearest=True)
    assert colours_to_labels(np.asarray(straight))[0].tolist() == [[3, 8], [3, 8]]


def test_check_clean_fixture(avss_root):
    rep = check_avss(avss_root)
    assert rep.ok, rep.format()
    assert rep.counts == {"train": 1, "val": 2, "test": 1}


def test_check_finds_every_planted_defect(avss_root):
    with open(avss_root / "metadata.csv", "a") as fh:
        fh.write("x,c,v1m,val\nx,e,v9,val\nx,f,v2,dev\n")  # duplicate, bad source, bad split
    labels = json.loads((avss_root / "label2idx.json").read_text())
    labels.pop("c70")
    (avss_root / "label2idx.json").write_text(json.dumps(labels))
    (avss_root / "v2" / "d" / "frames" / "9.jpg").unlink()  # a v2 clip with 9 frames
    (avss_root / "v1m" / "c" / "labels_rgb" / "4.png").unlink()  # a v1m clip with 4 masks
    m = np.zeros((S, S, 3), np.uint8)
    m[0, 0] = (5, 5, 5)
    Image.fromarray(m).save(avss_root / "v1s" / "b" / "labels_rgb" / "1.png")  # colour outside the palette
    (avss_root / "v1s" / "a" / "audio.wav").write_bytes(b"not a wav")
    text = check_avss(avss_root).format()
    for needle in (
        "duplicate row for clip 'c'",
        "label 'v9'",
        "split 'dev'",
        "70 entries",
        "9 frame file(s)",
        "missing frame 9",
        "4 colour mask(s)",
        "missing colour mask 4",
        "(5, 5, 5)",
        "unreadable wav",
    ):
        assert needle in text, needle


def test_frames_values_and_mixed_source_batches(avss_root):
    from torch.utils.data import DataLoader

    from avs.data.avsbench import build_dataset
    from avs.data.transforms import normalize_frames

    ds = build_dataset(
        data_node(avss_root, image_size=None), "val", train=False
    )  # the S4/MS3 entry point dispatches on data.subset
    batch = next(iter(DataLoader(ds, batch_size=2)))
    assert batch["frames"].shape == (2, 10, 3, S, S) and batch["masks"].shape == (2, 10, S, S)
    assert batch["mask_valid"].shape == (2, 10) and batch["frame_valid"].shape == (2, 10)
    assert batch["source"] == ["v1s", "v1m"]
    for k in range(5):  # frame k is the constant grey 20 k + 10 (JPEG keeps a flat image to +-1)
        want = normalize_frames(torch.full((1, 3, S, S), (20 * k + 10) / 255.0))[0]
        assert torch.allclose(batch["frames"][0, k], want, atol=0.03)


def test_csv_and_label_file_errors_name_the_file(avss_root):
    (avss_root / "metadata.csv").write_text("uid,split\na,train\n")
    with pytest.raises(AVSDataError, match=r"metadata.csv: metadata csv lacks column\(s\) \['label'\]"):
        AVSSDataset(avss_root, "train")
    rep = check_avss(avss_root)
    assert not rep.ok and "lacks column(s) ['label']" in rep.format()
    (avss_root / "label2idx.json").write_text(json.dumps({"background": 0, "dog": 0}))
    with pytest.raises(AVSDataError, match="label2idx.json: 2 entries, data.num_classes=71"):
        AVSSDataset(avss_root, "train")


def test_synthetic_config_refuses_unknown_keys():
    from avs.data.synthetic.semantic import SemanticConfig

    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['subset_x'\]"):
        SemanticConfig.from_mapping({"subset_x": 1})
    with pytest.raises(ConfigError, match="num_objects"):
        SemanticConfig(num_categories=2, num_objects=(2, 3))
