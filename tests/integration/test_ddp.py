"""Distributed data parallel on CPU (gloo, 2 processes): training runs, only rank 0 writes, checkpoints load
in a single process, and distributed evaluation equals single-process evaluation exactly, on a split whose
size (3 clips) is not divisible by the world size (docs/distributed.md)."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from omegaconf import OmegaConf

from avs.config import PROJECT_ROOT
from avs.engine.checkpoint import load_checkpoint, model_state_from
from tests.conftest import compose_cfg, tiny_overrides

WORLD = 2
CLIPS = ["data.synthetic.clips={train: 4, val: 3, test: 2}"]  # val: 3 clips over 2 ranks -> one padded repeat
COMMON = [
    "model.channels=32",
    "data.batch_size=1",
    "data.eval_batch_size=1",
    "trainer.max_steps=2",
    "trainer.checkpoint_every_steps=1",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, cfg_yaml: str, eval_yaml: str, run_dir: str, eval_dir: str, out: str) -> None:
    """One DDP rank: train, then evaluate the best checkpoint distributed; record every file it wrote."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    import avs.utils.io as io_mod
    from avs.engine import distributed as D
    from avs.engine.trainer import Trainer
    from avs.evaluation.checkpoint import evaluate_checkpoint

    written: list[str] = []
    real_open = io_mod.atomic_open

    @contextlib.contextmanager
    def spy(path, mode="wb"):
        written.append(str(path))
        with real_open(path, mode) as fh:
            yield fh

    io_mod.atomic_open = spy  # every framework writer goes through atomic_open
    try:
        trainer = Trainer(OmegaConf.create(cfg_yaml), run_dir)
        result = trainer.fit()
        ev = evaluate_checkpoint(OmegaConf.create(eval_yaml), eval_dir)
        record = {
            "rank": rank,
            "world": trainer.dist.world_size,
            "written": written,
            "steps": result["steps"],
            "val": trainer.best["val"],
            "test": result["test"],
            "eval": ev["metrics"],
            "loss_history": trainer.loss_history,
        }
    finally:
        D.cleanup()
    with open(out.format(rank=rank), "w") as fh:  # the harness's own file, outside the run dir
        json.dump(record, fh)


@pytest.fixture(scope="module")
def ddp_run(synth_data_dir, tmp_path_factory):
    """Train tiny TPAVI with 2 gloo processes, then evaluate its best checkpoint with 2 processes."""
    from avs.data.synthetic import ensure_synthetic

    tmp = tmp_path_factory.mktemp("ddp")
    cfg = compose_cfg("train", tiny_overrides(synth_data_dir) + CLIPS + COMMON)
    ensure_synthetic(cfg.data)  # generated once here, not raced by the ranks
    run_dir, eval_dir = tmp / "run", tmp / "eval"
    ecfg = compose_cfg(
        "eval",
        [
            f"checkpoint={run_dir / 'checkpoints' / 'best.ckpt'}",
            "split=val",
            "device=cpu",
            "batch_size=1",
            f"paths.log_dir={tmp}/logs",
        ],
    )
    out = str(tmp / "rank{rank}.json")
    mp.start_processes(
        _worker,
        args=(
            _free_port(),
            OmegaConf.to_yaml(cfg, resolve=True),
            OmegaConf.to_yaml(ecfg),
            str(run_dir),
            str(eval_dir),
            out,
        ),
        nprocs=WORLD,
        join=True,
        start_method="spawn",
    )
    records = [json.loads(Path(out.format(rank=r)).read_text()) for r in range(WORLD)]
    return {"cfg": cfg, "ecfg": ecfg, "run_dir": run_dir, "eval_dir": eval_dir, "records": records, "tmp": tmp}


def test_ddp_trains_and_only_rank0_writes(ddp_run):
    r0, r1 = ddp_run["records"]
    assert r0["world"] == r1["world"] == WORLD
    # 4 train clips / 2 ranks / batch 1 = 2 steps per epoch; both ranks took the same steps
    assert r0["steps"] == r1["steps"] == 2 and len(r0["loss_history"]) == 2
    assert r1["written"] == []
    names = {Path(p).name for p in r0["written"]}
    assert {
        "last.ckpt",
        "best.ckpt",
        "metrics.json",
        "run_report.json",
        "config_resolved.yaml",
        "metrics_val.json",
    } <= names
    metrics = json.loads((ddp_run["run_dir"] / "metrics.json").read_text())
    assert metrics["world_size"] == WORLD and metrics["global_batch_size"] == WORLD
    # every rank computed the same (gathered) metrics
    assert r0["val"] == r1["val"] and r0["test"] == r1["test"] and r0["eval"] == r1["eval"]


