"""The optimizer and the learning-rate scheduler of a run, built from the `trainer.optimizer` and
`trainer.scheduler` nodes (configs/optimizer/, configs/scheduler/: `_target_` + `_partial_: true`).

What a node cannot know is filled here, when the trainer builds it: the optimizer's parameters,
lr (`trainer.lr`), weight decay (`trainer.weight_decay`) and fused kernel (`trainer.fused_optimizer`);
the scheduler's optimizer and, for its length arguments left `null`, the run's total number of steps.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from avs.config import auto_flag
from avs.errors import ConfigError

DEFAULT_OPTIMIZER = "adam"  # the configs/optimizer/ option for a `tcfg` without optimizer node ({"lr": ...})
# Optimizer arguments the trainer fills from its own keys (a node setting them would be overridden).
TRAINER_ARGS = {"lr": "trainer.lr", "weight_decay": "trainer.weight_decay", "fused": "trainer.fused_optimizer"}
# Scheduler arguments that take the run's length: a `null` value is replaced by the total number of steps.
LENGTH_ARGS = ("T_max", "total_iters", "total_steps")


def _node(node: Any) -> dict[str, Any] | None:
    """A plain, resolved copy of a config node (None for an absent / null node)."""
    if node is None:
        return None
    if isinstance(node, DictConfig):
        return OmegaConf.to_container(node, resolve=True)
    return dict(node)


def _group_option(group: str, option: str) -> dict[str, Any]:
    """The node of configs/<group>/<option>.yaml."""
    from avs.config import CONFIG_DIR

    return OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / group / f"{option}.yaml"))


def use_fused(spec: Any, params: list[torch.Tensor], optimizer: type | None = None) -> bool:
    """trainer.fused_optimizer: auto (= on when every parameter is a float tensor on CPU or CUDA and the
    optimizer class has a fused kernel) | true | false."""
    has_kernel = optimizer is None or "fused" in inspect.signature(optimizer).parameters
    on_device = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    kinds = sorted({f"{p.device.type}/{p.dtype}" for p in params}) if not on_device else []
    if not on_device:
        requirement = f"float parameters on CPU or CUDA, got {kinds}"
    else:
        requirement = f"an optimizer with a fused kernel ({getattr(optimizer, '__qualname__', optimizer)} has none)"
    supported = on_device and has_kernel
    return auto_flag(
        spec, "trainer.fused_optimizer", auto=bool(params) and supported, supported=supported, requirement=requirement
    )


def build_optimizer(params: Iterable[torch.nn.Parameter], tcfg: Mapping[str, Any]) -> torch.optim.Optimizer:
    """The `trainer.optimizer` node (Adam when absent) over the trainable `params`.

    lr and weight decay are trainer.lr / trainer.weight_decay. `trainer.fused_optimizer` (default auto)
    uses torch's fused kernel where the class has one (Adam, AdamW, SGD): one pass over each parameter
    instead of a chain of per-tensor ops, the same update up to float rounding. On this 2-core CPU an
    Adam step over 80 M parameters took 0.03 s fused vs 0.13 s with the loop.
    """
    params = [p for p in params if p.requires_grad]
    spec = _node(tcfg.get("optimizer")) or _group_option("optimizer", DEFAULT_OPTIMIZER)
    for key, knob in TRAINER_ARGS.items():
        if key in spec:
            raise ConfigError(f"trainer.optimizer.{key} is set by the trainer from {knob}: set {knob} instead")
    factory = instantiate(spec, _partial_=True, _convert_="all")
    kwargs: dict[str, Any] = {
        "lr": float(tcfg.get("lr", 1e-4)),
        "weight_decay": float(tcfg.get("weight_decay", 0.0) or 0.0),
    }
    if use_fused(tcfg.get("fused_optimizer", "auto"), params, factory.func):
        kwargs["fused"] = True
    return factory(params, **kwargs)


def build_scheduler(optimizer: torch.optim.Optimizer, tcfg: Mapping[str, Any], total_steps: int):
    """The per-step learning-rate scheduler of `trainer.scheduler` over `total_steps` (None = constant lr)."""
    spec = _node(tcfg.get("scheduler"))
    if not spec:
        return None
    for key in LENGTH_ARGS:
        if key in spec and spec[key] is None:
            spec[key] = max(1, int(total_steps))
    return instantiate(spec, _partial_=True, _convert_="all")(optimizer)
