"""Every config key is classified once (avs/config_keys.py): result-neutral or result-affecting.

Resume (avs/engine/resume_check.py) and tables (avs/tables/keys.py) read that one classification;
a key added to any config without being classified fails here.
"""

from __future__ import annotations

import functools

from omegaconf import OmegaConf

from avs.config import CONFIG_DIR
from avs.config_keys import RESULT_NEUTRAL_KEYS, classify, matches
from tests.conftest import compose_cfg


def _leaves(node, prefix=""):
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            out.update(_leaves(v, f"{prefix}{k}."))
        return out if out or not prefix else {prefix[:-1]: {}}
    return {prefix[:-1]: node}


def composed_configs() -> dict[str, object]:
    """Every experiment overlay x (s4, ms3), every model x every data subset, every script config."""
    cases: dict[str, tuple[str, list[str]]] = {}
    for path in sorted((CONFIG_DIR / "experiment").glob("*.yaml")):
        extra = ["s4_checkpoint=/S4/best.ckpt"] if "s4_checkpoint" in path.read_text() else []
        for subset in ("s4", "ms3"):
            cases[f"experiment={path.stem} data={subset}"] = (
                "train",
                [f"experiment={path.stem}", f"data={subset}", *extra],
            )
    subsets = sorted(p.stem for p in (CONFIG_DIR / "data").glob("*.yaml"))
    for path in sorted((CONFIG_DIR / "model").glob("*.yaml")):
        if path.stem == "base":  # what the methods share: no model option (it names no class)
            continue
        for subset in subsets:
            cases[f"model={path.stem} data={subset}"] = ("train", [f"model={path.stem}", f"data={subset}"])
    for path in sorted(CONFIG_DIR.glob("*.yaml")):
        cases[path.stem] = (path.stem, [])
    return {name: compose_cfg(config, overrides) for name, (config, overrides) in cases.items()}


@functools.cache
def all_leaf_keys() -> dict[str, str]:
    """Leaf key -> the first case that has it."""
    keys: dict[str, str] = {}
    for case, cfg in composed_configs().items():
        for key in _leaves(OmegaConf.to_container(cfg, resolve=False)):
            keys.setdefault(key, case)
    return keys


def test_every_leaf_key_of_every_config_is_classified():
    keys = all_leaf_keys()
    assert len(keys) > 300  # the composition really walked the configs
    missing = [f"{key} (in {case})" for key, case in sorted(keys.items()) if classify(key) is None]
    assert not missing, "classify these keys in avs/config_keys.py:\n" + "\n".join(missing)


def test_every_result_neutral_pattern_names_a_real_key():
    keys = all_leaf_keys()
    # `hydra` is in the configs the scripts compose with their hydra node (run dirs), not in these
    unused = [p for p in RESULT_NEUTRAL_KEYS if p != "hydra" and not any(matches(k, [p]) for k in keys)]
    assert not unused, f"patterns naming no key of any config: {unused}"


def test_classification_examples():
    assert classify("trainer.progress") == "neutral"
    assert classify("model.audio_encoder.weights_path") == "neutral"  # neutral wins inside a result node
    assert classify("model.channels") == "result"
    assert classify("trainer.lr") == "result"
    assert classify("seed") == "result"
    assert classify("trainer.some_new_key") is None  # a new trainer key must be classified


def test_resume_and_tables_read_the_same_neutral_keys():
    from avs.engine.resume_check import config_changes
    from avs.tables.build import _ignored

    cfg = compose_cfg("train", ["model=tpavi", "data=synth_s4"])
    for key in ("trainer.progress", "trainer.record_latent_kl", "published.paper", "data.eval_batch_size"):
        assert _ignored(key, ())
        changed = cfg.copy()
        OmegaConf.update(changed, key, "changed", force_add=True)
        assert config_changes(OmegaConf.to_container(cfg, resolve=True), changed) == []
    # a result key is compared on resume and (unless rows merge it, like seed) splits table rows
    changed = cfg.copy()
    changed.trainer.lr = 0.5
    assert [c["key"] for c in config_changes(OmegaConf.to_container(cfg, resolve=True), changed)] == ["trainer.lr"]
    assert not _ignored("trainer.lr", ()) and _ignored("seed", ())