def test_ddp_checkpoint_loads_in_a_single_process(ddp_run):
    from avs.engine.trainer import Trainer

    state = load_checkpoint(ddp_run["run_dir"] / "checkpoints" / "last.ckpt")
    assert state["world_size"] == WORLD and len(state["rng_per_rank"]) == WORLD
    assert not any(k.startswith("module.") for k in state["model"])
    single = Trainer(ddp_run["cfg"], ddp_run["tmp"] / "single")
    single.model.load_state_dict(model_state_from(state))  # strict: same keys, same shapes


def test_distributed_eval_equals_single_process_exactly(ddp_run):
    from avs.evaluation.checkpoint import evaluate_checkpoint

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the ranks ran single-threaded: same kernels, same bits
    try:
        single = evaluate_checkpoint(ddp_run["ecfg"], ddp_run["tmp"] / "eval_single")["metrics"]
    finally:
        torch.set_num_threads(threads)
    r0 = ddp_run["records"][0]
    assert single == r0["eval"]  # every protocol, every number, no double-counted padding
    assert single["per_frame"]["num_frames"] == 3 * 3  # 3 clips x T=3, the padded repeat dropped
    assert single["avsbench_legacy"]["num_clips"] == 3
    # the validation run inside DDP training scored the best weights the same way
    assert r0["val"] == single
    table = json.loads((ddp_run["eval_dir"] / "metrics_val.json").read_text())
    assert table["world_size"] == WORLD and table["metrics"] == single


def test_torchrun_script_shares_one_run_dir(synth_data_dir, tmp_path):
    """scripts/train.py under torchrun: one Hydra run dir for both ranks, rank 1 writes no Hydra files."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={WORLD}",
        str(PROJECT_ROOT / "scripts" / "train.py"),
        *tiny_overrides(synth_data_dir),
        *CLIPS,
        *COMMON,
        f"paths.log_dir={tmp_path}/logs",
        "trainer.max_steps=1",
        "trainer.test_at_end=false",
    ]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    runs = list((tmp_path / "logs" / "train" / "runs").iterdir())
    assert len(runs) == 1, runs
    run = runs[0]
    assert sorted(p.name for p in (run / ".hydra").iterdir()) == ["config.yaml", "hydra.yaml", "overrides.yaml"]
    assert json.loads((run / "metrics.json").read_text())["world_size"] == WORLD
    assert load_checkpoint(run / "checkpoints" / "last.ckpt")["step"] == 1


# ----------------------------------------------------------------------------- DDP settings (single process)
@pytest.mark.parametrize(
    "overrides,unused",
    [
        (["model=tpavi"], False),
        (["model=ecmvae"], False),
        (["model=avsbg"], False),
        (["model=ecmvae_bg"], False),
        (["model=avsbg", "model.use_audio=false"], False),
        (["experiment=ecmvae_table2_cvae"], False),
    ],
)
def test_find_unused_parameters_default_matches_the_graph(tmp_path, overrides, unused):
    """No shipped variant (no-audio ablations included) leaves a parameter without grad, so DDP's search is off."""
    from avs.engine.build import ddp_find_unused_parameters, resolve_loss_weights
    from avs.models.build import build_model

    small = ["model.channels=32", "model.audio_dim=32", "audio.embed_dim=32"]
    cfg = compose_cfg("train", tiny_overrides(tmp_path) + small + overrides)
    torch.manual_seed(0)
    net = build_model(cfg).train()
    B, T, S = 1, cfg.data.num_frames, cfg.data.image_size
    batch = {
        "frames": torch.randn(B, T, 3, S, S),
        "masks": (torch.rand(B, T, 1, S, S) > 0.5).float(),
        "mask_valid": torch.ones(B, T, dtype=torch.bool),
        "audio": torch.randn(B, T, 1, 96, 64),
    }
    weights = resolve_loss_weights(cfg)
    sum(weights.get(k, 0.0) * v for k, v in net(batch).items()).backward()
    starved = [n for n, p in net.named_parameters() if p.requires_grad and p.grad is None]
    assert bool(starved) == unused == ddp_find_unused_parameters(cfg), starved[:5]


def test_slurm_multi_task_step_gives_env_variables(monkeypatch):
    from avs.engine import distributed as D

    for k in ("WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "8")
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_JOB_ID", "123456")
    monkeypatch.setenv("SLURM_STEP_NODELIST", "gpu[07-08,11],login1")
    env = D.slurm_env()
    assert env == {
        "RANK": "5",
        "WORLD_SIZE": "8",
        "LOCAL_RANK": "1",
        "MASTER_ADDR": "gpu07",
        "MASTER_PORT": str(20000 + 123456 % 20000),
    }
    assert D.env_world_size() == 8
    assert D.expand_nodelist("gpu[07-08,11],login1") == ["gpu07", "gpu08", "gpu11", "login1"]
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "1")  # one task (e.g. python in an sbatch script): no DDP
    assert D.slurm_env() == {} and D.env_world_size() == 1
