"""scripts/check_data.py and scripts/extract_audio.py as subprocesses on generated trees."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np

from avs.data.layout import LAYOUTS, embedding_path, frame_path, mask_path, split_records
from tests.conftest import run_script
from tests.fixtures.avsbench import make_avsbench_tree

REPO = Path(__file__).resolve().parents[2]


def _run(script: str, *overrides: str, cwd: Path) -> subprocess.CompletedProcess:
    return run_script(script, list(overrides), cwd)


def test_check_data_clean_and_broken(tmp_path):
    root = make_avsbench_tree(tmp_path / "data", "s4", size=32)
    ok = _run("check_data.py", f"data.root={root}", cwd=tmp_path)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "train: 2 clips" in ok.stdout and "0 problem(s)" in ok.stdout

    lay = LAYOUTS["s4"]
    recs = split_records(root, "s4", "val") + split_records(root, "s4", "train")
    deleted = frame_path(root, lay, recs[0], 3)
    deleted.unlink()
    truncated = mask_path(root, lay, recs[1], 1)
    truncated.write_bytes(truncated.read_bytes()[:60])
    bad = _run("check_data.py", f"data.root={root}", cwd=tmp_path)
    assert bad.returncode == 1
    assert str(deleted) in bad.stdout and str(truncated) in bad.stdout
    assert "2 problem(s)" in bad.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # hydra left nothing in the cwd


def test_extract_audio_script(tmp_path):
    root = make_avsbench_tree(tmp_path / "data", "ms3", {"val": 1, "test": 1}, size=32)
    out = tmp_path / "emb"
    args = [
        "data=ms3",
        f"data.root={root}",
        f"data.embedding_dir={out}",
        "vggish.pretrained=false",
        "splits=[val,test]",
        "device=cpu",
    ]
    r = _run("extract_audio.py", *args, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    for split in ("val", "test"):
        rec = split_records(root, "ms3", split)[0]
        e = np.load(embedding_path(root, LAYOUTS["ms3"], rec, out))
        assert e.shape == (5, 128) and e.dtype == np.float32
    assert "val: 1 written" in r.stdout
    missing = _run("extract_audio.py", f"data.root={root}", "data=ms3", f"paths.weights_dir={tmp_path}/w", cwd=tmp_path)
    assert missing.returncode == 5, missing.stdout + missing.stderr  # README, "Exit codes": a missing weight file
    assert missing.stderr.startswith("error: VGGish weights_path") and "Traceback" not in missing.stderr
    assert "vggish-10086976.pth" in missing.stderr and "pretrained=false" in missing.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "emb"]


def test_check_data_short_pkl_and_the_pad_short_audio_key(tmp_path):
    from avs.data.layout import logmel_path
    from avs.data.safe_pickle import dump_logmel_pkl

    root = make_avsbench_tree(tmp_path / "data", "s4", {"train": 1, "val": 1}, size=32)
    pkl = logmel_path(root, LAYOUTS["s4"], split_records(root, "s4", "val")[0])
    dump_logmel_pkl(pkl, np.zeros((3, 1, 96, 64), np.float32))
    bad = _run("check_data.py", f"data.root={root}", cwd=tmp_path)
    assert bad.returncode == 1
    assert (
        f"{pkl}: audio shaped [3, 1, 96, 64] has 3 example(s), data.num_frames=5 needs 5; set data.pad_short_audio=true"
    ) in bad.stdout
    ok = _run("check_data.py", f"data.root={root}", "data.pad_short_audio=true", cwd=tmp_path)
    assert ok.returncode == 0, ok.stdout + ok.stderr
