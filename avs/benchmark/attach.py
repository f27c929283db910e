"""Attach a PartTimer to a model from outside: module hooks on its parts, wrapped part methods and
wrapped loss callables. Which parts, methods and losses exist is read from `profile` in
configs/benchmark.yaml; every other top-level child module of the model is timed under its own name."""

from __future__ import annotations

import functools
import importlib
import sys
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from typing import Any

import torch

from avs.benchmark.timeline import PartTimer
from avs.errors import ConfigError


class _Slot:
    """The timer the attached hooks report to (set per run, so hooks are attached once)."""

    timer: PartTimer | None = None

    def enter(self, part: str) -> None:
        if self.timer is not None:
            self.timer.enter(part)

    def exit(self, part: str) -> None:
        if self.timer is not None:
            self.timer.exit(part)

    def alias(self, part: str, result: Any) -> None:
        """A loss callable returning a dict of terms is named by its keys."""
        if self.timer is not None and isinstance(result, Mapping) and result:
            self.timer.aliases[part] = "loss " + "+".join(str(k) for k in result)


def _wrap(fn: Callable[..., Any], part: str, slot: _Slot, alias: bool = False) -> Callable[..., Any]:
    @functools.wraps(fn)
    def timed(*args, **kwargs):
        slot.enter(part)
        try:
            out = fn(*args, **kwargs)
        finally:
            slot.exit(part)
        if alias:
            slot.alias(part, out)
        return out

    timed.__avs_profile_wrapped__ = fn
    return timed


def _hook_module(mod: torch.nn.Module, part: str, slot: _Slot, undo: list[Callable[[], None]]) -> None:
    pre = mod.register_forward_pre_hook(lambda *_: slot.enter(part))
    post = mod.register_forward_hook(lambda *_: slot.exit(part), always_call=True)
    undo += [pre.remove, post.remove]


def _wrap_attr(obj: Any, name: str, part: str, slot: _Slot, undo: list, alias: bool = False) -> None:
    """Shadow obj.name by a timed wrapper in the instance's __dict__ (removed again by `undo`)."""
    had = name in vars(obj)
    original = vars(obj).get(name)
    object.__setattr__(obj, name, _wrap(getattr(obj, name), part, slot, alias))

    def restore() -> None:
        if had:
            object.__setattr__(obj, name, original)
        else:
            object.__delattr__(obj, name)

    undo.append(restore)


def _resolve(path: str, where: str) -> tuple[Any, str, Any]:
    module_name, _, attr = str(path).rpartition(".")
    try:
        module = importlib.import_module(module_name)
        return module, attr, getattr(module, attr)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ConfigError(f"{where}: cannot import {path!r} ({exc})") from None


def _patch_function(path: str, part: str, slot: _Slot, undo: list, where: str) -> None:
    """Replace a loss function everywhere in avs's loaded modules that binds it under its name."""
    _, attr, fn = _resolve(path, where)
    wrapped = _wrap(fn, part, slot)
    for name, module in list(sys.modules.items()):
        if (name == "avs" or name.startswith("avs.")) and getattr(module, attr, None) is fn:
            setattr(module, attr, wrapped)
            undo.append(functools.partial(setattr, module, attr, fn))


def _parts(model: torch.nn.Module, spec: Mapping[str, Any]) -> list[tuple[str, torch.nn.Module]]:
    """The configured parts the model has, in the configured order, then its other child modules."""
    loss_attrs = set((spec.get("loss_modules") or {}).values())
    listed = [str(p) for p in spec.get("parts") or []]
    children = dict(model.named_children())
    names = [p for p in listed if children.get(p) is not None]
    names += [n for n in children if n not in listed and n not in loss_attrs]
    return [(n, children[n]) for n in names]


def param_owner(model: torch.nn.Module, spec: Mapping[str, Any]) -> dict[int, str]:
    """id(parameter) -> the part that owns it."""
    return {id(p): name for name, mod in _parts(model, spec) for p in mod.parameters()}


def part_names(model: torch.nn.Module, spec: Mapping[str, Any]) -> list[str]:
    return [n for n, _ in _parts(model, spec)]


def _attach_losses(model: torch.nn.Module, spec: Mapping[str, Any], slot: _Slot, undo: list) -> None:
    for term, attr in (spec.get("loss_modules") or {}).items():
        fn = getattr(model, str(attr), None)
        if isinstance(fn, torch.nn.Module):
            _hook_module(fn, f"loss {term}", slot, undo)
        elif callable(fn):
            _wrap_attr(model, str(attr), f"loss {term}", slot, undo)
    for term, paths in (spec.get("loss_functions") or {}).items():
        for path in paths:
            _patch_function(str(path), f"loss {term}", slot, undo, f"profile.loss_functions.{term}")
    for part, methods in (spec.get("loss_methods") or {}).items():
        mod = getattr(model, str(part), None)
        for name in methods if mod is not None else []:
            if callable(getattr(mod, str(name), None)):
                _wrap_attr(mod, str(name), f"loss {part}.{name}", slot, undo, alias=True)


@contextmanager
def attached(model: torch.nn.Module, spec: Mapping[str, Any]):
    """Hooks and wrappers on `model` for the duration of the block; yields the slot to set a timer in."""
    slot, undo = _Slot(), []
    try:
        for name, mod in _parts(model, spec):
            _hook_module(mod, name, slot, undo)
            for method in (spec.get("methods") or {}).get(name, []) or []:
                if callable(getattr(mod, str(method), None)):
                    _wrap_attr(mod, str(method), name, slot, undo)
        _attach_losses(model, spec, slot, undo)
        yield slot
    finally:
        for fn in reversed(undo):
            fn()
