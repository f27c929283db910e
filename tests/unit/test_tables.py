"""Paper-style tables from run dirs: grouping by varied config keys, mean ± std over seeds, published columns."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest

from avs.config import PROJECT_ROOT
from avs.tables import build_table, flatten_config, load_runs, make_table, to_csv, to_markdown, varied_keys
from tests.conftest import run_script

PUBLISHED = {
    "paper": "ECMVAE (Mao et al., ICCV 2023)",
    "table": "4",
    "row": "JS (ECMVAE)",
    "source": "not in our sources",
    "protocol": "avsbench_legacy",
    "legacy_batch_size": 1,
    "s4": None,
    "ms3": None,
    "rows": [
        {"match": {"model.latent.divergence": "js"}, "row": "JS", "s4": {"miou": 81.7, "fscore": 90.1}, "ms3": None},
        {"match": {"model.latent.divergence": "kl"}, "row": "KL", "s4": None, "ms3": None},
    ],
}


def _config(subset: str, seed: int, divergence: str, published=PUBLISHED, **extra) -> dict:
    cfg = {
        "task_name": "ecmvae_table4_divergence",
        "seed": seed,
        "data": {"name": subset, "subset": subset, "root": f"/data/{subset}", "num_workers": 2, "batch_size": 4},
        "model": {
            "name": "ecmvae",
            "channels": 128,
            "init_from": None,
            "latent": {"_target_": "avs.models.latent.ECMVAELatent", "_partial_": True, "divergence": divergence},
        },
        "backbone": {"name": "pvt_v2_b5", "weights_path": "/w/pvt_v2_b5.pth", "drop_path_rate": 0.1},
        "trainer": {"epochs": 15 if subset == "s4" else 30, "device": "cpu", "lr": 1e-4},
        "paths": {"log_dir": f"/logs/{seed}"},
        "published": published,
    }
    for dotted, value in extra.items():
        node = cfg
        *parents, leaf = dotted.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return cfg


def _write_run(run_dir: Path, cfg: dict, miou: float, fscore: float, legacy_bs: int = 1, test: bool = True) -> Path:
    metrics = {
        "per_frame": {"miou": miou, "fscore": fscore, "protocol": "per_frame"},
        "avsbench_legacy": {"miou": miou - 0.01, "fscore": fscore - 0.02, "eval_batch_size": legacy_bs},
        "dataset_level": {"miou": miou + 0.01, "fscore": fscore + 0.01},
    }
    record = {
        "method": cfg["model"]["name"],
        "data": {"name": cfg["data"]["name"], "subset": cfg["data"]["subset"]},
        "seed": cfg["seed"],
        "legacy_batch_size": legacy_bs,
        "val": metrics,
        "test": metrics if test else None,
        "config": cfg,
    }
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.json").write_text(json.dumps(record))
    return run_dir


@pytest.fixture
def sweep(tmp_path) -> Path:
    """A fake multirun: divergence js/kl x S4/MS3 x seeds 1,2 (plus one S4 KL seed 3)."""
    root = tmp_path / "multirun"
    values = {
        ("js", "s4"): [(0.80, 0.90), (0.82, 0.88)],
        ("kl", "s4"): [(0.70, 0.80), (0.74, 0.84), (0.72, 0.82)],
        ("js", "ms3"): [(0.50, 0.60), (0.54, 0.66)],
        ("kl", "ms3"): [(0.40, 0.50), (0.40, 0.50)],
    }
    job = 0
    for (div, subset), results in values.items():
        for seed, (miou, f) in enumerate(results, start=1):
            _write_run(root / str(job), _config(subset, seed, div), miou, f)
            job += 1
    return root


EXPECTED_MD = """**ecmvae_table4**

Split: test. Metric protocol: `per_frame`. Cells: mean ± sample std over runs (seeds), in %; n = number of runs. Row keys: published.row (9 runs). Columns marked (paper): as published, in % (ECMVAE (Mao et al., ICCV 2023), Table 4 [not in our sources]); n/a = not in our sources. Published numbers were computed under `avsbench_legacy` with 1 clip(s) per batch; ours use `per_frame`, so compare with care.

