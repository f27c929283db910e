"""CUDA-side code paths exercised on CPU: memory format, RNG state, AMP choice, scaler state,
export device independence, motion under autocast, fused attention precision, SyncBN freezing,
config refusals. Tests that need a GPU are marked and skipped elsewhere."""

from __future__ import annotations

import logging

import pytest
import torch

from avs.config_checks import ConfigError, check_config
from tests.conftest import compose_cfg, tiny_overrides

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


# ----------------------------------------------------------------------------- cached embeddings
@pytest.mark.parametrize(
    "overrides,message",
    [
        (["data.audio_source=embedding"], r"data\.audio_source=embedding .*model\.audio_encoder is TinyAudioEncoder.*set audio=vggish"),
        (["experiment=quickstart", "data.audio_source=embedding"], r"data\.audio_source=embedding.*set audio=vggish"),
        (["data.audio_source=embedding", "audio=vggish", "audio.trainable=true"], r"audio\.trainable=true.*set audio\.trainable=false"),
        (["data.audio_source=embedding", "audio=vggish", "model.audio_dim=64"], r"model\.audio_dim=64: set model\.audio_dim=128"),
    ],
    ids=["tiny", "quickstart", "trainable_vggish", "audio_dim"],
)
def test_cached_embeddings_refuse_an_encoder_that_would_not_run(overrides, message, tmp_path):
    cfg = compose_cfg("train", tiny_overrides(tmp_path) + overrides)
    with pytest.raises(ConfigError, match=message):
        check_config(cfg)


def test_cached_embeddings_with_frozen_vggish_pass(tmp_path):
    check_config(compose_cfg("train", tiny_overrides(tmp_path) + ["data.audio_source=embedding", "audio=vggish"]))
    check_config(compose_cfg("train", tiny_overrides(tmp_path) + ["data.audio_source=embedding", "model.use_audio=false"]))
