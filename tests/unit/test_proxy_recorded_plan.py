"""Which recorded runs a continuing sitting makes again as checks (avs.proxy.recorded.plan): one per model."""

from __future__ import annotations

from pathlib import Path

from avs.proxy.protocol import ProxyRun
from avs.proxy.recorded import model_of, plan

MODELS = {"tpavi": "tpavi", "tpavi_no_audio": "tpavi", "avsbg": "avsbg", "ecmvae": "ecmvae"}


def _runs(cells: list[str], seeds: list[int]) -> list[ProxyRun]:
    out = []
    for seed in seeds:
        for subset in ("s4", "ms3"):
            for cell in cells:
                after = f"s4/{cell}/seed{seed}" if subset == "ms3" else None
                overrides = (
                    (f"model={MODELS[cell]}", "model.use_audio=false")
                    if "no_audio" in cell
                    else (f"model={MODELS[cell]}",)
                )
                out.append(ProxyRun(subset, cell, seed, overrides, Path("/x") / subset / cell / f"seed{seed}", after))
    return out


def _rows(runs: list[ProxyRun]) -> list[dict]:
    return [{"protocol_version": 4, "subset": r.subset, "cell": r.cell, "seed": r.seed} for r in runs]


CELLS = ["tpavi", "avsbg", "ecmvae", "tpavi_no_audio"]


def test_each_model_of_new_seeds_gets_a_check_from_outside_the_selection():
    every = _runs(CELLS, [1, 2, 3])
    rows = _rows([r for r in every if r.seed == 1])
    todo = [r for r in every if r.seed == 3]
    made, checks, skipped = plan(todo, rows, 4, every)
    # one check per model (tpavi_no_audio shares TPAVI's), the first recorded S4 run of it, made first
    assert list(checks) == ["s4/tpavi/seed1", "s4/avsbg/seed1", "s4/ecmvae/seed1"]
    assert [r.name for r in made[:3]] == list(checks) and [r.name for r in made[3:]] == [r.name for r in todo]
    assert skipped == []
    assert model_of(every[3]) == "tpavi"


def test_a_model_is_not_checked_twice():
    every = _runs(["tpavi", "avsbg"], [1, 2])
    rows = _rows([r for r in every if r.seed == 1] + [every[4]])  # seed 1, and S4 TPAVI seed 2
    # MS3 TPAVI seed 2 needs its recorded S4 run again (for the checkpoint): that rerun is TPAVI's check
    made, checks, skipped = plan(every, rows, 4, every)
    assert sorted(checks) == ["s4/avsbg/seed1", "s4/tpavi/seed2"]
    assert [r.name for r in made] == [
        "s4/avsbg/seed1",
        "s4/tpavi/seed2",
        "s4/avsbg/seed2",
        "ms3/tpavi/seed2",
        "ms3/avsbg/seed2",
    ]
    assert sorted(skipped) == ["ms3/avsbg/seed1", "ms3/tpavi/seed1", "s4/tpavi/seed1"]
    # a model whose recorded run this out dir has finished needs no check
    made, checks, _ = plan(every, rows, 4, every, done=frozenset({"s4/avsbg/seed1"}))
    assert list(checks) == ["s4/tpavi/seed2"]


def test_nothing_recorded_or_nothing_to_make_needs_no_check():
    every = _runs(["tpavi"], [1, 2])
    assert plan(every, [], 4, every) == (every, {}, [])
    rows = _rows(every)
    assert plan([], rows, 4, every) == ([], {}, [])
    made, checks, skipped = plan(every, rows, 4, every)  # all recorded: nothing to make, nothing checked
    assert made == [] and checks == {} and len(skipped) == 4


def test_recheck_makes_every_selected_recorded_run_again_as_a_check():
    every = _runs(["tpavi", "avsbg"], [1, 2])
    rows = _rows([r for r in every if r.seed == 1])
    todo = every  # seed 1 recorded, seed 2 not
    made, checks, skipped = plan(todo, rows, 4, every, recheck=True)
    assert [r.name for r in made] == [r.name for r in todo] and skipped == []
    assert sorted(checks) == sorted(r.name for r in every if r.seed == 1)
    assert all(checks[name]["seed"] == 1 for name in checks)
    # without it the recorded runs are not made, and one check per model comes first
    made, checks, skipped = plan(todo, rows, 4, every)
    assert sorted(skipped) == ["ms3/avsbg/seed1", "ms3/tpavi/seed1"]
    assert [r.name for r in made[:2]] == list(checks) == ["s4/tpavi/seed1", "s4/avsbg/seed1"]
