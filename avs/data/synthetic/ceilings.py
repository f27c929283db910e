"""Visual-only ceilings of a Sounding Shapes split, scored from the sidecars with avs.metrics."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from avs.data.layout import LAYOUTS, ClipRecord, get_layout, mask_path
from avs.data.synthetic.render import rle_decode
from avs.errors import ConfigError


def _frame_ious(pred: list[np.ndarray], gt: list[np.ndarray]) -> list[float]:
    """AVSBench per-frame IoU (avs.metrics) of bool [H,W] masks; an empty GT scores the true-negative fraction."""
    import torch

    from avs.metrics import binary_frame_iou

    if not pred:
        return []
    return binary_frame_iou(torch.from_numpy(np.stack(pred)), torch.from_numpy(np.stack(gt))).tolist()


def _load_sidecars(root: Path, subset: str, split: str) -> list[dict[str, Any]]:
    from avs.data.synthetic.writer import meta_dir as sidecar_dir

    meta_dir = sidecar_dir(root, subset, split)
    if not meta_dir.is_dir():
        raise FileNotFoundError(f"{meta_dir}: no Sounding Shapes sidecars (is {root} a generated {subset} root?)")
    return [json.loads(p.read_text()) for p in sorted(meta_dir.glob("*.json"))]


def _category_prior(train: list[dict[str, Any]]) -> dict[str, float]:
    """P(sounds | on screen) per category, counted over train frames."""
    present: dict[str, int] = {}
    sounding: dict[str, int] = {}
    for clip in train:
        for obj in clip["objects"]:
            present[obj["category"]] = present.get(obj["category"], 0) + len(obj["sounding"])
            sounding[obj["category"]] = sounding.get(obj["category"], 0) + int(sum(obj["sounding"]))
    return {c: sounding.get(c, 0) / present[c] for c in sorted(present)}


def _read_gt_png(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("L")) > 127


def _score_frames(root: Path, subset: str, split: str, clips: list[dict[str, Any]], prior: dict[str, float],
                  names: list[str]) -> tuple[dict[str, list[float]], list[float]]:
    """Per-frame IoUs of every visual-only predictor, and of the GT PNGs on disk (the oracle)."""
    layout = get_layout(subset)
    preds: dict[str, list[np.ndarray]] = {k: [] for k in names}
    gts: list[np.ndarray] = []
    disk, disk_gt, oracle_ok = [], [], []
    for clip in clips:
        S, T, objs = clip["image_size"], clip["num_frames"], clip["objects"]
        rank = sorted(range(len(objs)), key=lambda i: (-prior.get(objs[i]["category"], 0.0), objs[i]["category"]))
        rec = ClipRecord(clip["video_id"], clip["category"], split)
        for t in range(T):
            vis = np.stack([rle_decode(o["visible_rle"][t], (S, S)) for o in objs])  # [n,S,S]
            snd = np.array([o["sounding"][t] for o in objs], dtype=bool)
            gt = vis[snd].any(axis=0)
            gts.append(gt)
            preds["all_objects"].append(vis.any(axis=0))
            preds["largest_object"].append(vis[int(vis.sum(axis=(1, 2)).argmax())])
            for m in range(1, len(names) - 1):
                preds[f"prior_top{m}"].append(vis[rank[:m]].any(axis=0))
            png = mask_path(root, layout, rec, t + 1)
            if png.is_file():
                on_disk = _read_gt_png(png)
                oracle_ok.append(on_disk.shape == gt.shape)
                if oracle_ok[-1]:
                    disk.append(on_disk)
                    disk_gt.append(gt)
    scores = {k: _frame_ious(v, gts) for k, v in preds.items()}
    matched = iter(_frame_ious(disk, disk_gt))
    oracle = [next(matched) if ok else 0.0 for ok in oracle_ok]  # a PNG of the wrong size scores 0
    return scores, oracle


def compute_ceilings(root: str | os.PathLike, subset: str, split: str) -> dict[str, Any]:
    """mIoU (0-100) of visual-only predictors and of the stored GT on one split, from the sidecars.

    Visual-only predictors know every object's exact visible mask but not the audio: `all_objects`,
    `largest_object`, and `prior_top<m>` (the m on-screen objects whose categories sound most
    often in train). `visual_only_ceiling` is the best of them. `oracle` scores the GT PNGs on
    disk against the GT rebuilt from the sidecars (100 when they agree). All T frames of every
    clip count (per-frame AVSBench IoU, mean over frames).
    """
    root = Path(root)
    if subset not in LAYOUTS:
        raise ConfigError(f"subset: expected one of {sorted(LAYOUTS)}, got {subset!r}")
    clips = _load_sidecars(root, subset, split)
    if not clips:
        raise ValueError(f"{root}: split {split!r} of {subset} has no clips")
    try:
        train = clips if split == "train" else _load_sidecars(root, subset, "train")
    except FileNotFoundError:
        train = []
    prior = _category_prior(train)
    max_objects = max(len(c["objects"]) for c in clips)
    names = ["all_objects", "largest_object"] + [f"prior_top{m}" for m in range(1, max_objects)]
    scores, oracle = _score_frames(root, subset, split, clips, prior, names)
    miou = {k: 100.0 * float(np.mean(v)) for k, v in scores.items()}
    best = max(miou, key=miou.get)
    return {
        "subset": subset,
        "split": split,
        "num_clips": len(clips),
        "num_frames": sum(c["num_frames"] for c in clips),
        "visual_only": miou,
        "visual_only_best": best,
        "visual_only_ceiling": miou[best],
        "oracle": 100.0 * float(np.mean(oracle)) if oracle else float("nan"),
        "oracle_frames": len(oracle),
        "category_prior": prior,
    }
