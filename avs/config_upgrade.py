"""Configs stored by earlier versions of avs (in checkpoints), read in today's spelling.

A checkpoint stores its run's resolved config. When a later version renames a key or turns a choice
into a `_target_` node, `upgrade_config` rewrites the stored config so that it builds the same model
(evaluation, demo, export) and compares key by key with a current config (resume). Each rule is one
entry below; a value no rule knows stays as it was, so it shows up as a change or fails to build with
the config check's message.
"""

from __future__ import annotations

from typing import Any

from omegaconf import OmegaConf

# Classes that became one class per kind behind a factory taking the same arguments.
RENAMED_TARGETS: dict[str, str] = {
    "avs.models.neck.Neck": "avs.models.neck.build_neck",
    "avs.models.decoder.Decoder": "avs.models.decoder.build_decoder",
    "avs.models.latent.ECMVAELatent": "avs.models.latent.build_latent",
}
# model.seg_loss: <name> + model.seg_loss_options -> a `_target_` node taking the options.
SEG_LOSS_TARGETS: dict[str, str] = {"bce": "avs.losses.BCESegLoss", "structure": "avs.losses.StructureLoss"}
# model._target_ (one segmentor class per method family) for configs of the single AVSegmentor, by
# model.name; a model of another name is an ECMVAE when it has a latent part, else the one-branch class.
SEGMENTOR_TARGETS: dict[str, str] = {
    "tpavi": "avs.models.methods.avsbench.AVSBenchSegmentor",
    "avsbg": "avs.models.methods.avsbg.AVSBGSegmentor",
    "ecmvae": "avs.models.methods.ecmvae.ECMVAESegmentor",
    "ecmvae_bg": "avs.models.methods.ecmvae.ECMVAESegmentor",
}
# The runtime group (configs/runtime/) of a training config stored before it existed: avs left the
# allocator alone then (runtime.allocator=off), whatever the default is now.
RUNTIME_BEFORE_GROUP: dict[str, Any] = {"allocator": "off"}


def _group_option(group: str, option: str) -> Any:
    """The node that configs/<group>/<option>.yaml puts in place (None for an option that sets it null)."""
    from avs.config import CONFIG_DIR

    node = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / group / f"{option}.yaml"))
    return node.get(group) if set(node) == {group} else node


def _rename_targets(node: Any) -> None:
    if isinstance(node, dict):
        if node.get("_target_") in RENAMED_TARGETS:
            node["_target_"] = RENAMED_TARGETS[node["_target_"]]
        for value in node.values():
            _rename_targets(value)
    elif isinstance(node, list):
        for value in node:
            _rename_targets(value)


def _upgrade_trainer(trainer: dict[str, Any]) -> None:
    if "schedule" in trainer and "scheduler" not in trainer:  # trainer.schedule: <kind> -> scheduler=<kind>
        kind = str(trainer["schedule"])
        try:
            trainer["scheduler"] = _group_option("scheduler", kind)
            del trainer["schedule"]
        except FileNotFoundError:
            pass  # an unknown kind stays as it was
    if "optimizer" not in trainer:  # Adam was the only optimizer before the optimizer group
        trainer["optimizer"] = _group_option("optimizer", "adam")


def _segmentor_target(model: dict[str, Any]) -> None:
    """Name the segmentor class of a config that predates `model._target_`; drop its `latent: null`
    (only the ECMVAE family takes a latent part)."""
    if "_target_" in model:
        return
    target = SEGMENTOR_TARGETS.get(str(model.get("name")))
    if target is None:
        if model.get("latent") is not None:
            target = SEGMENTOR_TARGETS["ecmvae"]
        else:
            target = SEGMENTOR_TARGETS["avsbg" if "release_raw_logits" in model else "tpavi"]
    model["_target_"] = target
    if target != SEGMENTOR_TARGETS["ecmvae"] and "latent" in model and model["latent"] is None:
        del model["latent"]


def _upgrade_model(model: dict[str, Any]) -> None:
    _segmentor_target(model)
    _rename_targets(model)
    avm = model.get("avm_loss")
    if isinstance(avm, dict):
        avm.setdefault("avss_mask", "soft")  # before the AVSS hard masks: always the soft map
        avm.setdefault("variant", "kl")  # before the S4 / closer variants: the MS3 KL form
    loss = model.get("seg_loss")
    if isinstance(loss, str) and loss in SEG_LOSS_TARGETS:
        model["seg_loss"] = {"_target_": SEG_LOSS_TARGETS[loss], **(model.pop("seg_loss_options", None) or {})}


def upgrade_config(old: dict[str, Any]) -> dict[str, Any]:
    """`old` (a plain dict, changed in place and returned) in today's spelling."""
    if "runtime" not in old and isinstance(old.get("trainer"), dict):  # a training config of before the group
        old["runtime"] = dict(RUNTIME_BEFORE_GROUP)
    if isinstance(old.get("trainer"), dict):
        _upgrade_trainer(old["trainer"])
    if isinstance(old.get("model"), dict):
        _upgrade_model(old["model"])
    return old
