"""The MS3 persistence knob: neutral value = the data of before (bytes and hash), high value = sets persist."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from avs.data import synthetic as sy

TINY = dict(image_size=32, num_frames=5, clips={"train": 3, "val": 2, "test": 2}, seed=3, offscreen_prob=0.5)
# Recorded with the generator before the knob existed (every file of the root except _COMPLETE,
# path then bytes, sorted by path), and its config hash.
RECORDED = {
    "s4": (
        "6647c63e87d0b35e5347c78017e0a66f048d11b640b8d353f4105f93f8f5e26a",
        "f894f2654f399ecbcc2b6bc321fe22743e8ca6087f9b61b3fc37576bda7e3979",
    ),
    "ms3": (
        "5f118c8aa363121f2ff2a231f0fdbdd3006dcc0cb077041cd78ca880c32afc97",
        "1f6d01b04f8705c84cd4d0a78369e7c5cc25bc8e9c913ccb68b6f0e6ade67fc2",
    ),
}


def _tree_sha(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != sy.COMPLETE_MARKER:
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.mark.parametrize("subset", ["s4", "ms3"])
def test_neutral_persistence_gives_the_recorded_bytes(tmp_path, subset):
    cfg = sy.SyntheticConfig(subset=subset, persistence=0.0, **TINY)
    root = sy.generate(tmp_path / "root", cfg, progress=False)
    assert (_tree_sha(root), sy.config_hash(cfg)) == RECORDED[subset]
    assert sy.config_hash(cfg) == sy.config_hash(sy.SyntheticConfig(subset=subset, **TINY))


def _sounding_sets(root: Path, split: str) -> list[list[tuple[bool, ...]]]:
    """Per clip, the set of sounding on-screen objects of each segment."""
    clips = []
    for p in sorted((sy.writer.meta_dir(root, "ms3", split)).glob("*.json")):
        meta = json.loads(p.read_text())
        T = meta["num_frames"]
        clips.append([tuple(o["sounding"][t] for o in meta["objects"]) for t in range(T)])
    return clips


def _changes(clips: list[list[tuple[bool, ...]]]) -> float:
    """Fraction of segment boundaries where the sounding set changes."""
    pairs = [(a, b) for c in clips for a, b in zip(c, c[1:])]
    return sum(a != b for a, b in pairs) / len(pairs)


def test_high_persistence_keeps_the_sounding_sets(tmp_path):
    base = dict(TINY, clips={"train": 0, "val": 0, "test": 24})
    always = sy.generate(tmp_path / "p1", sy.SyntheticConfig(subset="ms3", persistence=1.0, **base), progress=False)
    assert _changes(_sounding_sets(always, "test")) == 0.0
    high = sy.generate(tmp_path / "p9", sy.SyntheticConfig(subset="ms3", persistence=0.9, **base), progress=False)
    none = sy.generate(tmp_path / "p0", sy.SyntheticConfig(subset="ms3", persistence=0.0, **base), progress=False)
    assert _changes(_sounding_sets(high, "test")) < 0.3 < _changes(_sounding_sets(none, "test"))
    world = json.loads((sy.writer.meta_dir(high, "ms3", "test").parent / "generation.json").read_text())
    assert world["config"]["persistence"] == 0.9  # a non-neutral value is recorded (and enters the hash)


def test_persistence_must_be_a_probability():
    with pytest.raises(sy.world.ConfigError, match="persistence"):
        sy.SyntheticConfig(subset="ms3", persistence=1.5)
