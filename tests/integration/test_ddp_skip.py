"""DDP (gloo, 2 processes) with trainer.drop_last=true and data.on_error=skip: a clip lost on one rank
shortens that rank's batch only; every rank still takes the same steps (no collective left waiting)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import torch.multiprocessing as mp
from omegaconf import OmegaConf

from tests.conftest import compose_cfg, tiny_overrides
from tests.integration.test_ddp import _free_port

WORLD = 2
TIMEOUT_S = 60.0  # a rank waiting on a collective the other never joins fails after this, instead of hanging


def _worker(rank: int, port: int, cfg_yaml: str, run_dir: str, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    from avs.engine import distributed as D
    from avs.engine.trainer import Trainer

    D.init_from_env(timeout_s=TIMEOUT_S)
    try:
        trainer = Trainer(OmegaConf.create(cfg_yaml), run_dir)
        result = trainer.fit()
        record = {
            "steps": result["steps"],
            "loss_history": trainer.loss_history,
            "skipped": sorted(set(trainer.skipped)),
            "epoch": trainer.epoch,
        }
    finally:
        D.cleanup()
    with open(out.format(rank=rank), "w") as fh:
        json.dump(record, fh)


def test_clip_lost_on_one_rank_with_drop_last_keeps_the_ranks_in_step(synth_data_dir, tmp_path):
    from avs.data.avsbench import get_layout, mask_path, split_records
    from avs.data.synthetic import ensure_synthetic
    from avs.engine.sampler import ResumableSampler

    data_dir = tmp_path / "data"
    overrides = tiny_overrides(data_dir) + [
        "data.synthetic.clips={train: 6, val: 2, test: 2}",
        "model.channels=32",
        "data.batch_size=2",
        "data.eval_batch_size=1",
        "trainer.drop_last=true",
        "data.on_error=skip",
        "trainer.max_steps=2",
        "trainer.test_at_end=false",
        "trainer.checkpoint_every_steps=0",
    ]
    cfg = compose_cfg("train", overrides)
    ensure_synthetic(cfg.data)
    # 6 clips / 2 ranks = 3 per rank: batch 0 has 2 clips, batch 1 (1 clip) is dropped. Corrupt the first
    # clip rank 1 reads in epoch 0, so that rank's batch 0 has a single clip.
    root = Path(cfg.data.root)
    records = split_records(root, "ms3", "train")
    sampler = ResumableSampler(len(records), shuffle=True, seed=int(cfg.seed), num_replicas=WORLD, rank=1)
    rec = records[list(sampler)[0]]
    path = mask_path(root, get_layout("ms3"), rec, 1)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(64))
    out = str(tmp_path / "rank{rank}.json")
    mp.start_processes(
        _worker,
        args=(_free_port(), OmegaConf.to_yaml(cfg, resolve=True), str(tmp_path / "run"), out),
        nprocs=WORLD,
        join=True,
        start_method="spawn",
    )
    r0, r1 = (json.loads(Path(out.format(rank=r)).read_text()) for r in range(WORLD))
    assert r0["steps"] == r1["steps"] == 2
    assert r0["epoch"] == r1["epoch"] == 2  # one step per epoch: the short last batch dropped on both ranks
    assert len(r0["loss_history"]) == len(r1["loss_history"]) == 2
    assert rec.video_id in r0["skipped"] and r0["skipped"] == r1["skipped"]  # merged over the ranks
    shutil.rmtree(tmp_path / "run", ignore_errors=True)
