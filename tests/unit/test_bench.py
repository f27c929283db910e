"""scripts/benchmark.py measurements (avs.benchmark): structure of a quick run, pair agreement, memory."""

from __future__ import annotations

import json
import math

import pytest
import torch

from avs import benchmark as bench
from tests.conftest import compose_cfg

SECTIONS = (
    "hardware",
    "config",
    "params",
    "backbone",
    "train",
    "inference",
    "memory",
    "ratios",
    "comparisons",
    "data_loader",
    "metrics",
    "targets",
)


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def quick_result():
    """A quick run whose memory-measured children (seven) fork from a process that has imported torch once
    (multiprocessing's forkserver) instead of each spawning a new interpreter: the same child code and
    per-process peak RSS (VmHWM reset in the child), without seconds of imports per child."""
    import multiprocessing
    import types
    from unittest import mock

    from avs.benchmark import timing

    cfg = compose_cfg(
        "benchmark", ["model=tpavi", "quick=true", "compare=[fusion,audio]", "num_frames=2", "save_default=false"]
    )
    cfg = bench.apply_quick(cfg)
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "timm", "avs.benchmark.timing"])
    with mock.patch.object(timing, "mp", types.SimpleNamespace(get_context=lambda method: ctx)):
        return bench.run_benchmark(cfg)


def test_quick_run_has_every_section(quick_result, tmp_path):
    r = quick_result
    assert set(SECTIONS) <= set(r)
    assert r["config"]["backbone"] == "pvt_v2_b0" and r["config"]["image_size"] == 64 and r["config"]["num_frames"] == 2
    for v in (
        r["backbone"]["fwd_s"],
        r["backbone"]["fwdbwd_s"],
        r["train"]["step_s"],
        r["inference"]["clip_s"],
        r["inference"]["frame_s"],
        *r["ratios"].values(),
    ):
        assert _positive(v)
    assert r["inference"]["frame_s"] == pytest.approx(r["inference"]["clip_s"] / 2)
    # CPU: peak RSS of spawned children; a training step holds at least the model's fp32 weights
    weights_mb = r["params"]["all_parameters"] * 4 / 2**20
    assert r["memory"]["train_step_mb"] > 0.5 * weights_mb
    assert _positive(r["memory"]["backbone_train_mb"]) and _positive(r["memory"]["inference_mb"])
    for source in ("logmel", "wav", "embedding"):
        assert _positive(r["data_loader"][source]["clips_per_s"])
    assert r["data_loader"]["num_workers"] == 0
    assert _positive(r["metrics"]["frames_per_s"])
    assert r["targets"]["metrics frames/s"]["bound"] == 1000.0
    # host syncs of a trainer-style step and graph breaks of the training forward are reported
    assert r["host_syncs"]["per_step"] <= 2 and r["graph_breaks"]["breaks"] == 0 and r["graph_breaks"]["graphs"] == 1
    assert "host syncs per training step" in bench.format_report(r)
    json.dumps(r)  # JSON-ready


def test_pairs_keep_outputs(quick_result):
    comps = quick_result["comparisons"]
    assert set(comps) == {"fusion", "audio"}
    for name in ("fusion", "audio"):
        e = comps[name]
        assert "skipped" not in e, e
        assert e["max_abs_diff"] < 1e-3
        for k in ("train_step", "infer_clip"):
            assert _positive(e[k]["a_s"]) and _positive(e[k]["b_s"])
        assert _positive(e["memory_ratio_b_over_a"])


def test_dense_vs_factorised_outputs_differ_only_by_rounding():
    cfg = bench.bench_model_config(
        compose_cfg("benchmark", ["model=tpavi", "backbone=pvt_v2_b0", "image_size=64", "num_frames=2"])
    )
    diff = bench.output_diff(cfg, "fusion", torch.device("cpu"))
    assert diff < 1e-3
    # the comparison is not vacuous: zero-init gammas are perturbed, so the fusion changes the output
    model = bench.perturb_zero_init(bench.build_bench_model(cfg, torch.device("cpu"))).eval()
    batch = bench.make_batch(1, 2, 64, "logmel", torch.device("cpu"))
    with torch.no_grad():
        with_fusion = model(batch)["logits"]
        model.fusion = None
        without = model(batch)["logits"]
    assert float((with_fusion - without).abs().max()) > 1e-4


