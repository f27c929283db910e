"""Which config keys of a run never define a table row, and the config key names the table code reads.

A row never splits by a result-neutral key (`avs.config_keys.RESULT_NEUTRAL_KEYS`, the list resume
reads too) nor by the few result keys in `ROW_MERGED_KEYS`.
"""

from __future__ import annotations

from avs.config_keys import RESULT_NEUTRAL_KEYS

# trainer keys that say how a run was run (device, logging, resuming, debugging), not what it computes
TRAINER_RUN_KEYS: tuple[str, ...] = tuple(k for k in RESULT_NEUTRAL_KEYS if k.startswith("trainer."))
TEST_AT_END_KEY = "trainer.test_at_end"  # named in the message when a run has no test metrics
INIT_FROM_KEY = "model.init_from"  # a checkpoint path: normalised to 'checkpoint' (rows must not split by path)

# Result keys (avs.config_keys.RESULT_KEYS) that still do not define a row.
ROW_MERGED_KEYS: tuple[str, ...] = (
    "seed",  # a row is the mean +- std over its seeds
    "data.root",  # where the subset is stored: a row is one subset wherever it lies
    "data.embedding_dir",
    "s4_checkpoint",  # the S4 -> MS3 overlays: model.init_from (normalised) says it
)
# Config keys (and everything below them) that never define a table row.
IGNORED_KEYS: tuple[str, ...] = (*RESULT_NEUTRAL_KEYS, *ROW_MERGED_KEYS)
ROW_LABEL_KEY = "published.row"
SUBSET_ORDER = ("s4", "ms3", "avss")
