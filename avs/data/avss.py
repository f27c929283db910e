"""AVSBench-semantic (AVSS) dataset: every clip padded to 10 frames, class-index masks and frame flags.

Item (docs/avss.md): frames float32 [10,3,S,S] (ImageNet-normalised, padded frames all zero),
masks int64 [10,S,S] class indices (0 = background; unlabelled and padded frames all 0),
mask_valid bool [10] (frames with a colour mask: the loss and the metrics use only these),
frame_valid bool [10] (real, not padded, frames: the released `vid` flag), audio float32
[10,1,96,64] (VGGish log-mel of audio.wav; examples of padded frames are zero), video_id, source
('v1s' | 'v1m' | 'v2'), category ('') and index.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from avs.data.avsbench import ClipDataset
from avs.data.avss_layout import (
    CSV_NAME,
    LABELS_NAME,
    NUM_CLASSES,
    PAD_FRAMES,
    SOURCE_FRAMES,
    SOURCES,
    AVSSRecord,
    check_values,
    colours_to_labels,
    frame_path,
    labelled_frames,
    mask_path,
    read_label2idx,
    read_metadata,
    wav_path,
)
from avs.data.layout import SPLITS, AVSDataError
from avs.data.transforms import hflip_clip, normalize_frames
from avs.errors import ConfigError

__all__ = ["AVSSDataset", "build_avss_dataset", "release_geometry", "load_colour_mask"]

log = logging.getLogger(__name__)


def release_geometry(img: Image.Image, size: int, crop: bool, nearest: bool) -> Image.Image:
    """The released AVSS resize: `crop` (train) scales the short side to `size` (long side int()-truncated)
    and centre-crops with round() offsets; otherwise a straight resize to size x size.
    Frames use PIL BILINEAR, masks (`nearest`) PIL NEAREST."""
    resample = Image.NEAREST if nearest else Image.BILINEAR
    if not crop:
        return img.resize((size, size), resample)
    w, h = img.size
    if w > h:
        ow, oh = int(1.0 * w * size / h), size
    else:
        ow, oh = size, int(1.0 * h * size / w)
    img = img.resize((ow, oh), resample)
    x1 = int(round((ow - size) / 2.0))
    y1 = int(round((oh - size) / 2.0))
    return img.crop((x1, y1, x1 + size, y1 + size))


def load_colour_mask(path: Path, size: int | None, crop: bool, num_classes: int, legacy_unknown: bool) -> np.ndarray:
    """labels_rgb png -> int64 [S,S] class indices; AVSDataError naming colours outside the palette
    unless `legacy_unknown` (then they become class 0, as the released loader does)."""
    with Image.open(path) as img:
        img.load()
        rgb = img.convert("RGB")
    if size is not None:
        rgb = release_geometry(rgb, size, crop, nearest=True)
    labels, unknown = colours_to_labels(np.asarray(rgb), num_classes)
    if unknown and not legacy_unknown:
        shown = ", ".join(str(c) for c in unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        raise AVSDataError(
            f"{path}: {len(unknown)} colour(s) not in the {num_classes}-class AVSS palette: {shown}; "
            "set data.legacy_unknown_colours=true to map them to background as the released loader does"
        )
    return labels


def _load_frame(path: Path, size: int | None, crop: bool) -> torch.Tensor:
    with Image.open(path) as img:
        img.load()
        rgb = img.convert("RGB")
    if size is not None:
        rgb = release_geometry(rgb, size, crop, nearest=False)
    t = torch.from_numpy(np.array(rgb)).permute(2, 0, 1).float().div_(255.0)  # [h,w,3] -> [3,h,w]
    return normalize_frames(t[None])[0]


def _load_audio(path: Path, num_real: int) -> torch.Tensor:
    """audio.wav -> [PAD_FRAMES,1,96,64]: the first `num_real` VGGish examples (the last repeated when
    the wav is short, as avs's wav front end does), zero examples for padded frames (as released)."""
    from avs.data.audio import wav_to_logmel

    arr = wav_to_logmel(path, num_real)  # [n,1,96,64]
    out = torch.zeros(PAD_FRAMES, *arr.shape[1:])
    out[:num_real] = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
    return out


class AVSSDataset(ClipDataset):
    """AVSBench-semantic clips of one split (optionally of some source subsets) -> padded 10-frame items."""

    def __init__(
        self,
        root: str | os.PathLike,
        split: str,
        *,
        sources: Sequence[str] = SOURCES,
        image_size: int | None = 224,
        train_crop: bool = False,
        num_classes: int = NUM_CLASSES,
        legacy_unknown_colours: bool = False,
        flip_prob: float = 0.0,
        on_error: str = "raise",
        seed: int = 0,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
        unknown = [s for s in sources if s not in SOURCES]
        if unknown or not sources:
            raise ConfigError(f"data.sources must be a non-empty subset of {list(SOURCES)}, got {list(sources)}")
        if on_error not in ("raise", "skip"):
            raise ConfigError(f"data.on_error must be 'raise' or 'skip', got {on_error!r}")
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise AVSDataError(f"data.root {self.root} does not exist (expected the AVSS folder holding {CSV_NAME})")
        self.split, self.sources = split, tuple(sources)
        self.image_size = None if image_size is None else int(image_size)
        self.train_crop = bool(train_crop)
        self.num_classes = int(num_classes)
        self.legacy_unknown = bool(legacy_unknown_colours)
        self.flip_prob, self.on_error, self.seed, self.epoch = float(flip_prob), on_error, int(seed), 0
        self.class_names = read_label2idx(self.root / LABELS_NAME, self.num_classes)
        records = read_metadata(self.root / CSV_NAME)
        check_values(records, self.root / CSV_NAME)
        self.records = [r for r in records if r.split == split and r.source in self.sources]

    def clip_files(self):
        """Every file this split reads (the trainer's preflight): real frames, labelled masks, the wav."""
        for rec in self.records:
            yield from (frame_path(self.root, rec, k) for k in range(SOURCE_FRAMES[rec.source]))
            yield from (mask_path(self.root, rec, k) for k in labelled_frames(rec.source, rec.split))
            yield wav_path(self.root, rec)

    def _clip_id(self, rec: AVSSRecord) -> str:
        return rec.uid

    def _read(self, fn, path: Path, rec: AVSSRecord, what: str):
        if not path.is_file():
            raise AVSDataError(f"{path}: missing {what} of {rec.tag()}")
        try:
            return fn(path)
        except AVSDataError as exc:
            raise AVSDataError(f"{exc} ({what} of {rec.tag()})") from exc
        except Exception as exc:  # PIL / soundfile raise OSError, ValueError, SyntaxError on corrupt files
            raise AVSDataError(f"{path}: unreadable {what} of {rec.tag()} ({type(exc).__name__}: {exc})") from exc

    def _load(self, rec: AVSSRecord, index: int, epoch: int) -> dict[str, Any]:
        n_real, size, crop = SOURCE_FRAMES[rec.source], self.image_size, self.train_crop
        real = [
            self._read(lambda p: _load_frame(p, size, crop), frame_path(self.root, rec, k), rec, "frame")
            for k in range(n_real)
        ]
        frames = torch.zeros(PAD_FRAMES, *real[0].shape)
        frames[:n_real] = torch.stack(real)
        masks = torch.zeros(PAD_FRAMES, *real[0].shape[-2:], dtype=torch.int64)
        mask_valid = torch.zeros(PAD_FRAMES, dtype=torch.bool)
        for k in labelled_frames(rec.source, rec.split):
            lab = self._read(
                lambda p: load_colour_mask(p, size, crop, self.num_classes, self.legacy_unknown),
                mask_path(self.root, rec, k),
                rec,
                "colour mask",
            )
            if tuple(lab.shape) != tuple(masks.shape[-2:]):
                raise AVSDataError(
                    f"{mask_path(self.root, rec, k)}: mask size {lab.shape} differs from the "
                    f"frame size {tuple(masks.shape[-2:])} of {rec.tag()}"
                )
            masks[k] = torch.from_numpy(lab)
            mask_valid[k] = True
        audio = self._read(lambda p: _load_audio(p, n_real), wav_path(self.root, rec), rec, "wav")
        if self.flip_prob > 0:
            seq = np.random.SeedSequence([self.seed, epoch, index])
            gen = torch.Generator().manual_seed(int(seq.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1)))
            frames, masks, _ = hflip_clip(frames, masks, self.flip_prob, gen)
        frame_valid = torch.zeros(PAD_FRAMES, dtype=torch.bool)
        frame_valid[:n_real] = True
        return {
            "frames": frames.contiguous(),
            "masks": masks.contiguous(),
            "mask_valid": mask_valid,
            "frame_valid": frame_valid,
            "audio": audio,
            "video_id": rec.uid,
            "source": rec.source,
            "category": "",
            "index": index,
        }


def _flag(data_cfg: Mapping[str, Any], key: str) -> bool:
    value = data_cfg[key]
    if not isinstance(value, bool):
        raise ConfigError(f"data.{key} must be true or false, got {value!r}")
    return value


def build_avss_dataset(data_cfg: Mapping[str, Any], split: str, train: bool) -> AVSSDataset:
    """AVSSDataset from a `data` config node (configs/data/avss*.yaml, every key of data/base/avss.yaml);
    crop and flip only when `train`."""
    if data_cfg.get("root") is None:
        raise ConfigError("data config lacks required key data.root")
    if data_cfg["audio_source"] != "wav":
        raise ConfigError(
            f"data.audio_source={data_cfg['audio_source']!r}: AVSS reads audio.wav only (set data.audio_source=wav)"
        )
    if int(data_cfg["num_frames"]) != PAD_FRAMES:
        raise ConfigError(
            f"data.num_frames must be {PAD_FRAMES} for AVSS (every clip is padded to it), got {data_cfg['num_frames']}"
        )
    return AVSSDataset(
        data_cfg["root"],
        split,
        sources=list(data_cfg["sources"] or SOURCES),  # null / []: every source
        image_size=data_cfg["image_size"],
        train_crop=_flag(data_cfg, "train_crop") and train,
        num_classes=int(data_cfg["num_classes"]),
        legacy_unknown_colours=_flag(data_cfg, "legacy_unknown_colours"),
        flip_prob=float(data_cfg["flip_prob"] or 0.0) if train else 0.0,  # null = off, as the config check takes it
        on_error=data_cfg["on_error"],
        seed=int(data_cfg.get("seed", 0) or 0),  # data.seed is an optional node (+data.seed=N): no YAML sets it
    )
