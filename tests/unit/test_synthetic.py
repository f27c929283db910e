"""avs.data.synthetic: Sounding Shapes layout, determinism, audio identity, ceilings and caching."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from omegaconf import OmegaConf
from PIL import Image

from avs.config import CONFIG_DIR
from avs.data import synthetic as sy
from avs.data.avsbench import AVSBenchDataset
from avs.data.check import check_dataset
from avs.data.layout import split_records
from avs.data.safe_pickle import load_logmel_pkl
from tests.conftest import run_script

TINY = dict(image_size=64, num_frames=5, clips={"train": 3, "val": 2, "test": 2})


def _hash_tree(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def s4_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return sy.generate(tmp_path_factory.mktemp("s4") / "root", sy.SyntheticConfig(subset="s4", **TINY), progress=False)


@pytest.fixture(scope="module")
def ms3_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg = sy.SyntheticConfig(subset="ms3", offscreen_prob=0.5, **TINY)
    return sy.generate(tmp_path_factory.mktemp("ms3") / "root", cfg, progress=False)


@pytest.fixture(scope="module")
def s4_many(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """32 px S4 with enough seconds for the audio classifier and the ceilings."""
    cfg = sy.SyntheticConfig(subset="s4", seed=1, image_size=32, clips={"train": 24, "val": 0, "test": 16})
    return sy.generate(tmp_path_factory.mktemp("s4many") / "root", cfg, progress=False)


@pytest.fixture(scope="module")
def ms3_many(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg = sy.SyntheticConfig(subset="ms3", seed=2, image_size=32, clips={"train": 12, "val": 0, "test": 20})
    return sy.generate(tmp_path_factory.mktemp("ms3many") / "root", cfg, progress=False)


# ------------------------------------------------------------------------------------------------
# layout


@pytest.mark.parametrize("subset", ["s4", "ms3"])
def test_check_dataset_passes_and_dataset_reads(subset: str, s4_root: Path, ms3_root: Path) -> None:
    root = s4_root if subset == "s4" else ms3_root
    report = check_dataset(root, subset, num_frames=5, image_size=64)
    assert report.ok, report.format()
    assert report.counts == {"train": 3, "val": 2, "test": 2}
    for split in ("train", "val", "test"):
        ds = AVSBenchDataset(root, subset, split, num_frames=5, image_size=64)
        item = ds[0]
        assert item["frames"].shape == (5, 3, 64, 64)
        assert item["masks"].shape == (5, 1, 64, 64)
        assert item["audio"].shape == (5, 1, 96, 64)
        valid = item["mask_valid"].tolist()
        assert valid == ([True] + [False] * 4 if (subset, split) == ("s4", "train") else [True] * 5)
        labelled = item["masks"][item["mask_valid"]]
        assert set(labelled.unique().tolist()) == {0.0, 1.0}  # binary and never empty
        assert (labelled.flatten(1).sum(1) > 0).all()
        meta = json.loads((sy.writer.meta_dir(root, subset, split) / f"{item['video_id']}.json").read_text())
        assert item["category"] == meta["category"]


def test_s4_files_follow_avsbench_layout(s4_root: Path) -> None:
    with open(s4_root / "Single-source" / "s4_meta_data.csv", newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["name", "start_time", "category", "split"]
    assert [r[3] for r in rows[1:]] == ["train"] * 3 + ["val"] * 2 + ["test"] * 2
    assert len({r[0] for r in rows[1:]}) == 7
    names = {c.name for c in sy.build_categories(8)}
    base = s4_root / "Single-source" / "s4_data"
    for vid, start, cat, split in rows[1:]:
        assert start == "0" and cat in names
        for k in range(1, 6):
            with Image.open(base / "visual_frames" / split / cat / vid / f"{vid}_{k}.png") as im:
                assert (im.mode, im.size) == ("RGB", (64, 64))
        masks = sorted(p.name for p in (base / "gt_masks" / split / cat / vid).iterdir())
        assert masks == ([f"{vid}_1.png"] if split == "train" else [f"{vid}_{k}.png" for k in range(1, 6)])
        with Image.open(base / "gt_masks" / split / cat / vid / f"{vid}_1.png") as im:
            assert (im.mode, im.size) == ("L", (64, 64))
            assert set(np.unique(np.asarray(im)).tolist()) == {0, 255}
        info = sf.info(str(base / "audio_wav" / split / cat / f"{vid}.wav"))
        assert (info.samplerate, info.channels, info.subtype, info.frames) == (16000, 1, "PCM_16", 5 * 16000)
        logmel = load_logmel_pkl(base / "audio_log_mel" / split / cat / f"{vid}.pkl")
        assert logmel.shape == (5, 1, 96, 64) and logmel.dtype == np.float32
    assert (s4_root / "_COMPLETE").read_text().strip() == sy.config_hash(sy.SyntheticConfig(subset="s4", **TINY))


def test_ms3_files_follow_avsbench_layout(ms3_root: Path) -> None:
    with open(ms3_root / "Multi-sources" / "ms3_meta_data.csv", newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["video_id", "split"]
    base = ms3_root / "Multi-sources" / "ms3_data"
    # frames: no split folder and the literal ".mp4" in the name
    assert sorted(p.name for p in (base / "visual_frames").iterdir()) == sorted(r[0] for r in rows[1:])
    offscreen = 0
    for vid, split in rows[1:]:
        names = sorted(p.name for p in (base / "visual_frames" / vid).iterdir())
        assert names == [f"{vid}.mp4_{k}.png" for k in range(1, 6)]
        assert len(list((base / "gt_masks" / split / vid).iterdir())) == 5
        assert (base / "audio_wav" / split / f"{vid}.wav").is_file()
        assert (base / "audio_log_mel" / split / f"{vid}.pkl").is_file()
        meta = json.loads((ms3_root / "Multi-sources" / "synthetic_meta" / split / f"{vid}.json").read_text())
        on_screen = {o["category"] for o in meta["objects"]}
        assert 3 <= len(on_screen) == len(meta["objects"]) <= 4  # distinct categories
        sounding = np.array([o["sounding"] for o in meta["objects"]])  # [n,T]
        assert sounding.any(axis=0).all() and (sounding.sum(axis=0) <= 3).all()
        assert all(px > 0 for px in meta["gt_pixels"])
        if meta["offscreen"] is not None:
            offscreen += 1
            assert meta["offscreen"]["category"] not in on_screen and any(meta["offscreen"]["sounding"])
    assert offscreen > 0


def test_masks_are_visible_pixels_of_sounding_objects(ms3_root: Path) -> None:
    """GT PNG == union of the sounding objects' visible masks; visible masks never overlap."""
    meta_dir = ms3_root / "Multi-sources" / "synthetic_meta" / "val"
    for path in sorted(meta_dir.glob("*.json")):
        meta = json.loads(path.read_text())
        for t in range(5):
            vis = np.stack([sy.rle_decode(o["visible_rle"][t], (64, 64)) for o in meta["objects"]])
            assert vis.sum(axis=0).max() <= 1  # occlusion resolved: a pixel belongs to one object
            assert vis.sum(axis=(1, 2)).tolist() == [o["visible_pixels"][t] for o in meta["objects"]]
            expect = vis[[o["sounding"][t] for o in meta["objects"]]].any(axis=0)
            vid = meta["video_id"]
            mask_dir = ms3_root / "Multi-sources" / "ms3_data" / "gt_masks" / "val" / vid
            with Image.open(mask_dir / f"{vid}_{t + 1}.png") as im:
                np.testing.assert_array_equal(np.asarray(im) > 127, expect)


