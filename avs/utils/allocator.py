"""glibc malloc tuning for large tensors: the `runtime.allocator` key (docs/performance.md, "The allocator").

By default glibc serves large requests with fresh anonymous mappings and gives freed memory at the top
of its heap back to the system (its mmap and trim thresholds follow the program dynamically), so a
training step that frees and re-allocates its activations pays page faults for memory it just had.
`configure` sets three glibc parameters through `mallopt` so that freed memory stays in the process:

* `M_MMAP_THRESHOLD` = 32 MiB: requests below it come from the heap; larger tensors are still mapped
  fresh (glibc caps the value at HEAP_MAX_SIZE / 2, 32 MiB on 64-bit systems, in the versions that check
  it, so this is the largest value every version accepts);
* `M_TRIM_THRESHOLD` = -1: the top of the heap is never given back (mallopt takes an int, so the
  environment variable's 64 GiB is spelled as glibc's "never");
* `M_TOP_PAD` = 1 GiB: the heap grows in large steps.

Setting any of them also stops glibc's dynamic adjustment of the two thresholds. The cost: resident memory
stays at the process's peak heap. The settings are process-wide and apply to later allocations, so the
scripts call `configure` first, before any model or data is built; forked children (data-loader workers)
inherit them, spawned ones call `configure` themselves (avs.benchmark.timing).

`runtime.allocator`: `auto` (apply on glibc, elsewhere leave the allocator alone), `on` (apply; refused
with a ConfigError when the process does not run on glibc or mallopt rejects a value), `off` (leave it
alone). When the environment already tunes one of these parameters (`MALLOC_MMAP_THRESHOLD_`,
`MALLOC_TRIM_THRESHOLD_`, `MALLOC_TOP_PAD_` or their `GLIBC_TUNABLES` names), avs applies none of its
values (the user's tuning wins, in every setting) and records what the environment set.
What was done is recorded (`state()`) in metrics.json, the eval tables' JSON, demo.json and the
benchmark JSON.
"""

from __future__ import annotations

import ctypes
import logging
import os
from collections.abc import Mapping
from typing import Any

from avs.errors import ConfigError

log = logging.getLogger(__name__)

KEY = "runtime.allocator"
SETTINGS: tuple[str, ...] = ("auto", "on", "off")
# mallopt parameter numbers (glibc's <malloc.h>)
PARAMS: dict[str, int] = {"M_TRIM_THRESHOLD": -1, "M_TOP_PAD": -2, "M_MMAP_THRESHOLD": -3}
# the values avs sets, in the order it sets them
VALUES: dict[str, int] = {
    "M_MMAP_THRESHOLD": 32 * 2**20,
    "M_TRIM_THRESHOLD": -1,
    "M_TOP_PAD": 2**30,
}
# how the environment sets the same parameters at process start: variable / GLIBC_TUNABLES name
ENV_VARS: dict[str, str] = {
    "M_MMAP_THRESHOLD": "MALLOC_MMAP_THRESHOLD_",
    "M_TRIM_THRESHOLD": "MALLOC_TRIM_THRESHOLD_",
    "M_TOP_PAD": "MALLOC_TOP_PAD_",
}
TUNABLES: dict[str, str] = {
    "M_MMAP_THRESHOLD": "glibc.malloc.mmap_threshold",
    "M_TRIM_THRESHOLD": "glibc.malloc.trim_threshold",
    "M_TOP_PAD": "glibc.malloc.top_pad",
}

_state: dict[str, Any] = {}  # what `configure` did in this process


def normalise(value: Any) -> str:
    """auto | on | off from the key's value (true/yes and false/no/none are accepted as on and off)."""
    text = str(value).strip().lower() if not isinstance(value, bool) else ("on" if value else "off")
    text = {"true": "on", "yes": "on", "false": "off", "no": "off", "none": "off"}.get(text, text)
    if text not in SETTINGS:
        raise ConfigError(f"{KEY}={value}: expected one of {' | '.join(SETTINGS)}")
    return text


def _load_libc() -> Any:
    """The C library this process runs on (its global symbols), or None where ctypes cannot open it."""
    try:
        return ctypes.CDLL(None)
    except (OSError, TypeError):  # TypeError: Windows has no "this process" handle
        return None


