"""Train any configured model; at the end evaluate the best (val-selected) checkpoint on test once.

    python scripts/train.py experiment=quickstart
    python scripts/train.py model=tpavi data=ms3 backbone=pvt_v2_b5
    python scripts/train.py -m experiment=quickstart seed=1,2,3
    python scripts/train.py trainer.resume=<run dir> hydra.run.dir=<run dir>   # continue a stopped run in place
    torchrun --nproc_per_node=2 scripts/train.py experiment=quickstart   # DDP: docs/distributed.md

SIGTERM / SIGINT save checkpoints/last.ckpt after the current step and exit with 128 + signal
number (docs/reliability.md). A resume replays the stopped run's own overrides (its
.hydra/overrides.yaml): the command line adds only result-neutral keys or trainer.resume_allow_changes.
A rejected override prints the nearest valid key; the project's own errors print as plain lines with
the exit code of their kind (README, "Exit codes"); a sweep checks every job's config and files before
the first job starts.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

import avs  # noqa: E402,F401  (registers config resolvers)
from avs.config import CONFIG_DIR  # noqa: E402
from avs.config_checks import check_sweep, hints_on_rejection, is_multirun  # noqa: E402
from avs.engine import distributed as D  # noqa: E402
from avs.engine.rundir import precheck_resume, precheck_run_dir, resume_advice, resume_overrides  # noqa: E402
from avs.engine.trainer import Trainer  # noqa: E402
from avs.errors import plain_errors, run_plain  # noqa: E402
from avs.evaluation.report import markdown_table  # noqa: E402
from avs.script_args import check_overrides  # noqa: E402
from avs.utils.allocator import configure as configure_allocator  # noqa: E402

log = logging.getLogger("avs.train")


@hydra.main(version_base="1.3", config_path="../configs", config_name="train")
@plain_errors
def main(cfg: DictConfig) -> float | None:
    configure_allocator(cfg.runtime.allocator)  # process-wide, before the model and data are built
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    trainer = Trainer(cfg, run_dir)
    result = trainer.fit()
    if result.get("interrupted"):
        if trainer.is_main:  # the command that continues this run, as it can be run
            print(resume_advice(run_dir), file=sys.stderr)
        signame = result.get("signal")
        if signame:
            signum = int(getattr(signal, signame))
            log.warning("exiting after %s with code %d", signame, 128 + signum)
            raise SystemExit(128 + signum)
        return None
    best = trainer.best
    if trainer.is_main:
        print(f"\nrun dir: {run_dir}")
        if best.get("val"):
            print(markdown_table(best["val"], title=f"val (best epoch {best['epoch']}, step {best['step']})"))
        if result.get("test"):
            title = f"test ({cfg.data.name}, {cfg.model.name}, {cfg.backbone.name})"
            print(markdown_table(result["test"], title=title))
    return float(best["metric"]) if best.get("metric") is not None else None


def run() -> None:
    """Entry point: DDP run-dir agreement, Hydra main, override hints on a rejected command line."""
    user_args = list(sys.argv[1:])
    run_plain(lambda: check_overrides(user_args, "scripts/train.py", "train", open_nodes=["model"]))
    try:
        if is_multirun(user_args):  # every job's config and files before the first job starts
            run_plain(lambda: check_sweep([a for a in user_args if "=" in a]))
        else:  # a resume continues the run with its stored overrides (every rank replays the same file)
            user_args = run_plain(lambda: resume_overrides(user_args))
            sys.argv[1:] = user_args
            if os.environ.get("RANK", "0") == "0":  # a run dir in use or holding a run: refused before Hydra writes
                run_plain(lambda: precheck_run_dir(user_args))
            run_plain(lambda: precheck_resume(user_args))  # a resume that changes results: likewise
        sys.argv += D.hydra_overrides(user_args, CONFIG_DIR)  # torchrun: one run dir for every rank
        with hints_on_rejection(user_args):
            main()
    finally:
        D.cleanup()


if __name__ == "__main__":
    run()