# ------------------------------------------------------------------------------------------------
# determinism


def test_same_seed_gives_identical_files(tmp_path: Path, s4_root: Path) -> None:
    again = sy.generate(tmp_path / "again", sy.SyntheticConfig(subset="s4", **TINY), progress=False)
    a, b = _hash_tree(again), _hash_tree(s4_root)
    assert sorted(a) == sorted(b)
    assert len([k for k in a if k.endswith(".pkl")]) == 7
    # Every file is byte-identical, the log-mel pickles included (dump_logmel_pkl fixes the storage
    # key that torch would otherwise take from a memory address).
    assert a == b


def test_different_seed_gives_different_clips(tmp_path: Path, s4_root: Path) -> None:
    other = sy.generate(tmp_path / "other", sy.SyntheticConfig(subset="s4", seed=7, **TINY), progress=False)
    a = {Path(k).name: v for k, v in _hash_tree(s4_root).items() if k.endswith((".png", ".wav"))}
    b = {Path(k).name: v for k, v in _hash_tree(other).items() if k.endswith((".png", ".wav"))}
    shared = set(a) & set(b)  # same video ids; masks only match where the category matches too
    assert shared and all(a[k] != b[k] for k in shared if k.endswith((".wav", "_3.png")))


# ------------------------------------------------------------------------------------------------
# audio identity


