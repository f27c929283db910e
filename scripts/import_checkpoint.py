"""Convert an authors' released checkpoint into an avs checkpoint (docs/released_checkpoints.md).

    python scripts/import_checkpoint.py --source avsbench --released S4_pvt_best.pth \
        --vggish weights/vggish-10086976.pth --out checkpoints/avsbench_tpavi_pvt_s4.ckpt \
        experiment=avsbench_tpavi_pvt data=s4 paths.avsbench_root=/data/avsbench_data

    python scripts/import_checkpoint.py --source avsbench_avss --released <AVSS PVT or ResNet-50 file>.pth \
        --vggish weights/vggish-10086976.pth --out checkpoints/avsbench_tpavi_avss.ckpt \
        data.root=/data/AVSBench-semantic

Trailing arguments are train-config overrides that name the avs model, backbone and subset the
file corresponds to (an experiment overlay, or model=... backbone=... data=...). For
`--source avsbench_avss` the importer reads the backbone from the file and adds its experiment and
`data=avss` unless given. The written checkpoint uses `model.preset=release` and works with
eval.py, demo.py, visualize.py and export.py.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import avs  # noqa: E402,F401
from avs.errors import run_plain  # noqa: E402
from avs.inference.released import SOURCES, import_checkpoint, release_config  # noqa: E402
from avs.inference.released_avss import source_overrides  # noqa: E402
from avs.script_args import check_overrides  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", required=True, choices=SOURCES, help="which authors' code saved the file")
    parser.add_argument("--released", required=True, help="the released .pth state dict")
    parser.add_argument("--out", required=True, help="where to write the avs checkpoint (.ckpt)")
    parser.add_argument("--vggish", default=None, help="torchvggish weights (vggish-10086976.pth)")
    parser.add_argument(
        "overrides", nargs="*", help="train-config overrides, e.g. experiment=avsbench_tpavi_pvt data=s4"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    overrides = source_overrides(args.source, args.released, args.overrides)  # AVSS: experiment + data from the file
    check_overrides(overrides, "scripts/import_checkpoint.py", "train", open_nodes=["model"])
    cfg = release_config(overrides)
    record = import_checkpoint(args.source, args.released, cfg, args.out, vggish_path=args.vggish)
    print(json.dumps(record, indent=2))
    print(f"wrote {args.out}; evaluate with: python scripts/eval.py checkpoint={args.out} split=test")
    return 0


if __name__ == "__main__":
    sys.exit(run_plain(main))  # the project's errors: plain lines and their exit code (README)
