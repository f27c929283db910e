"""scripts/tables.py --per-class: one IoU column per AVSS class, named from label2idx.json, background last."""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import math
from pathlib import Path

import pytest

from avs.config import PROJECT_ROOT
from avs.tables import build_table, load_runs, to_csv, to_markdown

NAN = math.nan
# two seeds of one AVSS config, 4 classes (0 = background); class 3 is neither labelled nor predicted in seed 2
PER_CLASS_IOU = {1: [0.9, 0.5, 0.25, 0.125], 2: [0.8, 0.7, 0.5, NAN]}


def _script():
    spec = importlib.util.spec_from_file_location("tables_script", PROJECT_ROOT / "scripts" / "tables.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def _write_run(run: Path, subset: str, seed: int, root: Path, ious: list[float]) -> None:
    cfg = {
        "seed": seed,
        "data": {"name": subset, "subset": subset, "root": str(root), "num_classes": len(ious)},
        "model": {"name": "avsbg"},
        "backbone": {"name": "resnet50"},
    }
    fg = [v for v in ious[1:] if not math.isnan(v)]
    block = {"miou": sum(fg) / len(fg), "fscore": 0.5, "iou_background": ious[0], "iou_per_class": ious}
    metrics = {"per_class": block} if subset == "avss" else {"per_frame": {"miou": 0.5, "fscore": 0.5}}
    record = {
        "data": {"subset": subset, "root": str(root)},
        "seed": seed,
        "config": cfg,
        "val": metrics,
        "test": metrics,
    }
    run.mkdir(parents=True)
    (run / "metrics.json").write_text(json.dumps(record))  # NaN as the trainer's json.dumps writes it


def _avss_runs(tmp_path: Path, names: dict[str, int] | None) -> Path:
    root = tmp_path / "avss_data"
    root.mkdir()
    if names is not None:
        (root / "label2idx.json").write_text(json.dumps(names))
    for seed, ious in PER_CLASS_IOU.items():
        _write_run(tmp_path / "runs" / str(seed), "avss", seed, root, ious)
    return tmp_path / "runs"


def test_class_columns_named_from_label2idx(tmp_path):
    runs = _avss_runs(tmp_path, {"background": 0, "dog": 1, "car": 2, "piano": 3})
    table = build_table(load_runs([runs]), per_class=True)
    md = to_markdown(table)
    header = "| model.name | backbone.name | AVSS mIoU | AVSS F | AVSS dog | AVSS car | AVSS piano | AVSS background |"
    assert header in md
    # seed 1 mIoU = mean(50, 25, 12.5) = 29.1667, seed 2 = mean(70, 50) = 60: mean 44.58, std 21.80
    assert (
        "| avsbg | resnet50 | 44.58 ± 21.80 (n=2) | 50.00 ± 0.00 (n=2) | 60.00 ± 14.14 (n=2) | "
        "37.50 ± 17.68 (n=2) | 12.50 (n=1) | 85.00 ± 7.07 (n=2) |" in md
    )
    assert "Class columns: that class's IoU in %" in md
    rows = list(csv.DictReader(io.StringIO(to_csv(table))))
    assert list(rows[0])[-6:] == [
        "avss_iou_piano_mean",
        "avss_iou_piano_std",
        "avss_iou_piano_n",
        "avss_iou_background_mean",
        "avss_iou_background_std",
        "avss_iou_background_n",
    ]
    assert (float(rows[0]["avss_iou_dog_mean"]), float(rows[0]["avss_iou_dog_std"])) == (60.0, 14.1421)
    assert (rows[0]["avss_iou_piano_mean"], rows[0]["avss_iou_piano_std"], rows[0]["avss_iou_piano_n"]) == (
        "12.5",
        "",
        "1",
    )


def test_class_columns_without_label2idx_and_default_unchanged(tmp_path, capsys):
    runs = _avss_runs(tmp_path, None)
    script = _script()
    assert script.main([str(runs), "--per-class", "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "| AVSS mIoU | AVSS F | AVSS class_1 | AVSS class_2 | AVSS class_3 | AVSS background |" in out
    assert "| 60.00 ± 14.14 (n=2) | 37.50 ± 17.68 (n=2) | 12.50 (n=1) | 85.00 ± 7.07 (n=2) |" in out
    assert "avss_iou_class_1_mean" in (tmp_path / "out" / "table.csv").read_text()

    assert script.main([str(runs), "--out", str(tmp_path / "plain")]) == 0
    capsys.readouterr()
    plain = (tmp_path / "plain" / "table.md").read_text()
    assert plain.endswith(
        "(2 runs).\n\n| model.name | backbone.name | AVSS mIoU | AVSS F |\n|---|---|---|---|\n"
        "| avsbg | resnet50 | 44.58 ± 21.80 (n=2) | 50.00 ± 0.00 (n=2) |\n"
    )
    assert (tmp_path / "plain" / "table.csv").read_text().splitlines()[0] == (
        "model.name,backbone.name,avss_miou_mean,avss_miou_std,avss_miou_n,avss_fscore_mean,avss_fscore_std,"
        "avss_fscore_n"
    )


def test_per_class_refuses_mixed_subsets(tmp_path, capsys):
    runs = _avss_runs(tmp_path, {"background": 0, "dog": 1, "car": 2, "piano": 3})
    _write_run(runs / "s4", "s4", 1, tmp_path / "s4_data", [0.5, 0.5])
    for protocol in ([], ["--protocol", "per_class"]):
        assert _script().main([str(runs), "--per-class", *protocol, "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert err == "error: --per-class needs AVSS runs only; these runs include s4 runs\n"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("bad", [{"background": 0, "dog": 1}, {"background": 0, "dog": 1, "car": 2, "piano": 7}])
def test_bad_label2idx_is_a_plain_error(tmp_path, bad, capsys):
    runs = _avss_runs(tmp_path, bad)
    assert _script().main([str(runs), "--per-class", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "label2idx.json" in err and err.count("\n") == 1
