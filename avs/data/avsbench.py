"""AVSBench-object S4 / MS3 datasets: the `AVSBenchDataset`, its file readers and the collate
function that drops skipped clips.

The folder layout and the labelled-frames rule live in avs.data.layout, the layout checker in
avs.data.check; their names are re-exported here for existing imports.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, default_collate

from avs.data.audio import EMBEDDING_DIM, LOGMEL_SHAPE, fit_audio_array, wav_to_logmel
from avs.data.check import DatasetReport, Problem, check_dataset
from avs.data.layout import (
    EMBEDDING_DIRNAME,
    LAYOUTS,
    SPLITS,
    AVSDataError,
    ClipRecord,
    SubsetLayout,
    check_root,
    check_split_values,
    embedding_path,
    embedding_root,
    frame_path,
    get_layout,
    labelled_frames,
    logmel_path,
    mask_path,
    read_meta_csv,
    split_records,
    wav_path,
)
from avs.data.options import AUDIO_SOURCES, ON_ERROR, check_data_options, pad_short_audio_flag
from avs.data.transforms import ClipTransform, as_size, resize_frames, resize_masks

__all__ = [  # the layout / check / option names are re-exported for existing imports
    "AVSBenchDataset",
    "SkippedItem",
    "build_dataset",
    "collate_skip_none",
    "read_mask",
    "read_rgb",
    "AVSDataError",
    "ClipRecord",
    "SubsetLayout",
    "LAYOUTS",
    "SPLITS",
    "EMBEDDING_DIRNAME",
    "check_root",
    "check_split_values",
    "embedding_path",
    "embedding_root",
    "frame_path",
    "get_layout",
    "labelled_frames",
    "logmel_path",
    "mask_path",
    "read_meta_csv",
    "split_records",
    "wav_path",
    "DatasetReport",
    "Problem",
    "check_dataset",
    "AUDIO_SOURCES",
    "ON_ERROR",
    "pad_short_audio_flag",
    "fit_audio_array",
    "LOGMEL_SHAPE",
    "EMBEDDING_DIM",
]

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# file readers
# --------------------------------------------------------------------------------------------
def _missing_frame_hint(path: Path, rec: ClipRecord) -> str:
    # A common mistake for MS3: frames renamed <vid>_<k>.png without the '.mp4_' infix.
    if ".mp4_" in path.name:
        alt = path.with_name(path.name.replace(".mp4_", "_"))
        if alt.is_file():
            return f" (found {alt.name}: MS3 frames must be named <vid>.mp4_<k>.png)"
    return ""


def read_rgb(path: Path) -> np.ndarray:
    """PNG/JPEG -> uint8 [H,W,3] RGB (fully decoded); raises OSError/ValueError on bad files."""
    with Image.open(path) as img:
        img.load()
        return np.array(img.convert("RGB"))  # writable copy


def read_mask(path: Path) -> np.ndarray:
    """Mask image -> bool [H,W] foreground.

    '1': as stored; 'L'/'I'/'F' etc.: value > 0; 'P': palette index != 0 (index 0 is the
    background, whatever colour other indices carry); 'LA': L > 0; 'RGB'/'RGBA': any non-zero
    colour channel (alpha ignored); other modes are converted to RGB first.
    """
    with Image.open(path) as img:
        img.load()
        mode = img.mode
        if mode == "1":
            return np.asarray(img, dtype=bool)
        if mode == "P":
            return np.asarray(img) != 0
        if mode in ("L", "I", "F") or mode.startswith("I;"):
            return np.asarray(img) > 0
        if mode == "LA":
            return np.asarray(img)[..., 0] > 0
        if mode not in ("RGB", "RGBA"):
            img = img.convert("RGB")
        arr = np.asarray(img)
        return (arr[..., :3] > 0).any(axis=-1)


# --------------------------------------------------------------------------------------------
# dataset
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SkippedItem:
    """Stand-in returned by `__getitem__` with on_error='skip'; `collate_skip_none` drops it."""

    video_id: str
    index: int
    error: str

    def __bool__(self) -> bool:  # behaves like None in `if item:` checks
        return False


class ClipDataset(Dataset):
    """What the clip datasets share: `records`, an epoch for the augmentation draw, skip-on-error.

    A subclass sets `records` (each with `tag()`), `epoch`, `on_error` and implements
    `_load(rec, index, epoch)` and `_clip_id(rec)`.
    """

    records: Sequence[Any]
    epoch: int
    on_error: str

    def _load(self, rec: Any, index: int, epoch: int) -> dict[str, Any]:
        raise NotImplementedError

    def _clip_id(self, rec: Any) -> str:
        raise NotImplementedError

    def set_epoch(self, epoch: int) -> None:
        """Change the epoch that seeds the per-item augmentation draws."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int | tuple[int, int]) -> dict[str, Any] | SkippedItem:
        """Clip `index`; an `(epoch, index)` pair (ResumableSampler(with_epoch=True)) also sets the
        epoch of the augmentation draw, as `set_epoch` does, for persistent DataLoader workers."""
        epoch = self.epoch
        if isinstance(index, tuple):
            epoch, index = int(index[0]), int(index[1])
        if not 0 <= index < len(self.records):
            raise IndexError(f"index {index} out of range for {len(self.records)} clips")
        rec = self.records[index]
        try:
            return self._load(rec, index, epoch)
        except AVSDataError as exc:
            if self.on_error == "skip":
                log.warning("skipping %s: %s", rec.tag(), exc)
                return SkippedItem(self._clip_id(rec), index, str(exc))
            raise


