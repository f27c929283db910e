"""AVSBenchDataset / check_dataset / collate against small generated S4 and MS3 trees."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from torch.utils.data import DataLoader

from avs.config import CONFIG_DIR
from avs.data import AVSBenchDataset, AVSDataError, build_dataset, check_dataset, collate_skip_none
from avs.data.avsbench import SkippedItem, read_mask
from avs.data.layout import (
    LAYOUTS,
    ClipRecord,
    embedding_path,
    frame_path,
    labelled_frames,
    labelled_frames_name,
    logmel_path,
    mask_path,
    split_records,
    wav_path,
)
from avs.data.safe_pickle import dump_logmel_pkl, load_logmel_pkl
from avs.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from tests.fixtures.avsbench import MASK_MODES, clip_mask, make_avsbench_tree, save_mask

SIZE = 64
T = 5


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("avsbench")
    make_avsbench_tree(root, "s4", size=SIZE, num_frames=T)
    make_avsbench_tree(root, "ms3", size=SIZE, num_frames=T)
    return root


def _copy(tree: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(tree, dst)
    return dst


def _unnormalise(frames: torch.Tensor) -> torch.Tensor:
    m = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    s = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return frames * s + m


@pytest.mark.parametrize("subset", ["s4", "ms3"])
@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_item_contract(tree, subset, split):
    ds = AVSBenchDataset(tree, subset, split, num_frames=T, image_size=SIZE)
    assert len(ds) == {"train": 2, "val": 1, "test": 1}[split]
    item = ds[0]
    assert set(item) == {"frames", "masks", "mask_valid", "audio", "video_id", "category", "index"}
    assert item["frames"].shape == (T, 3, SIZE, SIZE) and item["frames"].dtype == torch.float32
    assert item["masks"].shape == (T, 1, SIZE, SIZE) and item["masks"].dtype == torch.float32
    assert item["mask_valid"].dtype == torch.bool and item["mask_valid"].shape == (T,)
    assert item["audio"].shape == (T, 1, 96, 64) and item["audio"].dtype == torch.float32
    assert item["index"] == 0
    rec = ds.records[0]
    assert item["video_id"] == rec.video_id
    assert item["category"] == ("dog_barking" if subset == "s4" else "")

    expect_valid = [True] + [False] * (T - 1) if (subset == "s4" and split == "train") else [True] * T
    assert item["mask_valid"].tolist() == expect_valid
    assert set(torch.unique(item["masks"]).tolist()) <= {0.0, 1.0}
    for k in range(T):
        if expect_valid[k]:
            np.testing.assert_array_equal(item["masks"][k, 0].numpy(), clip_mask(SIZE, k + 1).astype(np.float32))
        else:
            assert item["masks"][k].abs().sum() == 0

    # frames: ImageNet-normalised PNG pixels
    png = np.asarray(Image.open(frame_path(tree, LAYOUTS[subset], rec, 2)).convert("RGB"))
    got = _unnormalise(item["frames"][1:2])[0].permute(1, 2, 0).numpy() * 255
    assert np.abs(got - png).max() < 1e-3
    # audio: the pkl as written
    np.testing.assert_array_equal(item["audio"].numpy(), load_logmel_pkl(logmel_path(tree, LAYOUTS[subset], rec)))


def test_ms3_reads_mp4_frame_names(tree):
    rec = split_records(tree, "ms3", "val")[0]
    p = frame_path(tree, LAYOUTS["ms3"], rec, 3)
    assert p.name == f"{rec.video_id}.mp4_3.png"
    assert p.parent == tree / "Multi-sources/ms3_data/visual_frames" / rec.video_id  # no split level
    assert mask_path(tree, LAYOUTS["ms3"], rec, 3) == (
        tree / "Multi-sources/ms3_data/gt_masks/val" / rec.video_id / f"{rec.video_id}_3.png"
    )


def test_ms3_without_mp4_quirk_errors_naming_file(tree, tmp_path):
    root = _copy(tree, tmp_path)
    rec = split_records(root, "ms3", "test")[0]
    folder = root / "Multi-sources/ms3_data/visual_frames" / rec.video_id
    for f in folder.iterdir():  # rename <vid>.mp4_<k>.png -> <vid>_<k>.png
        f.rename(f.with_name(f.name.replace(".mp4_", "_")))
    ds = AVSBenchDataset(root, "ms3", "test", image_size=SIZE)
    with pytest.raises(AVSDataError) as err:
        ds[0]
    msg = str(err.value)
    assert str(folder / f"{rec.video_id}.mp4_1.png") in msg
    assert rec.video_id in msg and ".mp4_<k>.png" in msg


def test_wav_source_matches_pkl(tree):
    a = AVSBenchDataset(tree, "ms3", "val", image_size=SIZE, audio_source="logmel")[0]["audio"]
    b = AVSBenchDataset(tree, "ms3", "val", image_size=SIZE, audio_source="wav")[0]["audio"]
    assert torch.equal(a, b)


def test_flip_consistency(tree):
    plain = AVSBenchDataset(tree, "ms3", "train", image_size=SIZE, flip_prob=0.0)[1]
    flipped = AVSBenchDataset(tree, "ms3", "train", image_size=SIZE, flip_prob=1.0)[1]
    assert torch.equal(flipped["frames"], plain["frames"].flip(-1))
    assert torch.equal(flipped["masks"], plain["masks"].flip(-1))
    assert not torch.equal(flipped["masks"], plain["masks"])  # the masks are asymmetric
    assert torch.equal(flipped["audio"], plain["audio"])


def test_flip_reproducible_and_random(tree):
    plain = AVSBenchDataset(tree, "ms3", "train", image_size=SIZE)[0]["frames"]

    def draws(seed: int) -> list[bool]:
        ds = AVSBenchDataset(tree, "ms3", "train", image_size=SIZE, flip_prob=0.5, seed=seed)
        out = []
        for epoch in range(12):
            ds.set_epoch(epoch)
            f = ds[0]["frames"]
            assert torch.equal(f, plain) or torch.equal(f, plain.flip(-1))  # whole clip or nothing
            out.append(not torch.equal(f, plain))
        return out

    first = draws(3)
    assert draws(3) == first  # reproducible for (seed, epoch, index)
    assert 0 < sum(first) < 12  # and actually random across epochs
    assert draws(4) != first


@pytest.mark.parametrize("mode", MASK_MODES)
def test_mask_binarisation(tmp_path, mode):
    root = make_avsbench_tree(tmp_path, "ms3", {"val": 1}, num_frames=2, size=32, mask_mode=mode)
    item = AVSBenchDataset(root, "ms3", "val", num_frames=2, image_size=32)[0]
    for k in range(2):
        np.testing.assert_array_equal(item["masks"][k, 0].numpy(), clip_mask(32, k + 1).astype(np.float32))
    with Image.open(mask_path(root, LAYOUTS["ms3"], split_records(root, "ms3", "val")[0], 1)) as img:
        assert img.mode == {"L255": "L", "L01": "L", "P": "P", "RGB": "RGB", "RGBA": "RGBA", "1": "1"}[mode]


def test_palette_index_not_colour(tmp_path):
    # index 1 drawn black in the palette still counts as foreground; index 0 is background
    m = np.zeros((8, 8), np.uint8)
    m[2:4, 2:6] = 1
    img = Image.fromarray(m, mode="P")
    img.putpalette([255, 255, 255, 0, 0, 0] + [0] * 762)
    img.save(tmp_path / "p.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "p.png"), m.astype(bool))


def test_resize_to_image_size(tree):
    item = AVSBenchDataset(tree, "s4", "val", image_size=32)[0]
    assert item["frames"].shape == (T, 3, 32, 32)
    assert item["masks"].shape == (T, 1, 32, 32)
    assert set(torch.unique(item["masks"]).tolist()) == {0.0, 1.0}
    native = AVSBenchDataset(tree, "s4", "val", image_size=None)[0]
    assert native["frames"].shape == (T, 3, SIZE, SIZE)
    # nearest-exact 2x downscale == every second pixel at odd offsets
    np.testing.assert_array_equal(item["masks"][0, 0].numpy(), native["masks"][0, 0].numpy()[1::2, 1::2])


def test_num_frames_from_argument(tree):
    item = AVSBenchDataset(tree, "ms3", "test", num_frames=3, image_size=SIZE)[0]
    assert item["frames"].shape[0] == 3 and item["audio"].shape == (3, 1, 96, 64)
    assert item["mask_valid"].tolist() == [True] * 3


def test_audio_pad_and_truncate(tree, tmp_path):
    root = _copy(tree, tmp_path)
    recs = split_records(root, "s4", "train")
    lay = LAYOUTS["s4"]
    short = np.random.default_rng(0).standard_normal((3, 1, 96, 64)).astype(np.float32)
    long = np.random.default_rng(1).standard_normal((7, 1, 96, 64)).astype(np.float32)
    dump_logmel_pkl(logmel_path(root, lay, recs[0]), short)
    dump_logmel_pkl(logmel_path(root, lay, recs[1]), long)
    ds = AVSBenchDataset(root, "s4", "train", image_size=SIZE, pad_short_audio=True)  # opted in
    a0 = ds[0]["audio"].numpy()
    np.testing.assert_array_equal(a0[:3], short)
    np.testing.assert_array_equal(a0[3], short[2])
    np.testing.assert_array_equal(a0[4], short[2])
    np.testing.assert_array_equal(ds[1]["audio"].numpy(), long[:5])
    dump_logmel_pkl(logmel_path(root, lay, recs[0]), np.zeros((5, 96, 64), np.float32))
    with pytest.raises(AVSDataError, match=r"expected audio shaped \[n,1,96,64\]"):
        ds[0]


def test_embedding_source(tree, tmp_path):
    root = _copy(tree, tmp_path)
    emb_dir = tmp_path / "emb"
    recs = split_records(root, "s4", "val")
    e = np.random.default_rng(0).standard_normal((4, 128)).astype(np.float32)
    p = embedding_path(root, LAYOUTS["s4"], recs[0], emb_dir)
    assert p == emb_dir / "val" / recs[0].category / f"{recs[0].video_id}.npy"
    p.parent.mkdir(parents=True)
    np.save(p, e)
    with pytest.raises(AVSDataError, match=r"audio shaped \[4, 128\] has 4 example\(s\), data.num_frames=5 needs 5"):
        AVSBenchDataset(root, "s4", "val", image_size=SIZE, audio_source="embedding", embedding_dir=emb_dir)[0]
    item = AVSBenchDataset(
        root, "s4", "val", image_size=SIZE, audio_source="embedding", embedding_dir=emb_dir, pad_short_audio=True
    )[0]
    assert item["audio"].shape == (T, 128)
    np.testing.assert_array_equal(item["audio"].numpy()[:4], e)
    np.testing.assert_array_equal(item["audio"].numpy()[4], e[3])
    with pytest.raises(AVSDataError, match="audio_vggish_embedding"):  # default dir not made yet
        AVSBenchDataset(root, "s4", "val", audio_source="embedding")


def test_constructor_errors(tree, tmp_path):
    with pytest.raises(ValueError, match="data.subset"):
        AVSBenchDataset(tree, "s5", "train")
    with pytest.raises(ValueError, match="split"):
        AVSBenchDataset(tree, "s4", "training")
    with pytest.raises(ValueError, match="data.audio_source"):
        AVSBenchDataset(tree, "s4", "val", audio_source="mp3")
    with pytest.raises(AVSDataError, match=str(tmp_path / "missing")):
        AVSBenchDataset(tmp_path / "missing", "s4", "val")
    (tmp_path / "empty").mkdir()
    with pytest.raises(AVSDataError, match="Single-source"):
        AVSBenchDataset(tmp_path / "empty", "s4", "val")
    root = _copy(tree, tmp_path)
    (root / "Multi-sources/ms3_meta_data.csv").unlink()
    with pytest.raises(AVSDataError, match="ms3_meta_data.csv"):
        AVSBenchDataset(root, "ms3", "val")
    shutil.rmtree(root / "Single-source/s4_data/gt_masks")
    with pytest.raises(AVSDataError, match="gt_masks"):
        AVSBenchDataset(root, "s4", "val")


def test_csv_columns_by_position_and_split_by_name(tmp_path):
    root = make_avsbench_tree(tmp_path, "s4", {"test": 1}, size=32)
    csv_p = root / "Single-source/s4_meta_data.csv"
    rec = split_records(root, "s4", "test")[0]
    # other headers renamed, an extra column: id = col 0, category = col 2, split found by name
    csv_p.write_text(f"vid,start,label,split,extra\n{rec.video_id},0,{rec.category},test,x\n")
    recs = split_records(root, "s4", "test")
    assert recs == [ClipRecord(rec.video_id, rec.category, "test")]
    csv_p.write_text(f"vid,start,label\n{rec.video_id},0,{rec.category}\n")
    with pytest.raises(AVSDataError, match="'split' column"):
        split_records(root, "s4", "test")


def test_corrupt_and_missing_files_named(tree, tmp_path):
    root = _copy(tree, tmp_path)
    lay = LAYOUTS["s4"]
    rec = split_records(root, "s4", "val")[0]
    m = mask_path(root, lay, rec, 4)
    m.write_bytes(m.read_bytes()[:40])
    ds = AVSBenchDataset(root, "s4", "val", image_size=SIZE)
    with pytest.raises(AVSDataError, match="unreadable mask") as err:
        ds[0]
    assert str(m) in str(err.value) and rec.video_id in str(err.value)
    logmel_path(root, lay, rec).unlink()
    m.unlink()
    with pytest.raises(AVSDataError, match=str(m)):
        ds[0]


def test_malicious_pkl_refused_by_dataset(tree, tmp_path):
    import os
    import pickle

    from avs.data.safe_pickle import UnsafePickleError

    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {tmp_path / 'pwned'}",)

    root = _copy(tree, tmp_path)
    rec = split_records(root, "ms3", "val")[0]
    logmel_path(root, LAYOUTS["ms3"], rec).write_bytes(pickle.dumps(Evil()))
    with pytest.raises(UnsafePickleError, match=rec.video_id):
        AVSBenchDataset(root, "ms3", "val", image_size=SIZE)[0]
    assert not (tmp_path / "pwned").exists()


def test_on_error_skip_and_collate(tree, tmp_path):
    root = _copy(tree, tmp_path)
    rec = split_records(root, "s4", "train")[0]
    frame_path(root, LAYOUTS["s4"], rec, 2).unlink()
    ds = AVSBenchDataset(root, "s4", "train", image_size=SIZE, on_error="skip")
    bad = ds[0]
    assert isinstance(bad, SkippedItem) and bad.video_id == rec.video_id and not bad
    batch = next(iter(DataLoader(ds, batch_size=2, collate_fn=collate_skip_none)))
    assert batch["skipped"] == [rec.video_id]
    assert batch["frames"].shape == (1, T, 3, SIZE, SIZE)
    assert batch["video_id"] == [ds.records[1].video_id]
    assert collate_skip_none([bad, None]) == {"skipped": [rec.video_id, None]}
    with pytest.raises(AVSDataError):
        AVSBenchDataset(root, "s4", "train", image_size=SIZE)[0]


def test_default_collate_batch(tree):
    ds = AVSBenchDataset(tree, "s4", "train", image_size=SIZE)
    b = next(iter(DataLoader(ds, batch_size=2)))
    assert b["frames"].shape == (2, T, 3, SIZE, SIZE)
    assert b["masks"].shape == (2, T, 1, SIZE, SIZE)
    assert b["mask_valid"].shape == (2, T) and b["audio"].shape == (2, T, 1, 96, 64)
    assert b["index"].tolist() == [0, 1] and len(b["category"]) == 2


def test_build_dataset_from_config(tree):
    cfg = OmegaConf.load(CONFIG_DIR / "data" / "s4.yaml")
    cfg.root = str(tree)
    cfg.image_size = SIZE
    cfg.flip_prob = 1.0
    train = build_dataset(cfg, "train", train=True)
    val = build_dataset(cfg, "val", train=False)
    assert train.subset == "s4" and train.num_frames == 5 and train.image_size == (SIZE, SIZE)
    assert train.transform.flip_prob == 1.0 and val.transform.flip_prob == 0.0
    assert val.audio_source == "logmel" and val.on_error == "raise"
    assert len(train) == 2 and len(val) == 1


def test_check_dataset_clean_and_broken(tree, tmp_path):
    for subset in ("s4", "ms3"):
        rep = check_dataset(tree, subset, num_frames=T, image_size=SIZE)
        assert rep.ok, rep.format()
        assert rep.counts == {"train": 2, "val": 1, "test": 1}
    assert not check_dataset(tree, "s4", image_size=32).ok

    root = _copy(tree, tmp_path)
    lay = LAYOUTS["ms3"]
    recs = split_records(root, "ms3", "train")
    gone = frame_path(root, lay, recs[0], 2)
    gone.unlink()
    trunc = frame_path(root, lay, recs[1], 4)
    trunc.write_bytes(trunc.read_bytes()[:-300])
    small = mask_path(root, lay, recs[1], 5)
    save_mask(small, np.ones((32, 32), bool), "L255")
    pkl = logmel_path(root, lay, recs[0])
    dump_logmel_pkl(pkl, np.zeros((5, 96, 64), np.float32))
    wav = wav_path(root, lay, recs[1])
    wav.write_bytes(b"not a wav")
    rep = check_dataset(root, "ms3", num_frames=T)
    by_path = {}
    for p in rep.problems:
        by_path.setdefault(p.path, []).append(p.message)
    assert set(by_path) == {str(gone), str(trunc), str(small), str(pkl), str(wav)}, rep.format()
    assert "missing frame" in by_path[str(gone)][0]
    assert "truncated" in by_path[str(trunc)][0]
    assert "differs from frame size" in by_path[str(small)][0]
    assert "shape" in by_path[str(pkl)][0]
    assert "unreadable wav" in by_path[str(wav)][0]
    assert str(gone) in rep.format()


def test_check_dataset_missing_root(tmp_path):
    rep = check_dataset(tmp_path / "nowhere", "s4")
    assert not rep.ok and rep.problems[0].path == str(tmp_path / "nowhere")


# ------------------------------------------------------------------------ strict data: one rule
def test_short_logmel_pkl_is_an_error_in_loader_and_check_data_unless_padding_is_asked(tree, tmp_path):
    root = _copy(tree, tmp_path)
    rec = split_records(root, "s4", "train")[0]
    pkl = logmel_path(root, LAYOUTS["s4"], rec)
    short = np.random.default_rng(0).standard_normal((3, 1, 96, 64)).astype(np.float32)
    dump_logmel_pkl(pkl, short)
    expected = (
        rf"{pkl}: audio shaped \[3, 1, 96, 64\] has 3 example\(s\), data.num_frames=5 needs 5; "
        r"set data.pad_short_audio=true"
    )
    cfg = OmegaConf.create({"root": str(root), "subset": "s4", "image_size": SIZE, "num_frames": T})
    with pytest.raises(AVSDataError, match=expected):
        build_dataset(cfg, "train", train=True)[0]
    report = check_dataset(root, "s4", num_frames=T)
    assert [str(p) for p in report.problems] == [
        f"{pkl}: audio shaped [3, 1, 96, 64] has 3 example(s), data.num_frames=5 needs 5; "
        "set data.pad_short_audio=true to repeat the last example instead"
    ]
    # opted in: both accept it, and the loader repeats the last example
    cfg.pad_short_audio = True
    audio = build_dataset(cfg, "train", train=True)[0]["audio"].numpy()
    np.testing.assert_array_equal(audio, np.concatenate([short, short[2:], short[2:]]))
    assert check_dataset(root, "s4", num_frames=T, pad_short_audio=True).ok
    # fewer frames asked for: the same file is long enough
    assert AVSBenchDataset(root, "s4", "train", num_frames=3, image_size=SIZE)[0]["audio"].shape == (3, 1, 96, 64)


def test_short_pkl_under_on_error_skip_is_skipped_not_padded(tree, tmp_path):
    root = _copy(tree, tmp_path)
    rec = split_records(root, "ms3", "val")[0]
    dump_logmel_pkl(logmel_path(root, LAYOUTS["ms3"], rec), np.zeros((2, 1, 96, 64), np.float32))
    item = AVSBenchDataset(root, "ms3", "val", image_size=SIZE, on_error="skip")[0]
    assert isinstance(item, SkippedItem) and "needs 5" in item.error


def test_unknown_split_value_is_an_error_naming_csv_rows_and_allowed_values(tree, tmp_path):
    root = _copy(tree, tmp_path)
    csv_p = root / "Multi-sources/ms3_meta_data.csv"
    lines = csv_p.read_text().splitlines()
    i = next(i for i, line in enumerate(lines) if line.endswith(",val"))
    vid = lines[i].split(",")[0]
    lines[i] = lines[i][: -len("val")] + "validation"
    csv_p.write_text("\n".join(lines) + "\n")
    expected = (
        f"{csv_p}: unknown split value in 1 row(s): line {i + 1} (video '{vid}': 'validation'); "
        "the 'split' column allows train, val, test"
    )
    for split in ("train", "val"):  # every split refuses, not only the one that lost a clip
        with pytest.raises(AVSDataError) as err:
            AVSBenchDataset(root, "ms3", split, image_size=SIZE)
        assert str(err.value) == expected
    report = check_dataset(root, "ms3", num_frames=T)
    assert [str(p) for p in report.problems] == [expected]
    assert report.counts == {"train": 2, "val": 0, "test": 1}  # the rest was still checked


def test_pad_short_audio_must_be_a_boolean(tree):
    cfg = OmegaConf.create({"root": str(tree), "subset": "s4", "image_size": SIZE, "pad_short_audio": "no"})
    with pytest.raises(ValueError, match=r"data.pad_short_audio must be true or false, got 'no'"):
        build_dataset(cfg, "val", train=False)


@pytest.mark.parametrize("subset", ["s4", "ms3"])
def test_labelled_frames_is_the_one_rule_of_generator_loader_and_check(tmp_path, subset):
    from avs.data.check import check_dataset as check
    from avs.data.synthetic import SyntheticConfig, generate

    assert labelled_frames("s4", "train", 3) == [1]
    assert labelled_frames("s4", "val", 3) == labelled_frames("ms3", "train", 3) == [1, 2, 3]
    assert labelled_frames_name("s4", "train") == "first"
    assert labelled_frames_name("s4", "test") == labelled_frames_name("ms3", "train") == "all"
    cfg = SyntheticConfig(subset=subset, clips={"train": 1, "val": 1}, image_size=32, num_frames=3)
    root = generate(tmp_path / "root", cfg, progress=False)
    for split in ("train", "val"):
        want = labelled_frames(subset, split, 3)
        rec = split_records(root, subset, split)[0]
        written = [k for k in range(1, 4) if mask_path(root, LAYOUTS[subset], rec, k).is_file()]
        assert written == want
        item = AVSBenchDataset(root, subset, split, num_frames=3, image_size=32)[0]
        assert [k + 1 for k in range(3) if bool(item["mask_valid"][k])] == want
    assert check(root, subset, num_frames=3).ok
