"""Generate a Sounding Shapes root (AVSBench-object layout) from the `data.synthetic` config node.

    python scripts/make_synthetic.py                                   # MS3, quickstart size
    python scripts/make_synthetic.py data=synth_s4 force=true
    python scripts/make_synthetic.py data=synth_avss                   # AVSS layout (docs/avss.md)
    python scripts/make_synthetic.py data.synthetic.clips='{train: 600, val: 100, test: 100}'

Prints the root, the generation speed (clips/s), the disk size and, with `ceilings=true`, the
visual-only ceilings of val and test.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

import avs  # noqa: E402,F401  (registers config resolvers)
from avs.config_checks import ConfigError  # noqa: E402
from avs.data.synthetic import SyntheticConfig, compute_ceilings, ensure_synthetic, is_complete  # noqa: E402
from avs.errors import plain_errors, run_plain  # noqa: E402
from avs.script_args import check_overrides  # noqa: E402

log = logging.getLogger("avs.make_synthetic")


def _disk_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


@hydra.main(version_base="1.3", config_path="../configs", config_name="make_synthetic")
@plain_errors
def main(cfg: DictConfig) -> None:
    if cfg.data.get("synthetic") is None:
        raise ConfigError("data.synthetic is not set: choose a synthetic data config, e.g. data=synth_ms3")
    if cfg.data.subset == "avss":  # semantic Sounding Shapes in the AVSS layout (docs/avss.md)
        from avs.data.synthetic.semantic import semantic_config

        syn, _ = semantic_config(cfg.data)
    else:
        syn = SyntheticConfig.from_mapping(OmegaConf.to_container(cfg.data.synthetic, resolve=True))
    root = Path(cfg.data.root)
    cached = not cfg.force and is_complete(root, syn)
    start = time.perf_counter()
    root = ensure_synthetic(cfg.data, force=bool(cfg.force), progress=bool(cfg.progress))
    seconds = time.perf_counter() - start
    clips = sum(syn.clips.values())
    size = _disk_bytes(root)
    print(f"root: {root}")
    if cached:
        print(f"already complete ({clips} clips); nothing generated (force=true regenerates)")
    else:
        print(f"generated {clips} clips in {seconds:.1f} s ({clips / seconds:.2f} clips/s)")
    print(f"disk size: {size / 2**20:.1f} MiB ({size / max(clips, 1) / 2**10:.0f} KiB per clip)")
    if cfg.ceilings:
        for split in ("val", "test"):
            if syn.clips[split] == 0:
                continue
            if cfg.data.subset == "avss":
                from avs.data.synthetic.semantic_ceilings import compute_semantic_ceilings

                c = compute_semantic_ceilings(root, split, syn.num_classes)
                print(
                    f"avss {split}: visual-only ceiling {c['visual_only_ceiling']:.1f} per-class mIoU "
                    f"({c['visual_only_best']}), oracle {c['oracle']:.1f}"
                )
                continue
            c = compute_ceilings(root, syn.subset, split)
            table = json.dumps({k: round(v, 1) for k, v in c["visual_only"].items()})
            print(
                f"{syn.subset} {split}: visual-only ceiling {c['visual_only_ceiling']:.1f} mIoU "
                f"({c['visual_only_best']}), oracle {c['oracle']:.1f}; all predictors {table}"
            )


if __name__ == "__main__":
    run_plain(lambda: check_overrides(sys.argv[1:], "scripts/make_synthetic.py", "make_synthetic", open_nodes=()))
    main()
