"""The runner's start order: seed-major as the protocol, the longest expected chain first within a seed and
subset, timed from the results file; no timed lines leave the protocol's order."""

from __future__ import annotations

from pathlib import Path

from avs.proxy.protocol import ProxyRun
from avs.proxy.schedule import expected_seconds, longest_chains_first

CELLS = ["tpavi", "ecmvae", "avsbg"]


def _runs(seeds=(1, 2)) -> list[ProxyRun]:
    runs = []
    for seed in seeds:
        for subset in ("s4", "ms3"):
            for cell in CELLS:
                after = f"s4/{cell}/seed{seed}" if subset == "ms3" else None
                runs.append(ProxyRun(subset, cell, seed, (), Path(subset, cell, str(seed)), after))
    return runs


def _line(subset, cell, seconds, version=5):
    return {"protocol_version": version, "subset": subset, "cell": cell, "seed": 1, "seconds": seconds}


def test_expected_seconds_take_this_versions_median_else_any_versions():
    rows = [_line("s4", "tpavi", s) for s in (250, 260, 900)] + [_line("s4", "tpavi", 100, version=4)]
    rows += [_line("s4", "ecmvae", 200, version=4), _line("s4", "ecmvae", 220, version=4)]
    rows += [{"protocol_version": 5, "subset": "s4", "cell": "avsbg", "seed": 1}]  # untimed: not counted
    assert expected_seconds(rows, 5) == {("s4", "tpavi"): 260.0, ("s4", "ecmvae"): 210.0}


def test_the_longest_chain_starts_first_within_each_seed_and_subset():
    runs = _runs()
    expected = {("s4", "tpavi"): 250, ("ms3", "tpavi"): 260, ("s4", "ecmvae"): 440, ("ms3", "ecmvae"): 300}
    expected |= {("s4", "avsbg"): 290, ("ms3", "avsbg"): 280}
    names = [r.name for r in longest_chains_first(runs, expected)]
    # chains on S4: ecmvae 740, avsbg 570, tpavi 510; on MS3 their own seconds: ecmvae 300, avsbg 280, tpavi 260
    assert names[:6] == [
        "s4/ecmvae/seed1",
        "s4/avsbg/seed1",
        "s4/tpavi/seed1",
        "ms3/ecmvae/seed1",
        "ms3/avsbg/seed1",
        "ms3/tpavi/seed1",
    ]
    assert all(name.endswith("seed2") for name in names[6:])  # seed-major: no seed-2 run before seed 1's
    # an MS3 chain decides the S4 order: a fast S4 run with a slow MS3 run goes first
    expected[("ms3", "tpavi")] = 1000
    assert longest_chains_first(runs, expected)[0].name == "s4/tpavi/seed1"


def test_without_timed_lines_the_protocols_order_stays():
    runs = _runs()
    assert longest_chains_first(runs, expected_seconds([], 5)) == runs
    partly = {("s4", "avsbg"): 300.0}  # the unknown cells keep their order behind the known one
    assert [r.cell for r in longest_chains_first(runs, partly)[:3]] == ["avsbg", "tpavi", "ecmvae"]


def test_the_replay_waits_for_a_source_run_and_gains_from_the_start_order():
    """Two slots; each MS3 run starts after its S4 run. In the protocol's order the long AVS-BG chain starts
    third and its MS3 run ends alone; started first, the same runs end 100 s sooner."""
    from avs.proxy.schedule import replay

    runs = _runs(seeds=(1,))
    took = {"tpavi": 100.0, "ecmvae": 100.0, "avsbg": 300.0}  # each run, on S4 and on MS3
    seconds = {r.name: took[r.cell] for r in runs}
    # protocol order: 0 s4/tpavi, s4/ecmvae | 100 s4/avsbg, ms3/tpavi | 200 ms3/ecmvae | 400 ms3/avsbg -> 700
    assert replay(runs, seconds, 2) == 700.0
    first = longest_chains_first(runs, {(r.subset, r.cell): seconds[r.name] for r in runs})
    assert [r.name for r in first[:3]] == ["s4/avsbg/seed1", "s4/tpavi/seed1", "s4/ecmvae/seed1"]
    # 0 s4/avsbg, s4/tpavi | 100 s4/ecmvae | 200 ms3/tpavi | 300 ms3/avsbg, ms3/ecmvae -> 600
    assert replay(first, seconds, 2) == 600.0
    assert replay(runs, seconds, 1) == sum(seconds.values())
