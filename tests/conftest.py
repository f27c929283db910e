"""Shared test helpers: compose configs with tiny overrides; one small synthetic dataset per session."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
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


# Variables read when an interpreter or its libraries start: a script given one of them runs in a fresh process
# (PYTHONPATH excepted: the warm interpreter puts its entries on sys.path as a new one would).
_STARTUP_ENV = ("PYTHON", "OMP_", "MKL_", "KMP_", "LD_", "MALLOC", "TORCH", "ATEN_", "CUDA", "HYDRA")
_server: dict = {}


def _startup_env(env: dict) -> dict:
    return {k: v for k, v in env.items() if k.startswith(_STARTUP_ENV) and k != "PYTHONPATH"}


def _script_server(env: dict) -> subprocess.Popen | None:
    """This test process's warm script runner (tests/script_server.py), started on first use; None when the
    environment's start-up variables differ from the ones it started with (then a fresh process is used)."""
    proc = _server.get("proc")
    if proc is None or proc.poll() is not None:
        proc = subprocess.Popen(
            [sys.executable, str(PROJECT_ROOT / "tests" / "script_server.py")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        assert json.loads(proc.stdout.readline()) == {"ready": True}, "tests/script_server.py did not start"
        _server.update(proc=proc, startup=_startup_env(env))
    return proc if _server["startup"] == _startup_env(env) else None


def run_script(
    name: str, args: list[str], cwd: Path, env: dict | None = None, timeout: int = 300, inherit_env: bool = True
) -> subprocess.CompletedProcess:
    """Run scripts/<name> as a new process (one thread; `env` added to ours, or alone without `inherit_env`),
    capturing its text output.

    The process is forked from a warm interpreter that has imported torch, timm, Hydra and avs once
    (tests/script_server.py); it then runs the script like `python scripts/<name>` (own cwd, environment,
    exit code, output). A fresh interpreter is started instead when `env` sets start-up variables other
    than PYTHONPATH."""
    full_env = {**(os.environ if inherit_env else {}), "OMP_NUM_THREADS": "1", **(env or {})}
    cmd = [sys.executable, str(PROJECT_ROOT / "scripts" / name), *args]
    server = None if _startup_env(env or {}) else _script_server(full_env)
    if server is None:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd, env=full_env)
    with tempfile.TemporaryDirectory() as tmp:
        out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
        request = {"script": cmd[1], "args": args, "cwd": str(cwd), "env": full_env, "timeout": timeout}
        server.stdin.write(json.dumps({**request, "stdout": str(out), "stderr": str(err)}) + "\n")
        server.stdin.flush()
        line = server.stdout.readline()
        assert line, f"tests/script_server.py ended while running {name} (exit code {server.poll()})"
        reply = json.loads(line)
        stdout, stderr = out.read_text(errors="replace"), err.read_text(errors="replace")
    if reply["timed_out"]:
        raise subprocess.TimeoutExpired(cmd, timeout, stdout, stderr)
    return subprocess.CompletedProcess(cmd, reply["returncode"], stdout, stderr)


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
