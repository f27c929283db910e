"""AVSBench-object S4 / MS3 datasets, the on-disk layout, and a layout checker.

Layout of the released AVSBench-object folder, relative to `root` (the folder holding Single-source/
and Multi-sources/):

    Single-source/s4_meta_data.csv                      columns: 0 = video id, 2 = category, `split`
    Single-source/s4_data/visual_frames/<split>/<category>/<vid>/<vid>_<k>.png
    Single-source/s4_data/gt_masks/<split>/<category>/<vid>/<vid>_<k>.png   (train: k = 1 only)
    Single-source/s4_data/audio_wav/<split>/<category>/<vid>.wav
    Single-source/s4_data/audio_log_mel/<split>/<category>/<vid>.pkl
    Multi-sources/ms3_meta_data.csv                     columns: 0 = video id, `split`
    Multi-sources/ms3_data/visual_frames/<vid>/<vid>.mp4_<k>.png           (no split folder, ".mp4_")
    Multi-sources/ms3_data/gt_masks/<split>/<vid>/<vid>_<k>.png            (k = 1..T, every split)
    Multi-sources/ms3_data/audio_wav/<split>/<vid>.wav
    Multi-sources/ms3_data/audio_log_mel/<split>/<vid>.pkl

Cached VGGish embeddings (scripts/extract_audio.py) mirror the pkl paths with `.npy` under
`<subset dir>/audio_vggish_embedding/` (or `embedding_dir`).
"""

from __future__ import annotations

import csv
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, default_collate
from tqdm import tqdm

from avs.data.audio import MIN_SAMPLES, fit_num_examples, read_wav, wav_to_logmel
from avs.data.transforms import ClipTransform, as_size, resize_frames, resize_masks
from avs.errors import AVSError, ConfigError, ExitCode

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
AUDIO_SOURCES = ("logmel", "wav", "embedding")
ON_ERROR = ("raise", "skip")
LOGMEL_SHAPE = (1, 96, 64)  # per example
EMBEDDING_DIM = 128
EMBEDDING_DIRNAME = "audio_vggish_embedding"


class AVSDataError(AVSError, code=ExitCode.DATA):
    """A dataset file is missing, unreadable or malformed; the message names the path (and clip)."""


@dataclass(frozen=True)
class SubsetLayout:
    """Folder and file names of one AVSBench-object subset."""

    name: str
    folder: str  # under root
    csv_name: str
    data_folder: str  # under folder
    has_category: bool
    frame_split_folder: bool  # MS3 frames have no <split>/ level
    frame_pattern: str  # format with vid, k
    mask_pattern: str

    def subset_dir(self, root: Path) -> Path:
        return root / self.folder

    def data_dir(self, root: Path) -> Path:
        return root / self.folder / self.data_folder

    def csv_path(self, root: Path) -> Path:
        return root / self.folder / self.csv_name


LAYOUTS: dict[str, SubsetLayout] = {
    "s4": SubsetLayout(
        name="s4",
        folder="Single-source",
        csv_name="s4_meta_data.csv",
        data_folder="s4_data",
        has_category=True,
        frame_split_folder=True,
        frame_pattern="{vid}_{k}.png",
        mask_pattern="{vid}_{k}.png",
    ),
    "ms3": SubsetLayout(
        name="ms3",
        folder="Multi-sources",
        csv_name="ms3_meta_data.csv",
        data_folder="ms3_data",
        has_category=False,
        frame_split_folder=False,
        frame_pattern="{vid}.mp4_{k}.png",
        mask_pattern="{vid}_{k}.png",
    ),
}


@dataclass(frozen=True)
class ClipRecord:
    """One CSV row: a clip of `split` (category '' for MS3)."""

    video_id: str
    category: str
    split: str
    line: int = field(default=0, compare=False)  # line number in the csv (0: not from a csv)

    def rel_dir(self) -> Path:
        """<split>/[<category>/] -- the folder of this clip's audio files / masks."""
        return Path(self.split, self.category) if self.category else Path(self.split)


