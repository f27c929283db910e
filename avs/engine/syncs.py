"""Host-device synchronisations of a training step, counted on any device (also on CPU, where none
costs anything: the count tells what would stall a GPU).

`SyncCounter` is a TorchDispatchMode that records every aten op whose result the host must wait for:
a tensor read into Python (`.item()`, `bool(t)`, `float(t)`: aten._local_scalar_dense), and ops whose
output size depends on tensor values (nonzero, masked_select, unique, boolean-mask indexing,
repeat_interleave without output_size, equal). Used by scripts/benchmark.py and the tests.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_aten = torch.ops.aten
#: ops that always make the host wait for the device
SYNC_OPS = {
    _aten._local_scalar_dense.default: "item",  # .item(), bool(t), float(t), int(t), if t: ...
    _aten.nonzero.default: "nonzero",
    _aten.masked_select.default: "masked_select",
    _aten.equal.default: "equal",
    _aten._unique2.default: "unique",
    _aten.unique_dim.default: "unique",
    _aten.unique_consecutive.default: "unique",
    _aten.repeat_interleave.Tensor: "repeat_interleave",
}
#: indexing ops that sync when an index is a bool mask (the kernel calls nonzero)
_INDEX_OPS = {_aten.index.Tensor, _aten.index_put.default, _aten.index_put_.default, _aten._index_put_impl_.default}


def _bool_index(args: tuple[Any, ...]) -> bool:
    indices = args[1] if len(args) > 1 else None
    return isinstance(indices, (list, tuple)) and any(
        torch.is_tensor(i) and i.dtype in (torch.bool, torch.uint8) for i in indices
    )


class SyncCounter(TorchDispatchMode):
    """Count host syncs inside `with SyncCounter() as c: ...`.

    `c.total`, `c.counts` {kind: n}, `c.where` (kinds in order)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()
        self.where: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kind = SYNC_OPS.get(func)
        if kind is None and func in _INDEX_OPS and _bool_index(args):
            kind = "bool_mask_index"
        if kind is not None:
            self.counts[kind] += 1
            self.where.append(kind)
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        """Number of syncs seen."""
        return sum(self.counts.values())


# ------------------------------------------------------------------------------------------------
# the trainer's per-step checks, read with as few syncs as possible


class LossWindow:
    """The losses of one gradient-accumulation window, kept on the device.

    The trainer's non-finite guard reads them once, at the optimizer step, together with the
    gradient norm (`read_step_flags`): one host sync per step instead of one per micro-batch plus
    one per check. The terms of a bad micro-batch are read only when the step turned out bad.
    """

    def __init__(self) -> None:
        self.losses: list[torch.Tensor] = []
        self.terms: list[dict[str, torch.Tensor]] = []

    def add(self, loss: torch.Tensor, terms: dict[str, torch.Tensor]) -> None:
        """Record a micro-batch's total loss and its terms (detached; no sync)."""
        self.losses.append(loss.detach().float())
        self.terms.append({k: v.detach() for k, v in terms.items()})

    def nonfinite(self) -> torch.Tensor | bool:
        """0-d bool tensor: some loss of the window is NaN/inf (False for an empty window)."""
        if not self.losses:
            return False
        return ~torch.isfinite(torch.stack(self.losses)).all()

    def bad_terms(self) -> dict[str, float]:
        """The terms of the last micro-batch with a non-finite loss ({} if none); syncs, for reports only."""
        for loss, terms in zip(reversed(self.losses), reversed(self.terms)):
            if not math.isfinite(float(loss)):
                return {k: float(v) for k, v in terms.items()}
        return {}


def read_step_flags(
    loss_bad: torch.Tensor | bool, grad_norm: torch.Tensor, stop: bool = False, across_ranks: bool = False
) -> tuple[bool, bool, bool]:
    """(loss non-finite, gradient norm non-finite, stop requested) as Python bools, read with one host sync.

    `across_ranks` (DDP): each flag is first OR-ed over the ranks in one all_reduce on the device
    (`distributed.any_flags`), so the step's agreement costs no extra host read (with an NCCL-only
    group, a separate `any_true` per flag would each be a device tensor and a host read).
    """
    grad_bad = ~torch.isfinite(grad_norm)
    if across_ranks:
        from avs.engine import distributed as D

        as_flag = lambda v: v.to(torch.int32).reshape(()) if torch.is_tensor(v) else grad_bad.new_full((), int(v))  # noqa: E731
        flags = torch.stack([as_flag(loss_bad).to(grad_bad.device), as_flag(grad_bad), as_flag(bool(stop))])
        loss_any, grad_any, stop_any = D.any_flags(flags)
        return loss_any, grad_any, stop_any
    if not torch.is_tensor(loss_bad):
        return bool(loss_bad), bool(grad_bad), bool(stop)
    code = int(loss_bad.to(torch.int32) + 2 * grad_bad.to(device=loss_bad.device, dtype=torch.int32))  # the one sync
    return bool(code & 1), bool(code & 2), bool(stop)


class LossLog:
    """Per-step total losses kept on the device and read in one batch (at logging / checkpoint time)."""

    def __init__(self) -> None:
        self.pending: list[torch.Tensor] = []

    def add(self, loss: torch.Tensor) -> None:
        self.pending.append(loss.detach().float().reshape(()))

    def flush(self, into: list[float]) -> list[float]:
        """Append the pending values to `into` as Python floats (one device-to-host copy) and return it."""
        if self.pending:
            into += torch.stack(self.pending).cpu().tolist()
            self.pending = []
        return into
