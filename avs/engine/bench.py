"""Moved to the avs.benchmark package; this name stays only until tests/unit/test_gpu_paths.py
imports `make_batch` / `train_step_syncs` from there."""

from avs.benchmark import make_batch, train_step_syncs  # noqa: F401
