"""Check an AVSBench-object folder: clips per split and every missing / unreadable / mis-sized file.

    python scripts/check_data.py data=s4 data.root=/path/to/AVSBench-object [image_size=224]
    python scripts/check_data.py data=avss data.root=/path/to/AVSBench-semantic

Exits 1 when any problem is found.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

import avs  # noqa: E402,F401  (registers config resolvers)
from avs.data.check import check_dataset  # noqa: E402
from avs.data.options import pad_short_audio_flag  # noqa: E402
from avs.errors import ConfigError, plain_errors, run_plain  # noqa: E402
from avs.script_args import check_overrides  # noqa: E402

log = logging.getLogger("avs.check_data")


@hydra.main(version_base="1.3", config_path="../configs", config_name="check_data")
@plain_errors
def main(cfg: DictConfig) -> None:
    image_size = cfg.get("image_size")
    if image_size is not None and not isinstance(image_size, int):
        image_size = list(OmegaConf.to_container(image_size))
    if cfg.data.subset == "avss":  # AVSBench-semantic (docs/avss.md)
        from avs.data.avss_check import check_avss

        if image_size is not None:
            raise ConfigError("image_size: the AVSS check compares mask and frame sizes per clip only; drop image_size")
        report = check_avss(cfg.data.root, int(cfg.data.num_classes), progress=True)
        print(report.format())
        if not report.ok:
            sys.exit(1)
        return
    report = check_dataset(
        cfg.data.root,
        cfg.data.subset,
        int(cfg.data.num_frames),
        image_size,
        progress=True,
        pad_short_audio=pad_short_audio_flag(cfg.data),
    )
    print(report.format())
    if not report.ok:
        sys.exit(1)


if __name__ == "__main__":
    run_plain(lambda: check_overrides(sys.argv[1:], "scripts/check_data.py", "check_data", open_nodes=()))
    main()
