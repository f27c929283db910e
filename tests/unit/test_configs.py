"""Every config composes and every model config instantiates (lightning-hydra-template style)."""

from __future__ import annotations

import pytest
import torch

from avs.config import CONFIG_DIR
from avs.models.build import build_model
from tests.conftest import compose_cfg, tiny_overrides

# model/base.yaml holds the keys the methods share; it names no class (model._target_: ???)
MODELS = sorted(p.stem for p in (CONFIG_DIR / "model").glob("*.yaml") if p.stem != "base")
EXPERIMENTS = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))
DATA = sorted(p.stem for p in (CONFIG_DIR / "data").glob("*.yaml"))
BACKBONES = sorted(p.stem for p in (CONFIG_DIR / "backbone").glob("*.yaml"))
OPTIMIZERS = sorted(p.stem for p in (CONFIG_DIR / "optimizer").glob("*.yaml"))
SCHEDULERS = sorted(p.stem for p in (CONFIG_DIR / "scheduler").glob("*.yaml"))


@pytest.mark.parametrize("name", ["train", "eval", "benchmark", "check_data", "extract_audio", "make_synthetic"])
def test_primary_configs_compose(name, tmp_path):
    overrides = ["checkpoint=x.ckpt"] if name == "eval" else []
    cfg = compose_cfg(name, overrides, hydra_cfg=True)
    assert "paths" in cfg


@pytest.mark.parametrize("data", DATA)
@pytest.mark.parametrize("backbone", BACKBONES)
def test_data_and_backbone_groups_compose(data, backbone, tmp_path):
    cfg = compose_cfg("train", [f"data={data}", f"backbone={backbone}", f"paths.data_dir={tmp_path}"])
    assert cfg.data.subset in ("s4", "ms3", "avss")
    assert str(cfg.data.root).startswith("/")


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_every_optimizer_and_scheduler_choice_builds(optimizer, scheduler, tmp_path):
    from avs.config_checks import check_config
    from avs.engine.optim import build_optimizer, build_scheduler

    cfg = compose_cfg("train", [f"optimizer={optimizer}", f"scheduler={scheduler}"] + tiny_overrides(tmp_path))
    check_config(cfg)  # the node's arguments are parameters of its class
    opt = build_optimizer(torch.nn.Linear(2, 1).parameters(), cfg.trainer)
    assert type(opt).__name__.lower() == optimizer and opt.defaults["lr"] == cfg.trainer.lr
    sched = build_scheduler(opt, cfg.trainer, total_steps=10)
    assert (sched is None) == (scheduler == "constant")


@pytest.mark.parametrize("model", MODELS)
def test_every_model_instantiates_and_runs(model, tmp_path):
    cfg = compose_cfg("train", [f"model={model}"] + tiny_overrides(tmp_path))
    net = build_model(cfg)
    B, T, S = 1, cfg.data.num_frames, cfg.data.image_size
    batch = {
        "frames": torch.randn(B, T, 3, S, S),
        "masks": (torch.rand(B, T, 1, S, S) > 0.5).float(),
        "mask_valid": torch.ones(B, T, dtype=torch.bool),
        "audio": torch.randn(B, T, 1, 96, 64),
    }
    net.train()
    terms = net(batch)
    assert terms and all(torch.isfinite(v) for v in terms.values())
    net.eval()
    out = net(batch)
    assert out["logits"].shape == (B, T, 1, S, S)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes(experiment, tmp_path):
    cfg = compose_cfg("train", [f"experiment={experiment}", f"paths.data_dir={tmp_path}"])
    assert cfg.model.name


def test_paths_come_from_env(monkeypatch, tmp_path):
    monkeypatch.setenv("AVS_AVSBENCH_ROOT", str(tmp_path / "avsb"))
    cfg = compose_cfg("train", ["data=ms3"])
    assert str(cfg.data.root) == str(tmp_path / "avsb")


def test_auto_flag_resolves_auto_bools_and_strings_and_names_the_key():
    from avs.config import auto_flag

    assert auto_flag("auto", "data.pin_memory", auto=True) is True
    assert auto_flag("auto", "data.pin_memory", auto=False) is False
    assert auto_flag(True, "k", auto=False) is True and auto_flag("off", "k", auto=True) is False
    assert auto_flag("false", "k", auto=True) is False  # a string "false" is not truthy here
    with pytest.raises(ValueError, match="data.persistent_workers=true needs data.num_workers > 0"):
        auto_flag(True, "data.persistent_workers", auto=False, supported=False, requirement="data.num_workers > 0")
    assert auto_flag(False, "data.persistent_workers", auto=False, supported=False) is False
    with pytest.raises(ValueError, match="trainer.compile_x must be auto, true or false, got 'maybe'"):
        auto_flag("maybe", "trainer.compile_x", auto=False)


def test_old_spellings_get_a_hint_to_the_new_ones():
    from avs.config_checks import override_hints

    (hint,) = override_hints(["experiment=ecmvae_pvt_s4"])
    assert "did you mean experiment=ecmvae_pvt data=s4?" in hint
    (hint,) = override_hints(["experiment=avsbg_r50_ms3"])
    assert "did you mean experiment=avsbg_r50 data=ms3?" in hint
    (hint,) = override_hints(["trainer.schedule=cosine"])
    assert "scheduler=constant|cosine|poly" in hint
    assert override_hints(["experiment=avsbg_pvt_ms3_from_s4", "scheduler=poly", "optimizer=adamw"]) == []
