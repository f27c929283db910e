"""Speed, memory and parameter benchmark of a configured model (scripts/benchmark.py, docs/performance.md),
its per-part profile (`profile`) and the demo's throughput (`demo`).

The code knows no method: which comparison pairs exist and when they apply (`pairs`), and the
targets each model is held to (`targets`), are read from configs/benchmark.yaml.
"""

from avs.benchmark.demo import format_demo_report, run_demo_benchmark
from avs.benchmark.models import bench_model_config, build_bench_model, make_batch, perturb_zero_init
from avs.benchmark.pairs import compare_pairs, output_diff, pair_applicable, pair_spec
from avs.benchmark.probes import (
    data_loader_throughput,
    graph_breaks,
    hardware_info,
    metrics_throughput,
    train_step_syncs,
)
from avs.benchmark.profile import format_profile_report, profile_model, profile_module, run_profile
from avs.benchmark.report import check_targets, format_report
from avs.benchmark.run import apply_quick, run_benchmark
from avs.benchmark.timing import measure, median_time, peak_rss_mb, peak_rss_start, run_measurement

__all__ = [
    "apply_quick",
    "bench_model_config",
    "build_bench_model",
    "check_targets",
    "compare_pairs",
    "data_loader_throughput",
    "format_demo_report",
    "format_profile_report",
    "format_report",
    "graph_breaks",
    "hardware_info",
    "make_batch",
    "measure",
    "median_time",
    "metrics_throughput",
    "output_diff",
    "pair_applicable",
    "pair_spec",
    "peak_rss_mb",
    "peak_rss_start",
    "perturb_zero_init",
    "profile_model",
    "profile_module",
    "run_benchmark",
    "run_demo_benchmark",
    "run_measurement",
    "run_profile",
    "train_step_syncs",
]