def test_not_applicable_pairs_are_skipped_and_unknown_pairs_raise():
    cfg = compose_cfg("benchmark", ["model=tpavi"])
    assert bench.pair_applicable(cfg, "motion") == "model has no motion module"
    assert bench.pair_applicable(cfg, "fusion") is None
    assert bench.pair_applicable(compose_cfg("benchmark", ["model=avsbg"]), "fusion") == "model has no TPAVI fusion"
    with pytest.raises(ValueError, match="compare"):
        bench.pair_spec(cfg, "nope")
    with pytest.raises(ValueError, match="embedding"):
        bench.make_batch(1, 2, 32, "mp3", torch.device("cpu"))


def _alloc_child(q) -> None:
    base = bench.peak_rss_start()
    x = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    del x
    q.put(bench.peak_rss_mb(base))


def test_peak_rss_sees_a_freed_allocation_in_a_fresh_process():
    import multiprocessing as mp

    ctx = mp.get_context("spawn")  # like the benchmark: the parent's peak must not leak into the child's
    big = torch.ones(256 * 2**20 // 4)  # the parent is large at spawn time
    q = ctx.Queue()
    p = ctx.Process(target=_alloc_child, args=(q,))
    p.start()
    peak = q.get(timeout=60)
    p.join()
    del big
    assert 48 < peak < 200


def test_targets_are_checked():
    res = {
        "config": {"model": "ecmvae"},
        "ratios": {"train_step/backbone_fwdbwd": 2.5, "infer_clip/backbone_fwd": 1.2},
        "comparisons": {"fusion": {"memory_ratio_b_over_a": 0.3}},
        "data_loader": {"logmel": {"clips_per_s": 40.0}},
        "metrics": {"frames_per_s": 5000.0},
    }
    t = bench.check_targets(res, compose_cfg("benchmark", []).targets)
    assert t["train_step/backbone_fwdbwd"]["met"] is False and t["train_step/backbone_fwdbwd"]["bound"] == 2.0
    assert t["infer_clip/backbone_fwd"]["met"] is True
    assert t["factorised/dense peak memory"]["met"] is True
    assert t["loader logmel clips/s/worker"]["met"] is False
    assert t["loader logmel clips/s/worker"]["margin"] == pytest.approx(-10.0)
    # a per-model bound applies to that model only: no memory target for tpavi
    t = bench.check_targets({**res, "config": {"model": "tpavi"}}, compose_cfg("benchmark", []).targets)
    assert "factorised/dense peak memory" not in t and t["train_step/backbone_fwdbwd"]["bound"] == 1.5


def test_benchmark_code_names_no_method():
    """Pairs and targets per method live in configs/benchmark.yaml, not in avs/benchmark/."""
    from pathlib import Path

    from avs.config import CONFIG_DIR, PROJECT_ROOT

    methods = [p.stem for p in (Path(CONFIG_DIR) / "model").glob("*.yaml") if p.stem != "base"]  # base: shared keys
    assert "tpavi" in methods
    for path in (Path(PROJECT_ROOT) / "avs" / "benchmark").glob("*.py"):
        text = path.read_text().lower()
        assert not [m for m in methods if m in text], path


@pytest.mark.parametrize("override", ["repeats=5", "backbone=resnet50", "image_size=128", "+backbone.foo=1"])
def test_quick_refuses_an_override_it_would_drop(override):
    from avs.benchmark.run import check_quick_overrides
    from avs.errors import ConfigError

    with pytest.raises(ConfigError, match=override.split("=")[0].lstrip("+").split(".")[0]):
        check_quick_overrides(["model=tpavi", "quick=true", override])
    check_quick_overrides(["model=tpavi", "quick=true", "compare=[amp]", "save_default=false"])  # nothing dropped


def test_quick_with_a_dropped_override_exits_2_from_the_script():
    from avs.config import PROJECT_ROOT
    from tests.conftest import run_script

    res = run_script("benchmark.py", ["model=tpavi", "quick=true", "repeats=5", "save_default=false"], PROJECT_ROOT)
    assert res.returncode == 2, res.stderr
    assert "error: quick=true sets" in res.stderr and "repeats" in res.stderr
