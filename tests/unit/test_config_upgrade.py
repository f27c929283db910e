"""Configs stored by earlier versions (checkpoints) read in today's spelling: resume compares them, eval builds them."""

from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf

from avs.config_checks import ConfigError
from avs.config_upgrade import upgrade_config
from avs.engine.resume_check import check_resume_config
from tests.conftest import compose_cfg


def _stored(cfg, schedule: str) -> dict:
    """`cfg` as a checkpoint of the earlier version stored it: trainer.schedule, no optimizer node."""
    old = OmegaConf.to_container(cfg, resolve=True)
    del old["trainer"]["scheduler"], old["trainer"]["optimizer"]
    old["trainer"]["schedule"] = schedule
    return old


@pytest.mark.parametrize("kind", ["constant", "cosine", "poly"])
def test_an_old_schedule_equals_the_same_scheduler_group(kind, tmp_path):
    cfg = compose_cfg("train", [f"scheduler={kind}", f"paths.data_dir={tmp_path}"])
    assert check_resume_config(_stored(cfg, kind), cfg, "old.ckpt") == []


def test_a_changed_schedule_of_an_old_checkpoint_is_refused_by_its_new_name(tmp_path):
    cfg = compose_cfg("train", ["scheduler=constant", f"paths.data_dir={tmp_path}"])
    with pytest.raises(ConfigError, match=r"trainer\.scheduler.*resume_allow_changes"):
        check_resume_config(_stored(cfg, "cosine"), cfg, "old.ckpt")


def test_an_old_checkpoint_trained_with_adam_refuses_adamw(tmp_path):
    cfg = compose_cfg("train", ["optimizer=adamw", f"paths.data_dir={tmp_path}"])
    with pytest.raises(
        ConfigError, match=r"trainer\.optimizer: \{'_target_': 'torch\.optim\.Adam'.* in the checkpoint"
    ):
        check_resume_config(_stored(cfg, "constant"), cfg, "old.ckpt")


def test_upgrade_leaves_todays_configs_alone(tmp_path):
    cfg = OmegaConf.to_container(compose_cfg("train", ["scheduler=poly", f"paths.data_dir={tmp_path}"]), resolve=True)
    assert upgrade_config({**cfg, "trainer": dict(cfg["trainer"])}) == cfg


@pytest.mark.parametrize("model", ["tpavi", "ecmvae", "avsbg"])
def test_a_model_config_of_the_earlier_spelling_becomes_todays(model, tmp_path):
    """Stored configs of checkpoints written before one class per kind: same model config after the upgrade."""
    today = OmegaConf.to_container(compose_cfg("train", [f"model={model}", f"paths.data_dir={tmp_path}"]), resolve=True)
    old = json.loads(json.dumps(today))
    m = old["model"]
    m["neck"]["_target_"] = "avs.models.neck.Neck"
    m["decoder"]["_target_"] = "avs.models.decoder.Decoder"
    if m.get("latent"):
        m["latent"]["_target_"] = "avs.models.latent.ECMVAELatent"
    loss = m.pop("seg_loss")
    m["seg_loss"] = {"avs.losses.BCESegLoss": "bce", "avs.losses.StructureLoss": "structure"}[loss.pop("_target_")]
    m["seg_loss_options"] = loss
    assert old != today
    assert upgrade_config(old) == today


@pytest.mark.parametrize("model", ["tpavi", "avsbg", "ecmvae", "ecmvae_bg"])
def test_a_model_config_of_the_single_segmentor_class_gets_its_family_class(model, tmp_path):
    """Stored configs of checkpoints written before `model._target_`: no class named, `latent: null` on
    every model; the upgrade names the family's class and drops the part its class does not take."""
    today = OmegaConf.to_container(compose_cfg("train", [f"model={model}", f"paths.data_dir={tmp_path}"]), resolve=True)
    old = json.loads(json.dumps(today))
    del old["model"]["_target_"]
    old["model"].setdefault("latent", None)
    assert upgrade_config(old) == today


def test_an_unnamed_old_model_gets_its_class_from_its_parts():
    assert upgrade_config({"model": {"name": "mine", "latent": {"variant": "ae"}}})["model"]["_target_"] == (
        "avs.models.methods.ecmvae.ECMVAESegmentor"
    )
    assert upgrade_config({"model": {"name": "mine", "latent": None}})["model"] == {
        "name": "mine",
        "_target_": "avs.models.methods.avsbench.AVSBenchSegmentor",
    }


def test_an_old_av_loss_config_gets_the_soft_avss_map():
    """Configs stored before `model.avm_loss.avss_mask` pooled the soft foreground map."""
    old = {"model": {"_target_": "avs.models.methods.avsbg.AVSBGSegmentor", "avm_loss": {"variant": "kl"}}}
    assert upgrade_config(old)["model"]["avm_loss"] == {"variant": "kl", "avss_mask": "soft"}
    assert upgrade_config({"model": {"_target_": "x", "avm_loss": None}})["model"]["avm_loss"] is None


def test_an_av_loss_config_from_before_the_variants_gets_the_kl_form():
    """Configs stored before `model.avm_loss.variant` (S4 cosine, closer losses) always ran the MS3 KL form."""
    old = {"model": {"_target_": "avs.models.methods.avsbg.AVSBGSegmentor", "avm_loss": {"stages": [0, 1]}}}
    assert upgrade_config(old)["model"]["avm_loss"] == {"stages": [0, 1], "variant": "kl", "avss_mask": "soft"}
    kept = {"model": {"_target_": "x", "avm_loss": {"variant": "s4_cos", "avss_mask": "soft"}}}
    assert upgrade_config(kept)["model"]["avm_loss"]["variant"] == "s4_cos"


def test_a_training_config_stored_before_the_runtime_group_gets_its_own_setting(tmp_path):
    """runtime.allocator came later: a stored training config without it reads as `off` (avs left the
    allocator alone then), resumes without a refused change, and today's configs keep their value."""
    cfg = compose_cfg("train", [f"paths.data_dir={tmp_path}"])
    old = OmegaConf.to_container(cfg, resolve=True)
    del old["runtime"]
    assert upgrade_config(json.loads(json.dumps(old)))["runtime"] == {"allocator": "off"}
    assert check_resume_config(old, cfg, "old.ckpt") == []  # result-neutral: not compared
    today = OmegaConf.to_container(cfg, resolve=True)
    assert upgrade_config(json.loads(json.dumps(today)))["runtime"] == {"allocator": "auto"}
    assert "runtime" not in upgrade_config({"model": {"name": "tpavi"}})  # not a training config
