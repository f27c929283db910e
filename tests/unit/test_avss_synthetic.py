"""Semantic Sounding Shapes: AVSS layout, determinism, loader round trip, ceilings, scripts."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from avs.data.avss import AVSSDataset
from avs.data.avss_check import check_avss
from avs.data.synthetic.semantic import SemanticConfig, ensure_semantic, generate_semantic
from avs.data.synthetic.semantic_ceilings import compute_semantic_ceilings
from avs.errors import ExitCode
from tests.conftest import run_script

REPO = Path(__file__).resolve().parents[2]
CFG = SemanticConfig(clips={"train": 3, "val": 3, "test": 0}, image_size=32, num_categories=4, num_objects=(2, 3))


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode() + p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def sem_root(tmp_path_factory):
    return generate_semantic(tmp_path_factory.mktemp("sem") / "root", CFG, progress=False)


def test_layout_and_check(sem_root):
    assert (sem_root / "metadata.csv").read_text().splitlines()[:3] == [
        "uid,label,split",
        "shapes_avss_v1s_train_00000,v1s,train",
        "shapes_avss_v1m_train_00001,v1m,train",
    ]
    names = json.loads((sem_root / "label2idx.json").read_text())
    assert len(names) == 5 and names["background"] == 0
    assert sorted(p.name for p in (sem_root / "v2" / "shapes_avss_v2_val_00002" / "frames").iterdir()) == sorted(
        f"{k}.jpg" for k in range(10)
    )
    assert [p.name for p in (sem_root / "v1s" / "shapes_avss_v1s_train_00000" / "labels_rgb").iterdir()] == ["0.png"]
    rep = check_avss(sem_root, num_classes=5)
    assert rep.ok, rep.format()


def test_deterministic(sem_root, tmp_path):
    again = generate_semantic(tmp_path / "again", CFG, progress=False)
    assert _digest(again) == _digest(sem_root)
    other = generate_semantic(tmp_path / "other", SemanticConfig(**{**CFG.__dict__, "seed": 1}), progress=False)
    assert _digest(other) != _digest(sem_root)


def test_loader_reads_sidecar_truth(sem_root):
    ds = AVSSDataset(sem_root, "val", image_size=None, num_classes=5)
    for i in range(len(ds)):
        it = ds[i]
        meta = json.loads((sem_root / "synthetic_meta" / "val" / f"{it['video_id']}.json").read_text())
        n = meta["num_frames"]
        assert it["frame_valid"].sum() == n and it["mask_valid"].sum() == n
        from avs.data.synthetic.render import rle_decode

        for t in range(n):
            want = np.zeros((32, 32), np.int64)
            for o in meta["objects"]:
                if o["sounding"][t]:
                    want[rle_decode(o["visible_rle"][t], (32, 32))] = o["class"]
            assert (it["masks"][t].numpy() == want).all()


def test_ceilings(sem_root):
    c = compute_semantic_ceilings(sem_root, "val")
    assert c["oracle"] == pytest.approx(100.0)
    assert 0.0 < c["visual_only_ceiling"] < 100.0
    assert c["num_frames"] == 5 + 5 + 10


def test_ensure_and_scripts(tmp_path):
    env_over = [f"paths.data_dir={tmp_path}", "data.synthetic.clips={train: 3, val: 3, test: 3}", "data.image_size=32"]
    run = lambda script, *a: run_script(script, ["data=synth_avss", *env_over, *a], REPO)  # noqa: E731
    out = run("make_synthetic.py", "progress=false")
    assert out.returncode == 0, out.stderr
    assert "avss val: visual-only ceiling" in out.stdout and "oracle 100.0" in out.stdout
    chk = run("check_data.py")
    assert chk.returncode == 0 and "0 problem(s)" in chk.stdout, chk.stdout + chk.stderr
    refused = run("check_data.py", "image_size=32")
    assert refused.returncode == int(ExitCode.CONFIG) and "error: image_size" in refused.stderr
    root = Path(out.stdout.split("root: ")[1].splitlines()[0])
    bad = root / "v2" / "shapes_avss_v2_train_00002" / "labels_rgb" / "3.png"
    bad.unlink()
    chk = run("check_data.py")
    assert chk.returncode == 1 and "missing colour mask 3" in chk.stdout
    data = {
        "subset": "avss",
        "root": str(root),
        "image_size": 32,
        "num_classes": 9,
        "synthetic": {"clips": {"train": 3, "val": 3, "test": 3}, "image_size": 32},
    }
    assert ensure_semantic(data) == root and not bad.exists()  # complete marker: not regenerated
    ensure_semantic(data, force=True, progress=False)
    assert bad.exists()


def test_run_data_generates_and_loads(tmp_path):
    from avs.data.loaders import RunData
    from tests.conftest import compose_cfg

    over = [f"paths.data_dir={tmp_path}", "data=synth_avss", "data.image_size=32", "data.num_workers=0"]
    cfg = compose_cfg("train", [*over, "data.synthetic.clips={train: 2, val: 1, test: 0}"])
    run = RunData(cfg)
    train, val = run.dataset("train"), run.dataset("val")
    assert len(train) == 2 and len(val) == 1 and val.num_classes == 9
    batch = next(iter(run.loader("train", batch_size=2)))
    assert batch["masks"].shape == (2, 10, 32, 32) and batch["source"] == ["v1s", "v1m"]
    assert batch["mask_valid"].sum(1).tolist() == [1, 5] and batch["frame_valid"].sum(1).tolist() == [5, 5]