def _segment_features(logmel: np.ndarray) -> np.ndarray:
    """[T,1,96,64] -> [T,64]: time-averaged log-mel minus its band mean (level-invariant)."""
    f = logmel[:, 0].mean(axis=1)
    return f - f.mean(axis=1, keepdims=True)


def test_audio_identifies_the_sounding_category(s4_many: Path, ms3_many: Path) -> None:
    """Nearest-centroid on single-source seconds: fit on half the clips of each category, >= 90 % on the rest."""
    by_cat: dict[str, list[np.ndarray]] = {}
    for split in ("train", "test"):
        for rec in split_records(s4_many, "s4", split):
            folder = s4_many / "Single-source" / "s4_data" / "audio_log_mel" / split / rec.category
            path = folder / f"{rec.video_id}.pkl"
            by_cat.setdefault(rec.category, []).append(_segment_features(load_logmel_pkl(path)))
    classes = sorted(by_cat)
    assert len(classes) == 8 and min(len(v) for v in by_cat.values()) >= 2
    centroids = np.stack([np.concatenate(by_cat[c][0::2]).mean(axis=0) for c in classes])  # [K,64] from even clips
    Xte = np.concatenate([np.concatenate(by_cat[c][1::2]) for c in classes])  # odd clips are held out
    yte = np.concatenate([[c] * sum(len(f) for f in by_cat[c][1::2]) for c in classes])
    assert len(yte) >= 80

    def predict(X: np.ndarray) -> np.ndarray:
        return np.array(classes)[((X[:, None, :] - centroids[None]) ** 2).sum(-1).argmin(axis=1)]

    assert (predict(Xte) == yte).mean() >= 0.9
    # the same centroids name the source of MS3 segments with one on-screen and no off-screen source
    X, y = [], []
    for path in sorted((ms3_many / "Multi-sources" / "synthetic_meta" / "test").glob("*.json")):
        meta = json.loads(path.read_text())
        folder = ms3_many / "Multi-sources" / "ms3_data" / "audio_log_mel" / "test"
        logmel = load_logmel_pkl(folder / f"{meta['video_id']}.pkl")
        feats = _segment_features(logmel)
        for t in range(5):
            src = [o["category"] for o in meta["objects"] if o["sounding"][t]]
            if len(src) == 1 and (meta["offscreen"] is None or not meta["offscreen"]["sounding"][t]):
                X.append(feats[t])
                y.append(src[0])
    assert len(y) >= 30
    assert (predict(np.stack(X)) == np.array(y)).mean() >= 0.9


# ------------------------------------------------------------------------------------------------
# ceilings


def test_ceilings_below_targets_and_oracle_is_100(s4_many: Path, ms3_many: Path) -> None:
    s4 = sy.compute_ceilings(s4_many, "s4", "test")
    assert s4["oracle"] == pytest.approx(100.0) and s4["oracle_frames"] == 80
    assert 20.0 < s4["visual_only_ceiling"] < 60.0
    assert s4["visual_only_ceiling"] == max(s4["visual_only"].values())
    ms3 = sy.compute_ceilings(ms3_many, "ms3", "test")
    assert ms3["oracle"] == pytest.approx(100.0) and ms3["oracle_frames"] == 100
    assert 20.0 < ms3["visual_only_ceiling"] < 50.0
    assert {"all_objects", "largest_object", "prior_top1", "prior_top2", "prior_top3"} <= set(ms3["visual_only"])


