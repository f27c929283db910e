"""The proxy docs say only what the tracked results say: every result number in docs/reproducing.md's
sections on protocol versions 4 and 5 is a number of docs/results/ (a results line, a difference the docs name
from two of them, a rerun's numbers in proxy_reproductions.jsonl, a ceiling of the protocol snapshot, or a
number of the report rebuilt from the file)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from avs.proxy.results import numbers, read_rows

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "docs" / "results"
# (section title, protocol version, that version's report): version 4's report is docs/results/'s own
SECTIONS = [
    ("### Protocol version 4", 4, RESULTS / "proxy_report.md"),
    ("### Protocol version 5", 5, RESULTS / "v5" / "proxy_report.md"),
]
NUMBER = re.compile(r"(?<![\w.])-?\d+\.\d+(?![\w])")
# protocol constants a sentence names (the decision threshold), not results
CONSTANTS = {"0.5"}
READINGS = ("miou_05", "miou_val_threshold", "fscore")


def section(text: str, title: str) -> str:
    start = text.index(title)
    end = text.find("\n### ", start + 1)
    return text[start : end if end >= 0 else len(text)]


def _values(row: dict) -> Iterator[float]:
    for _, value in numbers(row):
        if isinstance(value, (int, float)):
            yield float(value)
        elif isinstance(value, list):  # a curve: [[step, value], ...]
            yield from (float(v) for _, v in value)
    if isinstance(row.get("seconds"), (int, float)):
        yield float(row["seconds"])


def _differences(rows: list[dict]) -> Iterator[float]:
    """With audio minus shuffled audio (same checkpoint), and minus the no-audio cell (same subset and seed)."""
    by_key = {(r["subset"], r["cell"], r["seed"]): r for r in rows}
    for (subset, cell, seed), row in by_key.items():
        listening = row.get("listening") or {}
        test, shuffled = listening.get("test") or {}, listening.get("test_shuffled_audio") or {}
        other = (by_key.get((subset, f"{cell}_no_audio", seed)) or {}).get("listening") or {}
        for reading in READINGS:
            if test.get(reading) is not None and shuffled.get(reading) is not None:
                yield test[reading] - shuffled[reading]
            if test.get(reading) is not None and (other.get("test") or {}).get(reading) is not None:
                yield test[reading] - other["test"][reading]


def _reproduced(path: Path, version: int) -> Iterator[float]:
    """The numbers a rerun of a recorded run gave (proxy_reproductions.jsonl: test mIoU, the numbers that
    differed), recorded and now."""
    import json

    lines = [json.loads(x) for x in path.read_text().splitlines()] if path.is_file() else []
    for line in (x for x in lines if x.get("protocol_version") == version):
        pairs = [line.get("test_miou") or [], *(line.get("differing") or {}).values()]
        yield from (float(v) for pair in pairs for v in pair if isinstance(v, (int, float)))


def backed_numbers(results: Path, version: int, report: Path | None = None) -> set[str]:
    """Every number the docs may cite for protocol `version`, as written with 1 or 2 decimals."""
    rows = [r for r in read_rows(results) if r.get("protocol_version") == version]
    values = [*(v for r in rows for v in _values(r)), *_differences(rows)]
    values += list(_reproduced(results.parent / "proxy_reproductions.jsonl", version))
    snapshot = OmegaConf.to_container(OmegaConf.load(results.parent / f"proxy_protocol_v{version}.yaml"))
    values += [float(v) for split in (snapshot.get("ceilings") or {}).values() for v in split.values()]
    out = {f"{v:.{d}f}" for v in values for d in (1, 2)} | {f"{abs(v):.{d}f}" for v in values for d in (1, 2)}
    report_numbers = set(NUMBER.findall((report or results.parent / "proxy_report.md").read_text()))
    return {n.lstrip("-") for n in out | report_numbers}  # a sign is compared apart from the number


@pytest.mark.parametrize(("title", "version", "report"), SECTIONS, ids=[f"v{v}" for _, v, _ in SECTIONS])
def test_every_result_number_of_a_version_section_is_in_the_results(title, version, report):
    text = section((ROOT / "docs" / "reproducing.md").read_text(), title)
    backed = backed_numbers(RESULTS / "proxy_runs.jsonl", version, report) | CONSTANTS
    unbacked = sorted({n for n in NUMBER.findall(text) if n.lstrip("-") not in backed}, key=float)
    assert not unbacked, f"numbers in docs/reproducing.md, {title!r}, that docs/results/ does not give: {unbacked}"


def test_the_check_finds_a_number_the_results_do_not_give(tmp_path):
    import json

    row = {"protocol_version": 1, "subset": "s4", "cell": "a", "seed": 1, "test": {"miou": 63.0321}}
    (tmp_path / "proxy_runs.jsonl").write_text(json.dumps(row) + "\n")
    (tmp_path / "proxy_protocol_v1.yaml").write_text("ceilings: {s4: {test: 38.75}}\n")
    (tmp_path / "proxy_report.md").write_text("| a | 2.5 h |\n")
    backed = backed_numbers(tmp_path / "proxy_runs.jsonl", 1)
    assert {"63.03", "63.0", "38.75", "2.5"} <= backed and "63.04" not in backed
    rerun = {"protocol_version": 1, "test_miou": [63.0321, 59.6055], "differing": {"val.miou": [49.0129, 54.684]}}
    other = {"protocol_version": 2, "test_miou": [1.25, 7.75], "differing": {}}
    (tmp_path / "proxy_reproductions.jsonl").write_text(json.dumps(rerun) + "\n" + json.dumps(other) + "\n")
    backed = backed_numbers(tmp_path / "proxy_runs.jsonl", 1)
    assert {"59.61", "49.01", "54.68"} <= backed and "7.75" not in backed  # a rerun's numbers, of this version only


def test_the_ms3_step0_diagnostic_table_is_what_its_csv_and_the_results_give():
    """docs/reproducing.md's step-0 diagnostic of version 5: each paired difference of its table is
    recomputed from docs/results/v5/ms3_step0.csv (step 0) and the version-5 results lines (later steps)."""
    import csv

    from avs.tables.proxy import describe

    title = "### Protocol version 5: where the MS3 differences form"
    text = section((ROOT / "docs" / "reproducing.md").read_text(), title)
    step0 = {
        (r["cell"], int(r["seed"])): float(r["miou"]) for r in csv.DictReader(open(RESULTS / "v5" / "ms3_step0.csv"))
    }
    lines = {
        (r["cell"], r["seed"]): r
        for r in read_rows(RESULTS / "proxy_runs.jsonl")
        if r.get("protocol_version") == 5 and r["subset"] == "ms3"
    }
    names = {"TPAVI": "tpavi", "ECMVAE": "ecmvae", "AVS-BG": "avsbg", "ECMVAE + AVS-BG": "ecmvae_bg"}
    readings = [
        lambda c, k: step0[(c, k)],
        lambda c, k: dict(lines[(c, k)]["curves"]["val_miou"])[80],
        lambda c, k: dict(lines[(c, k)]["curves"]["val_miou"])[800],
        lambda c, k: lines[(c, k)]["test"]["miou"],
    ]
    rows = [r for r in text.splitlines() if r.startswith("| ") and " − " in r.split("|")[1]]
    assert len(rows) == 4
    for row in rows:
        pair, *cells = [x.strip() for x in row.strip("|").split("|")]
        a, b = (names[x] for x in pair.split(" − "))
        for read, cell in zip(readings, cells):
            d = describe([read(a, k) - read(b, k) for k in range(1, 6)])
            assert cell == f"{d.mean:+.2f} [{d.lo:+.2f}, {d.hi:+.2f}]", (pair, cell)
    for cell in ("ecmvae_bg", "avsbg"):
        s = describe([step0[(cell, k)] for k in range(1, 6)])
        assert f"{s.mean:.2f} ±" in text and f"{s.std:.2f}" in text


def _cost(line: dict) -> float:
    """What shuffling the test audio costs a run of a pilot CSV (test mIoU minus the shuffled reading)."""
    return float(line["test_miou"]) - float(line["shuffled_test_miou"])


def _assert_backed(text: str, title: str, backed: set[str]) -> None:
    """Every decimal number of a section is in `backed`, a number of version 5's results, or a constant."""
    backed = backed | backed_numbers(RESULTS / "proxy_runs.jsonl", 5, RESULTS / "v5" / "proxy_report.md") | CONSTANTS
    unbacked = sorted({n for n in NUMBER.findall(text) if n.lstrip("-") not in backed}, key=float)
    assert not unbacked, f"numbers in {title!r} that docs/results/ does not give: {unbacked}"


