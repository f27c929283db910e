"""The proxy benchmark runner: protocol expansion, refusals, the run queue, and one real toy run."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from avs.config import PROJECT_ROOT
from avs.config_checks import ConfigError
from avs.proxy import expand, finished, passes, run_protocol, validate
from avs.proxy import runner as runner_mod
from avs.proxy.protocol import check_same_protocol, protocol_node
from avs.utils.simd import cpu_level as simd_cpu_level
from avs.utils.simd import environment as simd_environment
from tests.conftest import compose_cfg, run_script

# the script runs at the protocol's level where the CPU has it (x86-64 with AVX2), natively elsewhere
SCRIPT_SIMD = "avx2" if simd_cpu_level() in ("avx2", "avx512") else "native"


def _cfg(tmp_path: Path, **changes):
    # in-process: the runner's children inherit this process's (native) SIMD level
    cfg = compose_cfg("proxy_benchmark", [f"out_dir={tmp_path / 'out'}", "progress=false", "simd=native"])
    for key, value in changes.items():
        OmegaConf.update(cfg, key, value, merge=False)
    return cfg


def test_expand_puts_the_methods_first_each_group_seed_major(tmp_path):
    """The methods and their `<method>_no_audio` pairs run first, with every seed (paired listening)."""
    cfg = _cfg(tmp_path)
    runs = expand(protocol_node(cfg), tmp_path)
    methods = set(cfg.methods) | {f"{m}_no_audio" for m in cfg.methods}
    assert {f"{m}_no_audio" for m in cfg.methods} <= set(cfg.cells), "every method has its no-audio pair"
    in_methods = [r.cell in methods for r in runs]
    assert in_methods == sorted(in_methods, reverse=True), "every methods-table run comes before any ablation run"
    for group in ([r for r in runs if r.cell in methods], [r for r in runs if r.cell not in methods]):
        seeds = [r.seed for r in group]
        assert seeds == sorted(seeds), "within a group, every run of seed 1 comes before any of seed 2"
    restricted = {c for c in cfg.cells if cfg.cells[c].get("subsets")}
    n_seeds = {c: len(cfg.seeds if c in methods else cfg.ablation_seeds) for c in cfg.cells}
    assert cfg.ablation_seeds is not None and len(cfg.ablation_seeds) < len(cfg.seeds)
    assert len(runs) == sum(n_seeds[c] * len(cfg.cells[c].get("subsets") or cfg.subsets) for c in cfg.cells)
    for r in runs:
        assert r.run_dir == tmp_path / r.subset / r.cell / f"seed{r.seed}"
        assert r.overrides[0] == "experiment=proxy" and r.overrides[-1] == f"seed={r.seed}"
        if r.cell in restricted:
            assert r.subset in cfg.cells[r.cell].subsets


def test_protocol_references_are_checked(tmp_path):
    cfg = _cfg(tmp_path)
    bad = protocol_node(cfg)
    bad.claims.append({"name": "x", "a": "ecmvae", "b": "nope"})
    with pytest.raises(ConfigError, match="nope"):
        validate(bad)
    bad = protocol_node(cfg)
    bad.methods.append("missing_method")
    with pytest.raises(ConfigError, match="missing_method"):
        validate(bad)
    with pytest.raises(ConfigError, match="only_subsets"):
        run_protocol(_cfg(tmp_path, only_subsets=["avs"]), tmp_path / "never")


def test_an_out_dir_of_another_protocol_is_refused(tmp_path):
    cfg = _cfg(tmp_path)
    node = protocol_node(cfg)
    (tmp_path / "protocol.yaml").write_text(OmegaConf.to_yaml(node))
    check_same_protocol(tmp_path, node)  # same protocol: fine
    node.cells.tpavi.overrides = ["model=tpavi", "trainer.lr=5e-4"]
    check_same_protocol(tmp_path, node)  # no finished tpavi run yet: the cell may change
    done = tmp_path / "ms3" / "tpavi" / "seed1"
    done.mkdir(parents=True)
    (done / "metrics.json").write_text("{}")
    with pytest.raises(ConfigError, match="tpavi"):
        check_same_protocol(tmp_path, node)


def test_every_cell_config_is_checked_before_the_first_run(tmp_path, monkeypatch):
    started = []
    monkeypatch.setattr(runner_mod, "_run_one", lambda *a, **k: started.append(a) or runner_mod.RunEnd(a[0], 0, 0.0))
    bad = ["model=ecmvae", "model.use_audio=false"]  # the factorised latent encodes audio: refused
    cfg = _cfg(tmp_path, only=["ecmvae_no_audio"], seeds=[1])
    OmegaConf.update(cfg, "cells.ecmvae_no_audio.overrides", bad, merge=False)
    with pytest.raises(ConfigError, match="cell ecmvae_no_audio on"):
        run_protocol(cfg, tmp_path / "out")
    assert started == []


FAKE_TRAIN = """
import json, sys, pathlib
args = dict(a.split("=", 1) for a in sys.argv[1:] if "=" in a)
run = pathlib.Path(args["hydra.run.dir"]); run.mkdir(parents=True, exist_ok=True)
if "model=avsbg" in sys.argv and "seed=2" in sys.argv:
    sys.exit(3)
