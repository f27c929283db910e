"""Cache VGGish embeddings [T,128] per clip as `.npy`, where AVSBenchDataset(audio_source='embedding') reads them."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from avs.data.audio import LOGMEL_SHAPE, fit_audio_array, wav_to_logmel
from avs.data.layout import (
    AVSDataError,
    ClipRecord,
    embedding_path,
    embedding_root,
    get_layout,
    logmel_path,
    split_records,
    wav_path,
)
from avs.utils.device import select_device
from avs.utils.io import atomic_save

log = logging.getLogger(__name__)

__all__ = ["clip_logmel", "extract_embeddings"]


def clip_logmel(root: Path, subset: str, rec: ClipRecord, num_frames: int, pad_short_audio: bool = False) -> np.ndarray:
    """A clip's log-mel float32 [T,1,96,64]: from the released pkl (the dataset's shape rule), else from the wav."""
    from avs.data.safe_pickle import load_logmel_pkl

    layout = get_layout(subset)
    pkl = logmel_path(root, layout, rec)
    if pkl.is_file():
        try:
            return fit_audio_array(load_logmel_pkl(pkl), num_frames, pkl, LOGMEL_SHAPE, pad_short_audio)
        except AVSDataError as exc:
            raise AVSDataError(f"{exc} (clip {rec.video_id!r})") from exc
    wav = wav_path(root, layout, rec)
    if wav.is_file():
        try:
            return wav_to_logmel(wav, num_frames)
        except (ValueError, OSError) as exc:
            raise AVSDataError(f"{wav}: {exc} (clip {rec.video_id!r})") from exc
    raise AVSDataError(f"no audio for clip {rec.video_id!r}: neither {pkl} nor {wav} exists")


def _save_npy(path: Path, arr: np.ndarray) -> None:
    atomic_save(path, lambda fh: np.save(fh, arr, allow_pickle=False))


@torch.no_grad()
def extract_embeddings(
    dataset_root: str | os.PathLike,
    subset: str,
    vggish: nn.Module,
    splits: Iterable[str] = ("train", "val", "test"),
    num_frames: int = 5,
    device: str | torch.device = "cpu",
    overwrite: bool = False,
    out_dir: str | os.PathLike | None = None,
    batch_size: int = 16,
    pad_short_audio: bool = False,
) -> dict:
    """Write VGGish embeddings float32 [T,128] for every clip of `splits`; existing files are kept unless `overwrite`.

    Returns {'written': int, 'skipped': int, 'per_split': {split: {'written', 'skipped'}}, 'out_dir': str}.
    `batch_size` counts clips (each contributes T examples to one VGGish call). A pkl with fewer than
    `num_frames` examples is an error unless `pad_short_audio` (as in the dataset).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    root = Path(dataset_root).expanduser()
    layout = get_layout(subset)
    dev = select_device(device)
    vggish = vggish.to(dev).eval()
    base = embedding_root(root, layout, out_dir)
    summary: dict = {"written": 0, "skipped": 0, "per_split": {}, "out_dir": str(base)}

    for split in splits:
        records = split_records(root, subset, split)
        todo: list[tuple[ClipRecord, Path]] = []
        skipped = 0
        for rec in records:
            out = embedding_path(root, layout, rec, out_dir)
            if out.is_file() and not overwrite:
                skipped += 1
            else:
                todo.append((rec, out))
        written = 0
        bar = tqdm(total=len(todo), desc=f"vggish {subset}/{split}", unit="clip", disable=not todo)
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            mels = [clip_logmel(root, subset, rec, num_frames, pad_short_audio) for rec, _ in chunk]
            x = torch.from_numpy(np.concatenate(mels, axis=0)).to(dev)  # [clips*T,1,96,64]
            emb = vggish(x).float().cpu().numpy()  # [clips*T,128]
            for i, (_, out) in enumerate(chunk):
                _save_npy(out, np.ascontiguousarray(emb[i * num_frames : (i + 1) * num_frames], dtype=np.float32))
                written += 1
            bar.update(len(chunk))
        bar.close()
        log.info("%s/%s: %d embeddings written, %d already present", subset, split, written, skipped)
        summary["per_split"][split] = {"written": written, "skipped": skipped}
        summary["written"] += written
        summary["skipped"] += skipped
    return summary
