"""Sharp edges of a first day with avs: no silently ignored override, one error style in every script,
check_data reporting everything, and a pre-flight of every split file before step 1 (README, "Exit codes";
docs/reliability.md)."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest

from avs.config import PROJECT_ROOT
from avs.data.check import check_dataset
from avs.data.layout import LAYOUTS, AVSDataError, frame_path, mask_path, meta_csv_text, read_meta_csv, split_records
from avs.engine.trainer import Trainer
from avs.errors import ExitCode
from tests.conftest import compose_cfg, run_script, tiny_overrides
from tests.fixtures.avsbench import make_avsbench_tree

SCRIPTS = PROJECT_ROOT / "scripts"


_script = run_script


def _plain(proc: subprocess.CompletedProcess, code: int, *phrases: str) -> None:
    """Exit `code` with the README's style: `error: ...` on stderr (one or two lines), no traceback, no
    torch advice to load unsafely."""
    assert proc.returncode == code, (proc.returncode, proc.stdout[-1500:], proc.stderr[-2500:])
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines and 1 <= len(lines) <= 2 and lines[0].startswith("error: "), proc.stderr[-2500:]
    assert "Traceback" not in proc.stderr and "weights_only=False" not in proc.stderr + proc.stdout
    for phrase in phrases:
        assert phrase in lines[0], lines[0]


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory) -> dict[str, Path]:
    """Files that are not checkpoints: a text file, a zip archive of something else, an empty file."""
    d = tmp_path_factory.mktemp("bad")
    text = d / "notes.ckpt"
    text.write_text("checkpoint = model\nthis is a text file\n")
    archive = d / "archive.ckpt"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("readme.txt", "not torch")
    empty = d / "empty.ckpt"
    empty.write_bytes(b"")
    return {"text": text, "zip": archive, "empty": empty, "none": d / "none.ckpt", "dir": d}


# ----------------------------------------------------------------------------- every script's error paths
ERROR_PATHS = [
    # (script, args ({bad} = a file from bad_files), exit code, phrase of the error line)
    ("eval.py", ["checkpoint={text}"], ExitCode.CHECKPOINT, "not an avs or torch checkpoint"),
    ("eval.py", ["checkpoint={zip}"], ExitCode.CHECKPOINT, "not an avs or torch checkpoint"),
    ("eval.py", ["checkpoint={empty}"], ExitCode.CHECKPOINT, "not an avs or torch checkpoint"),
    ("eval.py", ["checkpoint={none}"], ExitCode.CHECKPOINT, "checkpoint not found"),
    ("eval.py", ["checkpoint={dir}"], ExitCode.CHECKPOINT, "is a directory"),
    ("eval.py", ["checkpoint={text}", "model=ecmvae"], ExitCode.CONFIG, "from the checkpoint"),
    ("eval.py", ["checkpoint={text}", "+model=ecmvae"], ExitCode.CONFIG, "from the checkpoint"),
    ("eval.py", ["checkpoint={text}", "backbone=pvt_v2_b0"], ExitCode.CONFIG, "from the checkpoint"),
    ("eval.py", ["checkpoint={text}", "+audio.pretrained=false"], ExitCode.CONFIG, "from the checkpoint"),
    ("eval.py", ["checkpoint={text}", "data.rooot=/x"], ExitCode.CONFIG, "no data config has the key 'rooot'"),
    ("eval.py", ["checkpoint={text}", "+foo=1"], ExitCode.CONFIG, "nothing would read it"),
    ("uncertainty.py", ["checkpoint={text}", "+model=ecmvae"], ExitCode.CONFIG, "from the checkpoint"),
    ("uncertainty.py", ["checkpoint={text}"], ExitCode.CHECKPOINT, "not an avs or torch checkpoint"),
    ("latent_kl.py", ["checkpoint={text}", "model=ecmvae"], ExitCode.CONFIG, "from the checkpoint"),
    ("visualize.py", ["checkpoint={zip}", "+backbone=pvt_v2_b0"], ExitCode.CONFIG, "from the checkpoint"),
    ("demo.py", ["checkpoint={text}", "video=x.mp4", "+model.channels=8"], ExitCode.CONFIG, "from the checkpoint"),
    ("export.py", ["checkpoint={text}", "+trainer.lr=1"], ExitCode.CONFIG, "from the checkpoint"),
    ("export.py", ["checkpoint={zip}"], ExitCode.CHECKPOINT, "not an avs or torch checkpoint"),
    (
        "import_checkpoint.py",
        ["--source", "avsbench", "--released", "{text}", "--out", "{dir}/o.ckpt"],
        ExitCode.CHECKPOINT,
        "not an avs or torch checkpoint",
    ),
    (
        "import_checkpoint.py",
        ["--source", "avsbench", "--released", "{zip}", "--out", "{dir}/o.ckpt"],
        ExitCode.CHECKPOINT,
        "not an avs or torch checkpoint",
    ),
    (
        "import_checkpoint.py",
        ["--source", "avsbench", "--released", "{text}", "--out", "{dir}/o.ckpt", "+trainer.lrr=1"],
        ExitCode.CONFIG,
        "nothing would read it",
    ),
    ("train.py", ["trainer.resume={none}"], ExitCode.MISSING_FILE, "trainer.resume="),
    ("train.py", ["+trainer.lrr=1"], ExitCode.CONFIG, "nothing would read it"),
    ("train.py", ["+data.foo=1"], ExitCode.CONFIG, "nothing would read it"),
    ("extract_audio.py", ["paths.weights_dir={dir}/w", "data.root={dir}"], ExitCode.MISSING_FILE, "vggish-10086976"),
    ("extract_audio.py", ["vggish.pretrained=false", "data.root={dir}/nope"], ExitCode.MISSING_FILE, "data.root="),
    ("extract_audio.py", ["+foo=1"], ExitCode.CONFIG, "nothing would read it"),
    ("check_data.py", ["+image_sise=3"], ExitCode.CONFIG, "nothing would read it"),
    ("make_synthetic.py", ["+data.synthetic.foo=1", "data.root={dir}/s"], ExitCode.CONFIG, "nothing would read it"),
    ("pretrain.py", ["+visual.foo=1"], ExitCode.CONFIG, "nothing would read it"),
]


@pytest.mark.parametrize("script,args,code,phrase", ERROR_PATHS, ids=[f"{e[0]}:{' '.join(e[1])}" for e in ERROR_PATHS])
def test_every_script_reports_its_errors_in_the_table_style(script, args, code, phrase, bad_files, tmp_path):
    given = [a.format(**bad_files) for a in args]
    if script not in ("import_checkpoint.py",):
        given.append(f"hydra.run.dir={tmp_path}/h")
    _plain(_script(script, given, tmp_path), int(code), phrase)
    assert not (bad_files["dir"] / "s").exists()  # nothing generated on a refused command line


# ----------------------------------------------------------------------------- eval never generates data
@pytest.fixture(scope="module")
def synth_checkpoint(synth_data_dir, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("ckpt") / "run"
    cfg = compose_cfg("train", tiny_overrides(synth_data_dir) + ["model.channels=32", "trainer.test_at_end=false"])
    Trainer(cfg, run).fit()
    return run / "checkpoints" / "best.ckpt"


def test_eval_with_a_mistyped_data_root_refuses_and_generates_nothing(synth_checkpoint, synth_data_dir, tmp_path):
    typo = tmp_path / "typo_root"
    proc = _script(
        "eval.py", [f"checkpoint={synth_checkpoint}", f"data.root={typo}", f"hydra.run.dir={tmp_path}/h"], tmp_path
    )
    _plain(proc, ExitCode.MISSING_FILE, f"data.root={typo}", "never generates")
    assert not typo.exists() and not any(tmp_path.glob("typo_root*"))
    ok = _script(
        "eval.py",
        [
            f"checkpoint={synth_checkpoint}",
            "split=val",
            f"paths.data_dir={synth_data_dir}",
            f"hydra.run.dir={tmp_path}/o",
        ],
        tmp_path,
    )
    assert ok.returncode == 0, ok.stderr[-2000:]


# ----------------------------------------------------------------------------- check_data reports everything
def test_check_data_reports_every_problem_even_with_a_malformed_csv_row(tmp_path):
    root = make_avsbench_tree(tmp_path / "data", "s4", {"train": 2, "val": 2, "test": 1}, size=32)
    lay = LAYOUTS["s4"]
    csv_p = lay.csv_path(root)
    records = read_meta_csv(csv_p, "s4")
    val = [r for r in records if r.split == "val"]
    train = [r for r in records if r.split == "train"]
    missing_mask = mask_path(root, lay, val[0], 2)
    missing_mask.unlink()
    corrupt_frame = frame_path(root, lay, val[1], 3)
    corrupt_frame.write_bytes(corrupt_frame.read_bytes()[:50])
    corrupt_mask = mask_path(root, lay, train[0], 1)
    corrupt_mask.write_bytes(b"not a png")
    records[-1] = dataclasses.replace(records[-1], split="tset")  # a bad split value
    csv_p.write_text(meta_csv_text("s4", records) + "brokenVid,0\n")  # a row with too few columns

    report = check_dataset(root, "s4", num_frames=5)
    text = report.format()
    assert "expected at least 4 columns" in text and "brokenVid" in text
    assert "unknown split value" in text and "'tset'" in text
    for path in (missing_mask, corrupt_frame, corrupt_mask):
        assert str(path) in text, text
    assert len(report.problems) == 5, text
    proc = _script("check_data.py", [f"data.root={root}"], tmp_path)
    assert proc.returncode == 1 and "5 problem(s)" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-2000:]


# ----------------------------------------------------------------------------- pre-flight
def test_preflight_lists_missing_files_with_one_listing_per_folder(tmp_path, monkeypatch):
    from avs.data import build_dataset
    from avs.data import preflight as P

    root = make_avsbench_tree(tmp_path / "data", "ms3", size=32)
    cfg = compose_cfg("train", ["data=ms3", f"data.root={root}", "data.image_size=32"]).data
    datasets = {s: build_dataset(cfg, s, train=False) for s in ("train", "val", "test")}
    assert P.missing_split_files(datasets) == []
    lay = LAYOUTS["ms3"]
    gone = [
        frame_path(root, lay, split_records(root, "ms3", "test")[0], 4),
        mask_path(root, lay, datasets["val"].records[0], 2),
    ]
    for p in gone:
        p.unlink()
    calls = []
    real = os.scandir
    monkeypatch.setattr(P.os, "scandir", lambda d: calls.append(d) or real(d))
    with pytest.raises(
        AVSDataError, match=r"^2 file\(s\) that the train/val/test split\(s\) name are missing: "
    ) as err:
        P.missing_split_files(datasets)
    assert all(str(p) in str(err.value) for p in gone)
    assert len(calls) == len(set(calls))  # one listing per folder, no stat per file
    assert P.missing_split_files(datasets, on_error="skip") == [gone[1], gone[0]]  # in split order


def test_a_missing_test_frame_stops_training_before_step_one(synth_data_dir, tmp_path):
    data_dir = tmp_path / "data"
    shutil.copytree(synth_data_dir, data_dir)
    cfg = compose_cfg("train", tiny_overrides(data_dir) + ["model.channels=32"])
    lay = LAYOUTS["ms3"]
    frame = frame_path(Path(cfg.data.root), lay, split_records(cfg.data.root, "ms3", "test")[0], 2)
    frame.unlink()
    run = tmp_path / "run"
    with pytest.raises(AVSDataError, match=r"1 file\(s\) that the train/val/test split\(s\) name are missing") as err:
        Trainer(cfg, run).fit()
    assert str(frame) in str(err.value)
    assert not (run / "checkpoints" / "last.ckpt").exists()  # refused before step 1, not at the final test
    skip = compose_cfg("train", tiny_overrides(data_dir) + ["model.channels=32", "data.on_error=skip"])
    result = Trainer(skip, tmp_path / "run_skip").fit()  # data.on_error=skip: the clip is skipped and recorded
    assert "test" in result