def test_the_seed_spread_pilot_section_says_only_what_its_csv_gives():
    """docs/reproducing.md's pilots toward a version 6: every pilot row of its table (per-seed test mIoU, mean,
    seed std, the range of what shuffling costs) is recomputed from docs/results/seed_spread_pilot.csv, and
    every other decimal number of the section is a number of that CSV, a difference of two of its lines, or a
    number of version 5's results."""
    import csv
    import statistics

    title = "### ECMVAE's S4 spread under other task sizes and schedules"
    text = section((ROOT / "docs" / "reproducing.md").read_text(), title)
    lines = list(csv.DictReader(open(RESULTS / "seed_spread_pilot.csv")))
    by_pilot: dict[str, list[dict]] = {}
    for line in lines:
        by_pilot.setdefault(line["pilot"], []).append(line)
    table = [r for r in text.splitlines() if r.startswith("| ") and r.count("|") == 8][2:]  # below the header
    checked = 0
    for row in table:
        label, samples, per_seed, mean, std, costs, _ = [x.strip() for x in row.strip("|").split("|")]
        if "version 5" in label:
            continue  # the protocol's own runs: checked by the version 5 test
        seeds = [float(x) for x in per_seed.split(" / ")]
        matches = [
            p
            for p, ls in by_pilot.items()
            if [round(float(x["test_miou"]), 2) for x in ls] == [round(s, 2) for s in seeds]
        ]
        assert len(matches) == 1, (label, per_seed)
        group = by_pilot[matches[0]]
        cost = [_cost(x) for x in group]
        assert costs == f"{min(cost):.2f} to {max(cost):.2f}", (label, costs)
        if len(seeds) > 2:
            t = [float(x["test_miou"]) for x in group]
            assert (mean, std) == (f"{statistics.mean(t):.2f}", f"{statistics.stdev(t):.2f}"), label
        checked += 1
    assert checked == len(by_pilot) - 1  # every S4 pilot has a row; the MS3 pilot is told in the text
    values = [float(x[k]) for x in lines for k in ("test_miou", "val_miou", "shuffled_test_miou")]
    values += [float(a["test_miou"]) - float(b["test_miou"]) for a in lines for b in lines if a["seed"] == b["seed"]]
    values += [_cost(x) for x in lines]
    for ls in by_pilot.values():
        t = [float(x["test_miou"]) for x in ls]
        values += [statistics.mean(t), statistics.stdev(t), *(statistics.mean(t) - v for v in t)] if len(t) > 2 else []
    _assert_backed(text, title, {f"{abs(v):.2f}" for v in values})


