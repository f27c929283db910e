"""Property tests (hypothesis) of the readers: masks of any PNG mode and size read back exactly, and a
short fuzz of the png / wav / pkl / npy readers at the dataset boundary: random or mutated bytes only
ever raise AVSDataError (or load a valid clip). docs/reliability.md."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from avs.data.avsbench import AVSBenchDataset, read_mask
from avs.data.layout import (
    AVSDataError,
    embedding_path,
    frame_path,
    get_layout,
    logmel_path,
    mask_path,
    wav_path,
)
from tests.conftest import compose_cfg, tiny_overrides

FUZZ = settings(
    max_examples=50,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


# ----------------------------------------------------------------------------- masks: any PNG mode
def _encode(mask: np.ndarray, mode: str, rng: np.random.Generator) -> Image.Image:
    """An image of `mode` whose foreground (per read_mask's rules) is exactly `mask` [H,W] bool."""
    h, w = mask.shape
    if mode == "1":
        return Image.fromarray(mask)
    if mode == "L":
        return Image.fromarray((mask * rng.integers(1, 256, (h, w))).astype(np.uint8), "L")
    if mode == "LA":
        la = np.stack([mask * rng.integers(1, 256, (h, w)), rng.integers(0, 256, (h, w))], -1)
        return Image.fromarray(la.astype(np.uint8), "LA")
    if mode in ("RGB", "RGBA"):
        colour = rng.integers(0, 256, (h, w, 3))
        colour[..., rng.integers(0, 3)] |= 1  # at least one non-zero channel
        rgb = colour * mask[..., None]
        if mode == "RGBA":
            rgb = np.concatenate([rgb, rng.integers(0, 256, (h, w, 1))], -1)
        return Image.fromarray(rgb.astype(np.uint8), mode)
    if mode == "P":  # index 0 = background whatever its colour; other indices foreground, even black
        img = Image.fromarray((mask * rng.integers(1, 256, (h, w))).astype(np.uint8), "P")
        palette = rng.integers(0, 256, 768).astype(np.uint8)
        palette[:3] = 255  # a white background entry
        palette[3:6] = 0  # a black foreground entry
        img.putpalette(palette.tolist())
        return img
    if mode == "I;16":
        return Image.fromarray((mask * rng.integers(1, 65536, (h, w))).astype(np.uint16))
    raise ValueError(mode)


@settings(max_examples=80, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    mode=st.sampled_from(["1", "L", "LA", "P", "RGB", "RGBA", "I;16"]),  # PNG cannot hold 32-bit "I"
    h=st.integers(1, 40),
    w=st.integers(1, 40),
    density=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
)
def test_read_mask_recovers_the_foreground_of_any_png_mode(tmp_path, mode, h, w, density, seed):
    rng = np.random.default_rng(seed)
    mask = rng.random((h, w)) < density
    path = tmp_path / f"m_{mode.replace(';', '_')}.png"
    _encode(mask, mode, rng).save(path, format="PNG")
    out = read_mask(path)
    assert out.dtype == bool and out.shape == (h, w)
    np.testing.assert_array_equal(out, mask)


# ----------------------------------------------------------------------------- fuzz at the dataset boundary
@pytest.fixture(scope="module")
def fuzz_root(synth_data_dir, tmp_path_factory) -> Path:
    """A private copy of the tiny MS3 data (its files get overwritten), with cached embeddings added."""
    cfg = compose_cfg("train", tiny_overrides(synth_data_dir))
    src = Path(cfg.data.root)
    root = tmp_path_factory.mktemp("fuzz") / src.name
    shutil.copytree(src, root)
    layout = get_layout("ms3")
    ds = AVSBenchDataset(root, "ms3", "val", num_frames=3, image_size=64)
    for rec in ds.records:
        p = embedding_path(root, layout, rec, None)
        p.parent.mkdir(parents=True, exist_ok=True)
        np.save(p, np.zeros((3, 128), np.float32))
    return root


TARGETS = {  # file kind -> (audio_source, path of clip 0's file)
    "mask": ("logmel", lambda root, rec: mask_path(root, get_layout("ms3"), rec, 2)),
    "frame": ("logmel", lambda root, rec: frame_path(root, get_layout("ms3"), rec, 1)),
    "pkl": ("logmel", lambda root, rec: logmel_path(root, get_layout("ms3"), rec)),
    "wav": ("wav", lambda root, rec: wav_path(root, get_layout("ms3"), rec)),
    "npy": ("embedding", lambda root, rec: embedding_path(root, get_layout("ms3"), rec, None)),
}


@st.composite
def _corrupted(draw, original: bytes) -> bytes:
    """Random bytes, or `original` with a few bytes replaced and/or truncated (headers survive more often)."""
    if draw(st.booleans()):
        return draw(st.binary(max_size=400))
    data = bytearray(original)
    for pos, val in draw(st.lists(st.tuples(st.integers(0, len(data) - 1), st.integers(0, 255)), max_size=8)):
        data[pos] = val
    cut = draw(st.one_of(st.just(len(data)), st.integers(0, len(data))))
    return bytes(data[:cut])


def _check_clip(ds: AVSBenchDataset) -> None:
    try:
        item = ds[0]
    except AVSDataError as exc:
        assert ds.records[0].video_id in str(exc)  # the error names the clip
        return
    assert item["frames"].shape == (3, 3, 64, 64) and item["masks"].shape == (3, 1, 64, 64)


@pytest.mark.parametrize("kind", list(TARGETS))
def test_fuzzed_files_only_raise_avs_data_error(fuzz_root, kind):
    source, where = TARGETS[kind]
    ds = AVSBenchDataset(fuzz_root, "ms3", "val", num_frames=3, image_size=64, audio_source=source)
    path = where(fuzz_root, ds.records[0])
    original = path.read_bytes()

    @FUZZ
    @given(blob=_corrupted(original))
    def run(blob: bytes) -> None:
        path.write_bytes(blob)
        _check_clip(ds)

    try:
        run()
    finally:
        path.write_bytes(original)


@FUZZ
@given(
    arr=hnp.arrays(
        dtype=st.one_of(
            hnp.integer_dtypes(), hnp.unsigned_integer_dtypes(), hnp.floating_dtypes(), hnp.boolean_dtypes()
        ),
        shape=hnp.array_shapes(min_dims=0, max_dims=3, max_side=140),
    )
)
@example(arr=np.zeros((3, 128), np.bool_))  # the right shape, but booleans are not numbers: refused
@example(arr=np.zeros((2, 128), np.float32))  # fewer examples than num_frames (no pad_short_audio): refused
@example(arr=np.zeros((4, 128), np.float16))  # loads (the first 3 examples)
def test_embedding_arrays_of_any_numeric_dtype_and_shape(fuzz_root, arr):
    ds = AVSBenchDataset(fuzz_root, "ms3", "val", num_frames=3, image_size=64, audio_source="embedding")
    path = embedding_path(fuzz_root, get_layout("ms3"), ds.records[0], None)
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    path.write_bytes(buf.getvalue())
    try:
        item = ds[0]
    except AVSDataError:
        assert arr.dtype == np.bool_ or arr.ndim != 2 or arr.shape[1] != 128 or arr.shape[0] < 3
        return
    assert arr.dtype != np.bool_
    assert item["audio"].shape == (3, 128) and item["audio"].dtype.is_floating_point


def test_non_numeric_embedding_raises_avs_data_error(fuzz_root):
    ds = AVSBenchDataset(fuzz_root, "ms3", "val", num_frames=3, image_size=64, audio_source="embedding")
    path = embedding_path(fuzz_root, get_layout("ms3"), ds.records[0], None)
    np.save(path, np.full((3, 128), "abc"))
    try:
        with pytest.raises(AVSDataError):
            ds[0]
    finally:
        np.save(path, np.zeros((3, 128), np.float32))
