"""runtime.allocator for real: glibc's page faults with and without it, and its record in a run's outputs.

The setting is process-wide, so each case runs in its own process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from avs.config import PROJECT_ROOT
from avs.utils.allocator import VALUES, process_glibc
from tests.conftest import run_script, tiny_overrides

GLIBC = process_glibc() is not None
needs_glibc = pytest.mark.skipif(not GLIBC, reason="glibc only: mallopt tunes glibc's allocator")

# A step's pattern: several 16 MB buffers live at once (activations held for the backward), then all freed.
# After a warm-up, glibc by default gives the freed top of its heap back and faults it in again next
# round; with the setting the memory stays in the process.
FAULTS = """
import json, resource, sys
import numpy as np
from avs.utils.allocator import configure
record = configure(sys.argv[1])
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def round_():
    buffers = [np.ones(16 << 20, dtype=np.uint8) for _ in range(4)]
    del buffers
for _ in range(3):
    round_()
before = faults()
for _ in range(int(sys.argv[2])):
    round_()
print(json.dumps({"faults": faults() - before, "record": record}))
"""


def _faults(setting: str, rounds: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT), "OMP_NUM_THREADS": "1"}
    for var in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "GLIBC_TUNABLES"):
        env.pop(var, None)
    proc = subprocess.run(
        [sys.executable, "-c", FAULTS, setting, str(rounds)], capture_output=True, text=True, timeout=120, env=env
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@needs_glibc
def test_the_setting_keeps_freed_memory_and_saves_its_page_faults():
    rounds = 10
    off, auto = _faults("off", rounds), _faults("auto", rounds)
    assert off["record"]["applied"] is False and auto["record"]["applied"] is True
    assert auto["record"]["values"] == VALUES  # glibc accepted every value
    assert off["faults"] >= rounds  # by default the freed memory is faulted in again every round
    assert auto["faults"] * 10 <= off["faults"], (auto["faults"], off["faults"])


def test_train_and_eval_record_the_setting(synth_data_dir, tmp_path):
    """scripts/train.py (default: auto) writes the record into metrics.json; scripts/eval.py (off) into its JSON."""
    run = tmp_path / "run"
    args = [*tiny_overrides(synth_data_dir), "model.channels=32", "trainer.max_steps=1", "trainer.test_at_end=false"]
    proc = run_script("train.py", [*args, f"hydra.run.dir={run}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((run / "metrics.json").read_text())
    alloc = record["allocator"]
    assert alloc["setting"] == "auto" and alloc["applied"] is GLIBC
    assert alloc["values"] == (VALUES if GLIBC else None)
    assert record["config"]["runtime"] == {"allocator": "auto"}
    out = tmp_path / "eval"
    ckpt = run / "checkpoints" / "best.ckpt"
    eval_args = [f"checkpoint={ckpt}", "split=val", "device=cpu", f"output_dir={out}", "runtime.allocator=off"]
    proc = run_script("eval.py", [*eval_args, f"paths.data_dir={synth_data_dir}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    alloc = json.loads((out / "metrics_val.json").read_text())["allocator"]
    assert alloc["setting"] == "off" and alloc["applied"] is False and alloc["values"] is None