def glibc_version(libc: Any) -> str | None:
    """'2.36' when `libc` is glibc with mallopt (musl and macOS have no gnu_get_libc_version), else None."""
    if libc is None or not hasattr(libc, "mallopt") or not hasattr(libc, "gnu_get_libc_version"):
        return None
    get = libc.gnu_get_libc_version
    get.restype = ctypes.c_char_p
    version = get()
    return version.decode() if isinstance(version, bytes) else str(version)


def process_glibc() -> str | None:
    """The glibc version this process runs on ('2.36'), None when it runs on another C library."""
    return glibc_version(_load_libc())


def environment_settings(environ: Mapping[str, str]) -> dict[str, str]:
    """The allocator parameters the environment already sets: {variable or tunable: value}."""
    found = {var: environ[var] for var in ENV_VARS.values() if var in environ}
    for item in environ.get("GLIBC_TUNABLES", "").split(":"):
        name, _, value = item.partition("=")
        if name.strip() in TUNABLES.values():
            found[f"GLIBC_TUNABLES {name.strip()}"] = value
    return found


def _mallopt(libc: Any) -> dict[str, int]:
    """Set VALUES -> {parameter: mallopt's return value} (1 = accepted)."""
    fn = libc.mallopt
    fn.argtypes = [ctypes.c_int, ctypes.c_int]
    fn.restype = ctypes.c_int
    return {name: int(fn(PARAMS[name], value)) for name, value in VALUES.items()}


def _record(setting: str, libc_name: str, applied: bool, reason: str | None, **extra: Any) -> dict[str, Any]:
    record = {
        "setting": setting,
        "applied": applied,
        "libc": libc_name,
        "values": None,
        "reason": reason,
        "environment": {},
        "refused": [],
        **extra,
    }
    _state.clear()
    _state.update(record)
    return dict(record)


def configure(value: Any, environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Apply the `runtime.allocator` setting `value` to this process -> the record of what was done.

    The record: setting, applied (every value accepted), libc ("glibc 2.36" or "not glibc"), values (what
    mallopt accepted), reason (why not applied), environment (the user's own settings, which win),
    refused (values mallopt did not accept, `auto` only: `on` raises ConfigError).
    """
    setting = normalise(value)
    environ = os.environ if environ is None else environ
    libc = _load_libc()
    version = glibc_version(libc)
    libc_name = f"glibc {version}" if version else "not glibc"
    if setting == "off":
        return _record(setting, libc_name, False, f"{KEY}=off: the allocator is left as it is")
    if version is None:
        if setting == "on":
            raise ConfigError(
                f"{KEY}=on: this process does not run on glibc (no mallopt / gnu_get_libc_version), so its "
                f"allocator cannot be tuned; set {KEY}=auto or off"
            )
        return _record(setting, libc_name, False, "not glibc: nothing to tune")
    user = environment_settings(environ)
    if user:
        names = ", ".join(f"{k}={v}" for k, v in user.items())
        log.info("allocator: the environment sets %s; avs applies none of its own values", names)
        return _record(setting, libc_name, False, "the environment tunes the allocator", environment=user)
    return _apply(setting, libc, libc_name)


def _apply(setting: str, libc: Any, libc_name: str) -> dict[str, Any]:
    results = _mallopt(libc)
    refused = [name for name, ok in results.items() if ok != 1]
    if refused and setting == "on":
        raise ConfigError(
            f"{KEY}=on: {libc_name} refused mallopt "
            + ", ".join(f"{n}={VALUES[n]}" for n in refused)
            + f"; set {KEY}=auto or off"
        )
    accepted = {name: VALUES[name] for name, ok in results.items() if ok == 1}
    if refused:
        log.warning("allocator: %s refused %s; applied %s", libc_name, refused, sorted(accepted))
    reason = f"mallopt refused {', '.join(refused)}" if refused else None
    return _record(setting, libc_name, not refused, reason, values=accepted, refused=refused)


def state() -> dict[str, Any]:
    """What `configure` did in this process (the record written to a run's outputs)."""
    if not _state:  # e.g. a Trainer used from Python: no script applied the key in this process
        return {
            "setting": None,
            "applied": False,
            "libc": None,
            "values": None,
            "reason": "not configured in this process",
            "environment": {},
            "refused": [],
        }
    return dict(_state)
