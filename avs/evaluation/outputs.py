"""Predicted masks as PNG files in the AVSBench layout (binary masks; AVSS class ids as palette PNGs); a guard
that keeps outputs away from inputs."""

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


def _clip_folder(out: Path, batch: dict[str, Any], b: int) -> tuple[str, Path]:
    """(clip id, folder) of clip `b`: S4 `<out>/<cat>/<vid>`, else `<out>/<vid>`; OutputPathError on a '../' escape."""
    vid = batch["video_id"][b]
    cat = batch["category"][b] if "category" in batch else ""
    folder = out / cat / vid if cat else out / vid
    if not _resolved(folder).is_relative_to(out):  # ids come from the dataset csv: no '../' escapes
        raise OutputPathError(f"clip id {vid!r} / category {cat!r} would write outside {out}")
    return vid, folder


def save_pred_masks(out_dir: str | Path, dataset: Any, batch: dict[str, Any], logits: torch.Tensor) -> list[Path]:
    """Write (sigmoid > 0.5) * 255 PNGs: S4 `<cat>/<vid>/<vid>_<k>.png`, MS3 `<vid>/<vid>_<k>.png`, k = 1..T.

    Refuses (OutputPathError) an `out_dir` inside the dataset root (`dataset.root`) and clip ids
    that would leave `out_dir` (e.g. '../x' in a tampered csv).
    """
    out = check_output_path(out_dir, [getattr(dataset, "root", None)], what="save_masks")
    masks = (torch.sigmoid(logits.float()) > 0.5).to(torch.uint8).mul_(255).cpu().numpy()  # [B,T,1,H,W]
    written = []
    for b in range(len(batch["video_id"])):
        vid, folder = _clip_folder(out, batch, b)
        for t in range(masks.shape[1]):
            buf = io.BytesIO()
            Image.fromarray(np.ascontiguousarray(masks[b, t, 0]), mode="L").save(buf, format="PNG")
            path = folder / f"{vid}_{t + 1}.png"
            atomic_write_bytes(path, buf.getvalue())
            written.append(path)
    return written


def predicted_labels(logits: torch.Tensor) -> torch.Tensor:
    """Class logits [...,C,H,W] -> class ids [...,H,W]: argmax(softmax) over C, the AVSS metrics' rule
    (logits that tie after the float32 softmax go to the lower class; avs.metrics_avss)."""
    return torch.argmax(torch.softmax(logits.float(), dim=-3), dim=-3)


def label_png_bytes(labels: np.ndarray, num_classes: int) -> bytes:
    """Class ids [H,W] -> PNG bytes of a palette image (mode "P"): the pixel values are the class ids and the
    palette is the AVSS one (avs.data.avss_layout.palette), so the file opens in the dataset's colours."""
    from avs.data.avss_layout import palette

    if not 1 <= num_classes <= 256:
        raise ValueError(f"a palette PNG holds at most 256 classes, got num_classes={num_classes}")
    ids = np.asarray(labels)
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= num_classes):
        raise ValueError(f"class ids must lie in 0..{num_classes - 1}, got {int(ids.min())}..{int(ids.max())}")
    img = Image.fromarray(np.ascontiguousarray(ids.astype(np.uint8)))  # mode "L"
    img.putpalette(palette(num_classes).reshape(-1).tolist())  # "L" -> "P", values kept
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def save_pred_labels(out_dir: str | Path, dataset: Any, batch: dict[str, Any], logits: torch.Tensor) -> list[Path]:
    """AVSS: the predicted class ids of every real frame (`frame_valid`) as palette PNGs (label_png_bytes),
    `<vid>/<vid>_<k>.png` with k = 1..T as save_pred_masks names them; padded frames get no file.

    logits [B,T,C,H,W]; ids = predicted_labels(logits). Same refusals as save_pred_masks.
    """
    out = check_output_path(out_dir, [getattr(dataset, "root", None)], what="save_masks")
    num_classes = int(logits.shape[2])
    labels = predicted_labels(logits).cpu().numpy()  # [B,T,H,W]
    real = batch["frame_valid"].bool().cpu().numpy()  # [B,T]
    written = []
    for b in range(len(batch["video_id"])):
        vid, folder = _clip_folder(out, batch, b)
        for t in range(labels.shape[1]):
            if not real[b, t]:
                continue
            path = folder / f"{vid}_{t + 1}.png"
            atomic_write_bytes(path, label_png_bytes(labels[b, t], num_classes))
            written.append(path)
    return written


def script_out_dir(explicit: str | os.PathLike | None) -> Path:
    """A script's output dir: `explicit` when given, else the Hydra run dir of the current job."""
    if explicit:
        return Path(explicit)
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir)
