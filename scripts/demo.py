"""Segment the sounding objects of a video with a trained checkpoint (docs/demo.md).

    python scripts/demo.py video=clip.mp4 checkpoint=outputs/train/runs/<run>/checkpoints/best.ckpt
    python scripts/demo.py video=silent.mp4 audio_file=track.wav checkpoint=... sampling=dense

Writes masks/<stem>_<k>.png, <stem>_overlay.mp4 (with the audio), contact_sheet.png and demo.json.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import avs  # noqa: E402,F401
from avs.errors import plain_errors, run_plain  # noqa: E402
from avs.evaluation.outputs import script_out_dir  # noqa: E402
from avs.inference.demo import run_demo  # noqa: E402
from avs.script_args import check_overrides  # noqa: E402
from avs.utils.allocator import configure as configure_allocator  # noqa: E402

log = logging.getLogger("avs.demo")


@hydra.main(version_base="1.3", config_path="../configs", config_name="demo")
@plain_errors
def main(cfg: DictConfig) -> None:
    configure_allocator(cfg.runtime.allocator)  # process-wide, before the model and data are built
    out_dir = script_out_dir(cfg.out_dir)
    result = run_demo(cfg, out_dir)
    print(f"{len(result.masks)} masks: {out_dir / 'masks'}")
    if result.overlay_video:
        print(f"overlay video: {result.overlay_video}")
    if result.contact_sheet:
        print(f"contact sheet: {result.contact_sheet}")
    print(f"summary: {result.summary}")


if __name__ == "__main__":
    run_plain(lambda: check_overrides(sys.argv[1:], "scripts/demo.py", "demo", from_checkpoint=True, open_nodes=()))
    main()