(run / "metrics.json").write_text(json.dumps({"test": {"per_frame": {"miou": 0.5}}}))
"""


def test_queue_runs_keeps_finished_and_reports_failures_by_name(tmp_path, monkeypatch):
    fake = tmp_path / "fake_train.py"
    fake.write_text(FAKE_TRAIN)
    monkeypatch.setattr(runner_mod, "TRAIN_SCRIPT", fake)
    monkeypatch.setattr(runner_mod, "prepare_data", lambda *a, **k: {})
    monkeypatch.setattr(runner_mod, "check_runs", lambda *a: None)
    started: list[str] = []  # the order in which the runner starts runs in its slots (runs.jsonl: end order)
    real_run_one = runner_mod._run_one

    def recording_run_one(run, *args, **kwargs):
        started.append(run.name)
        return real_run_one(run, *args, **kwargs)

    monkeypatch.setattr(runner_mod, "_run_one", recording_run_one)
    cfg = _cfg(tmp_path, seeds=[1, 2], only=["tpavi", "avsbg"], uncertainty=None, listening=None)
    out = Path(cfg.out_dir)
    first = run_protocol(cfg, out)
    made = [f"{s}/{c}/seed{k}" for s in ("ms3", "s4") for c, k in (("avsbg", 1), ("tpavi", 1), ("tpavi", 2))]
    assert sorted(first.made) == made
    assert sorted(first.failed) == ["ms3/avsbg/seed2", "s4/avsbg/seed2"]
    assert "exit code 3" in first.failed["s4/avsbg/seed2"]
    # the MS3 run starts from the S4 run's checkpoint (init_from): it is not started when that one failed
    assert first.failed["ms3/avsbg/seed2"] == "not run: it starts from s4/avsbg/seed2, which failed"
    lines = [json.loads(x) for x in (out / "runs.jsonl").read_text().splitlines()]
    assert sorted((x["run"], x["exit_code"]) for x in lines) == sorted([(m, 0) for m in made] + [("s4/avsbg/seed2", 3)])
    order = [x["run"] for x in lines]
    # the slot the first S4 run frees goes to its MS3 run (the first ready run in the protocol's order), not to
    # a run of seed 2 (end order in runs.jsonl depends on the machine's load; start order here does not)
    starts = list(started)  # not the child processes' own start: under load one starts seconds late
    assert sorted(starts[:2]) == ["s4/avsbg/seed1", "s4/tpavi/seed1"] and starts[2] in {
        "ms3/avsbg/seed1",
        "ms3/tpavi/seed1",
    }, starts
    assert all(
        order.index(f"s4/{c}/seed{k}") < order.index(f"ms3/{c}/seed{k}") for c, k in (("tpavi", 1), ("avsbg", 1))
    )
    assert {(x["task"], x["workers"], x["threads"]) for x in lines} == {("train", int(cfg.workers), int(cfg.threads))}
    # an unfinished run dir is set aside (kept), the finished ones are not run again
    broken = out / "s4" / "avsbg" / "seed2"
    broken.mkdir(parents=True, exist_ok=True)
    (broken / "partial.txt").write_text("x")
    lost = out / "proxy_runs.jsonl"
    assert len(lost.read_text().splitlines()) == 6
    lost.unlink()  # a finished run without its results line gets it back, without running again
    second = run_protocol(cfg, out)
    assert (
        sorted(f"{r['subset']}/{r['cell']}/seed{r['seed']}" for r in map(json.loads, lost.read_text().splitlines()))
        == made
    )
    assert (
        len(second.kept) == 6 and second.made == [] and sorted(second.failed) == ["ms3/avsbg/seed2", "s4/avsbg/seed2"]
    )
    assert (out / "s4" / "avsbg" / "seed2.unfinished1" / "partial.txt").is_file()
    assert finished(out / "ms3" / "tpavi" / "seed1") and not finished(broken)


FAKE_TRAIN_MIOU = """
import json, os, sys, pathlib
args = dict(a.split("=", 1) for a in sys.argv[1:] if "=" in a)
run = pathlib.Path(args["hydra.run.dir"]); run.mkdir(parents=True, exist_ok=True)
(run / "metrics.json").write_text(json.dumps({"test": {"per_frame": {"miou": float(os.environ["FAKE_MIOU"])}}}))
"""


def _fake_training(tmp_path: Path, monkeypatch) -> Path:
    """Runs train with FAKE_TRAIN_MIOU (test mIoU = $FAKE_MIOU, here 0.5), no data or stand-in checks -> the
    results file path for the test's sittings."""
    fake = tmp_path / "fake_train.py"
    fake.write_text(FAKE_TRAIN_MIOU)
    monkeypatch.setattr(runner_mod, "TRAIN_SCRIPT", fake)
    monkeypatch.setattr(runner_mod, "prepare_data", lambda *a, **k: {})
    monkeypatch.setattr(runner_mod, "check_runs", lambda *a: None)
    monkeypatch.setenv("FAKE_MIOU", "0.5")
    return tmp_path / "results" / "runs.jsonl"


