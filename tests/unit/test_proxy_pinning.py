"""Stand-ins pinned by SHA-256: the runner refuses another file, naming it and both hashes."""

from __future__ import annotations

import hashlib

import pytest
from omegaconf import OmegaConf

from avs.proxy import run_protocol
from avs.proxy.standins import StandinMismatch, check_pinned
from tests.conftest import compose_cfg

FILES = ("standin_pvt_v2_b0_64px.pth", "standin_tiny_audio.pth")


def test_check_pinned_names_the_file_and_both_hashes(tmp_path):
    path = tmp_path / "w.pth"
    path.write_bytes(b"weights")
    found = hashlib.sha256(b"weights").hexdigest()
    assert check_pinned({"w.pth": found}, [("audio.weights_path", path)], "here") == {"w.pth": found}
    with pytest.raises(StandinMismatch) as err:
        check_pinned({"w.pth": "0" * 64}, [("audio.weights_path", path)], "here")
    assert str(path) in str(err.value) and found in str(err.value) and "0" * 64 in str(err.value)
    with pytest.raises(StandinMismatch, match="pins no SHA-256 for w.pth"):
        check_pinned({}, [("audio.weights_path", path)], "here")
    with pytest.raises(FileNotFoundError, match="audio.weights_path"):
        check_pinned({"w.pth": found}, [("audio.weights_path", tmp_path / "nope.pth")], "here")


def test_the_runner_refuses_unpinned_standins_before_any_run(tmp_path):
    weights = tmp_path / "weights"
    weights.mkdir()
    for name in FILES:
        (weights / name).write_bytes(name.encode())
    pins = {name: hashlib.sha256(name.encode()).hexdigest() for name in FILES}
    pins[FILES[1]] = "f" * 64
    cfg = compose_cfg(
        "proxy_benchmark",
        [
            f"out_dir={tmp_path / 'out'}",
            f"paths.weights_dir={weights}",
            f"paths.data_dir={tmp_path / 'data'}",
            "simd=native",  # in-process (the script would start itself again at the protocol's level)
        ],
    )
    OmegaConf.update(cfg, "standins", pins, merge=False)
    OmegaConf.update(cfg, "only", ["tpavi"], merge=False)
    OmegaConf.update(cfg, "seeds", [1], merge=False)
    with pytest.raises(StandinMismatch) as err:
        run_protocol(cfg, tmp_path / "out")
    assert str(weights / FILES[1]) in str(err.value) and "f" * 64 in str(err.value)
    assert hashlib.sha256(FILES[1].encode()).hexdigest() in str(err.value)
    assert not (tmp_path / "data").exists()  # refused before the data are made
