"""Paper-style tables (markdown + csv) from run / multirun dirs: rows = varied config keys, mean ± std over seeds.

python scripts/tables.py outputs/train/multiruns/<time>
python scripts/tables.py <multirun dir> [<more dirs>] --protocol avsbench_legacy --name ecmvae_table4 --out tables/
python scripts/tables.py <dirs> --keys model.latent.divergence --metrics miou fscore fscore_at_0.5
python scripts/tables.py <AVSS runs> --protocol avsbench_legacy     # beside the AVSS paper's numbers
python scripts/tables.py <AVSS runs> --per-class     # plus one IoU column per class (background last)
python scripts/tables.py <multirun dir> --plot sweep.png     # first metric vs the swept key(s), dots = seeds
python scripts/tables.py <proxy benchmark dir or docs/results/proxy_runs.jsonl> --proxy [--version 4] [--out dir]
    [--plot methods.png] [--plot-claims claims.png] [--plot-kl latent_kl.png]
    [--plot-curves val_curves.png]
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from avs.errors import (
    AVSError,  # noqa: E402
    run_plain,  # noqa: E402
)
from avs.tables import make_table, to_markdown  # noqa: E402
from avs.tables.proxy import load_costs, load_protocol  # noqa: E402
from avs.tables.proxy_curves import load_curves  # noqa: E402
from avs.tables.proxy_plots import plot_claims, plot_latent_kl, plot_methods, plot_val_curves  # noqa: E402
from avs.tables.proxy_report import to_markdown as proxy_markdown  # noqa: E402
from avs.tables.proxy_report import write_report  # noqa: E402
from avs.tables.sweep_plot import plot_sweep  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="run dirs, multirun dirs or metrics.json files (searched recursively)")
    p.add_argument("--out", default=None, help="output dir for <name>.md and <name>.csv (default: the first input dir)")
    p.add_argument("--name", default="table", help="file stem and table title (default: table)")
    p.add_argument("--title", default=None, help="table title (default: --name)")
    p.add_argument("--split", default="test", choices=["test", "val"], help="test (default) or the best-on-val metrics")
    p.add_argument(
        "--protocol",
        default=None,
        choices=["per_frame", "avsbench_legacy", "dataset_level", "per_class"],
        help="metric protocol (default per_frame, per_class when every run is AVSS; avsbench_legacy compares "
        "with published numbers)",
    )
    p.add_argument("--metrics", nargs="+", default=["miou", "fscore"], help="metric keys (default: miou fscore)")
    p.add_argument("--keys", nargs="+", default=None, help="row keys (default: the config keys that vary across runs)")
    p.add_argument("--ignore", nargs="+", default=[], help="extra config keys (and their children) never used as rows")
    p.add_argument(
        "--per-class",
        action="store_true",
        help="AVSS runs only: after the metrics, one column per class with its IoU in %% (named from the data "
        "root's label2idx.json, else class_<i>; foreground classes, then background)",
    )
    p.add_argument(
        "--proxy",
        action="store_true",
        help="the one input is a proxy benchmark dir (protocol.yaml): methods, claims, latent and targets tables",
    )
    p.add_argument(
        "--version",
        type=int,
        default=None,
        help="with --proxy and a results file: the protocol version whose lines to read (default: the highest)",
    )
    p.add_argument(
        "--plot",
        default=None,
        help="write a PNG: the first --metrics value against the swept key(s), one dot per seed, mean and 95%% "
        "interval, one panel per subset (with --proxy: the methods plot)",
    )
    p.add_argument(
        "--plot-claims",
        default=None,
        help="with --proxy: write the plot of every claim's paired difference (PNG) to this path",
    )
    p.add_argument(
        "--plot-kl", default=None, help="with --proxy: write the plot of the latent KL over training (PNG) to this path"
    )
    p.add_argument(
        "--plot-curves",
        default=None,
        help="with --proxy: write the plot of the val mIoU over training, per subset (PNG) to this path",
    )
    return p.parse_args(argv)


def proxy_main(args: argparse.Namespace) -> int:
    """The --proxy mode: print the four tables, write md/csv (default into the benchmark dir) and the plots."""
    if len(args.runs) != 1:
        print(
            f"error: --proxy takes one proxy benchmark dir, got {len(args.runs)}: {' '.join(args.runs)}",
            file=sys.stderr,
        )
        return 2
    try:
        protocol, results = load_protocol(args.runs[0], args.version)
        costs = load_costs(args.runs[0], protocol)
        source = Path(args.runs[0])
        paths = write_report(protocol, results, args.out or (source.parent if source.is_file() else source), costs)
        print(proxy_markdown(protocol, results, costs))
        print("wrote " + ", ".join(str(p) for p in paths.values()))
        if args.plot is not None:
            print(f"wrote {plot_methods(results, protocol, args.plot)}")
        if args.plot_claims is not None:
            print(f"wrote {plot_claims(results, protocol, args.plot_claims)}")
        version = protocol.get("version")
        if args.plot_kl is not None:
            curves = load_curves(args.runs[0], results, "kl", version)
            print(f"wrote {plot_latent_kl(curves, protocol, args.plot_kl)}")
        if args.plot_curves is not None:
            curves = load_curves(args.runs[0], results, "val", version)
            print(f"wrote {plot_val_curves(curves, protocol, args.plot_curves)}")
    except (FileNotFoundError, ValueError, AVSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    if args.proxy and args.per_class:
        print("error: --per-class adds class columns to AVSS run tables; it does not apply to --proxy", file=sys.stderr)
        return 2
    if args.proxy:
        return proxy_main(args)
    for flag, value in (
        ("--plot-claims", args.plot_claims),
        ("--plot-kl", args.plot_kl),
        ("--plot-curves", args.plot_curves),
    ):
        if value is not None:
            print(f"error: {flag} draws a proxy benchmark plot; use it with --proxy", file=sys.stderr)
            return 2
    try:
        table, paths = make_table(
            args.runs,
            out_dir=args.out,
            name=args.name,
            title=args.title or args.name,
            split=args.split,
            protocol=args.protocol,
            metrics=args.metrics,
            keys=args.keys,
            ignore=args.ignore,
            per_class=args.per_class,
        )
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(to_markdown(table))
    print(f"wrote {paths['md']} and {paths['csv']}")
    if args.plot is not None:
        try:
            print(f"wrote {plot_sweep(table, args.plot)}")
        except (ValueError, AVSError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(run_plain(main))