def test_a_new_out_dir_continues_from_the_results_file_and_checks_a_rerun(tmp_path, monkeypatch):
    """continue_recorded: recorded runs are not made again, except a source of a pending run or one check;
    a rerun must give the recorded numbers (proxy_reproductions.jsonl), or nothing further starts."""
    results = _fake_training(tmp_path, monkeypatch)
    reproductions = results.parent / "proxy_reproductions.jsonl"

    def cfg(out: str, seeds: list, workers: int = 2):
        return _cfg(
            tmp_path,
            out_dir=str(tmp_path / out),
            results_file=str(results),
            seeds=[1, 2, 3],
            only_seeds=seeds,
            only=["tpavi"],
            uncertainty=None,
            listening=None,
            workers=workers,
        )

    first = run_protocol(cfg("a", [1]), tmp_path / "a")
    assert sorted(first.made) == ["ms3/tpavi/seed1", "s4/tpavi/seed1"] and first.checks == {}
    assert {(r["workers"], r["seconds"] >= 0) for r in map(json.loads, results.read_text().splitlines())} == {(2, True)}
    recorded_s4 = [x for x in results.read_text().splitlines() if '"s4"' in x]

    # a fresh out dir, one more seed: seed 1 is recorded; its S4 run is made again as the one check
    second = run_protocol(cfg("b", [1, 2]), tmp_path / "b")
    assert second.recorded == ["ms3/tpavi/seed1"] and list(second.checks) == ["s4/tpavi/seed1"]
    assert sorted(second.made) == ["ms3/tpavi/seed2", "s4/tpavi/seed1", "s4/tpavi/seed2"] and not second.failed
    (check,) = [json.loads(x) for x in reproductions.read_text().splitlines()]
    assert check["same"] is True and check["differing"] == {} and check["test_miou"] == [50.0, 50.0]
    assert [x for x in results.read_text().splitlines() if '"s4"' in x][0] == recorded_s4[0]  # left as recorded
    assert len(results.read_text().splitlines()) == 4

    # MS3 seed 2 lost its line: its S4 run is made again for the checkpoint, and now gives other numbers
    rows = [x for x in results.read_text().splitlines() if not ('"ms3"' in x and '"seed": 2' in x)]
    results.write_text("\n".join(rows) + "\n")
    monkeypatch.setenv("FAKE_MIOU", "0.6")
    third = run_protocol(cfg("c", [1, 2, 3], workers=1), tmp_path / "c")
    assert list(third.checks) == ["s4/tpavi/seed2"] and third.made == ["s4/tpavi/seed2"]
    assert "gave other numbers (test.miou" in third.failed["s4/tpavi/seed2"] and third.stopped
    for name in ("ms3/tpavi/seed2", "s4/tpavi/seed3", "ms3/tpavi/seed3"):
        assert third.failed[name] == "not run: the benchmark stopped (a rerun did not reproduce)"
    last = json.loads(reproductions.read_text().splitlines()[-1])
    assert last["same"] is False and last["differing"]["test.miou"] == [50.0, 60.0]
    assert '"seed": 3' not in results.read_text() and results.read_text().count('"miou": 60.0') == 0

    # a selection with nothing recorded (only seed 3): the check comes from outside it, the protocol's first
    # recorded S4 run, and made first; it gives other numbers here, so seed 3 does not join the table
    fourth = run_protocol(cfg("d", [3], workers=1), tmp_path / "d")
    assert list(fourth.checks) == ["s4/tpavi/seed1"] and fourth.made == ["s4/tpavi/seed1"] and fourth.stopped
    assert fourth.failed["s4/tpavi/seed3"] == "not run: the benchmark stopped (a rerun did not reproduce)"
    assert '"seed": 3' not in results.read_text()
    monkeypatch.setenv("FAKE_MIOU", "0.5")  # the same computation again: the check passes, seed 3 is recorded
    fifth = run_protocol(cfg("e", [3], workers=1), tmp_path / "e")
    assert list(fifth.checks) == ["s4/tpavi/seed1"] and fifth.made == [
        "s4/tpavi/seed1",
        "s4/tpavi/seed3",
        "ms3/tpavi/seed3",
    ]
    assert not fifth.failed and json.loads(reproductions.read_text().splitlines()[-1])["same"] is True
    # this out dir has made recorded runs: calling it again checks nothing again
    sixth = run_protocol(cfg("e", [3], workers=1), tmp_path / "e")
    assert sixth.checks == {} and sixth.made == [] and sorted(sixth.kept) == ["ms3/tpavi/seed3", "s4/tpavi/seed3"]