| row | S4 mIoU | S4 mIoU (paper) | S4 F | S4 F (paper) | MS3 mIoU | MS3 mIoU (paper) | MS3 F | MS3 F (paper) |
|---|---|---|---|---|---|---|---|---|
| JS | 81.00 ± 1.41 (n=2) | 81.7 | 89.00 ± 1.41 (n=2) | 90.1 | 52.00 ± 2.83 (n=2) | n/a | 63.00 ± 4.24 (n=2) | n/a |
| KL | 72.00 ± 2.00 (n=3) | n/a | 82.00 ± 2.00 (n=3) | n/a | 40.00 ± 0.00 (n=2) | n/a | 50.00 ± 0.00 (n=2) | n/a |
"""


def test_markdown_table_mean_std_protocol_and_published(sweep):
    table = build_table(load_runs([sweep]), title="ecmvae_table4")
    assert to_markdown(table) == EXPECTED_MD


def test_legacy_protocol_caption_names_the_batch_size(sweep):
    md = to_markdown(build_table(load_runs([sweep]), protocol="avsbench_legacy"))
    assert "Metric protocol: `avsbench_legacy` (legacy batch size: 1 clip(s) per batch)." in md
    assert "so compare with care" not in md  # same protocol and batch size as the paper
    assert "| JS | 80.00 ± 1.41 (n=2) | 81.7 | 87.00 ± 1.41 (n=2) | 90.1 |" in md


def test_csv_has_raw_numbers(sweep):
    table = build_table(load_runs([sweep]))
    rows = list(csv.DictReader(io.StringIO(to_csv(table))))
    assert [r["row"] for r in rows] == ["JS", "KL"]
    js = rows[0]
    assert float(js["s4_miou_mean"]) == pytest.approx(81.0)
    assert float(js["s4_miou_std"]) == pytest.approx(1.4142, abs=1e-4)
    assert js["s4_miou_n"] == "2" and float(js["s4_miou_paper"]) == 81.7 and js["ms3_miou_paper"] == ""


def test_without_published_rows_the_varied_key_is_the_row(tmp_path):
    # no `published` node: rows come from the config key that varies; subset-tied keys
    # (epochs, data root/name), seeds and paths do not split rows
    for i, (div, subset, seed) in enumerate([("js", "s4", 1), ("js", "s4", 2), ("poe", "s4", 1), ("js", "ms3", 1)]):
        _write_run(tmp_path / f"r{i}", _config(subset, seed, div, published=None), 0.5 + 0.1 * i, 0.6)
    runs = load_runs([tmp_path])
    assert varied_keys(runs) == ["model.latent.divergence"]
    table = build_table(runs)
    assert not table.show_published
    md = to_markdown(table)
    assert "| model.latent.divergence | S4 mIoU | S4 F | MS3 mIoU | MS3 F |" in md
    assert "| js | 55.00 ± 7.07 (n=2) | 60.00 ± 0.00 (n=2) | 80.00 (n=1) | 60.00 (n=1) |" in md
    assert "| poe | 70.00 (n=1) | 60.00 (n=1) |  |  |" in md


def test_covarying_keys_collapse_to_the_named_one(tmp_path):
    # a backbone swap changes name, weights path and drop path together: one row key, backbone.name
    for i, (name, dpr) in enumerate([("resnet50", 0.0), ("pvt_v2_b5", 0.1), ("pvt_v2_b5", 0.1)]):
        cfg = _config(
            "s4",
            i,
            "js",
            published=None,
            backbone__name=name,
            backbone__drop_path_rate=dpr,
            backbone__weights_path=f"/w/{name}.pth",
        )
        _write_run(tmp_path / f"r{i}", cfg, 0.7, 0.8)
    assert varied_keys(load_runs([tmp_path])) == ["backbone.name"]


def test_a_key_missing_from_older_runs_does_not_split_rows(tmp_path):
    # runs written before a config key existed lack it; the runs that have it agree, so it is no row key
    new_keys = {"model__latent__free_bits": 0.0, "data__pad_short_audio": False}
    for i, (div, extra) in enumerate([("js", {}), ("js", new_keys), ("kl", new_keys), ("kl", {})]):
        _write_run(tmp_path / f"r{i}", _config("ms3", i, div, published=None, **extra), 0.5, 0.6)
    assert varied_keys(load_runs([tmp_path])) == ["model.latent.divergence"]
    # two different values among the runs that have the key: it varies
    _write_run(tmp_path / "r4", _config("ms3", 4, "js", published=None, data__pad_short_audio=True), 0.5, 0.6)
    assert set(varied_keys(load_runs([tmp_path]))) == {"model.latent.divergence", "data.pad_short_audio"}
    # a result-neutral key (avs.config_keys) never splits rows, even when it varies
    _write_run(tmp_path / "r5", _config("ms3", 5, "js", published=None, data__persistent_workers=True), 0.5, 0.6)
    assert "data.persistent_workers" not in varied_keys(load_runs([tmp_path]))


def test_init_checkpoint_paths_are_one_row_and_target_nodes_show_the_class(tmp_path):
    for i, init in enumerate([None, "/runs/a/checkpoints/best.ckpt", "/runs/b/checkpoints/best.ckpt"]):
        cfg = _config("ms3", i, "js", published=None, model__init_from=init)
        _write_run(tmp_path / f"r{i}", cfg, 0.5, 0.6)
    table = build_table(load_runs([tmp_path]))
    assert table.keys == ["model.init_from"]
    assert [r.values["model.init_from"] for r in table.rows] == [None, "checkpoint"]
    assert table.rows[1].cells[("ms3", "miou")].n == 2
    motion = {"_target_": "avs.models.motion.CorrelationPyramidMotion", "impl": "released"}
    flat = flatten_config({"model": {"motion": motion, "projector": None}})
    want = {"model.motion": "CorrelationPyramidMotion", "model.motion.impl": "released", "model.projector": None}
    assert flat == want


def test_runs_without_test_metrics_are_skipped_and_errors_name_the_problem(tmp_path):
    _write_run(tmp_path / "a", _config("s4", 1, "js"), 0.8, 0.9)
    _write_run(tmp_path / "b", _config("s4", 2, "js"), 0.1, 0.1, test=False)  # test_at_end=false
    table = build_table(load_runs([tmp_path]))
    assert table.rows[0].cells[("s4", "miou")].n == 1
    table = build_table(load_runs([tmp_path / "b"]), split="val")
    assert table.rows[0].cells[("s4", "miou")].mean == pytest.approx(10.0)
    with pytest.raises(ValueError, match="test metrics"):
        build_table(load_runs([tmp_path / "b"]))
    with pytest.raises(ValueError, match="protocol 'nope'"):
        build_table(load_runs([tmp_path / "a"]), protocol="nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no metrics.json"):
        load_runs([tmp_path / "empty"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_runs([tmp_path / "missing"])


def test_make_table_writes_md_and_csv_next_to_the_runs(sweep):
    table, paths = make_table([sweep], name="t4", protocol="avsbench_legacy")
    assert paths["md"] == sweep / "t4.md" and paths["csv"] == sweep / "t4.csv"
    assert paths["md"].read_text() == to_markdown(table)
    assert paths["csv"].read_text().splitlines()[0].startswith("row,s4_miou_mean,s4_miou_std,s4_miou_n,s4_miou_paper")


def test_real_multirun_to_table_end_to_end(synth_data_dir, tmp_path):
    """scripts/train.py -m (2 seeds of a paper overlay, tiny) -> scripts/tables.py -> markdown + csv."""
    from tests.conftest import tiny_overrides

    sweep_dir = tmp_path / "sweep"
    train = [
        "-m",
        "experiment=avsbench_tpavi_pvt",
        "seed=1,2",
        f"hydra.sweep.dir={sweep_dir}",
        *tiny_overrides(synth_data_dir, "ms3"),
        "model.channels=32",
        "trainer.max_steps=1",
    ]
    proc = run_script("train.py", train, tmp_path, timeout=900)  # one thread (run_script): tiny models
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(list(sweep_dir.glob("*/metrics.json"))) == 2
    tables = [
        str(sweep_dir),
        "--name",
        "tpavi",
        "--protocol",
        "avsbench_legacy",
        "--out",
        str(tmp_path / "tables"),
    ]
    proc = run_script("tables.py", tables, tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    md = (tmp_path / "tables" / "tpavi.md").read_text()
    assert md in proc.stdout
    assert "Metric protocol: `avsbench_legacy` (legacy batch size: 4 clip(s) per batch)." in md
    # the overlay's row label names the row; its AVSBench numbers are not shown for synthetic data
    assert "Data: Sounding Shapes (synthetic)" in md and "(paper)" not in md
    assert "| row | MS3 mIoU | MS3 F |" in md
    row = [line for line in md.splitlines() if line.startswith("| TPAVI, PVT-v2-B5 |")]
    assert len(row) == 1 and row[0].count("(n=2)") == 2
    records = [json.loads(p.read_text()) for p in sorted(sweep_dir.glob("*/metrics.json"))]
    mean = 100 * sum(r["test"]["avsbench_legacy"]["miou"] for r in records) / 2
    assert f"| {mean:.2f} ± " in row[0]
    rows = list(csv.DictReader(io.StringIO((tmp_path / "tables" / "tpavi.csv").read_text())))
    assert len(rows) == 1 and rows[0]["ms3_miou_n"] == "2"
    assert float(rows[0]["ms3_miou_mean"]) == pytest.approx(mean, abs=1e-3)
    bad = run_script("tables.py", [str(tmp_path / "nothing")], tmp_path, timeout=120)
    assert bad.returncode == 2 and "does not exist" in bad.stderr


def test_published_rows_match_several_numeric_keys_and_synthetic_runs_hide_paper_numbers(tmp_path):
    published = {
        "paper": "P",
        "table": "5",
        "row": "full",
        "protocol": "avsbench_legacy",
        "legacy_batch_size": 1,
        "s4": {"miou": 81.7, "fscore": 90.1},
        "ms3": None,
        "rows": [
            {
                "match": {"model.loss_weights.diff": 0.0, "model.loss_weights.sic": 0.01},
                "row": "-L_diff",
                "s4": None,
                "ms3": None,
            },
        ],
    }
    for i, diff in enumerate([0.001, 0.0]):
        cfg = _config("s4", 1, "js", published=published, model__loss_weights={"diff": diff, "sic": 0.01})
        _write_run(tmp_path / "real" / f"r{i}", cfg, 0.8, 0.9)
    table = build_table(load_runs([tmp_path / "real"]), protocol="avsbench_legacy")
    labels = {r.values["published.row"]: r.published[("s4", "miou")] for r in table.rows}
    assert labels == {"full": 81.7, "-L_diff": None}  # 0.0 matches 0.0 (not 0.001); unmatched runs keep the node's row
    synth = _config("s4", 1, "js", published=published, data__synthetic={"seed": 0})
    _write_run(tmp_path / "synth" / "r0", synth, 0.8, 0.9)
    table = build_table(load_runs([tmp_path / "synth"]))
    assert not table.show_published and table.rows[0].values["published.row"] == "full"
    assert "(paper)" not in to_markdown(table) and "Sounding Shapes" in table.caption


def test_trainer_run_keys_never_split_rows(tmp_path):
    from avs.tables import TRAINER_RUN_KEYS

    assert "trainer.device" in TRAINER_RUN_KEYS and "trainer.lr" not in TRAINER_RUN_KEYS
    for i, (device, lr) in enumerate([("cpu", 1e-4), ("cuda", 1e-4), ("cpu", 1e-3)]):
        cfg = _config("s4", i, "js", published=None)
        cfg["trainer"].update(device=device, lr=lr, log_every_steps=10 * (i + 1))
        _write_run(tmp_path / f"r{i}", cfg, 0.5, 0.6)
    assert varied_keys(load_runs([tmp_path])) == ["trainer.lr"]  # device / logging differ too, but say how, not what


# ----------------------------------------------------------------------------- --plot for any sweep
def _tables_script_main():
    import importlib.util

    spec = importlib.util.spec_from_file_location("tables_script", PROJECT_ROOT / "scripts" / "tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_sweep_plot_draws_every_run_mean_and_interval(tmp_path, monkeypatch):
    """A numeric sweep (trainer.lr x 3 values x 3 seeds, S4 and MS3): one dot per run, mean and 95% interval."""
    pytest.importorskip("matplotlib")
    from avs.tables import sweep_plot

    for i, (lr, subset, seed) in enumerate(
        (lr, subset, seed) for lr in (1e-4, 3e-4, 1e-3) for subset in ("s4", "ms3") for seed in (1, 2, 3)
    ):
        miou = 0.5 + 100 * lr + 0.01 * seed
        _write_run(tmp_path / "sweep" / str(i), _config(subset, seed, "js", published=None, trainer__lr=lr), miou, 0.6)
    drawn: list[tuple] = []
    real_panel = sweep_plot._panel

    def panel(ax, table, subset, metric, numeric):
        real_panel(ax, table, subset, metric, numeric)
        drawn.append((subset, numeric, [c.get_offsets().shape[0] for c in ax.collections if hasattr(c, "get_offsets")]))

    monkeypatch.setattr(sweep_plot, "_panel", panel)
    out = tmp_path / "img" / "sweep.png"
    assert _tables_script_main()([str(tmp_path / "sweep"), "--plot", str(out), "--out", str(tmp_path / "t")]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [d[0] for d in drawn] == ["s4", "ms3"] and all(d[1] for d in drawn)  # x = the lr values
    for _, _, sizes in drawn:
        assert sorted(sizes).count(3) == 3  # three seeds as three dots per lr
    table = build_table(load_runs([tmp_path / "sweep"]))
    assert table.keys == ["trainer.lr"] and [len(r.cells[("s4", "miou")].values) for r in table.rows] == [3, 3, 3]


def test_sweep_plot_of_a_categorical_key(sweep, tmp_path):
    pytest.importorskip("matplotlib")
    from avs.tables.sweep_plot import plot_sweep

    table = build_table(load_runs([sweep]), keys=["model.latent.divergence"])
    path = plot_sweep(table, tmp_path / "div.png", "fscore")
    assert path.is_file() and path.stat().st_size > 1000
