"""Procedural pretraining data from the Sounding Shapes world: single frames and 1-s sounds.

Every example has its own generator seeded by (`PRETRAIN_TAG`, task, seed, split, index): five
seed words where a dataset clip uses four, so no pretraining example repeats a dataset clip's
random stream, whatever the seeds.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import torch

from avs.data.audio import SAMPLE_RATE, waveform_to_examples
from avs.data.synthetic.clip import _place_objects
from avs.data.synthetic.render import _render_frames
from avs.data.synthetic.sound import _category_signal, _pink_noise
from avs.data.synthetic.world import SyntheticConfig, build_categories
from avs.data.transforms import normalize_frames

PRETRAIN_TAG = 0x505254  # "PRT"
_TASKS = {"visual": 0, "audio": 1}
_SPLITS = {"train": 0, "val": 1}


def _rng(task: str, seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([PRETRAIN_TAG, _TASKS[task], int(seed), _SPLITS[split], int(index)])


def render_image(world: SyntheticConfig, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One frame with 1..n objects of distinct categories -> (uint8 [S,S,3], presence float32 [K])."""
    cats_all = build_categories(world.num_categories)
    n = int(rng.integers(world.num_objects[0], world.num_objects[1] + 1))
    chosen = rng.choice(len(cats_all), size=n, replace=False)
    cats = [cats_all[i] for i in chosen]
    order = rng.permutation(n)
    tracks, full, _ = _place_objects(rng, cats, order, world)
    frame = _render_frames(rng, tracks, cats, order, full, world)[0]
    label = np.zeros(world.num_categories, dtype=np.float32)
    label[chosen] = 1.0
    return frame, label


def image_set(
    seed: int, split: str, count: int, image_size: int, num_categories: int, num_objects: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` frames -> (ImageNet-normalised float [N,3,S,S], presence float [N,K])."""
    world = SyntheticConfig(
        image_size=image_size,
        num_frames=1,
        num_categories=num_categories,
        num_objects=tuple(num_objects),
    )
    frames, labels = [], []
    for i in range(count):
        frame, label = render_image(world, _rng("visual", seed, split, i))
        frames.append(frame)
        labels.append(label)
    x = torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).float() / 255.0  # [N,S,S,3] -> [N,3,S,S]
    return normalize_frames(x), torch.from_numpy(np.stack(labels))


def sound_example(num_categories: int, snr_db: Sequence[float], rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """One category's 1-s sound over pink noise -> (VGGish log-mel float32 [1,96,64], category)."""
    cats = build_categories(num_categories)
    cat = cats[int(rng.integers(num_categories))]
    sig = 0.1 * rng.uniform(0.6, 1.0) * _category_signal(rng, cat, SAMPLE_RATE, SAMPLE_RATE)
    snr = rng.uniform(float(snr_db[0]), float(snr_db[1]))
    sig = sig + _pink_noise(rng, SAMPLE_RATE, SAMPLE_RATE) * np.sqrt(np.mean(sig * sig)) / 10.0 ** (snr / 20.0)
    return waveform_to_examples(sig, SAMPLE_RATE)[0], cat.index


def sound_set(
    seed: int, split: str, count: int, num_categories: int, snr_db: Sequence[float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` 1-s clips -> (log-mel float [N,1,96,64], category long [N])."""
    pairs = [sound_example(num_categories, snr_db, _rng("audio", seed, split, i)) for i in range(count)]
    x = torch.from_numpy(np.stack([p[0] for p in pairs]))
    y = torch.tensor([p[1] for p in pairs], dtype=torch.long)
    return x, y


def data_hash(*tensors: torch.Tensor) -> str:
    """sha256 (hex) over the bytes of the given tensors, in order."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(str(tuple(t.shape)).encode())
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()
