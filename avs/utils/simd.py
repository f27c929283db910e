"""One SIMD level for torch's CPU kernels, whatever the x86-64 machine: the `simd` key of
configs/proxy_benchmark.yaml and configs/pretrain.yaml (docs/reproducing.md, "Proxy benchmark").

Float sums come out in another order when torch's kernels use wider vectors, so an AVX512 machine and an
AVX2 machine train the same config to other bytes. Three libraries pick their code path from the CPU, and
each takes an environment variable that caps it: ATen's own kernels (`ATEN_CPU_CAPABILITY`), oneDNN's
convolutions (`ONEDNN_MAX_CPU_ISA`) and MKL's BLAS (`MKL_CBWR`, its conditional numerical
reproducibility mode). All three are read once, when the library first runs, so `ensure` starts the
script again (the same interpreter and arguments) with them set, before any model is built; a process
that already has them carries on. Child processes inherit them.

`native` sets nothing (each library takes the best path of this CPU); `avx2` caps all three at AVX2,
which every x86-64 CPU of the last decade has. On AVX2 machines `avx2` makes the same bytes as `native`
(measured: docs/synthetic.md, "Pretrained stand-ins").
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Mapping

from avs.errors import ConfigError

LEVELS: dict[str, dict[str, str]] = {
    "native": {},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_CBWR": "AVX2,STRICT"},
}
# what torch.backends.cpu.get_cpu_capability() reports once a level holds
CAPABILITY: dict[str, str] = {"avx2": "AVX2"}
X86 = ("x86_64", "amd64")


def environment(level: str, key: str = "simd") -> dict[str, str]:
    """The variables that pin `level` (empty for `native`); an unknown level is refused naming `key`."""
    if level not in LEVELS:
        raise ConfigError(f"{key}: expected one of {sorted(LEVELS)}, got {level!r}")
    return dict(LEVELS[level])


def conflicts(level: str, environ: Mapping[str, str], key: str = "simd") -> dict[str, str]:
    """Variables of `level` that `environ` already sets to something else -> their values there."""
    return {k: environ[k] for k, v in environment(level, key).items() if k in environ and environ[k] != v}


def holds(level: str, environ: Mapping[str, str] | None = None, key: str = "simd") -> bool:
    """Whether `environ` (default: this process's) already carries every variable of `level`."""
    environ = os.environ if environ is None else environ
    return all(environ.get(k) == v for k, v in environment(level, key).items())


def ensure(level: str, key: str = "simd") -> None:
    """Make this process run at `level`: refuse (ConfigError naming `key`) a CPU or an environment that
    cannot give it; start the script again with the variables set when they are missing; check that torch
    dispatches at that level."""
    env = environment(level, key)
    if not env:
        return
    machine = platform.machine()
    if machine.lower() not in X86:
        raise ConfigError(
            f"{key}={level} needs an x86-64 CPU; this one is {machine}. "
            f"Use {key}=native, which is another instrument with its own pins (docs/reproducing.md)"
        )
    clash = conflicts(level, os.environ, key)
    if clash:
        raise ConfigError(f"{key}={level} sets {env}, but the environment has {clash}: unset it, or use {key}=native")
    if not holds(level, key=key):
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **env})
    import torch

    cap = torch.backends.cpu.get_cpu_capability()
    if cap != CAPABILITY[level]:
        raise ConfigError(f"{key}={level}: torch dispatches to {cap} on this CPU, not {CAPABILITY[level]}")


def check(level: str, what: str, key: str = "simd") -> None:
    """Refuse (ConfigError) to go on in a process that lacks `level`'s variables; `what` names the entry
    point that sets them."""
    if not holds(level, key=key):
        missing = {k: v for k, v in environment(level, key).items() if os.environ.get(k) != v}
        raise ConfigError(f"{key}={level}: this process lacks {missing}; {what} sets them (avs.utils.simd.ensure)")


def cpu_level() -> str | None:
    """The widest vector level this CPU has (`avx512` / `avx2` / `below avx2`), whatever the pins say;
    None where /proc/cpuinfo is not readable. Recorded beside what torch dispatched to."""
    try:
        text = open("/proc/cpuinfo", encoding="utf-8", errors="replace").read()
    except OSError:
        return None
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.partition(":")[2].split())
            break
    if not flags:
        return None
    return "avx512" if "avx512f" in flags else "avx2" if "avx2" in flags else "below avx2"