def test_recheck_makes_every_recorded_run_again_compares_it_and_records_the_sitting(tmp_path, monkeypatch):
    """recheck=true: a re-sitting of recorded runs, each compared (with both wall times) and left as recorded;
    every sitting that made runs leaves one line with its wall time in proxy_sittings.jsonl."""
    results = _fake_training(tmp_path, monkeypatch)

    def cfg(out: str, **more):
        common = dict(results_file=str(results), seeds=[1, 2], only=["tpavi"], uncertainty=None, listening=None)
        return _cfg(tmp_path, out_dir=str(tmp_path / out), **common, **more)

    first = run_protocol(cfg("a"), tmp_path / "a")
    assert len(first.made) == 4 and first.checks == {}
    recorded = results.read_text()
    (sitting,) = [json.loads(x) for x in (results.parent / "proxy_sittings.jsonl").read_text().splitlines()]
    assert (sitting["made"], sitting["checks"], sitting["recheck"], sitting["failed"]) == (4, 0, False, 0)
    assert sitting["seconds"] == round(first.seconds, 1) and sitting["selection"]["only"] == ["tpavi"]
    assert sitting["protocol_version"] == cfg("a").version and sitting["start"] <= sitting["end"]

    # without recheck a new out dir makes nothing (all recorded); with it, every recorded run, each a check
    assert run_protocol(cfg("b"), tmp_path / "b").made == []
    again = run_protocol(cfg("c", recheck=True), tmp_path / "c")
    assert sorted(again.made) == sorted(first.made) == sorted(again.checks) and not again.failed
    lines = [json.loads(x) for x in (results.parent / "proxy_reproductions.jsonl").read_text().splitlines()]
    assert len(lines) == 4 and all(x["same"] for x in lines)
    assert all(isinstance(t, float) and t >= 0 for x in lines for t in x["seconds"])  # recorded, now
    assert results.read_text() == recorded  # the recorded lines are left as they were
    sittings = [json.loads(x) for x in (results.parent / "proxy_sittings.jsonl").read_text().splitlines()]
    assert [(x["made"], x["checks"], x["recheck"]) for x in sittings] == [(4, 0, False), (4, 4, True)]

    # a dry run, or a sitting that makes nothing, leaves no sitting line
    run_protocol(cfg("c", recheck=True), tmp_path / "c")
    run_protocol(cfg("d", recheck=True, dry_run=True), tmp_path / "d")
    assert len((results.parent / "proxy_sittings.jsonl").read_text().splitlines()) == 2

    # recheck compares with the results file: without continue_recorded it is refused by name
    with pytest.raises(ConfigError, match="recheck=true .* continue_recorded=true"):
        run_protocol(cfg("e", recheck=True, continue_recorded=False), tmp_path / "e")
    assert not (tmp_path / "e").exists()


