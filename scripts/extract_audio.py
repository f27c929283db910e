"""Cache VGGish embeddings for every clip of an AVSBench subset (for data.audio_source=embedding).

python scripts/extract_audio.py data=s4 data.root=/path/to/AVSBench-object
python scripts/extract_audio.py data=ms3 device=cpu overwrite=true

Errors print as plain `error:` lines on stderr with the exit code of their kind (README, "Exit codes"):
a missing VGGish weight file or data.root exits 5, a malformed clip 3.
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
from avs.data.options import pad_short_audio_flag  # noqa: E402
from avs.engine.checkpoint import CheckpointError  # noqa: E402
from avs.errors import ConfigError, MissingFileError, plain_errors, run_plain  # noqa: E402
from avs.models.vggish import VGGish  # noqa: E402
from avs.script_args import check_overrides  # noqa: E402
from avs.utils.device import select_device  # noqa: E402

log = logging.getLogger("avs.extract_audio")


@hydra.main(version_base="1.3", config_path="../configs", config_name="extract_audio")
@plain_errors
def main(cfg: DictConfig) -> None:
    if not cfg.vggish.pretrained:
        log.warning("vggish.pretrained=false: embeddings come from RANDOM weights (only useful for tests)")
    try:
        vggish = VGGish(weights_path=cfg.vggish.weights_path, pretrained=bool(cfg.vggish.pretrained))
    except FileNotFoundError as exc:  # vggish.weights_path
        raise MissingFileError(str(exc)) from exc
    except ValueError as exc:  # a weight file that does not load or fit
        raise CheckpointError(str(exc)) from exc
    if not Path(str(cfg.data.root)).expanduser().is_dir():
        raise MissingFileError(f"data.root={cfg.data.root}: no such folder")
    try:
        device = select_device(cfg.device)
    except ValueError as exc:
        raise ConfigError(f"device: {exc}") from exc
    if int(cfg.batch_size) < 1:
        raise ConfigError(f"batch_size must be >= 1, got {cfg.batch_size}")
    summary = extract_embeddings(
        dataset_root=cfg.data.root,
        subset=cfg.data.subset,
        vggish=vggish,
        splits=list(cfg.splits),
        num_frames=int(cfg.data.num_frames),
        device=device,
        overwrite=bool(cfg.overwrite),
        out_dir=cfg.data.get("embedding_dir"),
        batch_size=int(cfg.batch_size),
        pad_short_audio=pad_short_audio_flag(cfg.data),
    )  # a missing or malformed clip: AVSDataError (exit 3)
    for split, counts in summary["per_split"].items():
        print(f"{split}: {counts['written']} written, {counts['skipped']} already present")
    print(f"embeddings in {summary['out_dir']}")


if __name__ == "__main__":
    run_plain(lambda: check_overrides(sys.argv[1:], "scripts/extract_audio.py", "extract_audio", open_nodes=()))
    main()
