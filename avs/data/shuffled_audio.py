"""Audio shuffled across clips: does a model use the audio of its own clip?

`ShuffledAudio(dataset, seed)` gives clip i the frames and masks of clip i and the audio of clip
`perm[i]`, where `perm` is a seeded derangement (no clip keeps its own audio; the same seed gives the
same pairing). The proxy benchmark's listening pass (avs/proxy/listening.py) scores a checkpoint
on it next to the unshuffled split.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from torch.utils.data import Dataset


def derangement(n: int, seed: int) -> np.ndarray:
    """A permutation of range(n) with no fixed point, from a seeded shuffle (one cycle; n >= 2)."""
    if n < 2:
        raise ValueError(f"shuffling audio across clips needs at least 2 clips, got {n}")
    order = np.random.default_rng([0x5348, int(seed)]).permutation(n)
    perm = np.empty(n, dtype=np.int64)
    perm[order] = np.roll(order, -1)  # clip order[j] hears clip order[j + 1]
    return perm


class ShuffledAudio(Dataset):
    """A clip dataset whose items carry another clip's audio (`audio_from` names that clip)."""

    def __init__(self, dataset: Any, seed: int = 0) -> None:
        self.dataset = dataset
        self.perm = derangement(len(dataset), seed)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        item = self.dataset[index]
        other = self.dataset[int(self.perm[index])]
        if not isinstance(item, dict) or not isinstance(other, dict):
            return item  # a skipped clip stays skipped (the collate drops it)
        return {**item, "audio": other["audio"], "audio_from": other["video_id"]}
