"""Per-part profile (avs.benchmark.profile): every part present, non-negative, and the parts plus "other"
add up to the measured whole, on CPU (perf_counter) and on the CUDA-event code path (a fake event class);
each part's counted operations (avs.benchmark.flops) equal the formula of its layers and add up to the
whole count. Consistency only: no test asserts a speed."""

from __future__ import annotations

import json
import time

import pytest
import torch
from torch import nn

from avs.benchmark.flops import FLOP_FORMULAS, above_peak, count_flops, ratio_bound
from avs.benchmark.profile import format_profile, profile_model, profile_module, run_profile
from avs.benchmark.timeline import CudaEventClock, Timeline, make_clock
from avs.errors import ExitCode
from avs.utils.allocator import process_glibc
from tests.conftest import compose_cfg, run_script

SPEC = {
    "parts": ["backbone", "audio_encoder", "neck", "latent", "fusion", "decoder"],
    "methods": {"latent": ["encode"]},
    "loss_modules": {"seg": "seg_loss"},
    "loss_functions": {"consistency": ["avs.models.projector.consistency_loss"]},
    "loss_methods": {"latent": ["losses"]},
}


class _Latent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(8, 4)

    def encode(self, f: torch.Tensor) -> torch.Tensor:
        return self.enc(f.mean((2, 3)))

    def losses(self, code: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"kl": code.pow(2).mean()}


