"""Paper-style result tables from run directories: rows = the config keys that vary, columns = subset x metric.

Every run dir written by the trainer holds a ``metrics.json`` whose ``config`` field is the resolved
config. ``build_table`` groups runs by the config keys that vary *within* a data subset (so that
keys tied to the subset, such as the epoch count or the data root, do not split rows), after
dropping seeds, paths, hydra and run-specific keys (avs.tables.keys), and reports mean +- sample
std over the runs (seeds) of each group. The experiment overlays carry a ``published`` node
(paper, table, row, ``s4``/``ms3``/``avss``: ``{miou, fscore}`` in %, optional ``by_subset.<subset>``
with the paper / table / source of one subset's numbers when another paper published them, optional
``rows`` matched against the run's config for swept tables); those numbers are put beside ours.
"""

from avs.tables.build import Cell, ResultTable, TableRow, build_table, varied_keys
from avs.tables.keys import IGNORED_KEYS, TRAINER_RUN_KEYS
from avs.tables.render import make_table, to_csv, to_markdown, write_table
from avs.tables.runs import RunDirNotFound, RunResult, TableError, find_metrics_files, flatten_config, load_runs

__all__ = [
    "IGNORED_KEYS",
    "TRAINER_RUN_KEYS",
    "RunResult",
    "RunDirNotFound",
    "TableError",
    "Cell",
    "TableRow",
    "ResultTable",
    "find_metrics_files",
    "flatten_config",
    "load_runs",
    "varied_keys",
    "build_table",
    "to_markdown",
    "to_csv",
    "write_table",
    "make_table",
]