def _two_way(grid: dict[tuple[int, int], float]) -> dict[str, tuple[float, float, float]]:
    """A two-way split of a full n x n grid without replication: each factor's share of the sum of squares,
    its F against the rest (the interaction) and the F test's p value."""
    from avs.tables.proxy import betainc

    keys = sorted({k[0] for k in grid})
    n, grand = len(keys), sum(grid.values()) / len(grid)
    total = sum((v - grand) ** 2 for v in grid.values())
    means = {
        "rows": [sum(grid[r, c] for c in keys) / n for r in keys],
        "columns": [sum(grid[r, c] for r in keys) / n for c in keys],
    }
    ss = {k: n * sum((m - grand) ** 2 for m in ms) for k, ms in means.items()}
    rest_df, df = (n - 1) ** 2, n - 1
    rest = (total - sum(ss.values())) / rest_df
    out = {}
    for k, s in ss.items():
        f = (s / df) / rest
        out[k] = (s / total, f, betainc(rest_df / 2, df / 2, rest_df / (rest_df + df * f)))
    out["rest"] = ((total - sum(ss.values())) / total, float("nan"), float("nan"))
    return out


def test_two_way_split_of_a_grid():
    rows_only = {(r, c): 10.0 * r + 0.1 * ((r * c) % 3) for r in range(1, 5) for c in range(1, 5)}
    split = _two_way(rows_only)
    assert split["rows"][0] > 0.99 and split["rows"][2] < 1e-6 and split["columns"][0] < 0.01
    assert abs(sum(s[0] for s in split.values()) - 1.0) < 1e-12