class Toy(nn.Module):
    """Parts like the segmentor's: fusion runs twice (two stages), the latent through methods."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
        self.audio_encoder = None
        self.neck = nn.Conv2d(8, 8, 1)
        self.latent = _Latent()
        self.fusion = nn.Conv2d(8, 8, 3, padding=1)
        self.decoder = nn.Conv2d(8, 1, 1)
        self.seg_loss = nn.BCEWithLogitsLoss()
        self.extra = nn.Linear(4, 4)  # not listed: timed under its own name

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        from avs.models import projector

        x = batch["frames"].flatten(0, 1)
        f = self.neck(self.backbone(x)).relu()
        code = self.latent.encode(f)
        f = self.fusion(self.fusion(f)) + code.mean()
        logits = self.decoder(f)
        if not self.training:
            return {"logits": logits}
        terms = {"seg": self.seg_loss(logits, batch["masks"].flatten(0, 1))}
        terms.update(self.latent.losses(code))
        terms["consistency"] = projector.consistency_loss(self.extra(code), code.detach())
        return terms


def _batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"frames": torch.rand(2, 2, 3, 32, 32, generator=g), "masks": torch.rand(2, 2, 1, 32, 32, generator=g)}


def _rows(res) -> dict[str, dict]:
    return {r["part"]: r for r in res["rows"]}


def _check_adds_up(res) -> None:
    rows = res["rows"]
    assert all(r[k] >= 0 for r in rows for k in ("forward_s", "backward_s", "total_s", "share"))
    assert sum(r["total_s"] for r in rows) == pytest.approx(res["whole_s"], rel=1e-9)
    assert sum(r["share"] for r in rows) == pytest.approx(1.0, rel=1e-9)
    # the timeline's whole (plus the excluded graph walk) is the wall time of the run around it
    covered = res["whole_s"] + res["excluded_graph_walk_s"]
    assert covered <= res["run_wall_s"] + 1e-6
    assert covered >= 0.8 * res["run_wall_s"] - 0.005


def test_training_step_parts_add_up_to_the_whole():
    model = Toy()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    res = profile_module(model, _batch(), SPEC, "train", opt, repeats=3, warmup=1)
    rows = _rows(res)
    expected = {"backbone", "neck", "latent", "fusion", "decoder", "extra", "loss seg", "loss kl", "loss consistency"}
    assert expected | {"optimizer step", "other"} == set(rows)
    assert "audio_encoder" not in rows  # a part the model lacks is left out
    assert rows["fusion"]["calls"] == 2 and rows["backbone"]["calls"] == 1
    assert rows["latent"]["calls"] == 1  # the wrapped `encode`; `losses` is a loss term
    for part in ("backbone", "neck", "fusion", "decoder", "latent"):  # parameters: gradient work in the backward
        assert rows[part]["forward_s"] > 0 and rows[part]["backward_s"] > 0
    assert rows["optimizer step"]["total_s"] > 0 and rows["optimizer step"]["forward_s"] == 0
    assert res["clock"] == "perf_counter" and len(res["instrumented_wholes_s"]) == 3
    assert res["autograd_nodes_hooked"] > 10
    _check_adds_up(res)
    table = format_profile(res, "toy")
    assert "fusion" in table and "backward ms" in table and "loss kl" in table
    # the hooks and wrappers are gone afterwards
    assert "encode" not in vars(model.latent) and not model.backbone._forward_pre_hooks
    from avs.models import projector

    assert not hasattr(projector.consistency_loss, "__avs_profile_wrapped__")


def test_inference_parts_add_up_and_have_no_backward():
    res = profile_module(Toy(), _batch(), SPEC, "infer", repeats=2, warmup=0)
    rows = _rows(res)
    assert {"backbone", "neck", "latent", "fusion", "decoder", "other"} == set(rows)
    assert all(r["backward_s"] == 0 for r in res["rows"])
    _check_adds_up(res)
    assert "backward" not in format_profile(res, "toy")


class FakeEvent:
    """torch.cuda.Event stand-in: records perf_counter, counts synchronisations."""

    created = 0
    syncs = 0

    def __init__(self, enable_timing: bool = False) -> None:
        assert enable_timing
        FakeEvent.created += 1
        self.t: float | None = None

    def record(self, stream=None) -> None:
        self.t = time.perf_counter()

    def synchronize(self) -> None:
        FakeEvent.syncs += 1

    def elapsed_time(self, end: FakeEvent) -> float:
        return (end.t - self.t) * 1000.0


def test_cuda_event_path_syncs_once_per_run(monkeypatch):
    FakeEvent.created = FakeEvent.syncs = 0

    def no_device_sync(*a, **k):
        raise AssertionError("a device-wide synchronize inside a profiled run")

    monkeypatch.setattr(torch.cuda, "synchronize", no_device_sync)
    model = Toy()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    res = profile_module(model, _batch(), SPEC, "train", opt, repeats=3, warmup=1, event_cls=FakeEvent)
    assert res["clock"] == "cuda_events"
    assert res["syncs"] == FakeEvent.syncs == 4  # one per run (1 warm-up + 3 repeats), at its end
    assert FakeEvent.created > 4 * 10  # marks at part switches, not only at the ends
    assert {"backbone", "fusion", "loss seg", "optimizer step"} <= set(_rows(res))
    _check_adds_up(res)


def test_make_clock_picks_events_on_cuda():
    assert isinstance(make_clock(torch.device("cuda")), CudaEventClock)
    assert make_clock(torch.device("cpu")).kind == "perf_counter"


def _cfg(model: str, extra=()):
    from avs.benchmark import apply_quick

    overrides = [f"model={model}", "quick=true", "audio=tiny", "num_frames=2", "warmup=0", *extra]
    return apply_quick(compose_cfg("benchmark", overrides))


def _check_flops_add_up(res) -> None:
    rows = res["rows"]
    assert all(r["gflop"] >= 0 for r in rows)
    assert sum(r["gflop"] for r in rows) == pytest.approx(res["whole_gflop"], rel=1e-12)
    for r in rows:
        rate = r["gflop"] / r["total_s"] if r["gflop"] > 0 and r["total_s"] > 0 else None
        assert r["gflop_per_s"] == (pytest.approx(rate, rel=1e-12) if rate else None)


def _conv_macs(n: int, hw: int, c_in: int, c_out: int, k: int, groups: int = 1) -> int:
    """Multiply-adds of a stride-1 'same' convolution: every output element takes c_in/groups * k * k."""
    return n * hw * hw * c_out * (c_in // groups) * k * k


def _gflop(macs: dict[str, int]) -> dict[str, object]:
    """2 FLOP per multiply-add, in GFLOP."""
    return {p: pytest.approx(2 * m / 1e9, rel=1e-12) for p, m in macs.items()}


def test_part_flops_are_the_layers_formula_and_add_up_to_the_whole():
    n = 4  # B=2 clips x T=2 frames, 32 x 32
    conv0, conv2, fusion = _conv_macs(n, 32, 3, 8, 3), _conv_macs(n, 32, 8, 8, 3), _conv_macs(n, 32, 8, 8, 3)
    neck, decoder, enc = _conv_macs(n, 32, 8, 8, 1), _conv_macs(n, 32, 8, 1, 1), 4 * 8 * 4
    model = Toy()
    infer = _rows(res_i := profile_module(model, _batch(), SPEC, "infer", repeats=1, warmup=0))
    forward = {"backbone": conv0 + conv2, "neck": neck, "latent": enc, "fusion": 2 * fusion, "decoder": decoder}
    assert {p: infer[p]["gflop"] for p in forward} == _gflop(forward)  # fusion runs twice
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    res = profile_module(model, _batch(), SPEC, "train", opt, repeats=1, warmup=0)
    rows = _rows(res)
    # backward: the input gradient and the weight gradient each repeat the forward's multiply-adds; the
    # first convolution's input (the frames) needs no gradient, and `extra` feeds a detached target only
    train = {"backbone": 2 * conv0 + 3 * conv2, "neck": 3 * neck, "latent": 3 * enc, "fusion": 6 * fusion}
    train |= {"decoder": 3 * decoder, "extra": 4 * 4 * 4}
    assert {p: rows[p]["gflop"] for p in train} == _gflop(train)
    # loss terms, the optimizer step and the glue: no matmul or convolution, so nothing counted
    assert all(rows[p]["gflop"] == 0 and rows[p]["gflop_per_s"] is None for p in rows if p not in train)
    _check_flops_add_up(res)
    _check_flops_add_up(res_i)
    # the whole is what FlopCounterMode counts for the same step without any hook
    counter = torch.utils.flop_counter.FlopCounterMode(display=False, custom_mapping=FLOP_FORMULAS)
    with counter:
        sum(model(_batch()).values()).backward()
    assert res["whole_gflop"] == pytest.approx(counter.get_total_flops() / 1e9, rel=1e-12)
    table = format_profile(res, "toy")
    assert "GFLOP/s" in table.splitlines()[1] and f"{rows['fusion']['gflop']:.3f}" in table


def test_grouped_convolution_and_attention_counts():
    """Depthwise convolution backward = 2 x its forward (not x groups); the attention kernel CPU runs is counted."""
    conv = nn.Conv2d(16, 16, 3, padding=1, groups=16)
    x = torch.rand(2, 16, 8, 8, requires_grad=True)
    q, k, v = (torch.rand(2, 3, 10, 4, requires_grad=True) for _ in range(3))

    def run(clock) -> dict:
        timeline = Timeline(clock)
        timeline.switch(("forward", "conv"))
        y = conv(x)
        timeline.switch(("forward", "attention"))
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        timeline.switch(("backward", "conv"))
        y.sum().backward()
        timeline.switch(("backward", "attention"))
        a.sum().backward()
        return timeline.close()

    counts = count_flops(run)
    macs = _conv_macs(2, 8, 16, 16, 3, groups=16)
    matmul = 2 * (2 * 3 * 10 * 10 * 4)  # one [10,4] @ [4,10] (or [10,10] @ [10,4]) per batch x head, 2 FLOP per MAC
    # forward: scores and the weighted values; backward: the fused kernel recomputes the scores, then 4 gradients
    expected = {"conv": (2 * macs, 4 * macs), "attention": (2 * matmul, 5 * matmul)}
    assert {p: (counts[("forward", p)], counts[("backward", p)]) for p in expected} == expected


def test_ratio_bound_is_the_backbone_time_plus_the_rest_at_the_peak():
    rows = [
        {"part": "backbone", "total_s": 2.0, "gflop": 10.0, "gflop_per_s": 5.0},
        {"part": "decoder", "total_s": 5.0, "gflop": 90.0, "gflop_per_s": 18.0},
        {"part": "loss seg", "total_s": 1.0, "gflop": 0.0, "gflop_per_s": None},
    ]
    table = {"rows": rows, "whole_gflop": 100.0, "mode": "train"}
    assert ratio_bound(table, 45.0) == pytest.approx((2.0 + 90.0 / 45.0) / 2.0)
    assert ratio_bound(table, None) is None
    assert ratio_bound({**table, "rows": rows[1:]}, 45.0) is None  # no backbone row
    assert above_peak(table, 45.0) == [] and above_peak(table, 10.0) == ["decoder"]
    res = profile_module(Toy(), _batch(), SPEC, "infer", repeats=1, warmup=0)
    lines = format_profile({**res, "ratio_bound": 1.25, "above_peak": ["decoder"]}, "toy").splitlines()
    assert lines[-2].startswith("at the backbone's measured time and the other parts at the peak, the clip/backbone")
    assert lines[-2].endswith("ratio would be >= 1.25 (a lower bound: no part runs faster than the peak)")
    assert lines[-1].startswith("but decoder ran faster than the peak here")


def test_profile_flops_false_leaves_the_counts_out():
    res = profile_module(Toy(), _batch(), SPEC, "infer", repeats=1, warmup=0, flops=False)
    assert "whole_gflop" not in res and not any("gflop" in r or "gflop_per_s" in r for r in res["rows"])
    assert "GFLOP" not in format_profile(res, "toy")
    run = run_profile([("tpavi", _cfg("tpavi", ["profile_flops=false", "profile_modes=[infer]"]))])
    assert "peak_matmul_gflop_per_s" not in run and run["config"]["profile_flops"] is False
    assert "gflop" not in run["profiles"]["tpavi"]["infer"]["rows"][0]


def test_ecmvae_bg_training_step_every_part():
    res = profile_model(_cfg("ecmvae_bg"), "train")
    rows = _rows(res)
    parts = {"backbone", "audio_encoder", "neck", "neck_post", "latent", "fusion", "motion", "decoder"}
    assert parts | {"decoder_post", "projector", "optimizer step", "other"} <= set(rows)
    assert {"loss seg", "loss avm", "loss consistency"} <= set(rows)
    assert any(p.startswith("loss kl") for p in rows)  # named by the keys latent.losses returns
    assert rows["fusion"]["calls"] == 2 and rows["motion"]["calls"] == 2  # prior and posterior branches
    assert rows["loss seg"]["calls"] == 2
    _check_adds_up(res)
    _check_flops_add_up(res)
    assert all(rows[p]["gflop"] > 0 for p in parts - {"audio_encoder"})  # VGGish: frozen, forward only


def test_script_profile_writes_table_and_json(tmp_path):
    out = tmp_path / "profile.json"
    cmd = ["quick=true", "profile=true"]
    cmd += ["audio=tiny", "num_frames=2", "profile_models=[tpavi,avsbg]", "profile_modes=[infer]", "threads=1"]
    cmd += ["save_default=false", f"out={out}", f"paths.log_dir={tmp_path}"]
    p = run_script("benchmark.py", cmd, tmp_path, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "tpavi: inference per clip" in p.stdout and "avsbg: inference per clip" in p.stdout
    assert "GFLOP/s" in p.stdout and "fp32 matmul peak:" in p.stdout
    assert p.stdout.count("the clip/backbone ratio would be >= ") == 2
    res = json.loads(out.read_text())
    assert res["peak"]["threads"] == 1 and res["peak"]["conv"]["gflop_per_s"] > 0
    assert res["peak_gflop_per_s"] >= res["peak_matmul_gflop_per_s"] > 0
    table = res["profiles"]["avsbg"]["infer"]
    assert table["ratio_bound"] >= 1.0 and {"gflop", "gflop_per_s"} <= set(table["rows"][0])
    assert res["hardware"]["threads"] == 1 and "interop_threads" in res["hardware"]
    assert set(res["profiles"]) == {"tpavi", "avsbg"}
    assert "motion" in {r["part"] for r in res["profiles"]["avsbg"]["infer"]["rows"]}
    assert "motion" not in {r["part"] for r in res["profiles"]["tpavi"]["infer"]["rows"]}
    alloc = res["allocator"]  # runtime.allocator (default auto): applied on glibc before the models were built
    glibc = process_glibc() is not None
    assert alloc["setting"] == "auto" and alloc["applied"] is glibc and (alloc["values"] is not None) is glibc


def test_script_refuses_profile_and_demo_together(tmp_path):
    p = run_script("benchmark.py", ["profile=true", "demo=true", f"paths.log_dir={tmp_path}"], tmp_path)
    assert p.returncode == ExitCode.CONFIG
    assert "error: profile=true and demo=true" in p.stderr


def test_script_refuses_an_unknown_profile_model(tmp_path):
    cmd = ["profile=true", "profile_models=[nosuch]", f"paths.log_dir={tmp_path}"]
    p = run_script("benchmark.py", cmd, tmp_path)
    assert p.returncode == ExitCode.CONFIG
    assert "error: profile_models: no model config 'nosuch'" in p.stderr


def test_profile_module_refuses_a_training_profile_without_optimizer():
    with pytest.raises(ValueError, match="train needs an optimizer"):
        profile_module(Toy(), _batch(), SPEC, "train")


def test_amp_training_step_parts_add_up():
    model = Toy()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    res = profile_module(model, _batch(), SPEC, "train", opt, amp=True, repeats=1, warmup=0)
    assert res["amp"] is True and "amp=on" in format_profile(res, "toy")
    rows = _rows(res)
    assert rows["fusion"]["calls"] == 2 and rows["fusion"]["backward_s"] > 0
    _check_adds_up(res)
