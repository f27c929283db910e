"""A refactor moves code, not results: configs, model structures and trained weights match the baseline.

The baseline (tests/fixtures/behaviour_baseline.json) was recorded by
``python -m tests.fixtures.behaviour_baseline`` before the engine / config / model redesign. When a
config is reorganised on purpose, the translation tables below say how an old case or key is spelt
now; a value may never change.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import compose_cfg, tiny_overrides
from tests.fixtures.behaviour_baseline import (
    BASELINE,
    PLACEHOLDER_PATHS,
    WEIGHT_CASES,
    WEIGHT_COMMON,
    machine,
    resolved,
    structure,
    weights_sha,
)

# Old case overrides -> the overrides that spell the same run now (identity when absent).
# The s4 / ms3 pairs of main overlays merged into one overlay per method x backbone (the subset is data=).
_MERGED = ["avsbench_tpavi_pvt", "avsbench_tpavi_r50", "avsbg_pvt", "avsbg_r50", "ecmvae_pvt", "ecmvae_r50",
           "ecmvae_bg_pvt"]
TRANSLATE_OVERRIDES: dict[str, str] = {
    f"experiment={name}_{old} data={subset}": f"experiment={name} data={subset}"
    for name in _MERGED for old in ("s4", "ms3") for subset in ("s4", "ms3")
}
# Old dotted key -> new dotted key (same value expected there).
RENAMED_KEYS: dict[str, str] = {}
# Old dotted key -> (new dotted key, {old value: new value}) where a key changed its kind of value:
# trainer.schedule (a name) became the trainer.scheduler node (configs/scheduler/); constant = no scheduler.
TRANSLATE_VALUES: dict[str, tuple[str, dict[Any, Any]]] = {
    "trainer.schedule": ("trainer.scheduler", {"constant": None}),
}
# Dotted key prefixes that only the new configs have (they must not change any old value).
ADDED_KEYS: tuple[str, ...] = (
    "trainer.optimizer",  # configs/optimizer/adam.yaml: torch.optim.Adam, as build_optimizer hard-coded
)
# Dotted keys whose values are not results (names of runs, free-text provenance) and may differ.
NOT_RESULTS: tuple[str, ...] = (
    "task_name",  # a merged overlay names its runs after the subset: <overlay>_${data.subset}
    "published.source",  # free text; pointers to notes outside the repository were dropped
)


def train_tiny(compose: Callable, overrides: list[str], run_dir: Path) -> str:
    """Train a tiny config in-process; SHA-256 of the final model weights."""
    from avs.data.synthetic import ensure_synthetic
    from avs.engine.checkpoint import load_checkpoint
    from avs.engine.trainer import Trainer

    cfg = compose("train", overrides)
    ensure_synthetic(cfg.data)
    Trainer(cfg, run_dir).fit()
    state = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")["model"]
    return weights_sha(state)


@pytest.fixture(scope="module")
def baseline() -> dict[str, Any]:
    return json.loads(BASELINE.read_text())


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for k, v in node.items():
            out.update(flatten(v, f"{prefix}{k}."))
        if not node and prefix:
            out[prefix[:-1]] = {}
        return out
    return {prefix[:-1]: node}


def _new_overrides(case: str) -> list[str]:
    return TRANSLATE_OVERRIDES.get(case, case).split()


def _starts(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def test_every_config_resolves_to_the_same_values(baseline):
    problems = []
    for case, old in baseline["configs"].items():
        new = flatten(resolved(compose_cfg, _new_overrides(case)))
        old = flatten(old)
        for key, value in old.items():
            if _starts(key, NOT_RESULTS):
                continue
            new_key = RENAMED_KEYS.get(key, key)
            if key in TRANSLATE_VALUES:
                new_key, values = TRANSLATE_VALUES[key]
                if value not in values:
                    problems.append(f"{case}: {key}={value!r} has no translation")
                    continue
                value = values[value]
            if new_key not in new:
                problems.append(f"{case}: {key} is gone")
            elif new[new_key] != value:
                problems.append(f"{case}: {key} was {value!r}, now {new[new_key]!r}")
        known = {TRANSLATE_VALUES[k][0] if k in TRANSLATE_VALUES else RENAMED_KEYS.get(k, k) for k in old}
        for key in new:
            if key not in known and not _starts(key, ADDED_KEYS) and not _starts(key, NOT_RESULTS):
                problems.append(f"{case}: new key {key}={new[key]!r}")
    assert not problems, "\n".join(problems[:40])


def test_every_config_builds_the_same_model(baseline):
    problems = []
    for case, old in baseline["structures"].items():
        new = structure(compose_cfg("train", _new_overrides(case) + PLACEHOLDER_PATHS))
        if new != old:
            problems.append(f"{case}: {old['tensors']} tensors {old['values_by_part']} before, "
                            f"{new['tensors']} tensors {new['values_by_part']} now")
    assert not problems, "\n".join(problems[:20])


@pytest.mark.parametrize("name", sorted(WEIGHT_CASES))
def test_tiny_training_gives_bit_identical_weights(name, baseline, synth_data_dir, tmp_path):
    if baseline["machine"] != machine():
        pytest.skip(f"baseline recorded on {baseline['machine']}, this is {machine()}: bitwise equality "
                    "holds only for the same torch build and CPU kernels")
    torch.set_num_threads(1)
    overrides = tiny_overrides(synth_data_dir) + WEIGHT_CASES[name] + WEIGHT_COMMON
    assert train_tiny(compose_cfg, overrides, tmp_path / name) == baseline["weights"][name]
