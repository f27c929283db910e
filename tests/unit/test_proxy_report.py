"""Proxy benchmark report: t quantiles, seed statistics, paired claims, targets, tables, plots and the CLI."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import yaml

from avs.engine.diagnostics import LATENT_KL_FILE, latent_kl_record
from avs.errors import ConfigError
from avs.tables import proxy, proxy_curves, proxy_report
from avs.tables.proxy import (
    check_targets,
    claim_differences,
    describe,
    final_kl,
    final_total_kl,
    load_protocol,
    missing_runs,
    t_cdf,
    t_quantile,
)
from avs.tables.proxy_curves import kl_curve, load_kl_curves
from avs.tables.proxy_plots import (
    PlotUnavailable,
    mean_band,
    plot_claims,
    plot_latent_kl,
    plot_methods,
    plot_val_curves,
)
from avs.tables.proxy_report import to_csvs, to_markdown, write_report
from avs.tables.runs import TableError

ROOT = Path(__file__).resolve().parents[2]
T975_DF4 = 2.7764451051977987  # Student t table values
T975_DF3 = 3.182446305284263

# test mIoU (%) per (subset, cell), seeds 1..5; F = mIoU + 10
TPAVI_S4 = [50.0, 51.0, 52.0, 53.0, 54.0]  # mean 52, sample var 2.5
ECMVAE_S4 = [a + d for a, d in zip(TPAVI_S4, [2, 2, 3, 4, 4])]  # differences: mean 3, sample std 1
NO_AUDIO_S4 = [a - d for a, d in zip(TPAVI_S4, [5, 6, 7, 8, 9])]  # differences: mean 7, sample var 2.5
TPAVI_MS3 = [30.0, 32.0, 34.0, 36.0, 38.0]  # mean 34, sample var 10
ECMVAE_MS3 = [a - d for a, d in zip(TPAVI_MS3, [1, -1, 2, -2, 0])]  # differences: mean 0
FB_MS3 = [33.0, 34.0, 35.0, 36.0, 37.0]
FB_KL = [0.5, 0.7, 0.9, 1.1, 1.3]  # final total KL per seed: mean 0.9
FB_AUROC = [0.6, 0.7, 0.8]  # seeds 1..3 only
FB_AUROC_ENTROPY = [0.55, 0.6, 0.65]  # the entropy baseline: mean 0.6, std 0.05
TPAVI_S4_SE = [0.010, 0.012, 0.014]  # clip-level SE of the mIoU (fraction), seeds 1..3; the other runs predate it

PROTOCOL = {
    "seeds": [1, 2, 3, 4, 5],
    "subsets": {"s4": ["data=synth_s4"], "ms3": ["data=synth_ms3"]},
    "base": ["experiment=proxy"],
    "cells": {
        "tpavi": {"label": "TPAVI", "overrides": ["model=tpavi"]},
        "ecmvae": {"label": "ECMVAE", "overrides": ["model=ecmvae"]},
        "tpavi_no_audio": {"label": "TPAVI without audio", "overrides": ["model.use_audio=false"], "subsets": ["s4"]},
        "ecmvae_fb": {"label": "ECMVAE, free bits", "overrides": ["model=ecmvae"], "subsets": ["ms3"]},
    },
    "methods": ["tpavi", "ecmvae"],
    "claims": [
        {"name": "ECMVAE vs TPAVI", "a": "ecmvae", "b": "tpavi"},
        {"name": "with vs without audio (TPAVI)", "a": "tpavi", "b": "tpavi_no_audio"},
    ],
    "targets": {"max_seed_std": 3.0, "min_total_kl": 1.0, "kl_cells": ["ecmvae_fb"]},
    "metric": "miou",
}


def write_run(
    run_dir: Path, subset: str, seed: int, miou: float, tested: bool = True, miou_se: float | None = None
) -> None:
    """A metrics.json shaped like the trainer's (config, data, seed, test/per_frame metrics in [0, 1])."""
    run_dir.mkdir(parents=True, exist_ok=True)
    record = {"config": {"data": {"subset": subset}, "seed": seed}, "data": {"subset": subset}, "seed": seed}
    if tested:
        record["test"] = {"per_frame": {"miou": miou / 100, "fscore": (miou + 10) / 100}}
        if miou_se is not None:
            record["test"]["per_frame"]["miou_se"] = miou_se
        record["history"] = [{"epoch": 2, "step": 4, "val": {"per_frame": {"miou": miou / 100}}}]
    (run_dir / "metrics.json").write_text(json.dumps(record))