class AVSBenchDataset(ClipDataset):
    """AVSBench-object S4 / MS3 clips -> dicts per docs/architecture.md "Data contract".

    Item: frames float32 [T,3,H,W] (ImageNet-normalised), masks float32 [T,1,H,W] in {0,1},
    mask_valid bool [T], audio float32 [T,1,96,64] (logmel / wav) or [T,128] (embedding),
    video_id str, category str ('' for MS3), index int (row within the split).
    The flip draw for item i is seeded by (seed, epoch, i); call `set_epoch` each epoch.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        subset: str,
        split: str,
        num_frames: int = 5,
        image_size: int | Sequence[int] | None = 224,
        audio_source: str = "logmel",
        embedding_dir: str | os.PathLike | None = None,
        flip_prob: float = 0.0,
        on_error: str = "raise",
        seed: int = 0,
        pad_short_audio: bool = False,
    ) -> None:
        self.layout = get_layout(subset)
        if split not in SPLITS:
            raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
        check_data_options(audio_source, on_error)
        if int(num_frames) < 1:
            raise ValueError(f"data.num_frames must be >= 1, got {num_frames}")
        self.root = check_root(root, subset)
        self.subset = subset
        self.split = split
        self.num_frames = int(num_frames)
        self.image_size = as_size(image_size, "data.image_size")
        self.audio_source = audio_source
        self.embedding_dir = embedding_dir
        self.on_error = on_error
        self.seed = int(seed)
        self.pad_short_audio = bool(pad_short_audio)
        self.epoch = 0
        self.transform = ClipTransform(self.image_size, flip_prob)
        self.records = split_records(self.root, subset, split)
        self._labelled = labelled_frames(subset, split, self.num_frames)
        self._check_audio_folder()

    def _check_audio_folder(self) -> None:
        data_dir = self.layout.data_dir(self.root)
        if self.audio_source == "logmel":
            folder = data_dir / "audio_log_mel"
        elif self.audio_source == "wav":
            folder = data_dir / "audio_wav"
        else:
            folder = embedding_root(self.root, self.layout, self.embedding_dir)
        if not folder.is_dir():
            hint = " (run scripts/extract_audio.py first)" if self.audio_source == "embedding" else ""
            raise AVSDataError(f"{folder}: missing audio folder for data.audio_source={self.audio_source!r}{hint}")

    def _clip_id(self, rec: ClipRecord) -> str:
        return rec.video_id

    # -- loading --------------------------------------------------------------------------------
    def _generator(self, index: int, epoch: int) -> torch.Generator:
        seq = np.random.SeedSequence([self.seed, epoch, index])
        return torch.Generator().manual_seed(int(seq.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1)))

    def _read(self, reader, path: Path, rec: ClipRecord, what: str):
        if not path.is_file():
            hint = _missing_frame_hint(path, rec) if what == "frame" else ""
            raise AVSDataError(f"{path}: missing {what} of {rec.tag()}{hint}")
        try:
            return reader(path)
        except AVSDataError as exc:  # keep the subclass (e.g. UnsafePickleError), add the clip
            raise type(exc)(f"{exc} ({what} of {rec.tag()})") from exc
        except Exception as exc:  # PIL raises OSError / SyntaxError / ValueError on corrupt files
            raise AVSDataError(f"{path}: unreadable {what} of {rec.tag()} ({type(exc).__name__}: {exc})") from exc

    def _load_frames(self, rec: ClipRecord) -> torch.Tensor:
        arrs = [
            self._read(read_rgb, frame_path(self.root, self.layout, rec, k), rec, "frame")
            for k in range(1, self.num_frames + 1)
        ]
        target = self.image_size or arrs[0].shape[:2]
        out = []
        for a in arrs:
            t = torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1).float().div_(255.0)  # [h,w,3] -> [3,h,w]
            if tuple(t.shape[-2:]) != tuple(target):
                t = resize_frames(t[None], tuple(target))[0]
            out.append(t)
        return torch.stack(out)  # [T,3,H,W]

    def _load_masks(self, rec: ClipRecord, size: tuple[int, int]) -> torch.Tensor:
        masks = torch.zeros(self.num_frames, 1, *size)
        for k in self._labelled:
            m = self._read(read_mask, mask_path(self.root, self.layout, rec, k), rec, "mask")
            t = torch.from_numpy(m.astype(np.float32))[None, None]  # [h,w] -> [1,1,h,w]
            masks[k - 1] = resize_masks(t, size)[0]
        return masks

    def _load_audio(self, rec: ClipRecord) -> torch.Tensor:
        if self.audio_source == "logmel":
            from avs.data.safe_pickle import load_logmel_pkl

            path = logmel_path(self.root, self.layout, rec)
            arr = self._read(load_logmel_pkl, path, rec, "log-mel pkl")
            tail = LOGMEL_SHAPE
        elif self.audio_source == "wav":
            path = wav_path(self.root, self.layout, rec)
            arr = self._read(lambda p: wav_to_logmel(p, self.num_frames), path, rec, "wav")
            tail = LOGMEL_SHAPE
        else:
            path = embedding_path(self.root, self.layout, rec, self.embedding_dir)
            arr = self._read(lambda p: np.load(p, allow_pickle=False), path, rec, "audio embedding")
            tail = (EMBEDDING_DIM,)
        try:  # the wav front end already gives [T,1,96,64] (its own, release-faithful padding)
            arr = fit_audio_array(arr, self.num_frames, path, tail, self.pad_short_audio)
        except AVSDataError as exc:
            raise AVSDataError(f"{exc} ({rec.tag()})") from exc
        return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))

    def _load(self, rec: ClipRecord, index: int, epoch: int) -> dict[str, Any]:
        frames = self._load_frames(rec)  # [T,3,H,W] in [0,1]
        masks = self._load_masks(rec, tuple(frames.shape[-2:]))  # [T,1,H,W]
        audio = self._load_audio(rec)
        gen = self._generator(index, epoch) if self.transform.flip_prob > 0 else None
        frames, masks = self.transform(frames, masks, gen)
        mask_valid = torch.zeros(self.num_frames, dtype=torch.bool)
        mask_valid[[k - 1 for k in self._labelled]] = True
        return {
            "frames": frames.contiguous(),
            "masks": masks.contiguous(),
            "mask_valid": mask_valid,
            "audio": audio,
            "video_id": rec.video_id,
            "category": rec.category,
            "index": index,
        }


def collate_skip_none(batch: list[Any]) -> dict[str, Any]:
    """default_collate over items that are not None / SkippedItem; their ids go to batch['skipped'].

    When every item was skipped the batch is just {'skipped': [...]}.
    """
    dropped = [b for b in batch if b is None or isinstance(b, SkippedItem)]
    skipped = [b.video_id if isinstance(b, SkippedItem) else None for b in dropped]
    kept = [b for b in batch if b is not None and not isinstance(b, SkippedItem)]
    out: dict[str, Any] = default_collate(kept) if kept else {}
    out["skipped"] = skipped
    return out


def build_dataset(data_cfg: Mapping[str, Any], split: str, train: bool) -> AVSBenchDataset:
    """AVSBenchDataset from a `data` config node (configs/data/*.yaml); flip only when `train`.

    `data.subset=avss` builds the AVSBench-semantic dataset instead (avs.data.avss)."""
    if data_cfg.get("subset") == "avss":
        from avs.data.avss import build_avss_dataset

        return build_avss_dataset(data_cfg, split, train)
    missing = [k for k in ("subset", "root") if data_cfg.get(k) is None]
    if missing:
        raise ValueError(f"data config lacks required key(s) {', '.join('data.' + k for k in missing)}")
    return AVSBenchDataset(
        root=data_cfg["root"],
        subset=data_cfg["subset"],
        split=split,
        num_frames=int(data_cfg.get("num_frames", 5)),
        image_size=data_cfg.get("image_size", 224),
        audio_source=data_cfg.get("audio_source", "logmel"),
        embedding_dir=data_cfg.get("embedding_dir"),
        flip_prob=float(data_cfg.get("flip_prob", 0.0) or 0.0) if train else 0.0,
        on_error=data_cfg.get("on_error", "raise"),
        seed=int(data_cfg.get("seed", 0) or 0),
        pad_short_audio=pad_short_audio_flag(data_cfg),
    )
