"""Audio shuffled across clips or zeroed: does a model use the audio of its own clip?

`ShuffledAudio(dataset, seed)` gives clip i the frames and masks of clip i and the audio of clip
`perm[i]`, where `perm` is a seeded derangement (no clip keeps its own audio; the same seed gives the
same pairing). `ZeroAudio(dataset)` gives every clip an all-zero audio input of the same shape.
The proxy benchmark's listening pass (avs/proxy/listening.py) scores a checkpoint on the shuffled
split next to the unshuffled one; `scripts/eval.py audio_input=zero|shuffled` scores any checkpoint on
either (`probe_audio`). Both wrappers pass every other attribute (class names, records) through.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from avs.errors import ConfigError

AUDIO_PROBES = ("real", "zero", "shuffled")


def derangement(n: int, seed: int) -> np.ndarray:
    """A permutation of range(n) with no fixed point, from a seeded shuffle (one cycle; n >= 2)."""
    if n < 2:
        raise ValueError(f"shuffling audio across clips needs at least 2 clips, got {n}")
    order = np.random.default_rng([0x5348, int(seed)]).permutation(n)
    perm = np.empty(n, dtype=np.int64)
    perm[order] = np.roll(order, -1)  # clip order[j] hears clip order[j + 1]
    return perm


class _AudioProbe(Dataset):
    """A wrapper of a clip dataset that changes only the items' audio."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name: str) -> Any:
        if name == "dataset":  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.dataset, name)


class ZeroAudio(_AudioProbe):
    """A clip dataset whose items carry an all-zero audio input (same shape and dtype)."""

    def __getitem__(self, index: int) -> Any:
        item = self.dataset[index]
        if not isinstance(item, dict):
            return item  # a skipped clip stays skipped (the collate drops it)
        return {**item, "audio": torch.zeros_like(item["audio"]), "audio_from": "zeros"}


class ShuffledAudio(_AudioProbe):
    """A clip dataset whose items carry another clip's audio (`audio_from` names that clip)."""

    def __init__(self, dataset: Any, seed: int = 0) -> None:
        super().__init__(dataset)
        self.perm = derangement(len(dataset), seed)

    def __getitem__(self, index: int) -> Any:
        item = self.dataset[index]
        other = self.dataset[int(self.perm[index])]
        if not isinstance(item, dict) or not isinstance(other, dict):
            return item  # a skipped clip stays skipped (the collate drops it)
        return {**item, "audio": other["audio"], "audio_from": other["video_id"]}


def probe_audio(dataset: Any, mode: str, seed: int = 0) -> Any:
    """`mode`: real (the dataset itself) | zero (ZeroAudio) | shuffled (ShuffledAudio with `seed`)."""
    if mode == "real":
        return dataset
    if mode == "zero":
        return ZeroAudio(dataset)
    if mode == "shuffled":
        if len(dataset) < 2:
            raise ConfigError(f"audio_input=shuffled: the split has {len(dataset)} clip(s); shuffling needs at least 2")
        return ShuffledAudio(dataset, seed)
    raise ConfigError(f"audio_input={mode!r}: expected one of {', '.join(AUDIO_PROBES)}")
