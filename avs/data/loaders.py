"""The datasets and DataLoaders of a run: synthetic data made on first use, workers, skipped clips.

`RunData` builds each split's dataset once (generating synthetic data first when `data.synthetic`,
rank 0 before the others; an evaluation, `generate=False`, only requires it) and its DataLoader;
with persistent workers a loader is built once and reused every epoch (its sampler is then the same
object, re-seeded with `set_epoch` before a pass). `preflight` checks every file the splits name
before step 1 (avs.data.preflight).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from avs.config import auto_flag


def shutdown_loader_iterator(it: Any) -> None:
    """Join a DataLoader iterator's workers now: an exception's traceback would otherwise keep them alive."""
    stop = getattr(it, "_shutdown_workers", None)  # multi-process iterators only
    if stop is not None:
        stop()


def collate_skip_errors(items: list[Any]) -> dict[str, Any]:
    """`collate_skip_none` that also keeps why each clip was dropped: batch['skipped_errors'] {video_id: message}."""
    from avs.data.avsbench import SkippedItem, collate_skip_none

    errors = {it.video_id: it.error for it in items if isinstance(it, SkippedItem)}
    out = collate_skip_none(items)
    out["skipped_errors"] = errors
    return out


def _no_barrier() -> None:
    return None


class RunData:
    """Datasets and loaders of one run (`is_main`: the process that generates synthetic data first)."""

    def __init__(
        self,
        cfg: DictConfig,
        *,
        is_main: bool = True,
        cuda: bool = False,
        barrier: Callable[[], None] = _no_barrier,
        generate: bool = True,
    ) -> None:
        self.cfg = cfg
        self.generate = generate  # False (evaluation): synthetic data must exist, it is never generated
        self.is_main = is_main
        self.cuda = cuda
        self.barrier = barrier
        self._datasets: dict[str, Any] = {}
        self._loaders: dict[str, DataLoader] = {}  # kept across epochs when the workers are persistent

    def dataset(self, split: str):
        """The split's dataset (built once; synthetic data is generated on first use, by rank 0 first)."""
        if split not in self._datasets:
            from avs.data.avsbench import build_dataset

            if self.cfg.data.get("synthetic") and not self.generate:
                from avs.data.preflight import require_synthetic

                require_synthetic(self.cfg.data)
            elif self.cfg.data.get("synthetic"):
                from avs.data.synthetic import ensure_synthetic

                if self.is_main:
                    ensure_synthetic(self.cfg.data)
                self.barrier()
                if not self.is_main:
                    ensure_synthetic(self.cfg.data)
            ds = build_dataset(self.cfg.data, split, train=(split == "train"))
            ds.seed = int(self.cfg.seed)  # augmentation draws follow (seed, epoch, index)
            self._datasets[split] = ds
        return self._datasets[split]

    def probe_audio(self, split: str, mode: str, seed: int = 0) -> None:
        """Score `split` with its audio zeroed or shuffled across clips (avs.data.shuffled_audio.probe_audio)."""
        from avs.data.shuffled_audio import probe_audio

        self._datasets[split] = probe_audio(self.dataset(split), mode, seed)
        self._loaders.pop(split, None)

    def preflight(self, splits: tuple[str, ...]) -> None:
        """Before step 1: every file these splits name exists (avs.data.preflight; data.on_error decides)."""
        from avs.data.preflight import missing_split_files

        missing_split_files({s: self.dataset(s) for s in splits}, self.cfg.data.on_error)

    def persistent_workers(self) -> bool:
        """data.persistent_workers: auto (= on with worker processes) | true | false."""
        workers = int(self.cfg.data.num_workers)
        return auto_flag(
            self.cfg.data.persistent_workers,
            "data.persistent_workers",
            auto=workers > 0,
            supported=workers > 0,
            requirement="data.num_workers > 0",
        )

    def loader(self, split: str, sampler=None, batch_size: int | None = None) -> DataLoader:
        """The split's DataLoader (reused while its workers are persistent)."""
        if split in self._loaders:
            return self._loaders[split]
        from avs.engine.signals import ignore_stop_signals

        dcfg = self.cfg.data
        workers = int(dcfg.num_workers)
        persistent = self.persistent_workers()
        loader = DataLoader(
            self.dataset(split),
            batch_size=batch_size or int(dcfg.eval_batch_size),
            sampler=sampler,
            shuffle=False,
            num_workers=workers,
            pin_memory=auto_flag(dcfg.pin_memory, "data.pin_memory", auto=self.cuda),
            persistent_workers=persistent,
            collate_fn=collate_skip_errors if dcfg.on_error == "skip" else None,
            worker_init_fn=ignore_stop_signals if workers > 0 else None,
            generator=torch.Generator().manual_seed(int(self.cfg.seed)),
        )
        if persistent:
            self._loaders[split] = loader
        return loader

    def end_pass(self, it: Any, loader: DataLoader, failed: bool) -> None:
        """After a pass over `loader`: keep persistent workers alive unless the pass failed."""
        if failed or not loader.persistent_workers:
            shutdown_loader_iterator(it)
            for key in [k for k, v in self._loaders.items() if v is loader]:
                del self._loaders[key]

    def close(self) -> None:
        """Join every persistent DataLoader worker (end of training, interruption, failure)."""
        for loader in self._loaders.values():
            shutdown_loader_iterator(getattr(loader, "_iterator", None))
        self._loaders.clear()
