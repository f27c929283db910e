"""Shared test helpers: compose configs with tiny overrides; one small synthetic dataset per session."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

import avs  # noqa: F401  (registers resolvers)
from avs.config import CONFIG_DIR, PROJECT_ROOT

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


def run_script(
    name: str, args: list[str], cwd: Path, env: dict | None = None, timeout: int = 300
) -> subprocess.CompletedProcess:
    """Run scripts/<name> in a new process (one thread; `env` added to ours), capturing its text output."""
    return subprocess.run(
        [sys.executable, str(PROJECT_ROOT / "scripts" / name), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
    )


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


def _outputs_entries(root: Path, depth: int = 4) -> set[str]:
    """Paths under `root` down to `depth` levels (run dirs sit at <task>/runs/<name> or <task>/multiruns/<time>/<n>)."""
    found: set[str] = set()
    if not root.is_dir():
        return found
    for dirpath, dirnames, filenames in os.walk(root):
        rel = Path(dirpath).relative_to(root)
        found |= {str(rel / n) for n in dirnames + filenames}
        if len(rel.parts) >= depth - 1:
            dirnames[:] = []
    return found


@pytest.fixture(scope="session", autouse=True)
def repo_outputs_untouched(tmp_path_factory):
    """The suite never writes into the repository's outputs/: the default log dir (paths.log_dir, also of every
    script a test starts) is a session tmp dir, and at the end outputs/ must hold nothing it did not hold before."""
    outputs = PROJECT_ROOT / "outputs"
    before = _outputs_entries(outputs)
    saved = os.environ.get("AVS_LOG_DIR")
    os.environ["AVS_LOG_DIR"] = str(tmp_path_factory.mktemp("default_log_dir"))
    yield
    if saved is None:
        os.environ.pop("AVS_LOG_DIR", None)
    else:
        os.environ["AVS_LOG_DIR"] = saved
    new = sorted(_outputs_entries(outputs) - before)
    assert not new, f"tests wrote into {outputs}: {new[:10]}"