def test_ceiling_arithmetic_on_a_hand_made_clip(tmp_path: Path) -> None:
    """Two objects of 40 and 60 visible pixels, the 40-pixel one sounding: all=0.4, largest=0."""
    S = 10
    a = np.zeros((S, S), dtype=bool)
    a[:4] = True  # 40 px
    b = np.zeros((S, S), dtype=bool)
    b[4:] = True  # 60 px
    meta = {
        "video_id": "v0",
        "image_size": S,
        "num_frames": 1,
        "category": "cat_a",
        "objects": [
            {"category": "cat_a", "sounding": [True], "visible_rle": [sy.rle_encode(a)]},
            {"category": "cat_b", "sounding": [False], "visible_rle": [sy.rle_encode(b)]},
        ],
    }
    for split in ("train", "test"):
        d = tmp_path / "Single-source" / "synthetic_meta" / split
        d.mkdir(parents=True)
        (d / "v0.json").write_text(json.dumps(meta))
    out = sy.compute_ceilings(tmp_path, "s4", "test")
    assert out["visual_only"]["all_objects"] == pytest.approx(40.0)
    assert out["visual_only"]["largest_object"] == pytest.approx(0.0)
    assert out["visual_only"]["prior_top1"] == pytest.approx(100.0)  # cat_a always sounds in train
    assert out["category_prior"] == {"cat_a": 1.0, "cat_b": 0.0}
    assert np.isnan(out["oracle"])  # no GT png on disk


def test_rle_round_trip() -> None:
    rng = np.random.default_rng(0)
    mask = rng.uniform(size=(17, 23)) < 0.4
    np.testing.assert_array_equal(sy.rle_decode(sy.rle_encode(mask), mask.shape), mask)


# ------------------------------------------------------------------------------------------------
# world and config


def test_categories_are_distinct() -> None:
    cats = sy.build_categories(8)
    assert len({c.shape for c in cats}) == 8 and len({c.sound for c in cats}) == 8
    assert len({c.f0 for c in cats}) == 8 and cats[0].name == "red_circle_bell"
    big = sy.build_categories(30)
    assert len({(c.shape, c.colour) for c in big}) == 30 and len({c.name for c in big}) == 30
    assert [c.name for c in sy.build_categories(12)[:8]] == [c.name for c in cats]
    with pytest.raises(ValueError, match="num_categories"):
        sy.build_categories(31)


def test_shapes_are_distinct_and_sized() -> None:
    g = (np.arange(64) - 31.5) / 32.0
    u, v = np.meshgrid(g, -g)
    masks = {s: sy.render._inside(s, u, v) for s in sy.SHAPES}
    for s, m in masks.items():
        assert 0.25 < m.mean() < 0.8, s  # fills a good part of its bounding disc
    names = list(masks)
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            inter = (masks[names[i]] & masks[names[j]]).sum()
            union = (masks[names[i]] | masks[names[j]]).sum()
            assert inter / union < 0.85, (names[i], names[j])


def test_config_validation_names_the_key() -> None:
    with pytest.raises(ValueError, match="subset"):
        sy.SyntheticConfig(subset="avss")
    with pytest.raises(ValueError, match="data.synthetic.*unknown key"):
        sy.SyntheticConfig.from_mapping({"seed": 1, "colour_blind": True})
    with pytest.raises(ValueError, match="data.synthetic.clips"):
        sy.SyntheticConfig.from_mapping({"clips": {"train": -1}})
    with pytest.raises(ValueError, match="object_area"):
        sy.SyntheticConfig(object_area=(0.3, 0.1))
    assert sy.SyntheticConfig(subset="ms3").num_objects == (3, 4)
    assert sy.config_hash(sy.SyntheticConfig()) != sy.config_hash(sy.SyntheticConfig(seed=1))


