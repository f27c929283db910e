"""AVSBench data: datasets and their loaders, layout check, VGGish log-mel front end, clip transforms."""

from avs.data.avsbench import (
    AVSBenchDataset,
    AVSDataError,
    DatasetReport,
    build_dataset,
    check_dataset,
    collate_skip_none,
)
from avs.data.loaders import RunData, collate_skip_errors

__all__ = [
    "AVSBenchDataset",
    "AVSDataError",
    "DatasetReport",
    "RunData",
    "build_dataset",
    "check_dataset",
    "collate_skip_errors",
    "collate_skip_none",
]
