"""Checks of a composed config that fail early, before any data is loaded, naming the keys."""

from __future__ import annotations

from omegaconf import DictConfig


class ConfigError(ValueError):
    """An impossible or unsafe combination of config values."""


def check_config(cfg: DictConfig) -> None:
    """Raise ConfigError for combinations that cannot work (see docs/reliability.md)."""
    data, model, trainer = cfg.data, cfg.model, cfg.trainer
    if data.subset not in ("s4", "ms3"):
        raise ConfigError(f"data.subset must be 's4' or 'ms3', got {data.subset!r}")
    size = int(data.image_size)
    if size % 32 != 0 or size < 32:
        raise ConfigError(f"data.image_size={size} must be a positive multiple of 32 (the backbone's output stride)")
    if int(data.num_frames) < 1:
        raise ConfigError(f"data.num_frames={data.num_frames} must be >= 1")
    if model.get("motion") is not None and int(data.num_frames) < 2:
        raise ConfigError(f"model.motion needs data.num_frames >= 2 (got {data.num_frames}); set model.motion=null")
    split = str(trainer.get("select_split", "val"))
    if split not in ("val", "test"):
        raise ConfigError(f"trainer.select_split must be 'val' (or 'test' with allow_test_selection), got {split!r}")
    if split == "test" and not trainer.get("allow_test_selection", False):
        raise ConfigError(
            "trainer.select_split=test selects checkpoints on the test split; this is refused unless "
            "trainer.allow_test_selection=true is set explicitly (the AVS-BG release did this; see docs/protocols.md)"
        )
    if data.audio_source not in ("logmel", "wav", "embedding"):
        raise ConfigError(f"data.audio_source must be logmel|wav|embedding, got {data.audio_source!r}")
    if data.audio_source != "embedding" and model.get("use_audio", True) and model.get("audio_encoder") is None:
        raise ConfigError("model.audio_encoder is null but data.audio_source gives log-mel audio: set audio=vggish|tiny or data.audio_source=embedding")
    if model.get("projector") is not None and model.get("projector_mask", "auto") == "gt" and data.subset == "s4":
        raise ConfigError("model.projector_mask=gt needs all frames labelled; S4 trains on frame 0 only (use auto or pred)")
