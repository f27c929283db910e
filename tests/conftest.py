"""Shared test helpers: compose configs with tiny overrides; one small synthetic dataset per session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

import avs  # noqa: F401  (registers resolvers)
from avs.config import CONFIG_DIR

torch.set_num_threads(1)  # tiny tensors: extra threads only add overhead


def tiny_overrides(data_dir: Path, subset: str = "ms3") -> list[str]:
    """Overrides that make any train config a seconds-long CPU run on a tiny synthetic dataset."""
    return [
        f"data=synth_{subset}",
        f"paths.data_dir={data_dir}",
        f"paths.log_dir={data_dir}/logs",
        "data.synthetic.clips={train: 4, val: 2, test: 2}",
        "data.image_size=64",
        "data.num_frames=3",
        "data.batch_size=2",
        "data.eval_batch_size=2",
        "data.num_workers=0",
        "backbone=pvt_v2_b0",
        "audio=tiny",
        "trainer.max_steps=2",
        "trainer.progress=false",
        "trainer.tensorboard=false",
        "trainer.device=cpu",
    ]


def compose_cfg(config_name: str = "train", overrides: list[str] | None = None, hydra_cfg: bool = False):
    """Compose a config from configs/ like the scripts do."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name, overrides=list(overrides or []), return_hydra_config=hydra_cfg)


@pytest.fixture(scope="session")
def synth_data_dir(tmp_path_factory) -> Path:
    """A data dir holding tiny Sounding Shapes S4 and MS3 roots (generated once per session)."""
    from avs.data.synthetic import ensure_synthetic

    data_dir = tmp_path_factory.mktemp("data")
    for subset in ("ms3", "s4"):
        cfg = compose_cfg("train", tiny_overrides(data_dir, subset))
        ensure_synthetic(cfg.data)
    return data_dir
