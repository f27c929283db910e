"""Which config keys of a run never define a table row, and the config key names the table code reads.

The trainer's key names live here only (`TRAINER_RUN_KEYS`, `TEST_AT_END_KEY`): when a trainer key
is renamed or moved, this module is the one to update.
"""

from __future__ import annotations

# trainer keys that say how a run was run (device, logging, resuming, debugging), not what it computes
TRAINER_RUN_KEYS: tuple[str, ...] = (
    "trainer.device",
    "trainer.progress",
    "trainer.tensorboard",
    "trainer.log_every_steps",
    "trainer.resume",
    "trainer.checkpoint_every_steps",
    "trainer.interrupt_after_steps",
    "trainer.debug_nan_steps",
    "trainer.epochs_by_subset",
)
TEST_AT_END_KEY = "trainer.test_at_end"  # named in the message when a run has no test metrics
INIT_FROM_KEY = "model.init_from"  # a checkpoint path: normalised to 'checkpoint' (rows must not split by path)

# Config keys (and everything below them) that never define a table row.
IGNORED_KEYS: tuple[str, ...] = (
    "seed",
    "task_name",
    "paths",
    "hydra",
    "published",  # except published.row, see ROW_LABEL_KEY
    "data.root",
    "data.embedding_dir",
    "data.synthetic.name",
    "data.num_workers",
    "data.pin_memory",
    *TRAINER_RUN_KEYS,
    "s4_checkpoint",  # the S4 -> MS3 overlays: model.init_from (normalised) says it
)
IGNORED_SUFFIXES: tuple[str, ...] = ("weights_path", "pca_path")
ROW_LABEL_KEY = "published.row"
SUBSET_ORDER = ("s4", "ms3")