FAKE_UNCERTAINTY = """
import json, sys, pathlib
args = dict(a.split("=", 1) for a in sys.argv[1:] if "=" in a)
if "seed2" in args["checkpoint"]:
    sys.exit(5)
pathlib.Path(args["out"]).write_text(json.dumps({"auroc": 0.7, "num_samples": int(args["eval.num_samples"])}))
"""


def test_the_uncertainty_pass_runs_in_the_worker_after_training(tmp_path, monkeypatch):
    for name, text, mod, attr in (
        ("t.py", FAKE_TRAIN, runner_mod, "TRAIN_SCRIPT"),
        ("u.py", FAKE_UNCERTAINTY, passes, "UNCERTAINTY_SCRIPT"),
    ):
        (tmp_path / name).write_text(text)
        monkeypatch.setattr(mod, attr, tmp_path / name)
    monkeypatch.setattr(runner_mod, "prepare_data", lambda *a, **k: {})
    monkeypatch.setattr(runner_mod, "check_runs", lambda *a: None)
    cfg = _cfg(tmp_path, seeds=[1, 2], only=["ecmvae"], only_subsets=["s4"], listening=None)
    out = Path(cfg.out_dir)
    outcome = run_protocol(cfg, out)
    assert json.loads((out / "s4" / "ecmvae" / "seed1" / "uncertainty.json").read_text()) == {
        "auroc": 0.7,
        "num_samples": int(cfg.uncertainty.num_samples),
    }
    assert list(outcome.failed) == ["s4/ecmvae/seed2"]
    assert "follow-up failed: u.py exit code 5" in outcome.failed["s4/ecmvae/seed2"]
    assert passes.followup_commands(cfg, expand(protocol_node(cfg), out)[0]) == []  # tpavi: no latent pass
    # the training itself is asked for the record (UncertaintyHook); the pass above ran because this fake
    # training did not write it
    runs = {r.cell: r for r in expand(protocol_node(cfg), out) if r.seed == 1 and r.subset == "s4"}
    hook = [a for a in runner_mod._command(runs["ecmvae"], cfg) if a.startswith("+hooks.uncertainty=")]
    assert len(hook) == 1 and "avs.evaluation.uncertainty.UncertaintyHook" in hook[0]
    assert f"num_samples:{int(cfg.uncertainty.num_samples)}" in hook[0]
    assert not any(a.startswith("+hooks.uncertainty=") for a in runner_mod._command(runs["tpavi"], cfg))
    # a finished run without its uncertainty.json gets the pass alone (no training) on the next call
    (out / "s4" / "ecmvae" / "seed1" / "uncertainty.json").unlink()
    (out / "s4" / "ecmvae" / "seed1" / "metrics.json").write_text(json.dumps({"test": {"per_frame": {"miou": 0.25}}}))
    again = run_protocol(cfg, out)
    assert sorted(again.kept) == ["s4/ecmvae/seed1", "s4/ecmvae/seed2"] and again.made == []
    assert (out / "s4" / "ecmvae" / "seed1" / "uncertainty.json").is_file()
    record = json.loads((out / "s4" / "ecmvae" / "seed1" / "metrics.json").read_text())
    assert record["test"]["per_frame"]["miou"] == 0.25


