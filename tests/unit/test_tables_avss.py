"""AVSS runs of the TPAVI overlays are tabled beside the AVSS paper's numbers (published.avss, cited through
published.by_subset.avss); the S4/MS3 tables of the same overlays are what they were before AVSS numbers existed."""

from __future__ import annotations

import csv
import importlib.util
import io
import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from avs.config import PROJECT_ROOT
from avs.tables import build_table, load_runs, to_csv, to_markdown
from tests.conftest import compose_cfg

OVERLAYS = ("avsbench_tpavi_r50", "avsbench_tpavi_pvt")


def _write_runs(root: Path, subsets: tuple[str, ...], protocols: tuple[str, ...], extra: tuple[str, ...] = ()) -> Path:
    """Two seeds per overlay and subset; metrics.json as the trainer writes it (resolved config inside)."""
    job = 0
    for exp in OVERLAYS:
        for data in subsets:
            overrides = [f"experiment={exp}", f"data={data}", "paths.avsbench_root=/data/avsbench", *extra]
            cfg = OmegaConf.to_container(compose_cfg("train", overrides), resolve=True)
            for seed, miou in ((1, 0.6), (2, 0.64)):
                cfg["seed"] = seed
                metrics = {
                    p: {"miou": miou - 0.01 * i, "fscore": miou + 0.1 - 0.02 * i} for i, p in enumerate(protocols)
                }
                metrics.get("avsbench_legacy", {})["eval_batch_size"] = 4
                record = {
                    "data": {"subset": cfg["data"]["subset"]},
                    "seed": seed,
                    "legacy_batch_size": 4,
                    "config": cfg,
                }
                record.update(val=metrics, test=metrics)
                run = root / str(job)
                run.mkdir(parents=True)
                (run / "metrics.json").write_text(json.dumps(record))
                job += 1
    return root


def test_avss_runs_show_the_avss_papers_numbers(tmp_path):
    runs = load_runs([_write_runs(tmp_path / "avss", ("avss",), ("per_class", "avsbench_legacy"))])
    table = build_table(runs, title="avss")  # every run AVSS: per_class by default
    paper = {
        r.values["published.row"]: (r.published[("avss", "miou")], r.published[("avss", "fscore")]) for r in table.rows
    }
    assert paper == {"TPAVI, ResNet-50": (20.18, 25.2), "TPAVI, PVT-v2-B5": (29.77, 35.2)}
    md = to_markdown(table)
    assert "Metric protocol: `per_class`." in md
    assert "| row | AVSS mIoU | AVSS mIoU (paper) | AVSS F | AVSS F (paper) |" in md
    assert "| TPAVI, ResNet-50 | 62.00 ± 2.83 (n=2) | 20.18 | 72.00 ± 2.83 (n=2) | 25.2 |" in md
    assert "AVSBench-semantic (Zhou et al., Audio-Visual Segmentation with Semantics)" in md
    assert "ECCV 2022" not in md  # the S4/MS3 paper is not cited for AVSS numbers
    assert "computed under `avsbench_legacy` with 4 clip(s) per batch; ours use `per_class`, so compare" in md

    legacy = to_markdown(build_table(runs, protocol="avsbench_legacy"))
    assert "| TPAVI, PVT-v2-B5 | 61.00 ± 2.83 (n=2) | 29.77 | 70.00 ± 2.83 (n=2) | 35.2 |" in legacy
    assert "so compare with care" not in legacy  # same protocol and batch as the paper
    rows = list(csv.DictReader(io.StringIO(to_csv(table))))
    assert [(r["row"], float(r["avss_miou_paper"])) for r in rows] == [
        ("TPAVI, ResNet-50", 20.18),
        ("TPAVI, PVT-v2-B5", 29.77),
    ]


def test_scripts_tables_on_avss_runs(tmp_path, capsys):
    root = _write_runs(tmp_path / "avss", ("avss",), ("per_class", "avsbench_legacy"))
    spec = importlib.util.spec_from_file_location("tables_script", PROJECT_ROOT / "scripts" / "tables.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main([str(root), "--protocol", "avsbench_legacy", "--out", str(tmp_path / "out")]) == 0
    assert "| TPAVI, ResNet-50 | 61.00 ± 2.83 (n=2) | 20.18 |" in capsys.readouterr().out
    assert script.main([str(root), "--protocol", "per_frame", "--out", str(tmp_path / "out")]) == 2
    assert "protocol 'per_frame' not in test metrics" in capsys.readouterr().err


def test_synthetic_avss_runs_show_no_paper_numbers(tmp_path):
    root = _write_runs(
        tmp_path / "synth", ("synth_avss",), ("per_class", "avsbench_legacy"), (f"paths.data_dir={tmp_path}",)
    )
    table = build_table(load_runs([root]))
    assert not table.show_published and "(paper)" not in to_markdown(table)


# The S4/MS3 table of these runs, as the code before AVSS published numbers rendered it (recorded then).
S4_MS3_BEFORE = """**main**

Split: test. Metric protocol: `per_frame`. Cells: mean ± sample std over runs (seeds), in %; n = number of runs. Row keys: published.row (8 runs). Columns marked (paper): as published, in % (AVSBench (Zhou et al., ECCV 2022), main results (table number not in our sources) [Stepping-Stones and CAVP README tables]); n/a = not in our sources. Published numbers were computed under `avsbench_legacy` with 4 clip(s) per batch; ours use `per_frame`, so compare with care.

| row | S4 mIoU | S4 mIoU (paper) | S4 F | S4 F (paper) | MS3 mIoU | MS3 mIoU (paper) | MS3 F | MS3 F (paper) |
|---|---|---|---|---|---|---|---|---|
| TPAVI, ResNet-50 | 62.00 ± 2.83 (n=2) | 72.79 | 72.00 ± 2.83 (n=2) | 84.8 | 62.00 ± 2.83 (n=2) | 47.88 | 72.00 ± 2.83 (n=2) | 57.8 |
| TPAVI, PVT-v2-B5 | 62.00 ± 2.83 (n=2) | 78.7 | 72.00 ± 2.83 (n=2) | 87.9 | 62.00 ± 2.83 (n=2) | 54 | 72.00 ± 2.83 (n=2) | 64.5 |
"""


def test_s4_ms3_tables_are_unchanged(tmp_path):
    root = _write_runs(tmp_path / "main", ("s4", "ms3"), ("per_frame", "avsbench_legacy"))
    table = build_table(load_runs([root]), title="main")
    assert to_markdown(table) == S4_MS3_BEFORE
    assert "avss" not in to_csv(table)


@pytest.mark.parametrize("subset", ["s4", "ms3"])
def test_mixed_tables_cite_each_subsets_paper(tmp_path, subset):
    root = _write_runs(tmp_path / "mixed", (subset, "avss"), ("avsbench_legacy",))
    md = to_markdown(build_table(load_runs([root]), protocol="avsbench_legacy"))
    assert "AVSBench (Zhou et al., ECCV 2022)" in md and "Audio-Visual Segmentation with Semantics" in md
    assert f"| {subset.upper()} mIoU |" in md and "| AVSS mIoU (paper) |" in md
