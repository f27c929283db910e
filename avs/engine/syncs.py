"""Host-device synchronisations of a training step, counted on any device (also on CPU, where none
costs anything: the count tells what would stall a GPU).

`SyncCounter` is a TorchDispatchMode that records every aten op whose result the host must wait for:
a tensor read into Python (`.item()`, `bool(t)`, `float(t)`: aten._local_scalar_dense), and ops whose
output size depends on tensor values (nonzero, masked_select, unique, boolean-mask indexing,
repeat_interleave without output_size, equal). Used by scripts/benchmark.py and the tests.
"""

from __future__ import annotations

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
        torch.is_tensor(i) and i.dtype in (torch.bool, torch.uint8) for i in indices)


class SyncCounter(TorchDispatchMode):
    """Count host syncs inside `with SyncCounter() as c: ...`; `c.total`, `c.counts` {kind: n}, `c.where` (kinds in order)."""

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