def _compose(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="make_synthetic", overrides=overrides)


@pytest.mark.parametrize("subset", ["s4", "ms3"])
def test_data_configs_extend_the_avsbench_ones(subset: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AVS_DATA_DIR", str(tmp_path))
    cfg = _compose([f"data=synth_{subset}", "data.image_size=64"])
    real = _compose([f"data={subset}"]).data  # the AVSBench data config, composed with its base
    assert set(real) <= set(cfg.data) and cfg.data.subset == subset
    syn = sy.SyntheticConfig.from_mapping(OmegaConf.to_container(cfg.data.synthetic, resolve=True))
    assert (syn.subset, syn.image_size, syn.num_frames) == (subset, 64, cfg.data.num_frames)
    assert cfg.data.root == str(tmp_path / "sounding_shapes" / f"{subset}_160-32-32_64px_t5_s0")
    assert cfg.force is False


# ------------------------------------------------------------------------------------------------
# ensure_synthetic


def _data_cfg(root: Path, **syn) -> dict:
    synthetic = {
        "name": "x",
        "seed": 0,
        "subset": "s4",
        "image_size": 32,
        "num_frames": 2,
        "clips": {"train": 1, "val": 1, "test": 1},
        **syn,
    }
    return {"subset": "s4", "root": str(root), "image_size": 32, "num_frames": 2, "synthetic": synthetic}


def test_ensure_synthetic_generates_caches_and_regenerates(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "ds"
    assert sy.ensure_synthetic(OmegaConf.create(_data_cfg(root)), progress=False) == root
    assert check_dataset(root, "s4", num_frames=2, image_size=32).ok
    first = _hash_tree(root)
    # same parameters: returned as is, nothing generated
    monkeypatch.setattr(sy, "generate", lambda *a, **k: pytest.fail("regenerated a complete root"))
    assert sy.ensure_synthetic(_data_cfg(root), progress=False) == root
    monkeypatch.undo()
    # new seed: regenerated in a fresh dir and swapped in; no tmp / old dirs left behind
    sy.ensure_synthetic(_data_cfg(root, seed=5), progress=False)
    assert _hash_tree(root) != first
    assert (root / "_COMPLETE").read_text().strip() == sy.config_hash(
        sy.SyntheticConfig.from_mapping(_data_cfg(root, seed=5)["synthetic"])
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


def test_ensure_synthetic_refuses_foreign_dirs_and_bad_configs(tmp_path: Path) -> None:
    root = tmp_path / "real_avsbench"
    root.mkdir()
    (root / "keep.txt").write_text("not ours")
    with pytest.raises(FileExistsError, match="_COMPLETE"):
        sy.ensure_synthetic(_data_cfg(root), progress=False)
    assert [p.name for p in root.iterdir()] == ["keep.txt"]
    bad = _data_cfg(tmp_path / "y")
    bad["image_size"] = 64
    with pytest.raises(ValueError, match="data.image_size"):
        sy.ensure_synthetic(bad, progress=False)
    with pytest.raises(ValueError, match="data.synthetic"):
        sy.ensure_synthetic({"subset": "s4", "root": str(tmp_path / "z")}, progress=False)


def test_make_synthetic_script(tmp_path: Path) -> None:
    cmd = [
        "data=synth_s4",
        "data.image_size=32",
        "data.num_frames=2",
        "data.synthetic.clips={train: 2, val: 1, test: 1}",
        "progress=false",
    ]
    out = run_script("make_synthetic.py", cmd, tmp_path, env={"AVS_DATA_DIR": str(tmp_path)}, timeout=120)
    assert out.returncode == 0, out.stderr
    root = tmp_path / "sounding_shapes" / "s4_2-1-1_32px_t2_s0"
    assert f"root: {root}" in out.stdout and "clips/s" in out.stdout and "disk size" in out.stdout
    assert "oracle 100.0" in out.stdout
    assert check_dataset(root, "s4", num_frames=2, image_size=32).ok
