"""Cache VGGish embeddings for every clip of an AVSBench subset (for data.audio_source=embedding).

python scripts/extract_audio.py data=s4 data.root=/path/to/AVSBench-object
python scripts/extract_audio.py data=ms3 device=cpu overwrite=true
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

import avs  # noqa: E402,F401  (registers config resolvers)
from avs.data.embeddings import extract_embeddings  # noqa: E402
from avs.data.layout import AVSDataError  # noqa: E402
from avs.data.options import pad_short_audio_flag  # noqa: E402
from avs.errors import plain_errors  # noqa: E402
from avs.models.vggish import VGGish  # noqa: E402
from avs.utils.device import select_device  # noqa: E402

log = logging.getLogger("avs.extract_audio")


@hydra.main(version_base="1.3", config_path="../configs", config_name="extract_audio")
@plain_errors
def main(cfg: DictConfig) -> None:
    if not cfg.vggish.pretrained:
        log.warning("vggish.pretrained=false: embeddings come from RANDOM weights (only useful for tests)")
    try:
        vggish = VGGish(weights_path=cfg.vggish.weights_path, pretrained=bool(cfg.vggish.pretrained))
        summary = extract_embeddings(
            dataset_root=cfg.data.root,
            subset=cfg.data.subset,
            vggish=vggish,
            splits=list(cfg.splits),
            num_frames=int(cfg.data.num_frames),
            device=select_device(cfg.device),
            overwrite=bool(cfg.overwrite),
            out_dir=cfg.data.get("embedding_dir"),
            batch_size=int(cfg.batch_size),
            pad_short_audio=pad_short_audio_flag(cfg.data),
        )
    except (AVSDataError, FileNotFoundError, ValueError) as exc:
        log.error("%s", exc)
        sys.exit(1)
    for split, counts in summary["per_split"].items():
        print(f"{split}: {counts['written']} written, {counts['skipped']} already present")
    print(f"embeddings in {summary['out_dir']}")


if __name__ == "__main__":
    main()
