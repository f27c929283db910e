"""AVSBench data: datasets, layout check, VGGish log-mel front end, clip transforms."""

from avs.data.avsbench import (
    AVSBenchDataset,
    AVSDataError,
    DatasetReport,
    build_dataset,
    check_dataset,
    collate_skip_none,
)

__all__ = [
    "AVSBenchDataset",
    "AVSDataError",
    "DatasetReport",
    "build_dataset",
    "check_dataset",
    "collate_skip_none",
]
