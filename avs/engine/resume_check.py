"""Resume = the same run: the config of a resumed run is compared with the one stored in the checkpoint.

Every resolved config key is a *result* key unless `avs.config_keys.RESULT_NEUTRAL_KEYS` names it: a key
that only changes how the run is watched or run (progress bars, logging, workers, device, where files
are), not its numbers (the same list keeps such keys out of table rows). A changed result key is refused
by name (`trainer.lr: 0.001 in the checkpoint, 0.05 now`) unless `trainer.resume_allow_changes` lists it
(or a parent node): an allowed change then takes effect for real (`restore_optimizer`: the optimizer's
hyperparameters come from the current config, the lr schedule is rebuilt for it) and is recorded
(run_report.json / metrics.json `faults.resumed_from[].changes`). `SCHEDULE_LENGTH_KEYS`
(trainer.epochs, trainer.max_steps) may change without being listed: the schedule is rebuilt for the new
total number of steps and continues from the step reached (docs/reliability.md, "Run integrity"). A key
present on one side only (added to or removed from the configs since the checkpoint was written) is
logged and recorded, not refused, so checkpoints of earlier versions stay resumable. Keys that a newer
version spells differently are first translated (`avs.config_upgrade.upgrade_config`: e.g.
`trainer.schedule: cosine` is now the `trainer.scheduler` node of `scheduler=cosine`; no
`trainer.optimizer` node meant Adam), so a change of their value is refused like any other.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from avs.config_checks import ConfigError
from avs.config_keys import is_result_neutral
from avs.config_keys import matches as _matches
from avs.config_upgrade import upgrade_config

log = logging.getLogger(__name__)

# Result keys that may change on resume without being listed: the schedule is rebuilt for the new length.
SCHEDULE_LENGTH_KEYS: tuple[str, ...] = ("trainer.epochs", "trainer.max_steps")
ALLOW_KEY = "trainer.resume_allow_changes"


# Nodes compared as one value: the component a group option picks (null = none), not its separate arguments.
WHOLE_NODES: tuple[str, ...] = ("trainer.optimizer", "trainer.scheduler")


def _leaves(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict) and prefix[:-1] not in WHOLE_NODES:
        out: dict[str, Any] = {}
        for k, v in node.items():
            out.update(_leaves(v, f"{prefix}{k}."))
        return out if out or not prefix else {prefix[:-1]: {}}
    return {prefix[:-1]: node}


def _text(value: Any) -> str:
    return "(absent)" if value is _ABSENT else repr(value) if isinstance(value, str) else str(value)


_ABSENT = object()


def config_changes(stored: Any, cfg: DictConfig) -> list[dict[str, Any]]:
    """Result keys whose value differs between the checkpoint's config (YAML text or mapping) and `cfg`."""
    old = OmegaConf.to_container(OmegaConf.create(stored), resolve=False) if stored is not None else {}
    old = upgrade_config(old)
    new = OmegaConf.to_container(cfg, resolve=True)
    a, b = _leaves(old), _leaves(new)
    changes = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key, _ABSENT), b.get(key, _ABSENT)
        if va == vb or is_result_neutral(key):
            continue
        changes.append(
            {
                "key": key,
                "checkpoint": None if va is _ABSENT else va,
                "now": None if vb is _ABSENT else vb,
                "text": f"{key}: {_text(va)} in the checkpoint, {_text(vb)} now",
                "schema": va is _ABSENT or vb is _ABSENT,
            }
        )
    return changes


def check_resume_config(stored: Any, cfg: DictConfig, path: str | Path) -> list[dict[str, Any]]:
    """Refuse (ConfigError) changed result keys that `trainer.resume_allow_changes` does not list -> the changes kept.

    Each returned change is {key, checkpoint, now}; a checkpoint without a stored config is not compared.
    """
    if stored is None:
        log.warning("%s stores no config: the resumed config cannot be compared with the original", path)
        return []
    allowed = [str(k) for k in (cfg.trainer.get("resume_allow_changes") or [])]
    changes = config_changes(stored, cfg)
    refused = [
        c
        for c in changes
        if not _matches(c["key"], allowed) and not _matches(c["key"], SCHEDULE_LENGTH_KEYS) and not c["schema"]
    ]
    if refused:
        keys = ",".join(dict.fromkeys(c["key"] for c in refused))
        raise ConfigError(
            f"resuming {path} with a config that changes its results: "
            + "; ".join(c["text"] for c in refused)
            + f". Resume with the values the run was started with, or allow the change explicitly with "
            f"{ALLOW_KEY}=[{keys}] (it then takes effect and is recorded in run_report.json and metrics.json)"
        )
    for c in changes:
        why = "a key added or removed by a newer version of the config" if c["schema"] else "allowed"
        log.warning("resume: %s (%s)", c["text"], why)
    return [{k: c[k] for k in ("key", "checkpoint", "now")} for c in changes]


def load_for_resume(path: str | Path, cfg: DictConfig) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Load (and verify) the checkpoint to resume from and compare its config with `cfg` -> (state, allowed changes)."""
    from avs.engine.checkpoint import CheckpointError, load_checkpoint

    state = load_checkpoint(path)
    if state.get("resumable") is False or "optimizer" not in state:
        raise CheckpointError(
            f"{path} holds the weights, config and metrics for evaluation but no optimizer / scheduler / RNG "
            f"state, so a run cannot continue from it: resume from last.ckpt (trainer.resume=<run dir>)"
        )
    return state, check_resume_config(state.get("config"), cfg, path)


def restore_optimizer(optimizer: torch.optim.Optimizer, scheduler: Any, state: dict[str, Any]) -> None:
    """Load the checkpoint's optimizer (and scheduler) state, keeping the current config's hyperparameters.

    `optimizer` and `scheduler` are freshly built from the current config. The checkpoint's moments and
    step counts are loaded; lr, weight decay, betas, ... stay those of the current config (equal to the
    checkpoint's unless a change was allowed). The scheduler state is loaded as saved when its base lrs
    and length are unchanged; otherwise it is rebuilt: base lrs from the config, the new length, and
    the lr of the step reached on the new schedule.
    """
    fresh = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    optimizer.load_state_dict(state["optimizer"])
    saved_lrs = [g["lr"] for g in optimizer.param_groups]
    for group, current in zip(optimizer.param_groups, fresh):
        group.update({k: v for k, v in current.items() if k != "lr"})
    saved = state.get("scheduler")
    if scheduler is None:  # constant schedule: the configured lr
        for group, current in zip(optimizer.param_groups, fresh):
            group["lr"] = current["lr"]
        return
    base = [g.get("initial_lr", g["lr"]) for g in fresh]
    if (
        saved
        and list(saved.get("base_lrs", [])) == base
        and all(saved.get(k) == getattr(scheduler, k) for k in ("T_max", "total_iters") if hasattr(scheduler, k))
    ):
        for group, lr in zip(optimizer.param_groups, saved_lrs):
            group["lr"] = lr
        scheduler.load_state_dict(saved)
        return
    step = int(saved["last_epoch"]) if saved else int(state.get("step", 0))
    scheduler.base_lrs = list(base)
    scheduler.last_epoch = step
    lrs = scheduler._get_closed_form_lr()  # the new schedule at the step reached
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = list(lrs)
    log.info(
        "lr schedule rebuilt on resume: %s over the current length, continuing at step %d (lr %s)",
        type(scheduler).__name__,
        step,
        lrs,
    )
