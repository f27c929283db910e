"""VGGish embedding cache: extract_embeddings writes what AVSBenchDataset(audio_source='embedding') returns."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from avs.data import AVSBenchDataset, AVSDataError
from avs.data.embeddings import extract_embeddings
from avs.data.layout import LAYOUTS, embedding_path, logmel_path, split_records
from avs.data.safe_pickle import load_logmel_pkl
from avs.models.vggish import VGGish
from tests.fixtures.avsbench import make_avsbench_tree


@pytest.fixture(scope="module")
def vggish():
    torch.manual_seed(0)
    return VGGish(None, pretrained=False)


def test_cache_roundtrip_exact(tmp_path, vggish):
    root = make_avsbench_tree(tmp_path, "s4", {"train": 2, "val": 1}, size=32)
    summary = extract_embeddings(
        root, "s4", vggish, splits=["train", "val"], num_frames=5, device="cpu", overwrite=False, batch_size=1
    )
    assert summary["written"] == 3 and summary["skipped"] == 0
    lay = LAYOUTS["s4"]
    for split in ("train", "val"):
        ds = AVSBenchDataset(root, "s4", split, image_size=32, audio_source="embedding")
        for i, rec in enumerate(split_records(root, "s4", split)):
            with torch.no_grad():
                expect = vggish(torch.from_numpy(load_logmel_pkl(logmel_path(root, lay, rec))))
            got = ds[i]["audio"]
            assert got.shape == (5, 128) and got.dtype == torch.float32
            assert torch.equal(got, expect)  # exact: same input, same batch shape
            on_disk = np.load(embedding_path(root, lay, rec, None))
            assert on_disk.dtype == np.float32 and np.array_equal(on_disk, got.numpy())

    # resumable: existing files are kept, overwrite rewrites them
    again = extract_embeddings(root, "s4", vggish, splits=["train", "val"], num_frames=5, device="cpu", overwrite=False)
    assert again["written"] == 0 and again["skipped"] == 3
    rec = split_records(root, "s4", "val")[0]
    p = embedding_path(root, lay, rec, None)
    np.save(p, np.zeros((5, 128), np.float32))
    extract_embeddings(root, "s4", vggish, splits=["val"], num_frames=5, device="cpu", overwrite=True, batch_size=4)
    assert np.load(p).any()


def test_batched_matches_single_and_wav_fallback(tmp_path, vggish):
    root = make_avsbench_tree(tmp_path, "ms3", {"test": 3}, size=32)
    out_a, out_b = tmp_path / "a", tmp_path / "b"
    extract_embeddings(
        root, "ms3", vggish, splits=["test"], num_frames=5, device="cpu", overwrite=False, out_dir=out_a, batch_size=1
    )
    # remove the pkls: the wav (which the pkls were computed from) is used instead
    for rec in split_records(root, "ms3", "test"):
        logmel_path(root, LAYOUTS["ms3"], rec).unlink()
    extract_embeddings(
        root, "ms3", vggish, splits=["test"], num_frames=5, device="cpu", overwrite=False, out_dir=out_b, batch_size=3
    )
    for rec in split_records(root, "ms3", "test"):
        a = np.load(embedding_path(root, LAYOUTS["ms3"], rec, out_a))
        b = np.load(embedding_path(root, LAYOUTS["ms3"], rec, out_b))
        assert a.shape == (5, 128)
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    ds = AVSBenchDataset(root, "ms3", "test", image_size=32, audio_source="embedding", embedding_dir=out_b)
    assert ds[2]["audio"].shape == (5, 128)


def test_missing_audio_named(tmp_path, vggish):
    root = make_avsbench_tree(tmp_path, "ms3", {"val": 1}, size=32)
    rec = split_records(root, "ms3", "val")[0]
    logmel_path(root, LAYOUTS["ms3"], rec).unlink()
    (root / "Multi-sources/ms3_data/audio_wav/val" / f"{rec.video_id}.wav").unlink()
    with pytest.raises(AVSDataError, match=rec.video_id):
        extract_embeddings(root, "ms3", vggish, splits=["val"], num_frames=5, device="cpu", overwrite=False)
