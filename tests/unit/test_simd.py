"""One SIMD level for torch's CPU kernels (avs/utils/simd.py): the variables, the refusals, and a
script that starts itself again with them set (once)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from avs.config import PROJECT_ROOT
from avs.errors import ConfigError
from avs.utils import simd

PINS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_CBWR")
HAS_AVX2 = simd.cpu_level() in ("avx2", "avx512")


def test_levels_and_their_variables():
    assert simd.environment("native") == {}
    assert set(simd.environment("avx2")) == set(PINS)
    with pytest.raises(ConfigError, match=r"simd: expected one of \['avx2', 'native'\], got 'avx512'"):
        simd.environment("avx512")
    env = simd.environment("avx2")
    assert simd.holds("avx2", env) and not simd.holds("avx2", {}) and simd.holds("native", {})
    assert simd.conflicts("avx2", {**env, "MKL_CBWR": "COMPATIBLE"}) == {"MKL_CBWR": "COMPATIBLE"}
    assert simd.conflicts("avx2", {}) == {}


def test_refusals_name_the_key_and_the_cause(monkeypatch):
    for k in PINS:
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(ConfigError, match="lacks .*ATEN_CPU_CAPABILITY.*scripts/x.py sets them"):
        simd.check("avx2", "scripts/x.py")
    simd.check("native", "scripts/x.py")
    monkeypatch.setattr(simd.platform, "machine", lambda: "aarch64")
    with pytest.raises(ConfigError, match="simd=avx2 needs an x86-64 CPU; this one is aarch64"):
        simd.ensure("avx2")
    monkeypatch.setattr(simd.platform, "machine", lambda: "x86_64")
    monkeypatch.setenv("MKL_CBWR", "COMPATIBLE")
    with pytest.raises(ConfigError, match="'MKL_CBWR': 'COMPATIBLE'"):
        simd.ensure("avx2")
    simd.ensure("native")  # sets nothing, never starts again


@pytest.mark.skipif(not HAS_AVX2, reason="needs an x86-64 CPU with AVX2")
def test_a_script_starts_itself_again_once_with_the_level_set(tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import os, sys
            sys.path.insert(0, {str(PROJECT_ROOT)!r})
            print("start", flush=True)
            from avs.utils.simd import ensure
            ensure("avx2")
            import torch
            print(sys.argv[1:], torch.backends.cpu.get_cpu_capability(), os.environ["MKL_CBWR"])
            """
        )
    )
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    out = subprocess.run(
        [sys.executable, str(script), "a", "b=1"], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.splitlines() == ["start", "start", "['a', 'b=1'] AVX2 AVX2,STRICT"]


def test_scripts_refuse_an_unknown_level_plainly(tmp_path):
    for script in ("pretrain.py", "proxy_benchmark.py"):
        proc = subprocess.run(
            [sys.executable, str(PROJECT_ROOT / "scripts" / script), "simd=avx9", f"out_dir={tmp_path / 'o'}"],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=tmp_path,
        )
        assert proc.returncode != 0 and "Traceback" not in proc.stderr
        assert "simd: expected one of ['avx2', 'native'], got 'avx9'" in proc.stderr, proc.stderr[-1000:]
        assert not (tmp_path / "o").exists()
