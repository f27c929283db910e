"""The run's hooks from config: the `hooks` group (configs/hooks/default.yaml) and `trainer.hooks`, in one order.

`hooks` maps a name to a `_target_` node with a `priority` (lower runs first; ties keep the listed
order, the group's entries before `trainer.hooks`'); `trainer.hooks` is a list of nodes (priority 100
unless given, i.e. after the built-in step hooks and before the final evaluation and the run records).
A built-in hook class (or a subclass of one) receives the trainer's objects and its settings from the
trainer keys (`builtin_arguments`) for every argument its node does not set. The hooks a run needs for
correct results or a resumable run (`REQUIRED`) may be dropped only when `trainer.allow_missing_hooks`
names them; anything else is refused by name (ConfigError).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig, OmegaConf

from avs.config import CONFIG_DIR
from avs.engine import hooks as H
from avs.errors import ConfigError

DEFAULT_FILE = CONFIG_DIR / "hooks" / "default.yaml"
USER_PRIORITY = 100
# name in the hooks group -> what is lost without it
REQUIRED: dict[str, str] = {
    "nonfinite": "non-finite steps would go on forever instead of stopping the run",
    "validation": "no validation: best.ckpt is never selected",
    "checkpoint": "no last.ckpt: the run cannot be resumed",
    "signal": "SIGTERM / SIGINT would kill the run without a resumable checkpoint",
    "final_evaluation": "no test evaluation of the best weights at the end",
    "metrics": "no metrics.json",
    "run_report": "no run_report.json",
}


def builtin_arguments(trainer: Any) -> dict[type, dict[str, Any] | None]:
    """Built-in hook class -> its constructor arguments for this run (None: the class is off in this config)."""
    cfg, tcfg, save, tb = trainer.cfg, trainer.tcfg, trainer.save, trainer.tb
    log_every = int(tcfg.log_every_steps)
    warmup = tcfg.get("kl_warmup") or {}
    progress = bool(tcfg.progress) and trainer.is_main
    return {
        H.LoggingHook: {"tb": tb, "log_every": log_every, "progress": progress},
        H.NonFiniteGuard: {
            "max_bad": int(tcfg.max_consecutive_nonfinite),
            "save": save,
            "run_dir": trainer.run_dir,
        },
        H.ValidationHook: {
            "evaluate": trainer.evaluate,
            "save": save,
            "tb": tb,
            "every": int(tcfg.val_every_epochs),
            "split": str(tcfg.select_split),  # test only with allow_test_selection
            "protocol": str(cfg.eval.protocol),
            "metric": str(tcfg.select_metric),
        },
        H.CheckpointHook: {"save": save, "every": int(tcfg.checkpoint_every_steps or 0)},
        H.InterruptAfterHook: {"steps": int(tcfg.interrupt_after_steps or 0)},
        H.SignalHook: {},
        H.KLWarmupHook: None
        if int(warmup.steps or 0) <= 0
        else {
            "steps": int(warmup.steps),
            "start": float(warmup.start),
            "cycle_steps": int(warmup.cycle_steps or 0),
            "tb": tb,
            "log_every": log_every,
        },
        H.LatentKLHook: {"run_dir": trainer.run_dir, "split": str(tcfg.select_split)}
        if bool(tcfg.record_latent_kl)
        else None,
        H.FinalEvaluationHook: {
            "evaluate": trainer.evaluate,
            "ckpt_dir": trainer.ckpt_dir,
            "test_at_end": bool(tcfg.test_at_end),
            "tb": tb,
        },
        H.MetricsHook: {"cfg": cfg, "run_dir": trainer.run_dir, "loss_weights": trainer.loss_weights},
        H.RunReportHook: {"run_dir": trainer.run_dir},
    }


def hook_nodes(cfg: DictConfig) -> list[tuple[str, Any]]:
    """(name, node) of every configured hook in run order (`hooks` group, else its default file; trainer.hooks)."""
    group = cfg.get("hooks") if "hooks" in cfg else OmegaConf.load(DEFAULT_FILE)
    entries: list[tuple[int, int, str, Any]] = []
    for i, (name, node) in enumerate((group or {}).items()):
        if node is not None:
            entries.append((_priority(node, f"hooks.{name}"), i, str(name), node))
    for i, node in enumerate(cfg.trainer.get("hooks") or []):
        where = f"trainer.hooks[{i}]"
        entries.append((_priority(node, where, USER_PRIORITY), len(entries), where, node))
    missing = [n for n in REQUIRED if not any(e[2] == n for e in entries)]
    allowed = set(cfg.trainer.get("allow_missing_hooks") or [])
    refused = [n for n in missing if n not in allowed]
    if refused:
        what = "; ".join(f"hooks.{n} ({REQUIRED[n]})" for n in refused)
        raise ConfigError(
            f"{what}: removed from the hooks config; a run needs it. To run without it anyway, "
            f"set trainer.allow_missing_hooks=[{','.join(refused)}]"
        )
    return [(name, node) for _, _, name, node in sorted(entries, key=lambda e: (e[0], e[1]))]


def _priority(node: Any, where: str, default: int | None = None) -> int:
    if not isinstance(node, Mapping) or "_target_" not in node:
        raise ConfigError(f"{where}: expected a node with a _target_ (a HookBase subclass), got {node!r}")
    value = node.get("priority", default)
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{where}.priority: expected a number (lower runs first), got {value!r}")
    return int(value)


def build_hooks(trainer: Any) -> list[H.HookBase]:
    """The run's hooks in order, each named by its config key (its state's key in a checkpoint)."""
    from hydra.utils import get_class, instantiate

    builtin = builtin_arguments(trainer)
    hooks = []
    for name, node in hook_nodes(trainer.cfg):
        where = name if name.startswith("trainer.") else f"hooks.{name}"
        spec = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dict(node)
        spec.pop("priority", None)
        try:
            cls = get_class(spec["_target_"])
        except Exception as exc:  # noqa: BLE001  (an import error of the user's node)
            raise ConfigError(f"{where}._target_: cannot import {spec['_target_']!r} ({exc})") from exc
        base = next((b for b in builtin if isinstance(cls, type) and issubclass(cls, b)), None)
        kwargs = {}
        if base is not None:
            if builtin[base] is None:
                continue  # switched off by its trainer key (kl_warmup, record_latent_kl)
            kwargs = {k: v for k, v in builtin[base].items() if k not in spec}
        hook = instantiate(spec, _partial_=True)(**kwargs)  # the run's objects never pass through OmegaConf
        if not isinstance(hook, H.HookBase):
            raise ConfigError(f"{where}: {type(hook).__name__} is not an avs.engine.hooks.HookBase")
        hook.name = name
        hooks.append(hook)
    return hooks
