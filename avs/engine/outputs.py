"""Predicted masks as PNG files in the AVSBench layout."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from avs.utils.io import atomic_write_bytes


def save_pred_masks(out_dir: str | Path, dataset: Any, batch: dict[str, Any], logits: torch.Tensor) -> list[Path]:
    """Write (sigmoid > 0.5) * 255 PNGs: S4 `<cat>/<vid>/<vid>_<k>.png`, MS3 `<vid>/<vid>_<k>.png`, k = 1..T."""
    out = Path(out_dir)
    masks = (torch.sigmoid(logits.float()) > 0.5).to(torch.uint8).mul_(255).cpu().numpy()  # [B,T,1,H,W]
    written = []
    for b, vid in enumerate(batch["video_id"]):
        cat = batch["category"][b] if "category" in batch else ""
        folder = out / cat / vid if cat else out / vid
        for t in range(masks.shape[1]):
            buf = io.BytesIO()
            Image.fromarray(np.ascontiguousarray(masks[b, t, 0]), mode="L").save(buf, format="PNG")
            path = folder / f"{vid}_{t + 1}.png"
            atomic_write_bytes(path, buf.getvalue())
            written.append(path)
    return written
