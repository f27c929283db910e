"""Graceful stop on SIGTERM / SIGINT: a handler sets a flag that the training loop checks after each step."""

from __future__ import annotations

import logging
import os
import signal
import threading
from types import FrameType
from typing import Any

log = logging.getLogger(__name__)

STOP_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGINT)


class StopSignal:
    """Context manager that turns SIGTERM / SIGINT into a stop request instead of killing the process.

    Inside the `with` block the first signal only sets `requested` (the trainer saves a resumable
    checkpoint after the current step and returns); a second SIGINT (Ctrl-C twice) restores the
    previous handler and raises KeyboardInterrupt at once. Handlers can only be installed in the
    main thread; elsewhere the context manager is inert (`installed` is False) and `request()` is
    the only way to set the flag. Previous handlers are restored on exit.
    """

    def __init__(self, signals: tuple[signal.Signals, ...] = STOP_SIGNALS) -> None:
        self.signals = tuple(signals)
        self.signum: int | None = None
        self.installed = False
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        """True once a stop signal arrived (or `request()` was called)."""
        return self.signum is not None

    @property
    def name(self) -> str | None:
        """Name of the signal that asked to stop, e.g. 'SIGTERM'."""
        if self.signum is None:
            return None
        try:
            return signal.Signals(self.signum).name
        except ValueError:
            return str(self.signum)

    def request(self, signum: int = signal.SIGTERM) -> None:
        """Set the stop flag as if `signum` had been received (tests, distributed agreement)."""
        if self.signum is None:
            self.signum = int(signum)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            self._restore()
            raise KeyboardInterrupt
        first = self.signum is None
        self.request(signum)
        if first:
            log.warning(
                "received %s: finishing the current step, then saving checkpoints/last.ckpt and stopping "
                "(send SIGINT again to abort without saving)",
                self.name,
            )

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        self.installed = False

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.getsignal(sig)
                signal.signal(sig, self._handle)
            self.installed = True
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.installed:
            self._restore()


WORKER_SIGTERM_GRACE_S = 30.0


def _worker_sigterm(signum: int, frame: FrameType | None) -> None:
    # keep serving batches for a while so the main process can finish its step and save, then leave
    # (exit 0: torch's SIGCHLD handler does not turn a clean exit into an error mid-step)
    timer = threading.Timer(WORKER_SIGTERM_GRACE_S, os._exit, args=(0,))
    timer.daemon = True
    timer.start()
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def ignore_stop_signals(worker_id: int = 0) -> None:
    """DataLoader `worker_init_fn`: only the main process reacts to SIGINT / SIGTERM at once.

    A Ctrl-C or a SLURM SIGTERM reaches every process; a worker that died at once would make the
    main process fail ("DataLoader worker exited unexpectedly") instead of finishing its step and
    saving. Workers ignore SIGINT, and on SIGTERM keep serving for WORKER_SIGTERM_GRACE_S seconds
    before exiting (bounded, so a parent that terminates its workers never waits forever). Workers
    also exit when the main process goes away (torch's worker watchdog).
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _worker_sigterm)