# --------------------------------------------------------------------------------------------
# paths
# --------------------------------------------------------------------------------------------
def get_layout(subset: str) -> SubsetLayout:
    """Layout for 's4' or 'ms3'; ValueError naming `data.subset` otherwise."""
    try:
        return LAYOUTS[subset]
    except KeyError:
        raise ValueError(f"data.subset must be one of {sorted(LAYOUTS)}, got {subset!r}") from None


def frame_path(root: Path, layout: SubsetLayout, rec: ClipRecord, k: int) -> Path:
    """Path of frame k (1-based) of a clip."""
    base = layout.data_dir(root) / "visual_frames"
    if layout.frame_split_folder:
        base = base / rec.rel_dir()
    return base / rec.video_id / layout.frame_pattern.format(vid=rec.video_id, k=k)


def mask_path(root: Path, layout: SubsetLayout, rec: ClipRecord, k: int) -> Path:
    """Path of GT mask k (1-based) of a clip."""
    name = layout.mask_pattern.format(vid=rec.video_id, k=k)
    return layout.data_dir(root) / "gt_masks" / rec.rel_dir() / rec.video_id / name


def wav_path(root: Path, layout: SubsetLayout, rec: ClipRecord) -> Path:
    """Path of a clip's 16 kHz wav."""
    return layout.data_dir(root) / "audio_wav" / rec.rel_dir() / f"{rec.video_id}.wav"


def logmel_path(root: Path, layout: SubsetLayout, rec: ClipRecord) -> Path:
    """Path of a clip's released log-mel pkl."""
    return layout.data_dir(root) / "audio_log_mel" / rec.rel_dir() / f"{rec.video_id}.pkl"


def embedding_root(root: Path, layout: SubsetLayout, embedding_dir: str | os.PathLike | None) -> Path:
    """Folder of cached VGGish embeddings: `embedding_dir`, else <subset dir>/audio_vggish_embedding."""
    return Path(embedding_dir) if embedding_dir else layout.subset_dir(root) / EMBEDDING_DIRNAME


def embedding_path(root: Path, layout: SubsetLayout, rec: ClipRecord, embedding_dir: str | os.PathLike | None) -> Path:
    """Path of a clip's cached VGGish embedding `.npy` (same relative path as the pkl)."""
    return embedding_root(root, layout, embedding_dir) / rec.rel_dir() / f"{rec.video_id}.npy"


def labelled_frames(subset: str, split: str, num_frames: int) -> list[int]:
    """1-based frame numbers that have a GT mask: S4 train -> [1]; otherwise 1..num_frames."""
    if subset == "s4" and split == "train":
        return [1]
    return list(range(1, num_frames + 1))


# --------------------------------------------------------------------------------------------
# csv
# --------------------------------------------------------------------------------------------
def read_meta_csv(path: str | os.PathLike, subset: str) -> list[ClipRecord]:
    """Read an AVSBench meta csv -> records (S4: id col 0, category col 2; MS3: id col 0; `split` by name)."""
    layout = get_layout(subset)
    path = Path(path)
    if not path.is_file():
        raise AVSDataError(
            f"{path}: metadata csv not found (expected {layout.folder}/{layout.csv_name} under data.root)"
        )
    with open(path, newline="", encoding="utf-8-sig") as fh:
        rows = list(csv.reader(fh))
    if not rows:
        raise AVSDataError(f"{path}: metadata csv is empty")
    header = [h.strip() for h in rows[0]]
    if "split" not in header:
        raise AVSDataError(f"{path}: metadata csv has no 'split' column (header: {header})")
    split_col = header.index("split")
    need = max(split_col, 2 if layout.has_category else 0)
    records = []
    for line_no, row in enumerate(rows[1:], start=2):
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) <= need:
            raise AVSDataError(f"{path}:{line_no}: expected at least {need + 1} columns, got {len(row)}: {row}")
        vid = row[0].strip()
        category = row[2].strip() if layout.has_category else ""
        records.append(ClipRecord(video_id=vid, category=category, split=row[split_col].strip(), line=line_no))
    return records