def test_the_seed_split_section_is_what_its_csv_and_the_results_give():
    """docs/reproducing.md's crossing of initial weights and draws: the diagonal lines of
    docs/results/seed_split.csv are version 5's recorded runs; the table's cells, row, column and grand means
    are the CSV's; the two-way split, the correlation and every other decimal number of the section are
    recomputed from the CSV (or are version 5's, or the pilots' 1600-step std)."""
    import csv
    import statistics

    title = "### What sets an ECMVAE S4 run's climb"
    text = section((ROOT / "docs" / "reproducing.md").read_text(), title)
    lines = list(csv.DictReader(open(RESULTS / "seed_split.csv")))
    recorded = {
        r["seed"]: r["listening"]
        for r in read_rows(RESULTS / "proxy_runs.jsonl")
        if r.get("protocol_version") == 5 and r["subset"] == "s4" and r["cell"] == "ecmvae"
    }
    for line in (x for x in lines if x["source"] == "version 5"):
        assert line["seed"] == line["init_seed"]
        rec = recorded[int(line["seed"])]
        assert float(line["test_miou"]) == rec["test"]["miou_05"] and float(line["val_miou"]) == rec["val"]["miou_05"]
        assert float(line["shuffled_test_miou"]) == rec["test_shuffled_audio"]["miou_05"]
    grid = {(int(x["seed"]), int(x["init_seed"])): float(x["test_miou"]) for x in lines}
    seeds = sorted({k[0] for k in grid})
    assert len(grid) == len(lines) == len(seeds) ** 2  # a full grid, one line per pair
    table = {r.split("|")[1].strip(): r for r in text.splitlines() if r.startswith("| seed ") or r.startswith("| mean")}
    for s in seeds:
        cells = [x.strip().strip("*") for x in table[f"seed {s}"].strip("|").split("|")[1:]]
        want = [grid[s, i] for i in seeds]
        assert cells == [f"{v:.2f}" for v in [*want, statistics.mean(want)]], s
    means = [x.strip() for x in table["mean"].strip("|").split("|")[1:]]
    want = [statistics.mean(grid[s, i] for s in seeds) for i in seeds] + [statistics.mean(grid.values())]
    assert means == [f"{v:.2f}" for v in want]
    split = _two_way(grid)
    flat = " ".join(text.split())  # the phrases below may wrap
    for key, label in (("columns", "the initial weights"), ("rows", "the run's own draws")):
        share, f, p = split[key]
        assert re.search(rf"{re.escape(label)} (account )?for {100 * share:.1f} % ", flat), key
        assert f"F {f:.2f}" in flat and f"p {p:.2f}" in flat, key
    assert f"{100 * split['rest'][0]:.1f} % is neither alone" in flat
    tests = [float(x["test_miou"]) for x in lines]
    costs = [_cost(x) for x in lines]
    crossed = [c for c, x in zip(costs, lines) if x["source"] != "version 5"]
    assert f"correlation {statistics.correlation(tests, costs):.2f}" in flat
    assert f"shuffling costs {min(crossed):.2f} to {max(crossed):.2f}" in flat
    assert f"std {statistics.stdev(tests):.2f}" in flat
    values = tests + costs + [float(x[k]) for x in lines for k in ("val_miou", "shuffled_test_miou", "test_fscore")]
    values += [v for s in split.values() for v in s] + [100 * s[0] for s in split.values()]
    values += [statistics.stdev(tests), statistics.correlation(tests, costs), *want]
    values += [statistics.mean(grid[s, i] for i in seeds) for s in seeds]  # the row means
    pilot = [x for x in csv.DictReader(open(RESULTS / "seed_spread_pilot.csv")) if x["pilot"] == "d640s1600"]
    values.append(statistics.stdev(float(x["test_miou"]) for x in pilot))
    _assert_backed(text, title, {f"{v:.{d}f}" for v in values for d in (1, 2)})


def test_the_initial_weights_snippet_writes_what_a_run_starts_from(tmp_path):
    """The crossing section's ```python block, run as written, writes the weights `build_run_model` (the
    trainer's builder) starts a run of that seed from, and other weights for another seed; `init_from` of
    the file leaves no tensor at init."""
    import os
    import subprocess
    import sys

    import torch

    from avs.config import compose_config
    from avs.engine.build import build_run_model, init_from
    from avs.engine.distributed import DistInfo

    text = section((ROOT / "docs" / "reproducing.md").read_text(), "### What sets an ECMVAE S4 run's climb")
    (block,) = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    script = tmp_path / "init_weights.py"
    script.write_text(block)
    overrides = ["experiment=quickstart", "model=ecmvae"]
    for seed in (3, 4):
        out = tmp_path / f"init{seed}.pt"
        cmd = [sys.executable, str(script), str(seed), str(out), *overrides]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True)
        assert run.returncode == 0, run.stderr.decode()[-2000:]
    cfg = compose_config("train", [*overrides, "seed=3"])
    built = build_run_model(cfg, torch.device("cpu"), DistInfo()).state_dict()
    written = {s: torch.load(tmp_path / f"init{s}.pt", weights_only=True)["model"] for s in (3, 4)}
    assert built.keys() == written[3].keys()
    assert all(torch.equal(built[k], written[3][k]) for k in built)
    assert not all(torch.equal(built[k], written[4][k]) for k in built)  # another seed, other weights
    model = build_run_model(compose_config("train", [*overrides, "seed=4"]), torch.device("cpu"), DistInfo())
    init_from(model, str(tmp_path / "init3.pt"))
    assert all(torch.equal(v, built[k]) for k, v in model.state_dict().items())
