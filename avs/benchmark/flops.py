"""Arithmetic of the per-part profile (`profile_flops`, docs/performance.md): the floating-point
operations each part does, counted by `torch.utils.flop_counter.FlopCounterMode` in one separate,
untimed run of the same step, the machine's fp32 peak (matmul and convolution), and the step/backbone
ratio bound.

Attribution uses the profile's own timeline: the run is the instrumented step with a clock whose
mark is the counter's running total, so each (phase, part) interval gets the operations counted
while it ran, with exactly the boundaries the times have (loss functions, part methods and the
backward nodes included), and the parts add up to the whole count by construction. FlopCounterMode
counts matmuls, convolutions and attention (forward and backward); elementwise work, norms, pooling
and the optimizer step count zero. Two of its formulas are replaced (FLOP_FORMULAS).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count, sdpa_backward_flop_count, sdpa_flop_count

__all__ = ["FLOP_FORMULAS", "FlopClock", "above_peak", "count_flops", "dense_peak", "ratio_bound"]

aten = torch.ops.aten


def _conv_backward_flop(
    grad_out_shape,
    x_shape,
    w_shape,
    _bias,
    _stride,
    _padding,
    _dilation,
    transposed,
    _output_padding,
    _groups,
    output_mask,
    out_shape=None,
    **_,
) -> int:
    """The input gradient and the weight gradient each take the forward's multiplications (every product
    x_i * w_j of the forward appears once in each), for any stride, padding, dilation and groups.
    (torch's own formula multiplies a grouped convolution's weight gradient by the group count.)"""
    forward = conv_flop_count(x_shape, w_shape, grad_out_shape, transposed)
    return forward * (int(bool(output_mask[0])) + int(bool(output_mask[1])))


def _cpu_sdpa_flop(query_shape, key_shape, value_shape, *_, out_shape=None, **__) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_sdpa_backward_flop(grad_out_shape, query_shape, key_shape, value_shape, *_, out_shape=None, **__) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


# FlopCounterMode's formulas, corrected or completed: grouped (depthwise) convolution backward, and the
# fused attention kernel CPU runs (counted like the CUDA kernels, which torch's table already knows)
FLOP_FORMULAS: dict[Any, Callable[..., int]] = {
    aten.convolution_backward: _conv_backward_flop,
    aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flop,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward_flop,
}


class FlopClock:
    """Timeline clock whose marks are the operations counted so far: intervals become counts."""

    kind = "flop_counter"

    def __init__(self, counter: FlopCounterMode) -> None:
        self.counter = counter

    def mark(self) -> int:
        return self.counter.get_total_flops()

    def offsets(self, marks: list[int]) -> list[int]:
        return [m - marks[0] for m in marks]


def count_flops(run: Callable[[FlopClock], dict[tuple[str, str], int]]) -> dict[tuple[str, str], int]:
    """`run(clock)` performs one instrumented step whose timeline reads `clock` -> operations per (phase, part)."""
    with FlopCounterMode(display=False, custom_mapping=FLOP_FORMULAS) as counter:
        return run(FlopClock(counter))


def _rate(fn: Callable[[], Any], flop: int, device: torch.device, repeats: int, warmup: int) -> dict[str, float]:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with torch.no_grad():
        for _ in range(warmup):
            fn()
        sync()
        times = []
        for _ in range(max(1, repeats)):
            t0 = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    return {"median_s": median, "gflop_per_s": flop / median / 1e9}


def dense_peak(device: torch.device, repeats: int = 5, warmup: int = 1) -> dict[str, Any]:
    """GFLOP/s (median of `repeats`, at the current thread count) of two large fp32 kernels: a 2048 x 2048
    @ 2048 x 2048 matmul and a 3x3, 256 -> 256 channel convolution of a 64 x 64 map; `gflop_per_s` is the
    faster. Both are needed: a library can run one far below the machine's rate (MKL's matmul on AMD CPUs
    trails the oneDNN convolutions), and a part that beats the peak would void the ratio bound."""
    g = torch.Generator().manual_seed(0)
    n, c, hw = 2048, 256, 64
    a, b = (torch.randn(n, n, generator=g).to(device) for _ in range(2))
    out = torch.empty(n, n, device=device)
    x, w = torch.randn(1, c, hw, hw, generator=g).to(device), torch.randn(c, c, 3, 3, generator=g).to(device)
    matmul = _rate(lambda: torch.mm(a, b, out=out), 2 * n**3, device, repeats, warmup)
    conv = _rate(lambda: torch.nn.functional.conv2d(x, w, padding=1), 2 * hw * hw * c * c * 9, device, repeats, warmup)
    return {
        "matmul": {"shape": f"{n}x{n} @ {n}x{n}", **matmul},
        "conv": {"shape": f"3x3 conv {c}->{c} channels, {hw}x{hw}", **conv},
        "repeats": max(1, repeats),
        "threads": torch.get_num_threads(),
        "gflop_per_s": max(matmul["gflop_per_s"], conv["gflop_per_s"]),
    }


def above_peak(table: Mapping[str, Any], peak_gflop_per_s: float) -> list[str]:
    """Rows whose rate exceeds the peak (the bound assumes none does)."""
    return [r["part"] for r in table["rows"] if (r.get("gflop_per_s") or 0.0) > peak_gflop_per_s]


def ratio_bound(table: Mapping[str, Any], peak_gflop_per_s: float | None) -> float | None:
    """(backbone s + (whole GFLOP - backbone GFLOP) / peak) / backbone s: the step/backbone (or
    clip/backbone) ratio if every other part ran at the peak; None without a backbone row, its time
    or a count."""
    rows = {r["part"]: r for r in table["rows"]}
    backbone = rows.get("backbone")
    whole = table.get("whole_gflop")
    if not peak_gflop_per_s or backbone is None or backbone.get("gflop") is None or whole is None:
        return None
    if backbone["total_s"] <= 0:
        return None
    return (backbone["total_s"] + (whole - backbone["gflop"]) / peak_gflop_per_s) / backbone["total_s"]