def check_split_values(records: Sequence[ClipRecord], csv_path: str | os.PathLike) -> None:
    """AVSDataError naming the csv, its rows and the allowed values when a row's split is not train/val/test."""
    bad = [r for r in records if r.split not in SPLITS]
    if not bad:
        return
    shown = ", ".join(f"line {r.line} (video {r.video_id!r}: {r.split!r})" for r in bad[:5])
    more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
    raise AVSDataError(f"{csv_path}: unknown split value in {len(bad)} row(s): {shown}{more}; "
                       f"the 'split' column allows {', '.join(SPLITS)}")


def split_records(root: str | os.PathLike, subset: str, split: str) -> list[ClipRecord]:
    """CSV rows of one split, in file order; AVSDataError when any row has an unknown split value."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
    layout = get_layout(subset)
    csv_path = layout.csv_path(Path(root))
    records = read_meta_csv(csv_path, subset)
    check_split_values(records, csv_path)
    return [r for r in records if r.split == split]


def fit_audio_array(arr: np.ndarray, num_frames: int, path: str | os.PathLike,
                    tail: tuple[int, ...] = LOGMEL_SHAPE, pad_short: bool = False) -> np.ndarray:
    """Audio read from a file, [n,*tail] -> [num_frames,*tail]; the one rule for log-mel pkls and cached embeddings.

    More than `num_frames` examples: the first `num_frames` are kept. Fewer: AVSDataError naming the
    file, the shape found and the examples expected, unless `pad_short` (config `data.pad_short_audio`),
    which repeats the last example as the wav front end does. Wrong dtype or shape: AVSDataError.
    """
    shape = "[n," + ",".join(map(str, tail)) + "]"
    if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
        raise AVSDataError(f"{path}: expected real numbers, got dtype {arr.dtype}")
    if arr.ndim != 1 + len(tail) or tuple(arr.shape[1:]) != tuple(tail) or arr.shape[0] == 0:
        raise AVSDataError(f"{path}: expected audio shaped {shape}, got {list(arr.shape)}")
    if arr.shape[0] < num_frames and not pad_short:
        raise AVSDataError(
            f"{path}: audio shaped {list(arr.shape)} has {arr.shape[0]} example(s), data.num_frames={num_frames} "
            f"needs {num_frames}; set data.pad_short_audio=true to repeat the last example instead")
    return fit_num_examples(arr, num_frames)  # [n,...] -> [T,...]


def check_root(root: str | os.PathLike, subset: str) -> Path:
    """Validate that `root` holds the subset's csv and data folder -> root as Path."""
    layout = get_layout(subset)
    root = Path(root).expanduser()
    if not root.is_dir():
        raise AVSDataError(f"data.root {root} does not exist (expected the AVSBench-object folder "
                           "holding Single-source/ and Multi-sources/)")
    sub = layout.subset_dir(root)
    if not sub.is_dir():
        raise AVSDataError(f"{sub}: missing; data.root {root} must hold {layout.folder}/ for subset {subset!r}")
    if not layout.csv_path(root).is_file():
        raise AVSDataError(f"{layout.csv_path(root)}: metadata csv not found for subset {subset!r}")
    data_dir = layout.data_dir(root)
    for name in ("visual_frames", "gt_masks"):
        if not (data_dir / name).is_dir():
            raise AVSDataError(f"{data_dir / name}: missing folder for subset {subset!r}")
    return root


# --------------------------------------------------------------------------------------------
# file readers
# --------------------------------------------------------------------------------------------
def _clip_tag(rec: ClipRecord) -> str:
    return f"clip {rec.video_id!r} ({rec.split}{'/' + rec.category if rec.category else ''})"


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


