"""Per-part timing of a training step or an inference forward, attributed from outside the model.

One timeline per run: a mark (perf_counter on CPU, a recorded CUDA event on CUDA) is taken each time
the running part changes, so consecutive intervals tile the run and the parts plus "other" add up
to the whole by construction. Forward: module pre/post hooks and wrapped methods keep a stack of the
parts being run (the innermost owns the time). Backward: every autograd node of the loss's graph
gets a pre-hook that switches to the part whose forward created it (known from the autograd
sequence numbers seen at each forward switch; a parameter's gradient accumulation belongs to the
part owning the parameter). On CUDA the events are read after one synchronisation at the end of the run.
"""

from __future__ import annotations

import bisect
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from typing import Any

import torch

OTHER = "other"
EXCLUDED = "excluded"


class CpuClock:
    """Marks are perf_counter() seconds."""

    kind = "perf_counter"

    def mark(self) -> float:
        return time.perf_counter()

    def offsets(self, marks: list[Any]) -> list[float]:
        return [m - marks[0] for m in marks]


class CudaEventClock:
    """Marks are CUDA events recorded on the current stream; read after one synchronisation per run."""

    kind = "cuda_events"

    def __init__(self, event_cls: Callable[..., Any] | None = None) -> None:
        self.event_cls = event_cls or torch.cuda.Event
        self.syncs = 0  # synchronisations: one per run, at its end

    def mark(self) -> Any:
        event = self.event_cls(enable_timing=True)
        event.record()
        return event

    def offsets(self, marks: list[Any]) -> list[float]:
        marks[-1].synchronize()
        self.syncs += 1
        return [marks[0].elapsed_time(m) / 1000.0 for m in marks]  # ms -> s


def make_clock(device: torch.device, event_cls: Callable[..., Any] | None = None) -> CpuClock | CudaEventClock:
    """CUDA events on a CUDA device (or when a fake `event_cls` is given, as the tests do), else perf_counter."""
    if device.type == "cuda" or event_cls is not None:
        return CudaEventClock(event_cls)
    return CpuClock()


class Timeline:
    """Marks at every change of (phase, part); interval i belongs to label i."""

    def __init__(self, clock) -> None:
        self.clock = clock
        self.marks: list[Any] = []
        self.labels: list[tuple[str, str] | None] = []

    def switch(self, label: tuple[str, str]) -> None:
        if self.labels and self.labels[-1] == label:
            return
        self.marks.append(self.clock.mark())
        self.labels.append(label)

    def close(self) -> dict[tuple[str, str], float]:
        """End the run; seconds per label (the excluded graph walk included, under phase EXCLUDED)."""
        self.marks.append(self.clock.mark())
        self.labels.append(None)
        t = self.clock.offsets(self.marks)
        out: dict[tuple[str, str], float] = defaultdict(float)
        for i, label in enumerate(self.labels[:-1]):
            out[label] += t[i + 1] - t[i]
        return dict(out)


def _seq_probe() -> Callable[[], int | None]:
    """The autograd sequence number the next node created on this thread gets (None when grad is off)."""
    leaf = torch.zeros(1, requires_grad=True)

    def now() -> int | None:
        if not torch.is_grad_enabled():
            return None
        return leaf.view(1).grad_fn._sequence_nr() + 1

    return now


class PartTimer:
    """Forward stack of parts, call counts, sequence-number markers and the backward node hooks of one run."""

    def __init__(self, clock, param_owner: dict[int, str]) -> None:
        self.timeline = Timeline(clock)
        self.param_owner = param_owner
        self.phase = "forward"
        self.stack: list[str] = []
        self.calls: Counter[str] = Counter()
        self.aliases: dict[str, str] = {}
        self.seqs: list[int] = []
        self.seq_parts: list[str] = []
        self._seq_now = _seq_probe()
        self.timeline.switch(("forward", OTHER))

    # ---------------------------------------------------------------- forward
    def _switch_forward(self) -> None:
        part = self.stack[-1] if self.stack else OTHER
        seq = self._seq_now()
        if seq is not None:
            self.seqs.append(seq)
            self.seq_parts.append(part)
        self.timeline.switch(("forward", part))

    def enter(self, part: str) -> None:
        if self.phase != "forward":  # e.g. a checkpointed module recomputed inside the backward
            return
        if part not in self.stack:
            self.calls[part] += 1
        self.stack.append(part)
        self._switch_forward()

    def exit(self, part: str) -> None:
        if self.phase != "forward" or part not in self.stack:
            return
        del self.stack[len(self.stack) - 1 - self.stack[::-1].index(part)]
        self._switch_forward()

    # ---------------------------------------------------------------- backward
    def _node_part(self, node: Any) -> str:
        var = getattr(node, "variable", None)
        if var is not None:  # AccumulateGrad: the part that owns the parameter
            return self.param_owner.get(id(var), OTHER)
        i = bisect.bisect_right(self.seqs, node._sequence_nr()) - 1
        return self.seq_parts[i] if i >= 0 else OTHER

    def hook_backward(self, root: torch.Tensor) -> int:
        """Pre-hook every node of `root`'s graph (the walk is timed as EXCLUDED); returns the node count."""
        self.timeline.switch((EXCLUDED, "graph walk"))
        self.phase = "backward"
        seen: dict[int, Any] = {}  # holds the Python node objects, so their ids are not reused during the walk
        todo = [root.grad_fn]
        while todo:
            node = todo.pop()
            if node is None or id(node) in seen:
                continue
            seen[id(node)] = node
            label = ("backward", self._node_part(node))
            node.register_prehook(lambda _grads, label=label: self.timeline.switch(label))
            todo.extend(nxt for nxt, _ in node.next_functions)
        self.timeline.switch(("backward", OTHER))
        return len(seen)

    def start(self, phase: str, part: str) -> None:
        self.phase = phase
        self.timeline.switch((phase, part))