def test_toy_protocol_end_to_end(tmp_path):
    """A real toy run of one latent cell: metrics, latent KL, uncertainty, then the report."""
    out = tmp_path / "out"
    env = dict(os.environ, AVS_DATA_DIR=str(tmp_path / "data"), AVS_LOG_DIR=str(tmp_path / "logs"))
    cmd = [
        "toy=true",
        f"out_dir={out}",
        "seeds=[1]",
        "only=[ecmvae]",
        "only_subsets=[s4]",
        "workers=1",
        "progress=false",
        f"simd={SCRIPT_SIMD}",
    ]
    proc = run_script("proxy_benchmark.py", cmd, tmp_path, env=env, timeout=600, inherit_env=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    run = out / "s4" / "ecmvae" / "seed1"
    assert finished(run)
    line = json.loads((out / "proxy_runs.jsonl").read_text().splitlines()[0])
    assert line["simd"] == SCRIPT_SIMD  # the script started itself again at the protocol's level
    if SCRIPT_SIMD == "avx2":
        assert " AVX2 " in line["machine_kind"], line["machine_kind"]
    assert (run / "latent_kl.jsonl").is_file()
    record = json.loads((run / "uncertainty.json").read_text())
    assert record["num_samples"] == 4 and record["split"] == "test"  # configs/proxy_benchmark.yaml
    assert not (run / "checkpoints" / "last.ckpt").exists() and (run / "checkpoints" / "best.ckpt").is_file()
    # the training wrote the listening and uncertainty records itself (ListeningHook, UncertaintyHook): no
    # standalone pass ran, and each gives the same record for the run's best.ckpt at the same SIMD level
    log_text = (out / "logs" / "s4_ecmvae_seed1.log").read_text()
    assert "\n$ " not in log_text and "listening: test mIoU@0.5" in log_text and "AUROC(variance)" in log_text
    ckpt = str(run / "checkpoints" / "best.ckpt")
    simd_env = {**env, **simd_environment(SCRIPT_SIMD), "OMP_NUM_THREADS": "1"}
    alone = tmp_path / "alone_listening.json", tmp_path / "alone_uncertainty.json"
    passes = (
        [sys.executable, "-m", "avs.proxy.listening", ckpt, str(alone[0]), "0"],
        [sys.executable, str(PROJECT_ROOT / "scripts" / "uncertainty.py"), f"checkpoint={ckpt}", "split=test"]
        + ["eval.num_samples=4", f"out={alone[1]}", f"hydra.run.dir={tmp_path / 'u'}"],
    )
    for cmd in passes:
        done = subprocess.run(cmd, cwd=PROJECT_ROOT, env=simd_env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(alone[0].read_text()) == json.loads((run / "listening.json").read_text())
    assert json.loads(alone[1].read_text()) == record
    ceilings = json.loads((out / "ceilings.json").read_text())
    assert 0.0 <= ceilings["s4"]["test"] <= 100.0
    report = run_script("tables.py", [str(out), "--proxy"], tmp_path)
    assert report.returncode == 0, report.stderr
    assert "ECMVAE" in report.stdout


def _tree(root: Path) -> dict[str, float]:
    return {str(p.relative_to(root)): p.stat().st_mtime for p in sorted(root.rglob("*"))} if root.exists() else {}


def _repo_state() -> str:
    out = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=all"], cwd=PROJECT_ROOT, capture_output=True, text=True
    )
    return out.stdout


def test_toy_run_reaches_paths_and_reproduces_exactly(tmp_path):
    """A toy protocol with paths.* in tmp dirs: the child's config has them, nothing lands in the
    repository, the results lines are written, the MS3 run starts from the S4 run's checkpoint, and
    reproduce= reruns the MS3 run (from the recorded S4 checkpoint) with the recorded numbers exactly."""
    before = _repo_state()
    data, weights, out, results = tmp_path / "data", tmp_path / "weights", tmp_path / "out", tmp_path / "runs.jsonl"
    weights.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AVS_")}
    common = [
        "toy=true",
        f"out_dir={out}",
        f"paths.data_dir={data}",
        f"paths.weights_dir={weights}",
        f"paths.log_dir={tmp_path / 'logs'}",
        f"results_file={results}",
        "seeds=[1]",
        "only=[tpavi]",
        "workers=2",
        "progress=false",
        f"simd={SCRIPT_SIMD}",
    ]
    proc = run_script("proxy_benchmark.py", common, tmp_path, env=env, timeout=600, inherit_env=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    run = out / "ms3" / "tpavi" / "seed1"
    child = json.loads((run / "metrics.json").read_text())["config"]
    assert child["paths"]["data_dir"] == str(data) and child["paths"]["weights_dir"] == str(weights)
    assert child["data"]["root"].startswith(str(data)) and child["data"]["root"].endswith("_p0.8")
    assert child["data"]["synthetic"]["persistence"] == 0.8
    source = out / "s4" / "tpavi" / "seed1" / "checkpoints" / "best.ckpt"
    assert child["model"]["init_from"] == str(source) and source.is_file()
    assert json.loads((run / "metrics.json").read_text())["init_from"] == str(source)
    runs = [json.loads(x)["run"] for x in (out / "runs.jsonl").read_text().splitlines()]
    assert runs == ["s4/tpavi/seed1", "ms3/tpavi/seed1"]  # two workers, yet MS3 waited for its S4 run
    rows = [json.loads(x) for x in results.read_text().splitlines()]
    version = OmegaConf.load(PROJECT_ROOT / "configs" / "proxy_benchmark.yaml").version
    assert [(r["subset"], r["cell"], r["seed"], r["protocol_version"]) for r in rows] == [
        ("ms3", "tpavi", 1, version),
        ("s4", "tpavi", 1, version),
    ]
    listening = rows[0]["listening"]
    assert set(listening["test_shuffled_audio"]) == {"miou_05", "miou_val_threshold", "fscore"}
    assert rows[0]["test"]["miou"] is not None and rows[0]["threads"] == 1
    again = run_script(
        "proxy_benchmark.py", [*common, "reproduce=ms3/tpavi:1"], tmp_path, env=env, timeout=600, inherit_env=False
    )
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-2000:]
    assert "every number is the same" in again.stdout and "listening.test_shuffled_audio.miou_05" in again.stdout
    assert "differs" not in again.stdout
    assert _repo_state() == before  # nothing written into the repository


def test_dry_run_writes_nothing_and_needs_no_standins(tmp_path):
    before = _repo_state()
    data, weights, out = tmp_path / "data", tmp_path / "weights", tmp_path / "out"
    data.mkdir()
    weights.mkdir()
    snapshot = _tree(tmp_path)
    cmd = [
        "dry_run=true",
        f"out_dir={out}",
        f"paths.data_dir={data}",
        f"paths.weights_dir={weights}",
        "only_seeds=[1]",
        "only=[tpavi]",
        "continue_recorded=false",  # every selected run is printed as made, whatever the results file holds
        "progress=false",
        f"simd={SCRIPT_SIMD}",
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("AVS_")}
    proc = run_script("proxy_benchmark.py", cmd, tmp_path, env=env, inherit_env=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"paths.weights_dir: {weights}" in proc.stdout
    assert f"{weights}/standin_pvt_v2_b0_64px.pth: pinned" in proc.stdout and "found missing" in proc.stdout
    assert f"paths.data_dir={data}" in proc.stdout and "train.py" in proc.stdout
    # a printed training command reads back, through a shell's quoting, as the runner's own argument list
    printed = [shlex.split(x) for x in proc.stdout.splitlines() if "train.py" in x and not x.startswith("#")]
    assert printed and all(any(a.startswith("+hooks.listening={_target_:") for a in argv) for argv in printed)
    assert all(a.endswith("}") for argv in printed for a in argv if a.startswith("+hooks."))
    assert _tree(tmp_path) == snapshot and not out.exists()
    assert _repo_state() == before
    # continuing: the check of a model the selection trains is printed too, though it lies outside the selection
    results = tmp_path / "results" / "proxy_runs.jsonl"
    results.parent.mkdir()
    tracked = PROJECT_ROOT / "docs" / "results"
    line = next(
        json.loads(x)
        for x in (tracked / "proxy_runs.jsonl").read_text().splitlines()
        if '"protocol_version": 4' in x and '"cell": "ecmvae"' in x and '"seed": 1,' in x and '"subset": "s4"' in x
    )
    # a recorded line of the protocol's current version (no snapshot beside it: the version's first sitting)
    line["protocol_version"] = OmegaConf.load(PROJECT_ROOT / "configs" / "proxy_benchmark.yaml").version
    results.write_text(json.dumps(line) + "\n")
    snapshot = _tree(tmp_path)
    cont = [
        *cmd[:4],
        "only_seeds=[1]",
        "only=[ecmvae_kl]",
        f"results_file={results}",
        "progress=false",
        f"simd={SCRIPT_SIMD}",
    ]
    proc = run_script("proxy_benchmark.py", cont, tmp_path, env=env, inherit_env=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "# recorded s4/ecmvae/seed1, made again" in proc.stdout
    assert _tree(tmp_path) == snapshot and not out.exists()


def test_ms3_runs_start_from_the_same_cell_and_seed_on_s4(tmp_path):
    """init_from {ms3: s4}: each MS3 run names its S4 run and that run's best.ckpt, which comes earlier."""
    cfg = _cfg(tmp_path)
    assert OmegaConf.to_container(cfg.init_from) == {"ms3": "s4"}
    runs = expand(protocol_node(cfg), tmp_path)
    names = [r.name for r in runs]
    for r in runs:
        if r.subset == "s4":
            assert r.after is None and not any(o.startswith("model.init_from=") for o in r.overrides)
            continue
        source = tmp_path / "s4" / r.cell / f"seed{r.seed}" / "checkpoints" / "best.ckpt"
        assert r.after == f"s4/{r.cell}/seed{r.seed}" and r.init_checkpoint == source
        assert f"model.init_from={source}" in r.overrides and r.overrides[-1] == f"seed={r.seed}"
        assert names.index(r.after) < names.index(r.name)
        assert "model.init_from=" not in " ".join(r.checkable_overrides())
    elsewhere = expand(protocol_node(cfg), tmp_path / "re", init_root=tmp_path)  # reproduce: recorded sources
    assert {r.init_checkpoint.parents[4] for r in elsewhere if r.after} == {tmp_path}


def test_init_from_is_checked(tmp_path):
    cfg = _cfg(tmp_path)
    bad = protocol_node(cfg)
    bad.cells.ecmvae_kl.subsets = ["ms3"]
    with pytest.raises(ConfigError, match="cells.ecmvae_kl: runs on ms3, which starts from s4"):
        validate(bad)
    bad = protocol_node(cfg)
    bad.init_from = {"ms3": "s3"}
    with pytest.raises(ConfigError, match="init_from.ms3=s3"):
        validate(bad)
    bad.init_from = {"ms3": "s4", "s4": "ms3"}
    with pytest.raises(ConfigError, match="no chains"):
        validate(bad)


def test_an_ms3_run_without_its_s4_run_is_refused_before_anything_is_written(tmp_path):
    cfg = _cfg(tmp_path, seeds=[1], only=["tpavi"], only_subsets=["ms3"])
    with pytest.raises(ConfigError, match=r"ms3/tpavi/seed1 starts from s4/tpavi/seed1 \(init_from\)"):
        run_protocol(cfg, Path(cfg.out_dir))
    assert not Path(cfg.out_dir).exists()


def test_only_seeds_selects_runs_and_the_protocol_keeps_its_seeds(tmp_path):
    """`only_seeds` narrows the runs like `only`; the protocol written to the out dir keeps every seed."""
    from avs.proxy.runner import _selected

    cfg = _cfg(tmp_path, only=["tpavi"], only_seeds=[2, 3])
    runs = _selected(cfg, expand(protocol_node(cfg), tmp_path))
    assert sorted({(r.subset, r.seed) for r in runs}) == [("ms3", 2), ("ms3", 3), ("s4", 2), ("s4", 3)]
    assert list(protocol_node(cfg).seeds) == [1, 2, 3, 4, 5]
    with pytest.raises(ConfigError, match=r"only_seeds: \[9\] not in the protocol"):
        _selected(_cfg(tmp_path, only_seeds=[9]), expand(protocol_node(cfg), tmp_path))


def test_a_sitting_that_changes_the_recorded_protocol_of_its_version_is_refused(tmp_path):
    """The snapshot beside the results file is the version's protocol: other seeds, or a recorded cell with
    other overrides, are refused by name before anything is written; a new cell may be added."""
    from avs.proxy.results import check_snapshot, write_protocol_snapshot

    results = tmp_path / "results" / "proxy_runs.jsonl"
    cfg = _cfg(tmp_path)
    protocol = protocol_node(cfg)
    check_snapshot(results, protocol)  # no snapshot yet
    write_protocol_snapshot(results, protocol, {"s4": {"test": 40.0}})
    check_snapshot(results, protocol)
    fewer = protocol_node(_cfg(tmp_path, seeds=[2, 3]))
    with pytest.raises(ConfigError, match=r"^seeds: differ from protocol version \d+ as recorded in .*only_seeds"):
        check_snapshot(results, fewer)
    with pytest.raises(ConfigError, match=r"^extra_overrides: differ"):
        check_snapshot(results, protocol_node(_cfg(tmp_path, extra_overrides=["trainer.lr=0.01"])))
    changed = protocol_node(_cfg(tmp_path))
    changed.cells.tpavi.overrides = ["model=tpavi", "trainer.lr=0.01"]
    with pytest.raises(ConfigError, match=r"^cells.tpavi: differ"):
        check_snapshot(results, changed)
    more = protocol_node(_cfg(tmp_path))
    more.cells.mine = {"label": "mine", "overrides": ["model=avsbg"]}
    check_snapshot(results, more)
    out = tmp_path / "out"
    for dry in (False, True):
        with pytest.raises(ConfigError, match="seeds: differ"):
            run_protocol(_cfg(tmp_path, seeds=[2, 3], results_file=str(results), dry_run=dry), out)
    assert not out.exists()
