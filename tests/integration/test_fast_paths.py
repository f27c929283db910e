"""Trainer fast paths give the plain path's results: persistent DataLoader workers, torch.compile."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from avs.data import build_dataset
from avs.data.loaders import RunData
from avs.engine.checkpoint import load_checkpoint
from avs.engine.trainer import Trainer
from tests.conftest import compose_cfg, tiny_overrides

DET = ["model.channels=32", "trainer.deterministic=true", "trainer.test_at_end=false"]


def _fit(data_dir: Path, run_dir: Path, extra: list[str]) -> Trainer:
    trainer = Trainer(compose_cfg("train", tiny_overrides(data_dir) + DET + extra), run_dir)
    trainer.fit()
    return trainer


def _record_train_loaders(monkeypatch) -> dict[int, list[int]]:
    """id(trainer.data) -> ids of the train DataLoaders it iterated, one entry per epoch."""
    seen: dict[int, list[int]] = {}
    original = RunData.loader

    def recording(self, split, sampler=None, batch_size=None):
        loader = original(self, split, sampler=sampler, batch_size=batch_size)
        if split == "train":
            seen.setdefault(id(self), []).append(id(loader))
        return loader

    monkeypatch.setattr(RunData, "loader", recording)
    return seen


def test_epoch_in_the_index_equals_set_epoch(synth_data_dir):
    cfg = compose_cfg("train", tiny_overrides(synth_data_dir) + ["data.flip_prob=0.5"])
    from avs.data.synthetic import ensure_synthetic

    ensure_synthetic(cfg.data)
    ds = build_dataset(cfg.data, "train", train=True)
    flipped_differs = False
    for i in range(len(ds)):
        per_epoch = []
        for epoch in range(4):
            ds.set_epoch(epoch)
            plain = ds[i]["frames"]
            ds.set_epoch(99)  # the pair's epoch wins over the dataset's own
            paired = ds[(epoch, i)]["frames"]
            assert torch.equal(plain, paired), (i, epoch)
            per_epoch.append(paired)
        flipped_differs |= any(not torch.equal(per_epoch[0], f) for f in per_epoch[1:])
    assert flipped_differs, "flip_prob=0.5 never changed a clip across 4 epochs: the epoch is not used"


def test_persistent_workers_train_like_in_process_loading(synth_data_dir, tmp_path, monkeypatch):
    common = ["data.flip_prob=0.5", "data.batch_size=1", "trainer.max_steps=0", "trainer.epochs=3"]
    seen = _record_train_loaders(monkeypatch)
    plain = _fit(synth_data_dir, tmp_path / "plain", common + ["data.num_workers=0"])
    fast = _fit(synth_data_dir, tmp_path / "fast", common + ["data.num_workers=2"])
    plain_ids, fast_ids = seen[id(plain.data)], seen[id(fast.data)]
    assert fast.data.persistent_workers() and not plain.data.persistent_workers()
    assert plain.step == fast.step == 3 * 4
    # one DataLoader (and one set of worker processes) for all three epochs; a new one per epoch in-process
    assert len(fast_ids) == 3 and len(set(fast_ids)) == 1
    assert len(plain_ids) == 3
    assert fast.data._loaders == {}  # the workers were joined at the end of the run
    a = load_checkpoint(tmp_path / "plain" / "checkpoints" / "last.ckpt")["model"]
    b = load_checkpoint(tmp_path / "fast" / "checkpoints" / "last.ckpt")["model"]
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_persistent_workers_need_workers(synth_data_dir, tmp_path):
    cfg = compose_cfg("train", tiny_overrides(synth_data_dir) + ["data.persistent_workers=true"])
    with pytest.raises(ValueError, match="data.persistent_workers=true needs data.num_workers > 0"):
        Trainer(cfg, tmp_path / "run").fit()


def test_compiled_training_matches_eager(synth_data_dir, tmp_path):
    eager = _fit(synth_data_dir, tmp_path / "eager", ["trainer.epochs=1"])
    compiled = _fit(
        synth_data_dir,
        tmp_path / "compiled",
        ["trainer.epochs=1", "trainer.compile=true", "trainer.compile_backend=aot_eager"],
    )
    assert compiled._net is not compiled.model  # the forward ran through torch.compile's wrapper
    a = load_checkpoint(tmp_path / "eager" / "checkpoints" / "last.ckpt")["model"]
    b = load_checkpoint(tmp_path / "compiled" / "checkpoints" / "last.ckpt")["model"]
    assert set(a) == set(b)  # no "_orig_mod." prefixes: checkpoints load into a plain model
    # Adam turns float noise in near-zero gradients into lr-sized steps, so weights are not compared
    # elementwise; the losses (step 2 follows the first update) and the validation metrics are.
    torch.testing.assert_close(compiled.loss_history, eager.loss_history, rtol=1e-5, atol=1e-6)
    for key in ("miou", "fscore"):
        assert compiled.history[-1]["val"]["per_frame"][key] == pytest.approx(
            eager.history[-1]["val"]["per_frame"][key], abs=1e-4
        )
