"""Values of the `data.*` options the loader accepts, checked by one function.

`check_config` (avs/config_checks.py) calls `check_data_options` before anything is built, and
`AVSBenchDataset` calls it for callers that build a dataset without a composed config.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from avs.errors import ConfigError

AUDIO_SOURCES = ("logmel", "wav", "embedding")
ON_ERROR = ("raise", "skip")


def check_data_options(audio_source: Any, on_error: Any) -> None:
    """ConfigError (a ValueError) naming the key unless `data.audio_source` and `data.on_error` are known values."""
    if audio_source not in AUDIO_SOURCES:
        raise ConfigError(f"data.audio_source must be {'|'.join(AUDIO_SOURCES)}, got {audio_source!r}")
    if on_error not in ON_ERROR:
        raise ConfigError(f"data.on_error must be {' or '.join(repr(v) for v in ON_ERROR)}, got {on_error!r}")


def pad_short_audio_flag(data_cfg: Mapping[str, Any]) -> bool:
    """`data.pad_short_audio` (default false); ConfigError naming the key unless it is true or false."""
    value = data_cfg.get("pad_short_audio", False)
    if not isinstance(value, bool):
        raise ConfigError(f"data.pad_short_audio must be true or false, got {value!r}")
    return value