class AVSBenchDataset(Dataset):
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
        if audio_source not in AUDIO_SOURCES:
            raise ValueError(f"data.audio_source must be one of {list(AUDIO_SOURCES)}, got {audio_source!r}")
        if on_error not in ON_ERROR:
            raise ValueError(f"data.on_error must be one of {list(ON_ERROR)}, got {on_error!r}")
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

    def set_epoch(self, epoch: int) -> None:
        """Change the epoch that seeds the per-item flip draws."""
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
                log.warning("skipping %s: %s", _clip_tag(rec), exc)
                return SkippedItem(rec.video_id, index, str(exc))
            raise

    # -- loading --------------------------------------------------------------------------------
    def _generator(self, index: int, epoch: int) -> torch.Generator:
        seq = np.random.SeedSequence([self.seed, epoch, index])
        return torch.Generator().manual_seed(int(seq.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1)))

    def _read(self, reader, path: Path, rec: ClipRecord, what: str):
        if not path.is_file():
            hint = _missing_frame_hint(path, rec) if what == "frame" else ""
            raise AVSDataError(f"{path}: missing {what} of {_clip_tag(rec)}{hint}")
        try:
            return reader(path)
        except AVSDataError as exc:  # keep the subclass (e.g. UnsafePickleError), add the clip
            raise type(exc)(f"{exc} ({what} of {_clip_tag(rec)})") from exc
        except Exception as exc:  # PIL raises OSError / SyntaxError / ValueError on corrupt files
            raise AVSDataError(f"{path}: unreadable {what} of {_clip_tag(rec)} ({type(exc).__name__}: {exc})") from exc

    def _load_frames(self, rec: ClipRecord) -> torch.Tensor:
        arrs = [self._read(read_rgb, frame_path(self.root, self.layout, rec, k), rec, "frame")
                for k in range(1, self.num_frames + 1)]
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
            raise AVSDataError(f"{exc} ({_clip_tag(rec)})") from exc
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


def pad_short_audio_flag(data_cfg: Mapping[str, Any]) -> bool:
    """`data.pad_short_audio` (default false); ConfigError naming the key unless it is true or false."""
    value = data_cfg.get("pad_short_audio", False)
    if not isinstance(value, bool):
        raise ConfigError(f"data.pad_short_audio must be true or false, got {value!r}")
    return value


def build_dataset(data_cfg: Mapping[str, Any], split: str, train: bool) -> AVSBenchDataset:
    """AVSBenchDataset from a `data` config node (configs/data/*.yaml); flip only when `train`."""
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


