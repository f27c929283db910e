"""Defaults live in the YAML only: code reads composed-config keys without a default of its own.

While the config checks, the model builder and a one-step training of every model run on composed
configs, `DictConfig.get` is watched. A call from avs/ or scripts/ that passes a default is reported:
- `fallback`: the key is missing, so the code's default decides (it belongs in the YAML), or
- `duplicate`: the key is set, so the default repeats the YAML (read the key plainly).
`.get(key)` without a default (an optional node, None when absent) is not reported.

ALLOWED lists the sites whose `.get` is legitimate, with the reason. KNOWN_REMAINING lists the sites
still to clean, (file, key): they are in files other work was rewriting at the time. Delete an entry
when its site is fixed; the test fails on a stale entry, so both lists only shrink.

What it sees is what runs: the checks and the model builder for every overlay and model, and one
training step of each model; a `.get` on a path these do not take (CUDA, DDP, resume) is not seen.
"""

from __future__ import annotations

import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
from omegaconf import DictConfig

from avs.config import PROJECT_ROOT
from tests.conftest import compose_cfg, tiny_overrides
from tests.unit.test_config_keys import composed_configs

WATCHED = (PROJECT_ROOT / "avs", PROJECT_ROOT / "scripts")

_STORED = "also reads configs stored in checkpoints of earlier versions, which may lack the key"
ALLOWED: dict[tuple[str, str], str] = {
    **{
        ("avs/data/avsbench.py", key): "build_dataset takes any data mapping: " + _STORED
        for key in ("num_frames", "image_size", "audio_source", "flip_prob", "on_error")
    },
    ("avs/data/avsbench.py", "seed"): "data.seed is an optional node (+data.seed=N); no YAML sets it",
    ("avs/data/options.py", "pad_short_audio"): "pad_short_audio_flag takes any data mapping: " + _STORED,
    # check_config also checks the configs of checkpoints evaluated by scripts/eval.py; these keys came later
    **{
        ("avs/config_checks.py", key): "added after the first released configs: " + _STORED
        for key in ("free_bits", "steps", "cycle_steps", "start", "record_latent_kl")
    },
    **{
        ("avs/config_checks.py", key): "check_config also checks stored configs (scripts/eval.py): " + _STORED
        for key in ("use_audio", "projector_mask", "legacy_raw_logits")
    },
    ("avs/models/segmentor.py", "use_audio"): "capabilities are read from stored configs too (eval): " + _STORED,
    ("avs/models/methods/ecmvae.py", "variant"): "capabilities are read from stored configs too (eval): " + _STORED,
    ("avs/models/build.py", "use_audio"): "build_model also builds from stored configs (eval, export): " + _STORED,
    ("avs/evaluation/evaluator.py", "legacy_batch_size"): "evaluation also runs on stored configs: " + _STORED,
}
ALLOWED_FILES: dict[str, str] = {
    "avs/engine/optim.py": "build_optimizer takes any mapping (benchmarks pass {lr: ...} only)",
}
# Sites still to clean, (file, key): none left. Add none: read the key plainly or move the default to the YAML.
KNOWN_REMAINING: set[tuple[str, str]] = set()


class GetRecorder:
    """Patches DictConfig.get; collects {(file, key): (kind, line)} for calls with a default from WATCHED."""

    def __init__(self) -> None:
        self.found: dict[tuple[str, str], tuple[str, int]] = {}
        self._get = DictConfig.get

    def __enter__(self) -> GetRecorder:
        recorder, original = self, self._get

        def get(node, key, default_value=None):
            if default_value is not None:
                frame = sys._getframe(1)
                path = Path(frame.f_code.co_filename)
                if any(path.is_relative_to(w) for w in WATCHED):
                    kind = "duplicate" if key in node else "fallback"
                    site = (str(path.relative_to(PROJECT_ROOT)), str(key))
                    kinds, _ = recorder.found.get(site, ("", 0))
                    recorder.found[site] = (kind if kinds in ("", kind) else "fallback+duplicate", frame.f_lineno)
            return original(node, key, default_value)

        self._patch = mock.patch.object(DictConfig, "get", get)
        self._patch.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._patch.__exit__(*exc)


def _build_on_meta(cfg) -> None:
    from avs.models.build import build_model

    cfg = cfg.copy()
    cfg.backbone.pretrained = None
    if "pretrained" in cfg.audio:
        cfg.audio.pretrained = False
    cfg.model.init_from = None
    with torch.device("meta"), mock.patch("timm.models.pvt_v2.trunc_normal_", lambda t, *a, **k: t):
        build_model(cfg)


@pytest.fixture(scope="module")
def recorded(synth_data_dir, tmp_path_factory) -> dict[tuple[str, str], tuple[str, int]]:
    from avs.config_checks import check_config
    from avs.data.synthetic import ensure_synthetic
    from avs.engine.trainer import Trainer

    configs = {name: cfg for name, cfg in composed_configs().items() if "=" in name}  # the train configs
    built: set[str] = set()
    with GetRecorder() as rec:
        for name, cfg in configs.items():
            if cfg.model.init_from:  # the S4 -> MS3 overlays name a checkpoint that does not exist here
                cfg.model.init_from = None
            check_config(cfg)
            model = name.split()[0]
            if model not in built:  # one build per overlay / model: the builder's reads
                built.add(model)
                _build_on_meta(cfg)
        torch.set_num_threads(1)
        for model in ("tpavi", "ecmvae", "avsbg", "ecmvae_bg"):
            small = ["model.channels=32", "model.audio_dim=32", "audio.embed_dim=32"]
            extra = ["trainer.max_steps=1", "trainer.test_at_end=false", *small]
            cfg = compose_cfg("train", tiny_overrides(synth_data_dir) + [f"model={model}", *extra])
            ensure_synthetic(cfg.data)
            Trainer(cfg, tmp_path_factory.mktemp(model)).fit()
    return rec.found


def test_code_reads_composed_config_keys_without_defaults(recorded):
    skip = KNOWN_REMAINING | set(ALLOWED)
    new = {s: v for s, v in recorded.items() if s not in skip and s[0] not in ALLOWED_FILES}
    lines = [f"{f}:{line} .get({key!r}, default): {kind}" for (f, key), (kind, line) in sorted(new.items())]
    assert not lines, "read these keys plainly (or move the default to the YAML):\n" + "\n".join(lines)


def test_known_remaining_sites_still_exist(recorded):
    stale = sorted((KNOWN_REMAINING | set(ALLOWED)) - set(recorded))
    assert not stale, f"no such call any more: delete from KNOWN_REMAINING / ALLOWED: {stale}"
