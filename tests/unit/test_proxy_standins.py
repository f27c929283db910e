"""Stand-ins for the proxy: pretraining is deterministic across processes at a fixed thread count."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from avs.config import PROJECT_ROOT

TOY = [
    "visual.image_size=32",
    "visual.num_categories=2",
    "visual.num_objects=[1,1]",
    "visual.train_images=32",
    "visual.val_images=16",
    "visual.epochs=2",
    "visual.batch_size=16",
    "audio.num_categories=2",
    "audio.train_clips=32",
    "audio.val_clips=16",
    "audio.epochs=2",
    "audio.batch_size=16",
    "num_threads=1",
]
FILES = ("standin_pvt_v2_b0_64px", "standin_tiny_audio")


def _pretrain(out: Path) -> dict[str, dict]:
    cmd = [sys.executable, str(PROJECT_ROOT / "scripts" / "pretrain.py"), f"out_dir={out}", *TOY]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=out.parent)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return {name: json.loads((out / f"{name}.json").read_text()) for name in FILES}


def test_two_processes_make_the_same_bytes(tmp_path):
    a, b = _pretrain(tmp_path / "a"), _pretrain(tmp_path / "b")
    for name in FILES:
        assert a[name]["weights_sha256"] == b[name]["weights_sha256"], name
        assert (tmp_path / "a" / f"{name}.pth").read_bytes() == (tmp_path / "b" / f"{name}.pth").read_bytes()
        assert a[name]["num_threads"] == 1 and a[name]["machine_kind"] == b[name]["machine_kind"]