# --------------------------------------------------------------------------------------------
# layout check
# --------------------------------------------------------------------------------------------
@dataclass
class Problem:
    """One thing wrong with the dataset on disk."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


@dataclass
class DatasetReport:
    """Result of `check_dataset`: clips per split and every problem found."""

    root: str
    subset: str
    counts: dict[str, int] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def add(self, path: Path | str, message: str) -> None:
        self.problems.append(Problem(str(path), message))

    def format(self) -> str:
        """Human-readable multi-line summary."""
        lines = [f"AVSBench {self.subset} at {self.root}"]
        lines += [f"  {s}: {n} clips" for s, n in self.counts.items()]
        lines.append(f"  {len(self.problems)} problem(s)")
        lines += [f"  - {p}" for p in self.problems]
        return "\n".join(lines)


def _image_size_or_problem(report: DatasetReport, path: Path, what: str) -> tuple[int, int] | None:
    if not path.is_file():
        report.add(path, f"missing {what}")
        return None
    try:
        with Image.open(path) as img:
            img.load()  # full decode: catches truncated PNGs
            return img.size[1], img.size[0]  # (H, W)
    except Exception as exc:
        report.add(path, f"unreadable/truncated {what} ({type(exc).__name__}: {exc})")
        return None


def check_dataset(
    root: str | os.PathLike,
    subset: str,
    num_frames: int = 5,
    image_size: int | Sequence[int] | None = None,
    progress: bool = False,
    pad_short_audio: bool = False,
) -> DatasetReport:
    """Walk every split of `subset` under `root`; report counts and every missing / bad file (tqdm if `progress`).

    Csv split values and log-mel pkls are judged by the loader's own rules (`check_split_values`,
    `fit_audio_array` with `pad_short_audio`).
    """
    from avs.data.safe_pickle import load_logmel_pkl

    layout = get_layout(subset)
    root_p = Path(root).expanduser()
    size = as_size(image_size)
    report = DatasetReport(root=str(root_p), subset=subset)
    if not root_p.is_dir():
        report.add(root_p, "data.root does not exist")
        return report
    csv_p = layout.csv_path(root_p)
    if not csv_p.is_file():
        report.add(csv_p, "metadata csv missing")
        return report
    try:
        records = read_meta_csv(csv_p, subset)
    except AVSDataError as exc:
        report.add(csv_p, str(exc))
        return report
    data_dir = layout.data_dir(root_p)
    present = {}
    for name in ("visual_frames", "gt_masks", "audio_log_mel", "audio_wav"):
        present[name] = (data_dir / name).is_dir()
        if name in ("visual_frames", "gt_masks") and not present[name]:
            report.add(data_dir / name, "missing folder")
    if not (present["audio_log_mel"] or present["audio_wav"]):
        report.add(data_dir / "audio_log_mel", "missing folder (and no audio_wav/ either)")
    try:
        check_split_values(records, csv_p)
    except AVSDataError as exc:
        report.add(csv_p, str(exc).removeprefix(f"{csv_p}: "))
    seen: set[tuple[str, str]] = set()
    for rec in records:
        if (rec.split, rec.video_id) in seen:
            report.add(csv_p, f"duplicate row for video {rec.video_id!r} in split {rec.split!r}")
        seen.add((rec.split, rec.video_id))

    for split in SPLITS:
        recs = [r for r in records if r.split == split]
        report.counts[split] = len(recs)
        for rec in tqdm(recs, desc=f"check {subset}/{split}", unit="clip", disable=not progress or not recs):
            sizes: dict[Path, tuple[int, int]] = {}
            if present["visual_frames"]:
                for k in range(1, num_frames + 1):
                    p = frame_path(root_p, layout, rec, k)
                    hw = _image_size_or_problem(report, p, f"frame of {_clip_tag(rec)}")
                    if hw is not None:
                        sizes[p] = hw
            frame_sizes = set(sizes.values())
            if len(frame_sizes) > 1:
                report.add(
                    frame_path(root_p, layout, rec, 1).parent, f"frames of one clip differ in size: {sorted(frame_sizes)}"
                )
            ref = next(iter(sizes.values()), None)
            if present["gt_masks"]:
                for k in labelled_frames(subset, split, num_frames):
                    p = mask_path(root_p, layout, rec, k)
                    hw = _image_size_or_problem(report, p, f"mask of {_clip_tag(rec)}")
                    if hw is not None:
                        if ref is not None and hw != ref:
                            report.add(p, f"mask size {hw} differs from frame size {ref} (H, W)")
                        sizes[p] = hw
            if size is not None:
                for p, hw in sizes.items():
                    if hw != size:
                        report.add(p, f"size {hw} != data.image_size {size} (H, W)")
            if present["audio_log_mel"]:
                p = logmel_path(root_p, layout, rec)
                if not p.is_file():
                    report.add(p, f"missing log-mel pkl of {_clip_tag(rec)}")
                else:
                    try:
                        arr = load_logmel_pkl(p)
                    except AVSDataError as exc:
                        report.add(p, f"unreadable log-mel pkl ({exc})")
                    else:
                        try:
                            arr = fit_audio_array(arr, num_frames, p, LOGMEL_SHAPE, pad_short_audio)
                        except AVSDataError as exc:
                            report.add(p, str(exc).removeprefix(f"{p}: "))
                        else:
                            if not np.isfinite(arr).all():
                                report.add(p, "log-mel holds NaN/inf")
            if present["audio_wav"]:
                p = wav_path(root_p, layout, rec)
                if not p.is_file():
                    report.add(p, f"missing wav of {_clip_tag(rec)}")
                else:
                    try:
                        samples, sr = read_wav(p)
                        if len(samples) * 16000 < MIN_SAMPLES * sr:
                            report.add(p, f"wav too short for one VGGish example ({len(samples) / sr:.3f} s)")
                    except (ValueError, OSError) as exc:
                        report.add(p, f"unreadable wav ({exc})")
    return report
