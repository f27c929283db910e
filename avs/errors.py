"""The project's error base class, one exit code per kind of error, and the wrapper every script uses.

Every error the framework raises on purpose (bad config, bad data, damaged checkpoint, unsafe file,
missing weight file, refused output location, a run that cannot go on) derives from `AVSError` and
carries an `exit_code` (the `ExitCode` table, also in the README). `plain_errors` wraps a script's
Hydra task function: such an error becomes one or two plain lines on stderr and that exit code;
`AVS_TRACEBACK=1` (or `+debug=true` on the command line) prints the traceback as well. Anything else
is a bug and keeps its traceback.
"""

from __future__ import annotations

import functools
import os
import sys
import traceback
from collections.abc import Callable
from enum import IntEnum
from typing import Any, TypeVar


class ExitCode(IntEnum):
    """Process exit codes of the scripts (128 + N after signal N: docs/reliability.md)."""

    OK = 0
    UNEXPECTED = 1  # a bug (traceback shown) or a command line Hydra rejected (with hints)
    CONFIG = 2  # a config value or combination that cannot work
    DATA = 3  # a data file or folder that is missing, unreadable or malformed (also unsafe pickles)
    CHECKPOINT = 4  # a checkpoint that is missing, damaged, unsafe or does not fit
    MISSING_FILE = 5  # a weight file (or other input named by a config key) is missing
    OUTPUT = 6  # an output location is refused: run dir in use or holding another run, output inside the data
    RUN_FAILED = 7  # training or export could not go on (e.g. non-finite losses)


class AVSError(Exception):
    """Base of the framework's own errors: the message is for the user, `exit_code` says which kind.

    A subclass names its kind in the class line: `class AVSDataError(AVSError, code=ExitCode.DATA)`.
    """

    exit_code: int = ExitCode.RUN_FAILED

    def __init_subclass__(cls, code: int | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if code is not None:
            cls.exit_code = ExitCode(code)


class ConfigError(AVSError, ValueError, code=ExitCode.CONFIG):
    """An impossible or unsafe combination of config values."""


class MissingFileError(AVSError, FileNotFoundError, code=ExitCode.MISSING_FILE):
    """A file or folder named by a config key (data root, weight file, input video) does not exist."""


TRACEBACK_ENV = "AVS_TRACEBACK"


def want_traceback(cfg: Any = None) -> bool:
    """True when the user asked for tracebacks (AVS_TRACEBACK=1 or `+debug=true`)."""
    if os.environ.get(TRACEBACK_ENV, "").strip().lower() in ("1", "true", "yes", "on"):
        return True
    try:
        return bool(cfg is not None and cfg.get("debug", False))
    except Exception:  # noqa: BLE001  (a cfg without .get)
        return False


def report(exc: AVSError, show_traceback: bool = False) -> int:
    """Print `exc` as plain lines on stderr (with its traceback when asked) -> its exit code."""
    if show_traceback:
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    text = str(exc).strip() or type(exc).__name__
    print(f"error: {text}", file=sys.stderr)
    if not show_traceback:
        print(f"({type(exc).__name__}; set {TRACEBACK_ENV}=1 to see the traceback)", file=sys.stderr)
    sys.stderr.flush()
    return int(getattr(exc, "exit_code", ExitCode.RUN_FAILED))


F = TypeVar("F", bound=Callable[..., Any])


def plain_errors(fn: F) -> F:
    """Decorator for a script's task function (below `@hydra.main`): AVSError -> stderr lines + exit code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except AVSError as exc:
            cfg = args[0] if args else None
            code = report(exc, want_traceback(cfg))
            from avs.engine.rundir import remove_refused_run_dir

            remove_refused_run_dir()  # refused before any work: no run dir holding only Hydra's files
            raise SystemExit(code) from None

    return wrapper  # type: ignore[return-value]


def run_plain(fn: Callable[[], Any]) -> Any:
    """Call `fn()` (a script's entry point) with the same translation of AVSError as `plain_errors`."""
    try:
        return fn()
    except AVSError as exc:
        raise SystemExit(report(exc, want_traceback())) from None
