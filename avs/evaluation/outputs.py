"""Predicted masks as PNG files in the AVSBench layout; a guard that keeps outputs away from inputs."""

from __future__ import annotations

import io
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from avs.errors import AVSError, ExitCode
from avs.utils.io import atomic_write_bytes


class OutputPathError(AVSError, ValueError, code=ExitCode.OUTPUT):
    """An output location would write into (and possibly overwrite) an input: dataset or checkpoint."""


def _resolved(path: str | os.PathLike) -> Path:
    return Path(path).expanduser().resolve()  # follows symlinks, so a link into the dataset is caught


def check_output_path(out: str | os.PathLike, inputs: Iterable[str | os.PathLike | None], what: str = "output") -> Path:
    """Refuse `out` when it is, or lies inside, an input folder, or is an input file -> resolved `out`.

    inputs: dataset roots (folders) and input files (checkpoints, weights); None entries are ignored.
    Raises OutputPathError naming both paths.
    """
    target = _resolved(out)
    for item in inputs:
        if item is None or str(item) == "":
            continue
        src = _resolved(item)
        if target == src or (src.is_dir() and target.is_relative_to(src)):
            raise OutputPathError(
                f"{what} path {target} lies inside the input {src}: refusing to write there "
                "(it could overwrite dataset files such as gt_masks); choose another output_dir"
            )
    return target


def save_pred_masks(out_dir: str | Path, dataset: Any, batch: dict[str, Any], logits: torch.Tensor) -> list[Path]:
    """Write (sigmoid > 0.5) * 255 PNGs: S4 `<cat>/<vid>/<vid>_<k>.png`, MS3 `<vid>/<vid>_<k>.png`, k = 1..T.

    Refuses (OutputPathError) an `out_dir` inside the dataset root (`dataset.root`) and clip ids
    that would leave `out_dir` (e.g. '../x' in a tampered csv).
    """
    out = check_output_path(out_dir, [getattr(dataset, "root", None)], what="save_masks")
    masks = (torch.sigmoid(logits.float()) > 0.5).to(torch.uint8).mul_(255).cpu().numpy()  # [B,T,1,H,W]
    written = []
    for b, vid in enumerate(batch["video_id"]):
        cat = batch["category"][b] if "category" in batch else ""
        folder = out / cat / vid if cat else out / vid
        if not _resolved(folder).is_relative_to(out):  # ids come from the dataset csv: no '../' escapes
            raise OutputPathError(f"clip id {vid!r} / category {cat!r} would write outside {out}")
        for t in range(masks.shape[1]):
            buf = io.BytesIO()
            Image.fromarray(np.ascontiguousarray(masks[b, t, 0]), mode="L").save(buf, format="PNG")
            path = folder / f"{vid}_{t + 1}.png"
            atomic_write_bytes(path, buf.getvalue())
            written.append(path)
    return written


def script_out_dir(explicit: str | os.PathLike | None) -> Path:
    """A script's output dir: `explicit` when given, else the Hydra run dir of the current job."""
    if explicit:
        return Path(explicit)
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir)
