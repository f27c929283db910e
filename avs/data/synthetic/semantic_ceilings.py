"""Visual-only ceilings of a semantic Sounding Shapes split, scored with the AVSS metrics (avs.metrics_avss)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from avs.data.avss_layout import AVSSRecord, labelled_frames, mask_path
from avs.data.synthetic.render import rle_decode
from avs.data.synthetic.semantic import SEMANTIC_META_DIRNAME

__all__ = ["compute_semantic_ceilings"]


def _sidecars(root: Path, split: str) -> list[dict[str, Any]]:
    folder = root / SEMANTIC_META_DIRNAME / split
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no semantic Sounding Shapes sidecars (is {root} a generated AVSS root?)")
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]


def _prior(train: list[dict[str, Any]]) -> dict[str, float]:
    """P(sounds | on screen) per category over train frames."""
    present: dict[str, int] = {}
    sounding: dict[str, int] = {}
    for clip in train:
        for o in clip["objects"]:
            present[o["category"]] = present.get(o["category"], 0) + len(o["sounding"])
            sounding[o["category"]] = sounding.get(o["category"], 0) + int(sum(o["sounding"]))
    return {c: sounding.get(c, 0) / present[c] for c in present}


def _frame_maps(clip: dict[str, Any], t: int, rank: list[int], names: list[str]) -> tuple[np.ndarray, dict]:
    """GT label map [S,S] of frame t and each predictor's label map."""
    S, objs = clip["image_size"], clip["objects"]
    vis = [rle_decode(o["visible_rle"][t], (S, S)) for o in objs]
    gt = np.zeros((S, S), dtype=np.int64)
    every = np.zeros((S, S), dtype=np.int64)
    for o, v in zip(objs, vis):
        every[v] = o["class"]
        if o["sounding"][t]:
            gt[v] = o["class"]
    preds = {"all_objects": every}
    for m in range(1, len(names)):
        p = np.zeros((S, S), dtype=np.int64)
        for i in rank[:m]:
            p[vis[i]] = objs[i]["class"]
        preds[names[m]] = p
    return gt, preds


def _one_hot_logits(labels: np.ndarray, num_classes: int) -> torch.Tensor:
    """[S,S] class map -> logits [1,1,C,S,S] whose argmax is the map."""
    t = torch.from_numpy(labels)
    return torch.nn.functional.one_hot(t, num_classes).permute(2, 0, 1).float()[None, None]


def compute_semantic_ceilings(root: str | os.PathLike, split: str, num_classes: int | None = None) -> dict[str, Any]:
    """Per-class mIoU (0-100, foreground classes present, avs.metrics_avss 'per_class') of visual-only
    predictors that know every object's class and visible mask but not the audio: `all_objects` and
    `prior_top<m>` (the m on-screen objects whose categories sound most often in train). Scored on
    the labelled frames. `oracle` scores the colour masks on disk against the GT rebuilt from the sidecars."""
    from avs.data.avss import load_colour_mask
    from avs.metrics_avss import SemanticAccumulator

    root = Path(root)
    clips = _sidecars(root, split)
    if not clips:
        raise ValueError(f"{root}: split {split!r} has no clips")
    if num_classes is None:
        num_classes = len(json.loads((root / "label2idx.json").read_text()))
    prior = _prior(clips if split == "train" else _sidecars(root, "train"))
    names = ["all_objects"] + [f"prior_top{m}" for m in range(1, max(len(c["objects"]) for c in clips))]
    accs = {k: SemanticAccumulator(num_classes) for k in names + ["oracle"]}
    n = 0
    for clip in clips:
        objs = clip["objects"]
        rank = sorted(range(len(objs)), key=lambda i: (-prior.get(objs[i]["category"], 0.0), objs[i]["category"]))
        rec = AVSSRecord(clip["video_id"], clip["source"], split)
        for t in labelled_frames(rec.source, split):
            gt, preds = _frame_maps(clip, t, rank, names)
            target = torch.from_numpy(gt)[None, None]
            for k, p in preds.items():
                accs[k].update(_one_hot_logits(p, num_classes), target, [n])
            disk = load_colour_mask(mask_path(root, rec, t), None, False, num_classes, legacy_unknown=True)
            accs["oracle"].update(_one_hot_logits(disk, num_classes), target, [n])
            n += 1
    miou = {k: 100.0 * accs[k].compute("per_class")["miou"] for k in names}
    best = max(miou, key=miou.get)
    return {
        "split": split,
        "num_clips": len(clips),
        "num_frames": n,
        "visual_only": miou,
        "visual_only_best": best,
        "visual_only_ceiling": miou[best],
        "oracle": 100.0 * accs["oracle"].compute("per_class")["miou"],
        "category_prior": prior,
    }