def write_kl(run_dir: Path, total: float, with_total: bool = True) -> None:
    """Two validation lines as the trainer writes them; the last one's per-dimension KL sums to `total`, half
    of it on each code, with 3 active dimensions (the fourth is exactly at the 0.01 nats threshold)."""
    first = latent_kl_record({"s_v": [9.0], "s_a": [9.0], "frames": 20}, epoch=1, step=2, split="val")
    kl = {"s_v": [total / 4, total / 4], "s_a": [total / 2 - 0.01, 0.01], "frames": 20}
    last = latent_kl_record(kl, epoch=2, step=4, split="val")
    if not with_total:
        del last["total"]
    (run_dir / LATENT_KL_FILE).write_text(json.dumps(first) + "\n" + json.dumps(last) + "\n")


def make_tree(out: Path, protocol: dict | None = None, ceilings: dict | None = None) -> Path:
    """A protocol directory with the numbers above (all runs finished)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "protocol.yaml").write_text(yaml.safe_dump(protocol or PROTOCOL, sort_keys=False))
    ceilings = ceilings or {"s4": {"val": 50.0, "test": 51.5}, "ms3": {"val": 28.0, "test": 29.0}}
    (out / "ceilings.json").write_text(json.dumps(ceilings))
    cells = {
        ("s4", "tpavi"): TPAVI_S4,
        ("s4", "ecmvae"): ECMVAE_S4,
        ("s4", "tpavi_no_audio"): NO_AUDIO_S4,
        ("ms3", "tpavi"): TPAVI_MS3,
        ("ms3", "ecmvae"): ECMVAE_MS3,
        ("ms3", "ecmvae_fb"): FB_MS3,
    }
    for (subset, cell), values in cells.items():
        for seed, v in enumerate(values, start=1):
            se = TPAVI_S4_SE[seed - 1] if (subset, cell) == ("s4", "tpavi") and seed <= len(TPAVI_S4_SE) else None
            write_run(out / subset / cell / f"seed{seed}", subset, seed, v, miou_se=se)
    for seed, kl in enumerate(FB_KL, start=1):
        write_kl(out / "ms3" / "ecmvae_fb" / f"seed{seed}", kl, with_total=seed != 2)
    for seed, (auroc, entropy) in enumerate(zip(FB_AUROC, FB_AUROC_ENTROPY), start=1):
        run = out / "ms3" / "ecmvae_fb" / f"seed{seed}"
        record = {"auroc": auroc, "auroc_entropy": entropy, "num_samples": 20}
        (run / "uncertainty.json").write_text(json.dumps(record))
    return out


def by_target(checks, prefix: str, where: str):
    hits = [c for c in checks if c.target.startswith(prefix) and c.where == where]
    assert len(hits) == 1, checks
    return hits[0]


# ----------------------------------------------------------------------------- statistics
@pytest.mark.parametrize(
    ("df", "expected"), [(1, 12.7062047362), (2, 4.3026527297), (4, T975_DF4), (29, 2.0452296421), (1e6, 1.9599650)]
)
def test_t_quantile_matches_table_values(df, expected):
    assert t_quantile(0.975, df) == pytest.approx(expected, rel=1e-6)
    assert t_quantile(0.025, df) == pytest.approx(-expected, rel=1e-6)
    assert t_cdf(expected, df) == pytest.approx(0.975, abs=1e-7)


def test_t_cdf_is_the_cauchy_cdf_for_one_degree_of_freedom():
    for t in (-3.0, -0.5, 0.0, 0.7, 10.0):
        assert t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-12)


def test_describe_mean_std_interval_and_small_n():
    s = describe(TPAVI_S4)
    half = T975_DF4 * math.sqrt(2.5) / math.sqrt(5)
    assert (s.n, s.mean, s.min) == (5, 52.0, 50.0)
    assert s.std == pytest.approx(math.sqrt(2.5))
    assert (s.lo, s.hi) == (pytest.approx(52 - half), pytest.approx(52 + half))
    one = describe([7.0])
    assert (one.n, one.mean, one.std, one.lo, one.hi) == (1, 7.0, None, None, None)
    assert describe([]).mean is None


# ----------------------------------------------------------------------------- loading, claims, targets
def test_load_protocol_reads_metrics_kl_auroc_and_ceilings(tmp_path):
    protocol, results = load_protocol(make_tree(tmp_path / "bench"))
    assert protocol.ceilings.s4.test == 51.5
    assert sorted(results) == sorted(
        [("s4", "tpavi"), ("s4", "ecmvae"), ("s4", "tpavi_no_audio"), ("ms3", "tpavi"), ("ms3", "ecmvae")]
        + [("ms3", "ecmvae_fb")]
    )
    run = results[("s4", "tpavi")][3]
    assert run["miou"] == pytest.approx(52.0) and run["fscore"] == pytest.approx(62.0)
    assert run["kl"] is None and run["auroc"] is None
    fb = results[("ms3", "ecmvae_fb")]
    assert [fb[k]["kl"] for k in range(1, 6)] == pytest.approx(FB_KL)  # seed 2 summed from the per-dimension KL
    assert [fb[k]["auroc"] for k in range(1, 4)] == pytest.approx(FB_AUROC)
    assert fb[4]["auroc"] is None and fb[5]["auroc"] is None
    assert [fb[k]["auroc_entropy"] for k in range(1, 4)] == pytest.approx(FB_AUROC_ENTROPY)
    assert [fb[k]["active_dims"] for k in range(1, 6)] == [3.0] * 5
    assert [fb[k]["kl:s_v"] for k in range(1, 6)] == pytest.approx([v / 2 for v in FB_KL])
    assert results[("s4", "tpavi")][2]["miou_se"] == pytest.approx(1.2)  # in %, like the mIoU
    assert results[("s4", "tpavi")][4]["miou_se"] is None and run["auroc_entropy"] is None
    assert missing_runs(protocol, results) == []


def test_final_total_kl_uses_the_last_line(tmp_path):
    assert proxy.LATENT_KL_FILE == LATENT_KL_FILE
    write_kl(tmp_path, 2.5)
    assert final_total_kl(tmp_path / "latent_kl.jsonl") == pytest.approx(2.5)
    assert final_total_kl(tmp_path / "absent.jsonl") is None


def test_claim_differences_are_paired_over_common_seeds(tmp_path):
    protocol, results = load_protocol(make_tree(tmp_path / "bench"))
    claims = {(c.name, c.subset): c for c in claim_differences(protocol, results)}
    assert sorted(claims) == sorted(
        [("ECMVAE vs TPAVI", "s4"), ("ECMVAE vs TPAVI", "ms3"), ("with vs without audio (TPAVI)", "s4")]
    )
    c = claims[("ECMVAE vs TPAVI", "s4")]
    half = T975_DF4 * 1.0 / math.sqrt(5)
    assert (c.stats.n, c.stats.mean, c.verdict) == (5, pytest.approx(3.0), "holds")
    assert (c.stats.lo, c.stats.hi) == (pytest.approx(3 - half), pytest.approx(3 + half))
    assert claims[("ECMVAE vs TPAVI", "ms3")].verdict == "unresolved"
    assert claims[("ECMVAE vs TPAVI", "ms3")].stats.mean == pytest.approx(0.0)
    audio = claims[("with vs without audio (TPAVI)", "s4")]
    assert audio.stats.mean == pytest.approx(7.0) and audio.verdict == "holds"
    assert audio.seeds == [1, 2, 3, 4, 5] and audio.differences == pytest.approx([5, 6, 7, 8, 9])


def test_claim_differences_keep_the_seed_of_each_difference(tmp_path):
    out = make_tree(tmp_path / "bench")
    for seed in (2, 4):  # unfinished in one cell: those seeds are not paired
        (out / "s4" / "tpavi_no_audio" / f"seed{seed}" / "metrics.json").unlink()
    protocol, results = load_protocol(out)
    audio = next(c for c in claim_differences(protocol, results) if c.name.startswith("with vs without"))
    assert audio.seeds == [1, 3, 5] and audio.differences == pytest.approx([5, 7, 9])
    assert audio.stats.mean == pytest.approx(7.0) and audio.stats.n == 3


def test_partial_tree_counts_the_finished_seeds_and_says_what_is_missing(tmp_path):
    out = make_tree(tmp_path / "bench")
    (out / "s4" / "tpavi" / "seed3" / "metrics.json").unlink()
    write_run(out / "ms3" / "ecmvae" / "seed5", "ms3", 5, 0.0, tested=False)  # trained, never tested
    protocol, results = load_protocol(out)
    assert missing_runs(protocol, results) == [("s4", "tpavi", 3), ("ms3", "ecmvae", 5)]
    s = describe([v["miou"] for v in results[("s4", "tpavi")].values()])
    values = [50.0, 51.0, 53.0, 54.0]
    std = math.sqrt(sum((v - 52.0) ** 2 for v in values) / 3)
    assert (s.n, s.mean, s.std) == (4, pytest.approx(52.0), pytest.approx(std))
    assert s.hi == pytest.approx(52.0 + T975_DF3 * std / 2)
    claim = next(c for c in claim_differences(protocol, results) if c.subset == "s4" and c.b == "tpavi")
    assert claim.seeds == [1, 2, 4, 5]
    md = to_markdown(protocol, results)
    assert "Missing (2 runs" in md and "s4/tpavi seed 3;" in md and "ms3/ecmvae seed 5." in md
    from avs.tables.proxy_report import _missing_text

    gone = [("s4", "tpavi", 2), ("s4", "tpavi", 3), ("ms3", "avsbg", 1)]
    assert _missing_text(gone) == "s4/tpavi seeds 2, 3; ms3/avsbg seed 1"
    assert "| 4/5 |" in md
    assert "s4,4,5," in to_csvs(protocol, results)["methods"].split("tpavi,TPAVI,")[1]


def test_targets_are_measured_and_flip_when_the_numbers_change(tmp_path):
    protocol, results = load_protocol(make_tree(tmp_path / "a"))
    checks = check_targets(protocol, results)
    ceiling = by_target(checks, "every seed above", "tpavi / s4")
    assert ceiling.ok is False and "seeds 1, 2 not above" in ceiling.measured
    assert by_target(checks, "every seed above", "ecmvae / s4").ok is True
    assert by_target(checks, "seed std", "tpavi / s4").ok is True
    assert by_target(checks, "seed std", "tpavi / ms3").ok is False  # std sqrt(10) > 3
    assert by_target(checks, "audio claim", "tpavi / s4").ok is True
    assert [c.where for c in checks if c.target.startswith("audio")] == ["tpavi / s4"]  # no ecmvae_no_audio cell
    kl = by_target(checks, "mean total KL", "ecmvae_fb / ms3")
    assert kl.ok is False and kl.measured.startswith("0.900")

    out = make_tree(tmp_path / "b", ceilings={"s4": {"test": 49.0}, "ms3": {"test": 29.0}})
    for seed, v in enumerate(TPAVI_S4, start=1):  # without audio now better: the claim is reversed
        write_run(out / "s4" / "tpavi_no_audio" / f"seed{seed}", "s4", seed, v + seed + 4)
    for seed in range(1, 6):
        write_kl(out / "ms3" / "ecmvae_fb" / f"seed{seed}", 1.2)
    protocol, results = load_protocol(out)
    checks = check_targets(protocol, results)
    assert by_target(checks, "every seed above", "tpavi / s4").ok is True
    assert by_target(checks, "audio claim", "tpavi / s4").ok is False
    assert "reversed" in by_target(checks, "audio claim", "tpavi / s4").measured
    assert by_target(checks, "mean total KL", "ecmvae_fb / ms3").ok is True


def test_unknown_cell_in_a_claim_is_a_plain_config_error(tmp_path):
    bad = {**PROTOCOL, "claims": [{"name": "x", "a": "ecmvae", "b": "nope"}]}
    with pytest.raises(ConfigError, match=r"claims\[0\]\.b names cell 'nope'"):
        load_protocol(make_tree(tmp_path / "bench", protocol=bad))


# ----------------------------------------------------------------------------- rendering, plot, CLI
def test_markdown_and_csv_tables(tmp_path):
    protocol, results = load_protocol(make_tree(tmp_path / "bench"))
    md = to_markdown(protocol, results)
    half = T975_DF4 * math.sqrt(2.5) / math.sqrt(5)
    ci = f"[{52 - half:.2f}, {52 + half:.2f}]"
    assert f"| TPAVI | 52.00 ± {math.sqrt(2.5):.2f} | {ci} | 1.20 | 62.00 | 5 | 50.00 |" in md
    assert "| TPAVI without audio | " in md and md.index("| ECMVAE |") < md.index("| TPAVI without audio |")
    assert "| visual-only ceiling (test) | 51.50 |" in md
    assert f"| ECMVAE vs TPAVI | S4 | +3.00 [{3 - T975_DF4 / math.sqrt(5):+.2f}, " in md
    assert "| ECMVAE, free bits | MS3 | 0.900 ± " in md and "| 0.700 ± 0.100 | 0.600 ± 0.050 | 3 |" in md
    assert "| s_v 0.450 / s_a 0.450 | 3.0 | 5 |" in md
    assert "Missing" not in md
    csvs = to_csvs(protocol, results)
    assert csvs["claims"].splitlines()[0] == "claim,a,b,subset,n,diff_mean,diff_std,ci_lo,ci_hi,verdict"
    assert "ECMVAE vs TPAVI,ecmvae,tpavi,s4,5,3.0,1.0," in csvs["claims"]
    paths = write_report(protocol, results, tmp_path / "report")
    assert sorted(p.name for p in paths.values()) == sorted(
        ["proxy_report.md", "proxy_methods.csv", "proxy_claims.csv", "proxy_latent.csv", "proxy_targets.csv"]
        + ["proxy_listening.csv"]
    )
    assert paths["md"].read_text() == md


def test_plot_is_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    protocol, results = load_protocol(make_tree(tmp_path / "bench"))
    path = plot_methods(results, protocol, tmp_path / "images" / "methods.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_claims_plot_is_a_png_and_needs_a_paired_seed(tmp_path):
    pytest.importorskip("matplotlib")
    out = make_tree(tmp_path / "bench")
    protocol, results = load_protocol(out)
    path = plot_claims(results, protocol, tmp_path / "images" / "claims.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for run in (out / "s4" / "tpavi").iterdir():  # b of every claim on S4, and a of the MS3 one is gone too
        (run / "metrics.json").unlink()
    for run in (out / "ms3" / "tpavi").iterdir():
        (run / "metrics.json").unlink()
    protocol, results = load_protocol(out)
    with pytest.raises(TableError, match="no claim has a seed finished in both of its cells"):
        plot_claims(results, protocol, tmp_path / "none.png")


def test_plot_without_matplotlib_names_the_extra(tmp_path, monkeypatch):
    protocol, results = load_protocol(make_tree(tmp_path / "bench"))
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import fails as if not installed
    with pytest.raises(PlotUnavailable, match=r"pip install -e \.\[plot\]"):
        plot_methods(results, protocol, tmp_path / "p.png")


def _tables_main():
    spec = importlib.util.spec_from_file_location("tables_script", ROOT / "scripts" / "tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_cli_proxy_mode_writes_tables_and_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = make_tree(tmp_path / "bench")
    plot = tmp_path / "img" / "proxy.png"
    assert _tables_main()([str(out), "--proxy", "--plot", str(plot), "--out", str(tmp_path / "rep")]) == 0
    printed = capsys.readouterr().out
    assert "### Claims" in printed and "### Targets" in printed
    assert (tmp_path / "rep" / "proxy_report.md").is_file() and plot.is_file()
    assert not (out / "proxy_report.md").exists()


def test_cli_proxy_mode_without_protocol_is_a_plain_error(tmp_path, capsys):
    assert _tables_main()([str(tmp_path), "--proxy"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "protocol.yaml" in err[0] and str(tmp_path) in err[0]


# ----------------------------------------------------------------------------- SE, latent KL, KL plot
def test_se_column_is_the_seed_mean_of_one_runs_se_and_a_dash_without_it(tmp_path):
    protocol, results = load_protocol(make_tree(tmp_path / "bench"))
    md = to_markdown(protocol, results)
    assert "| S4 SE (one run) |" in md
    ecmvae = next(line for line in md.splitlines() if line.startswith("| ECMVAE |"))
    assert ecmvae.split(" | ")[3] == "–"  # S4 SE: no ECMVAE run has miou_se
    methods = to_csvs(protocol, results)["methods"].splitlines()
    header = methods[0].split(",")
    assert header[-2:] == ["miou_se_mean", "missing_seeds"]
    rows = {(r[0], r[2]): r for r in (line.split(",") for line in methods[1:])}
    assert float(rows[("tpavi", "s4")][header.index("miou_se_mean")]) == pytest.approx(1.2)
    assert rows[("ecmvae", "s4")][header.index("miou_se_mean")] == ""


def test_final_kl_counts_active_dimensions_over_codes(tmp_path):
    early = latent_kl_record({"s_v": [2.0, 2.0], "c": [3.0], "frames": 8}, epoch=1, step=10, split="val")
    kl = {"s_v": [0.5, 0.011, 0.0], "s_a": [0.009, 0.02], "c": [0.01], "frames": 8}
    late = latent_kl_record(kl, epoch=2, step=20, split="val")
    path = tmp_path / LATENT_KL_FILE
    path.write_text(json.dumps(early) + "\n\n" + json.dumps(late) + "\n")
    final = final_kl(path)
    assert final.active == 3  # 0.5, 0.011 and 0.02 exceed 0.01 nats; 0.01 itself does not
    assert final.codes == pytest.approx({"s_v": 0.511, "s_a": 0.029, "c": 0.01})
    assert final.total == pytest.approx(0.55)
    assert final_kl(path, threshold=0.001).active == 5
    curve = {
        "s_v": [(10, 4.0), (20, pytest.approx(0.511))],
        "c": [(10, 3.0), (20, 0.01)],
        "s_a": [(20, pytest.approx(0.029))],
    }
    assert kl_curve(path) == curve
    old = {"epoch": 1, "step": 5, "total": 1.5}  # a line with only the grand total: no per-code values
    path.write_text(json.dumps(old) + "\n")
    assert final_kl(path) == (1.5, {}, None) and kl_curve(path) == {}
    path.write_text("{not json\n")
    with pytest.raises(TableError, match=r"latent_kl\.jsonl: line 1 is not JSON"):
        final_kl(path)


def test_latent_table_has_entropy_auroc_active_dims_and_per_code_kl(tmp_path):
    out = make_tree(tmp_path / "bench")
    for seed, dims in enumerate([[0.3, 0.2], [0.3, 0.005]], start=1):  # 4 and 3 active dimensions, 3 in the rest
        kl = {"s_v": dims, "s_a": [0.1], "c": [0.4], "frames": 8}
        line = latent_kl_record(kl, epoch=3, step=6, split="val")
        (out / "ms3" / "ecmvae_fb" / f"seed{seed}" / LATENT_KL_FILE).write_text(json.dumps(line) + "\n")
    protocol, results = load_protocol(out)
    md = to_markdown(protocol, results)
    row = next(line for line in md.splitlines() if line.startswith("| ECMVAE, free bits | MS3 |"))
    s_v = (0.5 + 0.305 + sum(v / 2 for v in FB_KL[2:])) / 5
    s_a = (0.1 + 0.1 + sum(v / 2 for v in FB_KL[2:])) / 5
    assert f"| s_v {s_v:.3f} / s_a {s_a:.3f} / c 0.400 | 3.2 | 5 |" in row  # c only in seeds 1, 2
    latent = to_csvs(protocol, results)["latent"].splitlines()
    header = latent[0].split(",")
    assert header[8:] == ["auroc_entropy_mean", "auroc_entropy_std", "active_dims_mean"] + [
        f"kl_{c}_mean" for c in ("s_v", "s_a", "c")
    ]
    values = dict(zip(header, latent[1].split(",")))
    assert float(values["active_dims_mean"]) == pytest.approx(3.2)
    assert float(values["auroc_entropy_mean"]) == pytest.approx(0.6)
    assert float(values["kl_c_mean"]) == pytest.approx(0.4)


def test_mean_band_over_seeds_that_reached_each_step():
    runs = {1: {"s_v": [(2, 1.0), (4, 3.0)]}, 2: {"s_v": [(2, 2.0)], "c": [(2, 0.5)]}, 3: {"s_v": [(2, 6.0)]}}
    assert mean_band(runs, "s_v") == [(2, 3.0, 1.0, 6.0), (4, 3.0, 3.0, 3.0)]
    assert mean_band(runs, "s_a") == []


def test_latent_kl_plot_is_a_png_and_needs_curves(tmp_path):
    pytest.importorskip("matplotlib")
    out = make_tree(tmp_path / "bench")
    collapsed = latent_kl_record({"s_v": [0.0], "s_a": [50.0], "frames": 8}, epoch=3, step=6, split="val")
    with (out / "ms3" / "ecmvae_fb" / "seed1" / LATENT_KL_FILE).open("a") as f:
        f.write(json.dumps(collapsed) + "\n")  # 0 and decades apart: the symlog axis
    protocol, results = load_protocol(out)
    curves = load_kl_curves(out, results)
    assert sorted(curves) == [("ms3", "ecmvae_fb")] and sorted(curves[("ms3", "ecmvae_fb")]) == [1, 2, 3, 4, 5]
    path = plot_latent_kl(curves, protocol, tmp_path / "img" / "kl.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(TableError, match="no finished run has a latent_kl.jsonl"):
        plot_latent_kl({}, protocol, tmp_path / "none.png")


@pytest.mark.parametrize("flag", ["--plot-claims", "--plot-kl", "--plot-curves"])
def test_cli_plot_flags_write_a_png(tmp_path, capsys, flag):
    pytest.importorskip("matplotlib")
    out = make_tree(tmp_path / "bench")
    plot = tmp_path / "img" / "plot.png"
    assert _tables_main()([str(out), "--proxy", flag, str(plot), "--out", str(tmp_path / "rep")]) == 0
    assert f"wrote {plot}" in capsys.readouterr().out
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("flag", ["--plot-claims", "--plot-kl", "--plot-curves"])
def test_cli_plot_flag_without_proxy_is_a_plain_error(tmp_path, capsys, flag):
    assert _tables_main()([str(tmp_path), flag, str(tmp_path / "plot.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {flag} draws a proxy benchmark plot; use it with --proxy"]
    assert not (tmp_path / "plot.png").exists()


# ----------------------------------------------------------------------------- cost (runs.jsonl)
def write_runs_log(out: Path, lines: list[dict]) -> None:
    (out / "runs.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))


def test_run_times_take_the_last_good_training_plus_later_follow_ups(tmp_path):
    out = make_tree(tmp_path / "bench")
    write_runs_log(
        out,
        [
            {"run": "s4/tpavi/seed1", "exit_code": 0, "seconds": 500.0},  # the first runner wrote no task
            {"run": "s4/tpavi/seed2", "task": "train", "exit_code": 1, "seconds": 30.0},  # failed: not a time
            {"run": "s4/tpavi/seed2", "task": "train", "exit_code": 0, "seconds": 300.0, "workers": 2},
            {"run": "s4/tpavi/seed1", "task": "train", "exit_code": 0, "seconds": 200.0},  # made again: replaces
            {"run": "ms3/ecmvae/seed1", "task": "train", "exit_code": 0, "seconds": 600.0},
            {"run": "ms3/ecmvae/seed1", "task": "follow-up", "exit_code": 0, "seconds": 40.0},
            {"run": "ms3/ecmvae/seed2", "task": "follow-up", "exit_code": 0, "seconds": 40.0},  # no training timed
        ],
    )
    times, workers = proxy.run_times(out)
    assert times == {"s4/tpavi/seed1": 200.0, "s4/tpavi/seed2": 300.0, "ms3/ecmvae/seed1": 640.0}
    assert workers == 2
    protocol, _ = load_protocol(out)
    costs = proxy.load_costs(out, protocol)
    assert costs.seconds == {("s4", "tpavi"): [200.0, 300.0], ("ms3", "ecmvae"): [640.0]}
    # each run of a timed cell costs the cell's fastest run; the other cells' runs are counted as untimed
    est = proxy.cost_estimate(protocol, costs, ["tpavi", "ecmvae"])
    assert est == proxy.CostEstimate(seconds=5 * 200.0 + 5 * 640.0, runs=10, untimed=10)


def test_cost_table_and_estimate_in_the_report(tmp_path):
    out = make_tree(tmp_path / "bench")
    lines = [{"run": f"s4/tpavi/seed{k}", "task": "train", "exit_code": 0, "seconds": 100.0 * k} for k in (1, 2, 3)]
    write_runs_log(out, [{**x, "workers": 2} for x in lines])
    protocol, results = load_protocol(out)
    costs = proxy.load_costs(out, protocol)
    md = to_markdown(protocol, results, costs)
    assert "### Cost" in md and "| TPAVI | S4 | 3/5 | 200 | 100–300 |" in md
    assert "| ECMVAE | MS3 | 0/5 | – | – |" in md
    # methods: 5 TPAVI S4 runs at 100 s = 500 s; in 2 slots they end at 300 s (2 + 2 + 1), not at 250;
    # 15 runs of untimed cells not counted
    assert "the methods table (5 runs) 0 h 08 min one after another, 0 h 05 min with 2 side by side" in md
    assert "not counting 15 runs of untimed cells" in md
    assert "### Cost" not in to_markdown(protocol, results)  # without runs.jsonl data asked for: no section
    csv_text = to_csvs(protocol, results, costs)["costs"]
    assert csv_text.splitlines()[0] == "cell,label,subset,timed,expected,median_s,min_s,max_s"
    assert "tpavi,TPAVI,s4,3,5,200.0,100.0,300.0" in csv_text
    paths = write_report(protocol, results, tmp_path / "rep", costs)
    assert paths["costs"].read_text() == csv_text


def test_costs_from_a_results_file_read_the_lines_of_its_version(tmp_path):
    """The tracked results file carries each run's wall seconds and workers, so the cost table needs no out dir."""
    out = make_tree(tmp_path / "bench")
    protocol, _ = load_protocol(out)
    version = protocol.get("version")
    rows = [
        {"protocol_version": version, "subset": "s4", "cell": "tpavi", "seed": 1, "seconds": 210.0, "workers": 2},
        {"protocol_version": version, "subset": "s4", "cell": "tpavi", "seed": 2, "seconds": 190.0, "workers": 2},
        {"protocol_version": version, "subset": "ms3", "cell": "tpavi", "seed": 1},  # recorded before seconds were
        {"protocol_version": "other", "subset": "ms3", "cell": "ecmvae", "seed": 1, "seconds": 9.0, "workers": 1},
    ]
    path = tmp_path / "proxy_runs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    costs = proxy.load_costs(path, protocol)
    assert costs.seconds == {("s4", "tpavi"): [210.0, 190.0]} and costs.workers == 2


