"""runtime.allocator (avs.utils.allocator): which C libraries it tunes, what it refuses, what it records.

The C library is replaced by a stand-in here, so this process's allocator is never changed; the real
mallopt effect is measured in tests/integration/test_allocator.py, in child processes.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from avs.config import PROJECT_ROOT
from avs.errors import ConfigError, ExitCode
from avs.utils import allocator
from tests.conftest import compose_cfg


class FakeLibc:
    """A C library with `mallopt` (recording its calls; `refuse`: parameter numbers it returns 0 for) and,
    when `glibc`, `gnu_get_libc_version`."""

    def __init__(self, glibc: bool = True, refuse: tuple[int, ...] = ()) -> None:
        self.calls: list[tuple[int, int]] = []

        def mallopt(param: int, value: int) -> int:
            self.calls.append((param, value))
            return 0 if param in refuse else 1

        self.mallopt = mallopt
        if glibc:
            self.gnu_get_libc_version = lambda: b"2.99"


@pytest.fixture(autouse=True)
def fresh_state(monkeypatch):
    monkeypatch.setattr(allocator, "_state", {})


def _use(monkeypatch, libc) -> None:
    monkeypatch.setattr(allocator, "_load_libc", lambda: libc)


@pytest.mark.parametrize(
    ("value", "setting"), [("auto", "auto"), ("on", "on"), ("off", "off"), (True, "on"), (False, "off"), ("OFF", "off")]
)
def test_settings_are_read_as_auto_on_off(value, setting):
    assert allocator.normalise(value) == setting


def test_an_unknown_setting_names_the_key():
    with pytest.raises(ConfigError, match=r"^runtime\.allocator=sometimes: expected one of auto \| on \| off$"):
        allocator.configure("sometimes", environ={})


def test_on_glibc_every_value_is_passed_to_mallopt_and_recorded(monkeypatch):
    libc = FakeLibc()
    _use(monkeypatch, libc)
    record = allocator.configure("auto", environ={})
    assert libc.calls == [(-3, 33554432), (-1, -1), (-2, 1073741824)]  # M_MMAP_THRESHOLD, M_TRIM, M_TOP_PAD
    assert record["applied"] is True and record["libc"] == "glibc 2.99" and record["setting"] == "auto"
    assert record["values"] == {"M_MMAP_THRESHOLD": 33554432, "M_TRIM_THRESHOLD": -1, "M_TOP_PAD": 1073741824}
    assert allocator.state() == record


@pytest.mark.parametrize("libc", [FakeLibc(glibc=False), None], ids=["musl-like", "no-libc-handle"])
def test_on_refuses_a_process_not_on_glibc(monkeypatch, libc):
    _use(monkeypatch, libc)
    with pytest.raises(ConfigError, match=r"^runtime\.allocator=on: this process does not run on glibc"):
        allocator.configure("on", environ={})
    assert libc is None or libc.calls == []


def test_auto_leaves_a_process_not_on_glibc_alone(monkeypatch):
    libc = FakeLibc(glibc=False)
    _use(monkeypatch, libc)
    record = allocator.configure("auto", environ={})
    assert libc.calls == [] and record["applied"] is False and record["libc"] == "not glibc"
    assert record["reason"] == "not glibc: nothing to tune"


def test_off_never_calls_mallopt(monkeypatch):
    libc = FakeLibc()
    _use(monkeypatch, libc)
    record = allocator.configure("off", environ={})
    assert libc.calls == [] and record["applied"] is False and record["setting"] == "off"


def test_a_refused_value_stops_on_and_is_recorded_by_auto(monkeypatch):
    _use(monkeypatch, FakeLibc(refuse=(-3,)))
    with pytest.raises(ConfigError, match=r"runtime\.allocator=on: glibc 2\.99 refused mallopt M_MMAP_THRESHOLD="):
        allocator.configure("on", environ={})
    record = allocator.configure("auto", environ={})
    assert record["applied"] is False and record["refused"] == ["M_MMAP_THRESHOLD"]
    assert record["values"] == {"M_TRIM_THRESHOLD": -1, "M_TOP_PAD": 1073741824}


@pytest.mark.parametrize("setting", ["auto", "on"])
@pytest.mark.parametrize(
    ("environ", "recorded"),
    [
        ({"MALLOC_TOP_PAD_": "0"}, {"MALLOC_TOP_PAD_": "0"}),
        (
            {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.mmap_threshold=4096"},
            {"GLIBC_TUNABLES glibc.malloc.mmap_threshold": "4096"},
        ),
    ],
)
def test_the_users_own_allocator_settings_win_and_are_recorded(monkeypatch, setting, environ, recorded):
    libc = FakeLibc()
    _use(monkeypatch, libc)
    record = allocator.configure(setting, environ=environ)
    assert libc.calls == []
    assert record["applied"] is False and record["environment"] == recorded


def test_unrelated_environment_does_not_count_as_tuning():
    env = {"MALLOC_ARENA_MAX": "2", "GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "PATH": "/bin"}
    assert allocator.environment_settings(env) == {}


def test_the_key_is_composed_by_every_script_that_applies_it():
    for name in ("train", "eval", "demo", "benchmark"):
        assert compose_cfg(name).runtime.allocator == "auto", name


def test_a_script_refuses_on_without_glibc_in_one_plain_line(tmp_path):
    """scripts/benchmark.py with runtime.allocator=on in a process whose C library is not glibc (stand-in)."""
    code = (
        "import runpy, sys; from avs.utils import allocator; allocator._load_libc = lambda: None; "
        f"sys.argv = ['benchmark.py', 'params_only=true', 'runtime.allocator=on', 'paths.log_dir={tmp_path}']; "
        f"runpy.run_path({str(PROJECT_ROOT / 'scripts' / 'benchmark.py')!r}, run_name='__main__')"
    )
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env
    )
    assert proc.returncode == ExitCode.CONFIG, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: runtime.allocator=on: this process does not run on glibc (no mallopt / gnu_get_libc_version), "
        "so its allocator cannot be tuned; set runtime.allocator=auto or off"
    ]
    assert "params" not in proc.stdout  # refused before anything was built


def test_a_process_that_never_configured_says_so():
    record = allocator.state()
    assert record["setting"] is None and record["applied"] is False
    assert record["reason"] == "not configured in this process"
