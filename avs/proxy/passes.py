"""The records each proxy run makes after its training: its listening record (avs/proxy/listening.py) and,
for the cells `uncertainty.cells` lists, its uncertainty record (avs/evaluation/uncertainty.py).

The runner's training command asks the training itself for both (`record_overrides`: two hooks after the
final evaluation); `followup_commands` are the standalone passes that make the same records from a
finished run's best.ckpt, run for a record a finished training did not write.
"""

from __future__ import annotations

import sys
from pathlib import Path

from omegaconf import DictConfig

from avs.config import PROJECT_ROOT
from avs.engine.rundir import BEST_CKPT, CHECKPOINT_DIR
from avs.proxy.protocol import ProxyRun

UNCERTAINTY_SCRIPT = PROJECT_ROOT / "scripts" / "uncertainty.py"
UNCERTAINTY_FILE = "uncertainty.json"
LISTENING_FILE = "listening.json"  # avs/proxy/listening.py (not imported here: it loads torch)
# after hooks.final_evaluation (200: best.ckpt loaded, test scored), before hooks.metrics (210)
LISTENING_PRIORITY = 205
UNCERTAINTY_PRIORITY = 206


def record_overrides(cfg: DictConfig | None, run: ProxyRun) -> list[str]:
    """The overrides that make a run's training write its listening record (with the protocol's `listening`,
    every cell) and its uncertainty record (the cells `uncertainty.cells` lists) after its final evaluation:
    avs.proxy.listening.ListeningHook, avs.evaluation.uncertainty.UncertaintyHook. The standalone passes
    (followup_commands) give the same records for a finished run that lacks one."""
    if cfg is None:
        return []
    ckpt = _quoted(_best(run))
    hooks: dict[str, dict[str, str]] = {}
    listen = cfg.get("listening")
    if listen is not None:
        hooks["listening"] = {
            "_target_": "avs.proxy.listening.ListeningHook",
            "priority": str(LISTENING_PRIORITY),
            "out": _quoted(run.run_dir / LISTENING_FILE),
            "shuffle_seed": str(int(listen.shuffle_seed)),
            "checkpoint": ckpt,
        }
    node = _uncertainty(cfg, run)
    if node is not None:
        hooks["uncertainty"] = {
            "_target_": "avs.evaluation.uncertainty.UncertaintyHook",
            "priority": str(UNCERTAINTY_PRIORITY),
            "out": _quoted(run.run_dir / UNCERTAINTY_FILE),
            "split": str(node.split),
            "num_samples": str(int(node.num_samples)),
            "checkpoint": ckpt,
        }
    return [
        f"+hooks.{name}={{" + ",".join(f"{k}:{v}" for k, v in fields.items()) + "}" for name, fields in hooks.items()
    ]


def _best(run: ProxyRun) -> Path:
    return run.run_dir / CHECKPOINT_DIR / BEST_CKPT


def _uncertainty(cfg: DictConfig, run: ProxyRun) -> DictConfig | None:
    """The protocol's `uncertainty` node when it lists this run's cell, else None."""
    node = cfg.get("uncertainty")
    return node if node is not None and run.cell in set(node.get("cells") or []) else None


def _quoted(path: Path) -> str:
    """A path as a quoted string of Hydra's override grammar (backslashes and quotes escaped)."""
    return "'" + str(path).replace("\\", "\\\\").replace("'", "\\'") + "'"


def followup_commands(cfg: DictConfig, run: ProxyRun, missing_only: bool = False) -> list[list[str]]:
    """The standalone passes that make a finished run's records from its best.ckpt (the runner's own
    training writes them itself: record_overrides): the uncertainty pass for the listed cells, the
    listening pass (avs/proxy/listening.py) for every cell when `listening` is set.
    `missing_only`: only those whose output file is not there yet."""
    cmds: list[tuple[list[str], Path]] = []
    ckpt = _best(run)
    node = _uncertainty(cfg, run)
    if node is not None:
        logs = run.run_dir.parent.parent.parent / "logs" / "uncertainty" / run.name.replace("/", "_")
        cmd = [
            sys.executable,
            str(UNCERTAINTY_SCRIPT),
            f"checkpoint={ckpt}",
            f"split={node.split}",
            f"eval.num_samples={int(node.num_samples)}",
            f"out={run.run_dir / UNCERTAINTY_FILE}",
            f"hydra.run.dir={logs}",
        ]
        cmds.append((cmd, run.run_dir / UNCERTAINTY_FILE))
    listen = cfg.get("listening")
    if listen is not None:
        out = run.run_dir / LISTENING_FILE
        cmds.append(
            ([sys.executable, "-m", "avs.proxy.listening", str(ckpt), str(out), str(int(listen.shuffle_seed))], out)
        )
    return [cmd for cmd, out in cmds if not (missing_only and out.is_file())]