def test_a_broken_runs_log_line_is_named(tmp_path):
    out = make_tree(tmp_path / "bench")
    (out / "runs.jsonl").write_text('{"run": "s4/tpavi/seed1", "exit_code": 0, "seconds": 1}\n{"run": "x"}\n')
    with pytest.raises(TableError, match=r"runs.jsonl: line 2 needs a `run` name and its `seconds`"):
        proxy.run_times(out)
    (out / "runs.jsonl").write_text("not json\n")
    with pytest.raises(TableError, match="line 1 is not JSON"):
        proxy.run_times(out)


def _with_history(run_dir: Path, points: list[tuple[int, float]]) -> None:
    """Add a `history` of validations (val mIoU in [0, 1]) to a run's metrics.json, as the trainer writes it."""
    record = json.loads((run_dir / "metrics.json").read_text())
    record["history"] = [{"epoch": i, "step": s, "val": {"per_frame": {"miou": v}}} for i, (s, v) in enumerate(points)]
    (run_dir / "metrics.json").write_text(json.dumps(record))


def test_curves_from_the_results_lines_are_the_run_dirs_curves(tmp_path, monkeypatch):
    """The runner's `curves` (val mIoU and KL per code at each validation) let the curve plots be drawn from the
    tracked results file alone: the same curves as read from the run dirs, to the lines' rounding."""
    pytest.importorskip("matplotlib")
    from avs.proxy.results import run_row, update_rows, write_protocol_snapshot

    out = make_tree(tmp_path / "bench")
    for seed in (1, 2, 3):
        _with_history(out / "s4" / "tpavi" / f"seed{seed}", [(2, 0.1 * seed), (4, 0.2 + 0.01 * seed)])
        _with_history(out / "s4" / "tpavi_no_audio" / f"seed{seed}", [(2, 0.05), (4, 0.1234567)])
    protocol, results = load_protocol(out)
    protocol.version = version = 7
    path = tmp_path / "results" / "proxy_runs.jsonl"
    write_protocol_snapshot(path, protocol, {"s4": {"test": 51.5}, "ms3": {"test": 29.0}})
    rows = []
    for (subset, cell), runs in results.items():
        for seed in runs:
            head = {"protocol_version": version, "subset": subset, "cell": cell, "seed": seed}
            rows.append(run_row(out / subset / cell / f"seed{seed}", head, None))
    update_rows(path, rows)
    line = next(r for r in rows if (r["subset"], r["cell"], r["seed"]) == ("s4", "tpavi_no_audio", 1))
    assert line["curves"] == {"val_miou": [[2, 5.0], [4, 12.3457]], "kl": {}}
    _, from_file = load_protocol(path)
    for kind in ("val", "kl"):
        a, b = proxy_curves.load_curves(out, results, kind), proxy_curves.load_curves(path, from_file, kind, version)
        assert a and sorted(a) == sorted(b)
        for key in a:
            for seed, curve in a[key].items():
                assert b[key][seed].keys() == curve.keys()
                for name, points in curve.items():
                    assert [s for s, _ in b[key][seed][name]] == [s for s, _ in points]
                    assert [v for _, v in b[key][seed][name]] == pytest.approx([v for _, v in points], abs=1e-4)
    val = proxy_curves.load_curves(path, from_file, "val", version)
    assert sorted(val) == sorted(results)  # every run of make_tree has a history
    assert val[("s4", "tpavi")][2][proxy_curves.VAL_CURVE] == [(2, 20.0), (4, 22.0)]
    from matplotlib.axes import Axes

    drawn_at: list[float] = []
    axhline = Axes.axhline

    def record(ax, y=0, *args, **kwargs):
        drawn_at.append(y)
        return axhline(ax, y, *args, **kwargs)

    monkeypatch.setattr(Axes, "axhline", record)
    png = plot_val_curves(val, protocol, tmp_path / "img" / "val.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(drawn_at) == [28.0, 50.0]  # the val ceilings (make_tree), not the test ones: the curves are val
    with pytest.raises(TableError, match="no finished run has a val curve"):
        plot_val_curves({}, protocol, tmp_path / "none.png")


def test_the_cost_section_lists_the_measured_sittings_of_its_version(tmp_path):
    """proxy_sittings.jsonl beside the results file: each sitting of the report's version with its wall time,
    and one that made exactly the methods is named so."""
    out = make_tree(tmp_path / "bench")
    protocol, _ = load_protocol(out)
    version = protocol.get("version")
    path = tmp_path / "proxy_runs.jsonl"
    path.write_text(json.dumps({"protocol_version": version, "subset": "s4", "cell": "tpavi", "seed": 1}) + "\n")
    base = {"workers": 2, "threads": 1, "simd": "avx2", "failed": 0, "commit": "abcdef0123"}
    sittings = [
        {
            **base,
            "protocol_version": version,
            "start": "2026-12-04T15:58:18",
            "seconds": 7175.4,
            "made": 40,
            "checks": 40,
            "selection": {"only": list(reversed(protocol.methods)), "only_seeds": []},
        },
        {
            **base,
            "protocol_version": version,
            "start": "2026-12-05T09:00:00",
            "seconds": 61.0,
            "made": 2,
            "checks": 0,
            "selection": {"only": [], "only_seeds": [2]},
        },
        {**base, "protocol_version": "other", "start": "2026-12-01T00:00:00", "seconds": 5.0, "made": 1},
    ]
    (tmp_path / "proxy_sittings.jsonl").write_text("".join(json.dumps(x) + "\n" for x in sittings))
    costs = proxy.load_costs(path, protocol)
    assert [x["start"] for x in costs.sittings] == ["2026-12-04T15:58:18", "2026-12-05T09:00:00"]
    text = "\n".join(proxy_report._cost_markdown(protocol, costs))
    methods = ",".join(reversed(protocol.methods))
    assert f"| 2026-12-04T15:58:18 | abcdef0 | only=[{methods}] (the methods table) | 40 (40 checks) | 0 |" in text
    assert "| 2 × 1 (avx2) | 1 h 59 min 35 s |" in text
    assert "| only_seeds=[2] | 2 | 0 | 2 × 1 (avx2) | 0 h 01 min 01 s |" in text and "2026-12-01" not in text
