"""Per-part profile (`profile=true`, docs/performance.md): forward and backward seconds of each part of
a training step (loss terms and the optimizer step included) and of an inference forward, with the
share of the whole each takes. The parts plus "other" tile the measured whole (avs.benchmark.timeline).
With `profile_flops`, also each part's GFLOP and GFLOP/s, the fp32 peak (matmul and convolution) and
the step/backbone ratio bound (avs.benchmark.flops)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from avs.benchmark.attach import attached, param_owner, part_names
from avs.benchmark.flops import above_peak, count_flops, dense_peak, ratio_bound
from avs.benchmark.models import _autocast, bench_model_config, build_bench_model, make_batch, perturb_zero_init
from avs.benchmark.timeline import EXCLUDED, OTHER, PartTimer, make_clock
from avs.benchmark.timing import median_time
from avs.errors import ConfigError

__all__ = [
    "format_profile",
    "format_profile_report",
    "pin_threads",
    "profile_model",
    "profile_module",
    "profile_rows",
    "run_profile",
]

log = logging.getLogger(__name__)


def _train_run(model, batch, opt, device, amp: bool, slot, clock, owner) -> tuple[dict, PartTimer, int]:
    """One instrumented training step -> (seconds per (phase, part), the timer, autograd nodes hooked)."""
    timer = PartTimer(clock, owner)
    slot.timer = timer
    try:
        with _autocast(device, amp):
            terms = model(batch)
        loss = sum(v.float() for v in terms.values())
        nodes = timer.hook_backward(loss)
        loss.backward()
        timer.start("optimizer", "optimizer step")
        opt.step()
        opt.zero_grad(set_to_none=True)
    finally:
        slot.timer = None
    return timer.timeline.close(), timer, nodes


def _infer_run(model, batch, device, amp: bool, slot, clock, owner) -> tuple[dict, PartTimer, int]:
    timer = PartTimer(clock, owner)
    slot.timer = timer
    try:
        with torch.no_grad(), _autocast(device, amp):
            model(batch)
    finally:
        slot.timer = None
    return timer.timeline.close(), timer, 0


def _median_run(run: Callable[[], tuple], repeats: int, warmup: int) -> tuple:
    """`warmup` discarded runs, then `repeats`; the run whose whole (graph walk excluded) is the median."""
    for _ in range(warmup):
        run()
    runs = [run() for _ in range(max(1, repeats))]
    wholes = [sum(s for (phase, _), s in r[0].items() if phase != EXCLUDED) for r in runs]
    order = sorted(range(len(runs)), key=wholes.__getitem__)
    chosen = runs[order[(len(order) - 1) // 2]]
    return (*chosen, wholes)


def _add_flops(rows: list[dict[str, Any]], names: list[str], flops: Mapping[tuple[str, str], int]) -> float:
    """`gflop` (all phases) and `gflop_per_s` (over the row's total time) into each row -> the whole GFLOP."""
    for row, name in zip(rows, names, strict=True):
        gflop = sum(n for (phase, part), n in flops.items() if part == name and phase != EXCLUDED) / 1e9
        row["gflop"] = gflop
        row["gflop_per_s"] = gflop / row["total_s"] if gflop > 0 and row["total_s"] > 0 else None
    return sum(n for (phase, _), n in flops.items() if phase != EXCLUDED) / 1e9


def profile_rows(
    seconds: Mapping[tuple[str, str], float],
    timer: PartTimer,
    parts: list[str],
    flops: Mapping[tuple[str, str], int] | None = None,
) -> dict[str, Any]:
    """Table rows: one per part (forward, backward, calls, share), loss terms, the optimizer step, other;
    with `flops` (operations per (phase, part) of a counted run) also each row's GFLOP and GFLOP/s."""
    whole = sum(s for (phase, _), s in seconds.items() if phase != EXCLUDED)
    names = list(parts)
    names += sorted({p for (_, p) in seconds if p.startswith("loss ")} | {p for p in timer.calls if p not in names})
    names = [n for n in dict.fromkeys(names) if n != OTHER]
    rows, kept = [], []
    for name in [*names, "optimizer step", OTHER]:
        fwd, bwd = seconds.get(("forward", name), 0.0), seconds.get(("backward", name), 0.0)
        step = seconds.get(("optimizer", name), 0.0)
        if name != OTHER and fwd == bwd == step == 0.0 and not timer.calls.get(name):
            continue
        kept.append(name)
        total = fwd + bwd + step
        rows.append(
            {
                "part": timer.aliases.get(name, name),
                "forward_s": fwd,
                "backward_s": bwd,
                "total_s": total,
                "share": total / whole if whole > 0 else 0.0,
                "calls": int(timer.calls.get(name, 1 if name == "optimizer step" else 0)),
            }
        )
    out = {
        "whole_s": whole,
        "parts_sum_s": sum(r["total_s"] for r in rows),
        "excluded_graph_walk_s": seconds.get((EXCLUDED, "graph walk"), 0.0),
        "rows": rows,
    }
    if flops is not None:
        out["whole_gflop"] = _add_flops(rows, kept, flops)
    return out


def _setup(cfg: DictConfig, device: torch.device, mode: str):
    c = bench_model_config(cfg)
    model = perturb_zero_init(build_bench_model(c, device, int(cfg.get("seed", 0))))
    B = int(c.batch_size) if mode == "train" else 1
    batch = make_batch(B, int(c.num_frames), int(c.image_size), "logmel", device, int(c.model.get("audio_dim", 128)))
    return c, model, batch


def _plain_step(model, batch, opt, device, amp: bool, mode: str) -> Callable[[], None]:
    """The same step without any hook (its median is the whole the instrumented runs are checked against)."""

    def step() -> None:
        if mode == "infer":
            with torch.no_grad(), _autocast(device, amp):
                model(batch)
            return
        with _autocast(device, amp):
            terms = model(batch)
        sum(v.float() for v in terms.values()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def profile_module(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    spec: Mapping[str, Any],
    mode: str,
    opt: torch.optim.Optimizer | None = None,
    amp: bool = False,
    repeats: int = 5,
    warmup: int = 1,
    event_cls=None,
    flops: bool = True,
) -> dict[str, Any]:
    """Per-part table of any model whose training forward returns a dict of loss terms (`mode='train'`,
    stepping `opt`) or of its no-grad forward (`mode='infer'`); `spec` as `profile_parts` in the config.
    `flops`: also count each part's operations, in a separate untimed run after the timed ones."""
    if mode not in MODES or (mode == "train" and opt is None):
        raise ValueError(f"profile_module: mode must be one of {MODES} (train needs an optimizer), got {mode!r}")
    device = batch["frames"].device
    model.train(mode == "train")
    owner, parts = param_owner(model, spec), part_names(model, spec)
    clock = make_clock(device, event_cls)
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    plain_s = median_time(_plain_step(model, batch, opt, device, amp, mode), repeats, warmup, sync)
    with attached(model, spec) as slot:

        def instrumented(on_clock) -> tuple:
            if mode == "train":
                return _train_run(model, batch, opt, device, amp, slot, on_clock, owner)
            return _infer_run(model, batch, device, amp, slot, on_clock, owner)

        def run() -> tuple:
            t0 = time.perf_counter()
            return (*instrumented(clock), time.perf_counter() - t0)

        seconds, timer, nodes, wall, wholes = _median_run(run, repeats, warmup)
        # the arithmetic: one more run of the same step, untimed, its operations counted per part
        counts = count_flops(lambda flop_clock: instrumented(flop_clock)[0]) if flops else None
    out = profile_rows(seconds, timer, parts, counts)
    out.update(
        {
            "mode": mode,
            "amp": bool(amp),
            "clock": clock.kind,
            "batch_size": int(batch["frames"].shape[0]),
            "uninstrumented_s": plain_s,
            "instrumented_wholes_s": wholes,
            "overhead": out["whole_s"] / plain_s - 1.0 if plain_s > 0 else None,
            "autograd_nodes_hooked": nodes,
            "run_wall_s": wall,  # perf_counter around the chosen run (graph walk included)
        }
    )
    if getattr(clock, "syncs", None) is not None:
        out["syncs"] = clock.syncs
    return out


def profile_model(cfg: DictConfig, mode: str, amp: bool = False, event_cls=None) -> dict[str, Any]:
    """Per-part table of the configured model: a training step (`mode='train'`, the trainer's optimizer)
    or an inference forward (`mode='infer'`, B=1)."""
    from avs.engine.optim import build_optimizer

    device = torch.device(str(cfg.device))
    spec = OmegaConf.to_container(cfg.profile_parts, resolve=True)
    c, model, batch = _setup(cfg, device, mode)
    opt = build_optimizer(model.parameters(), {**dict(c.get("trainer") or {}), "lr": 1e-5}) if mode == "train" else None
    flops = bool(cfg.profile_flops)
    return profile_module(model, batch, spec, mode, opt, amp, int(c.repeats), int(c.warmup), event_cls, flops)


def _flop_cells(gflop: float | None, rate: float | None) -> str:
    g = f"{'-':>10}" if gflop is None else f"{gflop:>10.3f}"
    return g + (f"{'-':>10}" if rate is None else f"{rate:>10.1f}")


def _bound_line(res: Mapping[str, Any]) -> list[str]:
    if res.get("ratio_bound") is None:
        return []
    ratio = "step/backbone" if res["mode"] == "train" else "clip/backbone"
    L = [
        f"at the backbone's measured time and the other parts at the peak, the {ratio} ratio "
        f"would be >= {res['ratio_bound']:.2f} (a lower bound: no part runs faster than the peak)"
    ]
    if res.get("above_peak"):
        L.append(
            f"but {', '.join(res['above_peak'])} ran faster than the peak here, so the bound does not hold "
            "for this table (a noisy or loaded machine, or a kernel faster than both peak kernels)"
        )
    return L


def format_profile(res: Mapping[str, Any], title: str) -> str:
    """Plain-text per-part table of one profile_model result (GFLOP columns when it was counted)."""
    train, counted = res["mode"] == "train", "whole_gflop" in res
    L = [
        f"{title}: {'training step' if train else 'inference per clip'} (B={res['batch_size']}, "
        f"amp={'on' if res['amp'] else 'off'}, clock={res['clock']})",
        f"{'part':<28}{'calls':>6}{'forward ms':>12}"
        + (f"{'backward ms':>13}{'total ms':>10}" if train else "")
        + f"{'share':>8}"
        + (f"{'GFLOP':>10}{'GFLOP/s':>10}" if counted else ""),
    ]
    for r in res["rows"]:
        step = r["part"] == "optimizer step"
        fwd = f"{'-':>12}" if step else f"{r['forward_s'] * 1e3:>12.2f}"
        bwd = (f"{'-':>13}" if step else f"{r['backward_s'] * 1e3:>13.2f}") + f"{r['total_s'] * 1e3:>10.2f}"
        calls = "-" if r["part"] == OTHER else r["calls"]
        L.append(
            f"{r['part'][:27]:<28}{calls:>6}{fwd}{bwd if train else ''}{r['share'] * 100:>7.1f}%"
            + (_flop_cells(r.get("gflop"), r.get("gflop_per_s")) if counted else "")
        )
    whole, gflop = res["whole_s"], res.get("whole_gflop")
    L.append(
        f"{'whole (instrumented)':<28}{'':>6}"
        + (f"{'':>12}{'':>13}{whole * 1e3:>10.2f}" if train else f"{whole * 1e3:>12.2f}")
        + f"{res['parts_sum_s'] / whole * 100 if whole else 0:>7.1f}%"
        + (_flop_cells(gflop, gflop / whole if gflop and whole else None) if counted else "")
    )
    L.append(
        f"uninstrumented median {res['uninstrumented_s'] * 1e3:.2f} ms; hook overhead "
        f"{(res['overhead'] or 0) * 100:+.1f}%"
        + (f"; graph walk (not in the whole) {res['excluded_graph_walk_s'] * 1e3:.2f} ms" if train else "")
    )
    return "\n".join(L + _bound_line(res))


MODES = ("train", "infer")


def pin_threads(cfg: DictConfig) -> dict[str, int]:
    """Apply `threads` (null = torch's default) and report the intra- and inter-op thread counts."""
    if cfg.get("threads") is not None:
        n = int(cfg.threads)
        if n < 1:
            raise ConfigError(f"threads must be >= 1 or null, got {n}")
        torch.set_num_threads(n)
    return {"threads": torch.get_num_threads(), "interop_threads": torch.get_num_interop_threads()}


def run_profile(cfgs: list[tuple[str, DictConfig]], event_cls=None) -> dict[str, Any]:
    """Per-part tables of every (model, amp, mode) asked for -> a JSON-ready dict."""
    from avs.benchmark.probes import hardware_info

    first = cfgs[0][1]
    modes = [str(m) for m in first.profile_modes]
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise ConfigError(f"profile_modes must be a non-empty list of {list(MODES)}, got {modes}")
    threads = pin_threads(first)
    device = torch.device(str(first.device))
    res: dict[str, Any] = {"hardware": {**hardware_info(device), **threads}, "profiles": {}}
    res["config"] = {
        "backbone": str(first.backbone.name),
        "image_size": int(first.image_size),
        "num_frames": int(first.num_frames),
        "batch_size": int(first.batch_size),
        "repeats": int(first.repeats),
        "warmup": int(first.warmup),
        "quick": bool(first.quick),
        "profile_flops": bool(first.profile_flops),
        "note": "each table is the repeat whose instrumented whole is the median of the repeats",
    }
    for name, cfg in cfgs:
        tables: dict[str, Any] = {}
        for amp in list(cfg.profile_amp):
            for mode in modes:
                log.info("profile %s %s amp=%s", name, mode, bool(amp))
                tables[f"{mode}_amp" if amp else mode] = profile_model(cfg, mode, bool(amp), event_cls)
        res["profiles"][name] = tables
    if res["config"]["profile_flops"]:
        _add_peak(res, device)
    return res


def _add_peak(res: dict[str, Any], device: torch.device) -> None:
    """The fp32 peak (once per run, at the profile's thread count) and each fp32 table's ratio bound."""
    log.info("fp32 peak: matmul and convolution")
    peak = dense_peak(device)
    res["peak"] = peak
    res["peak_matmul_gflop_per_s"] = peak["matmul"]["gflop_per_s"]
    res["peak_gflop_per_s"] = peak["gflop_per_s"]
    for tables in res["profiles"].values():
        for table in tables.values():
            # an fp32 peak bounds fp32 tables only: bf16 autocast runs other kernels
            table["ratio_bound"] = None if table["amp"] else ratio_bound(table, peak["gflop_per_s"])
            table["above_peak"] = [] if table["amp"] else above_peak(table, peak["gflop_per_s"])


def format_profile_report(res: Mapping[str, Any]) -> str:
    """All tables of a run_profile result, under one header line."""
    c, h = res["config"], res["hardware"]
    L = [
        f"per-part profile: backbone={c['backbone']} size={c['image_size']} T={c['num_frames']} "
        f"B={c['batch_size']} repeats={c['repeats']} warmup={c['warmup']} device={h['device']} "
        f"threads={h['threads']} interop={h['interop_threads']}"
    ]
    for name, tables in res["profiles"].items():
        for table in tables.values():
            L += ["", format_profile(table, name)]
    peak = res.get("peak")
    if peak:
        mm, conv = peak["matmul"], peak["conv"]
        L += [
            "",
            f"fp32 matmul peak: {mm['gflop_per_s']:.1f} GFLOP/s ({mm['shape']}); {conv['shape']}: "
            f"{conv['gflop_per_s']:.1f} GFLOP/s (median of {peak['repeats']}, threads={peak['threads']}); "
            f"the bounds use the faster, {peak['gflop_per_s']:.1f} GFLOP/s",
        ]
    return "\n".join(L)
