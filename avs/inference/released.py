"""Import the authors' released checkpoints (AVSBench S4/MS3 and AVSS, MMVAE-AVS, AVS-bidirectional) as avs checkpoints.

A released file is a plain ``state_dict`` of the authors' model class (possibly saved from a
``DataParallel`` wrapper, i.e. with ``module.`` prefixes). Its keys are renamed to ours by one
table of ``(regex, replacement)`` rules per source; keys the released forward never reads are on
a documented list per source (``UNUSED``). The conversion is strict: a released key that is
neither mapped nor documented-unused, an avs key left unfilled, two keys mapping to one name or a
shape mismatch is an error that lists the keys.

The VGGish audio network is not part of any released model file (the authors run it outside the
model), so its weights come from the torchvggish release file (``vggish-10086976.pth``).

The written checkpoint holds ``model`` (our state dict), ``config`` (the resolved training config
with ``model.preset=release``, i.e. every ``legacy_*`` flag the released forward needs),
``avs_checkpoint_version``, ``released`` (source, file name, SHA-256, key counts) and
``release_flags`` (the inference-relevant flags it was built with).
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from avs.engine.checkpoint import CheckpointError, safe_torch_load, save_checkpoint
from avs.inference.released_avss import check_avss_config

log = logging.getLogger(__name__)

__all__ = [
    "SOURCES",
    "RULES",
    "UNUSED",
    "VGGISH_RULES",
    "RELEASE_INFERENCE_FLAGS",
    "KeyMapping",
    "map_keys",
    "convert_state_dict",
    "load_released",
    "import_checkpoint",
    "sha256_of",
    "release_config",
]

SOURCES: tuple[str, ...] = ("avsbench", "avsbench_avss", "mmvae_avs", "avs_bidirectional")

Rule = tuple[str, str]  # (regex matched against the whole released key, re.expand template)


# ----------------------------------------------------------------------------- rule tables
def _pvt_rules(prefix: str) -> list[Rule]:
    """Original PVT-v2 layout (patch_embed1..4, block1..4, norm1..4) under `prefix` -> our timm body."""
    p = re.escape(prefix)
    rules: list[Rule] = [(rf"{p}patch_embed1\.(.+)", r"backbone.body.patch_embed.\1")]
    for i in range(1, 5):
        s = i - 1
        if i > 1:
            rules.append((rf"{p}patch_embed{i}\.(.+)", rf"backbone.body.stages_{s}.downsample.\1"))
        rules.append(
            (rf"{p}block{i}\.(\d+)\.mlp\.dwconv\.dwconv\.(.+)", rf"backbone.body.stages_{s}.blocks.\1.mlp.dwconv.\2")
        )
        rules.append((rf"{p}block{i}\.(\d+)\.(.+)", rf"backbone.body.stages_{s}.blocks.\1.\2"))
        rules.append((rf"{p}norm{i}\.(.+)", rf"backbone.body.stages_{s}.norm.\1"))
    return rules


def _resnet_rules(prefix: str, two_branch: bool) -> list[Rule]:
    """torchvision ResNet-50 names under `prefix` (AVSBench's two-branch copy: layer3_1 / layer4_1)."""
    p = re.escape(prefix)
    rules: list[Rule] = [(rf"{p}(conv1|bn1|layer1|layer2)\.(.+)", r"backbone.body.\1.\2")]
    if two_branch:
        rules += [
            (rf"{p}layer3_1\.(.+)", r"backbone.body.layer3.\1"),
            (rf"{p}layer4_1\.(.+)", r"backbone.body.layer4.\1"),
        ]
    else:
        rules += [(rf"{p}(layer3|layer4)\.(.+)", r"backbone.body.\1.\2")]
    return rules


def _dimreduce_rules(src: str, dst: str) -> list[Rule]:
    """`<src>.conv_list.i.reduce.j.{conv,norm}` (BasicConv2d) -> `<dst>.stages.i.{2j,2j+1}` (our Sequential)."""
    rules: list[Rule] = []
    for j in range(3):
        rules.append((rf"{src}\.conv_list\.(\d+)\.reduce\.{j}\.conv\.(.+)", rf"{dst}.stages.\1.{2 * j}.\2"))
        rules.append((rf"{src}\.conv_list\.(\d+)\.reduce\.{j}\.norm\.(.+)", rf"{dst}.stages.\1.{2 * j + 1}.\2"))
    # the "aspp" neck option: conv_list.i.conv2d_list.j (no bias)
    rules.append((rf"{src}\.conv_list\.(\d+)\.conv2d_list\.(\d+)\.(.+)", rf"{dst}.stages.\1.branches.\2.\3"))
    return rules


def _simple_decoder_rules(src: str, dst: str) -> list[Rule]:
    """ECMVAE / AVS-BG "simple" decoder, both released layouts (`fusion_block_n` and
    `short_connect_with_decode_module.{n-1}`), block n -> our path{5-n}; ResidualBlock
    `ConvBNReLU{1,2}.{conv,norm}` -> our `body.{0,1}` / `body.{3,4}`; `head_up_2.output_conv` -> `output_conv`."""
    rules: list[Rule] = []
    for n in range(1, 5):
        for block in (rf"fusion_block_{n}", rf"short_connect_with_decode_module\.{n - 1}"):
            for unit in (1, 2):
                rules.append(
                    (
                        rf"{src}\.{block}\.resConfUnit{unit}\.ConvBNReLU1\.conv\.(.+)",
                        rf"{dst}.path{5 - n}.resConfUnit{unit}.body.0.\1",
                    )
                )
                rules.append(
                    (
                        rf"{src}\.{block}\.resConfUnit{unit}\.ConvBNReLU1\.norm\.(.+)",
                        rf"{dst}.path{5 - n}.resConfUnit{unit}.body.1.\1",
                    )
                )
                rules.append(
                    (
                        rf"{src}\.{block}\.resConfUnit{unit}\.ConvBNReLU2\.conv\.(.+)",
                        rf"{dst}.path{5 - n}.resConfUnit{unit}.body.3.\1",
                    )
                )
                rules.append(
                    (
                        rf"{src}\.{block}\.resConfUnit{unit}\.ConvBNReLU2\.norm\.(.+)",
                        rf"{dst}.path{5 - n}.resConfUnit{unit}.body.4.\1",
                    )
                )
    rules.append((rf"{src}\.head_up_2\.output_conv\.([024])\.(.+)", rf"{dst}.output_conv.\1.\2"))
    return rules


_TPAVI_PARTS = r"(align_channel|norm_layer|g|theta|phi|W_z)"

_ECMVAE_LATENT_ENCODERS = r"(enc_vs|enc_as|enc_vac|enc_vs_y|enc_as_y|enc_vac_y)"


def _ecmvae_latent_rules() -> list[Rule]:
    """`mm_vae_model.*` -> `latent.*`.

    Conv stacks layerK/bnK -> convs.{3(K-1)}/{3(K-1)+1}, BA heads -> ba_{prior,post}."""
    src = r"mm_vae_model"
    rules: list[Rule] = []
    for k in range(1, 6):
        rules.append((rf"{src}\.{_ECMVAE_LATENT_ENCODERS}\.layer{k}\.(.+)", rf"latent.\1.convs.{3 * (k - 1)}.\2"))
        rules.append((rf"{src}\.{_ECMVAE_LATENT_ENCODERS}\.bn{k}\.(.+)", rf"latent.\1.convs.{3 * (k - 1) + 1}.\2"))
    rules += [
        (rf"{src}\.{_ECMVAE_LATENT_ENCODERS}\.(fc1|fc2|fc_gt_vector)\.(.+)", r"latent.\1.\2.\3"),
        (rf"{src}\.(sc1_prior|sc2_prior|sc1_posterior|sc2_posterior)\.(.+)", r"latent.\1.\2"),
        (rf"{src}\.(noise_model_prior|noise_model_post)\.noise_conv\.(.+)", r"latent.\1.\2"),
        (rf"{src}\.ba_lower_bound_mu_(prior|post)\.(.+)", r"latent.ba_\1.mu.\2"),
        (rf"{src}\.ba_lower_bound_logvar_(prior|post)\.(.+)", r"latent.ba_\1.logvar.\2"),
        (rf"{src}\.ba_lower_bound_sc_a_(prior|post)\.(.+)", r"latent.ba_\1.target.\2"),
    ]
    return rules


RULES: dict[str, list[Rule]] = {
    # OpenNLPLab/AVSBench avs_s4 | avs_ms3 `Pred_endecoder` (PVT_AVSModel.py / ResNet_AVSModel.py)
    "avsbench": [
        *_pvt_rules("encoder_backbone."),
        *_resnet_rules("resnet.", two_branch=True),
        *[(rf"conv{i + 1}\.conv2d_list\.(\d+)\.(.+)", rf"neck.stages.{i}.branches.\1.\2") for i in range(4)],
        *[(rf"tpavi_b{i + 1}\.{_TPAVI_PARTS}\.(.+)", rf"fusion.blocks.{i}.\1.\2") for i in range(4)],
        *[(rf"tpavi_b{i + 1}\.W_f\.0\.(.+)", rf"fusion.blocks.{i}.W_f.\1") for i in range(4)],
        (r"(path[1-4])\.(resConfUnit[12])\.(conv[12])\.(.+)", r"decoder.\1.\2.\3.\4"),
        (r"output_conv\.([024])\.(.+)", r"decoder.output_conv.\1.\2"),
    ],
    # OpenNLPLab/MMVAE-AVS `AVSMMVAE` (model/AVSModel.py), the model test.py loads
    "mmvae_avs": [
        *_pvt_rules("encoder."),
        *_resnet_rules("encoder.", two_branch=False),
        *_dimreduce_rules("neck_prior", "neck"),
        *_dimreduce_rules("neck_post", "neck_post"),
        (rf"fusion_modules\.(\d+)\.{_TPAVI_PARTS}\.(.+)", r"fusion.blocks.\1.\2.\3"),
        (r"fusion_modules\.(\d+)\.(conv[123])\.conv\.(.+)", r"fusion.blocks.\1.\2.\3"),
        *_simple_decoder_rules("decoder_prior", "decoder"),
        *_simple_decoder_rules("decoder_post", "decoder_post"),
        *_ecmvae_latent_rules(),
    ],
    # OpenNLPLab/AVS-bidirectional `AVSModel` (model/AVSModel.py)
    "avs_bidirectional": [
        *_pvt_rules("encoder."),
        *_resnet_rules("encoder.", two_branch=False),
        *_dimreduce_rules("neck", "neck"),
        (r"fusion_modules\.(\d+)\.(conv[123])\.conv\.(.+)", r"fusion.blocks.\1.\2.\3"),
        (rf"fusion_modules\.(\d+)\.{_TPAVI_PARTS}\.(.+)", r"fusion.blocks.\1.\2.\3"),
        (r"corr_atten\.(\d+)\.(weight|bias)", r"motion.gates.\1.\2"),
        (r"mask_encoder\.([012])\.conv\.(.+)", r"projector.mask_encoder.\1.\2"),
        (r"maksed_visual_to_audio\.(weight|bias)", r"projector.spatial_pool.\1"),  # (sic)
        *_simple_decoder_rules("decoder", "decoder"),
    ],
}

# OpenNLPLab/AVSBench avss `Pred_endecoder`: the S4/MS3 names; its align_channel has no bias, which the
# release preset's model.fusion.block.legacy_align_without_bias builds (released_avss.py picks the config)
RULES["avsbench_avss"] = RULES["avsbench"]

# Released keys that exist in the file but that the released forward never reads: (regex, why).
UNUSED: dict[str, list[Rule]] = {
    "avsbench": [
        (
            r"path4\.resConfUnit1\..+",
            "the deepest FeatureFusionBlock is called with one input: its resConfUnit1 never runs",
        ),
        (r"resnet\.(layer3_2|layer4_2)\..+", "B2_ResNet's second branch is built and loaded but never called"),
        (r"encoder_backbone\.head\..+", "PVT classification head (not called by the segmentation forward)"),
    ],
    "mmvae_avs": [
        (
            r"(decoder_prior|decoder_post)\.(fusion_block_1|short_connect_with_decode_module\.0)\.resConfUnit1\..+",
            "the first decoder block gets one input: its resConfUnit1 never runs",
        ),
        (r"audio_neck\..+", "audio_neck (Linear 128->128) is built but never called"),
        (r"encoder\.(head|fc)\..+", "backbone classifier (not called by the segmentation forward)"),
    ],
    "avs_bidirectional": [
        (
            r"decoder\.(short_connect_with_decode_module\.0|fusion_block_1)\.resConfUnit1\..+",
            "the first decoder block gets one input: its resConfUnit1 never runs",
        ),
        (r"audio_neck\..+", "audio_neck (Linear 128->128) is built but never called"),
        (r"encoder\.(head|fc)\..+", "backbone classifier (not called by the segmentation forward)"),
    ],
}

UNUSED["avsbench_avss"] = UNUSED["avsbench"]  # the same path4.resConfUnit1, resnet.layer3_2 / layer4_2, head

# torchvggish release file (vggish-10086976.pth) -> our VGGish under model.audio_encoder
VGGISH_RULES: list[Rule] = [(r"(features|embeddings)\.(.+)", r"audio_encoder.\1.\2")]

# Config overrides that make our forward compute the released one at inference; the importer
# applies them through `model.preset=release` and records their resolved values in the checkpoint.
RELEASE_INFERENCE_FLAGS: dict[str, tuple[str, ...]] = {
    "avsbench": ("model.decoder.legacy_inplace_relu_skip",),
    "avsbench_avss": (
        "model.decoder.legacy_inplace_relu_skip",
        "model.fusion.legacy_window",
        "model.fusion.block.legacy_align_without_bias",
        "model.legacy_vid_zeroing",
    ),
    "mmvae_avs": ("model.latent.legacy_test_sample",),
    "avs_bidirectional": ("model.motion.impl", "model.order"),
}


# ----------------------------------------------------------------------------- mapping
@dataclass
class KeyMapping:
    """Result of renaming one released state dict (released key -> our key)."""

    mapped: dict[str, str] = field(default_factory=dict)
    unused: dict[str, str] = field(default_factory=dict)  # released key -> reason
    unmatched: list[str] = field(default_factory=list)


def _compiled(rules: Sequence[Rule]) -> list[tuple[re.Pattern, str]]:
    return [(re.compile(p), r) for p, r in rules]


def map_keys(keys: Sequence[str], rules: Sequence[Rule], unused: Sequence[Rule] = ()) -> KeyMapping:
    """Apply the first fully matching rule to each key; documented-unused keys are set aside first."""
    rules_c, unused_c = _compiled(rules), _compiled(unused)
    out = KeyMapping()
    for key in keys:
        why = next((reason for pat, reason in unused_c if pat.fullmatch(key)), None)
        if why is not None:
            out.unused[key] = why
            continue
        for pat, repl in rules_c:
            m = pat.fullmatch(key)
            if m:
                out.mapped[key] = m.expand(repl)
                break
        else:
            out.unmatched.append(key)
    return out


def _strip_module(sd: Mapping[str, Any]) -> dict[str, Any]:
    return {(k[len("module.") :] if k.startswith("module.") else k): v for k, v in sd.items()}


def _listing(keys: Sequence[str]) -> str:
    return "\n".join(f"  {k}" for k in keys)


def _place(
    pairs: Sequence[tuple[str, str, torch.Tensor]], target: Mapping[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Put each (released key, our key, value) into our state dict, cast to the target dtype; returns the state
    dict and one line per pair that could not go in (name taken twice, no such key, shape mismatch)."""
    out: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    problems: list[str] = []
    for src_key, ours, value in pairs:
        if ours in out:
            problems.append(f"{src_key} and {origin[ours]} both map to {ours}")
            continue
        if ours not in target:
            problems.append(f"{src_key} -> {ours}: no such avs key")
            continue
        if tuple(value.shape) != tuple(target[ours].shape):
            problems.append(f"{src_key} -> {ours}: shape {tuple(value.shape)} != {tuple(target[ours].shape)}")
            continue
        out[ours] = value.to(dtype=target[ours].dtype)
        origin[ours] = src_key
    return out, problems


def _mismatch_error(
    name: str, source: str, unmatched: list[str], unfilled: list[str], problems: list[str]
) -> CheckpointError:
    """The error listing every released key without a rule, every unfilled avs key and every conflict."""
    lines = [
        f"{name}: not a {source} checkpoint for this avs model: {len(unmatched)} released key(s) match no rule "
        f"(and are not on the documented-unused list), {len(unfilled)} avs key(s) are not filled, "
        f"{len(problems)} key(s) conflict.",
        "Check source= and the model/backbone/data overrides (fusion stages, neck kind, decoder, image size).",
    ]
    if unmatched:
        lines += ["released keys with no rule:", _listing(unmatched)]
    if unfilled:
        lines += ["avs keys not filled:", _listing(unfilled)]
    if problems:
        lines += ["conflicts:", _listing(problems)]
    return CheckpointError("\n".join(lines))


def convert_state_dict(
    source: str,
    released: Mapping[str, torch.Tensor],
    target: Mapping[str, torch.Tensor],
    vggish: Mapping[str, torch.Tensor] | None = None,
    name: str = "<released file>",
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Released state dict (+ VGGish file) -> our state dict shaped like `target`, and key counts.

    Raises CheckpointError listing every unmatched released key, every unfilled avs key, every
    shape mismatch and every name two released keys map to.
    """
    if source not in SOURCES:
        raise ValueError(f"source must be one of {list(SOURCES)}, got {source!r}")
    released = _strip_module(released)
    km = map_keys(list(released), RULES[source], UNUSED[source])
    pairs: list[tuple[str, str, torch.Tensor]] = [(k, km.mapped[k], released[k]) for k in km.mapped]
    vg = KeyMapping()
    if vggish is not None:
        vggish = _strip_module(vggish)
        vg = map_keys(list(vggish), VGGISH_RULES)
        pairs += [(f"[vggish] {k}", vg.mapped[k], vggish[k]) for k in vg.mapped]
    out, problems = _place(pairs, target)
    unmatched = list(km.unmatched) + [f"[vggish] {k}" for k in vg.unmatched]
    unfilled = [k for k in target if k not in out and not k.endswith("num_batches_tracked")]
    defaulted = [k for k in target if k not in out and k.endswith("num_batches_tracked")]
    if unmatched or unfilled or problems:
        raise _mismatch_error(name, source, unmatched, unfilled, problems)
    for k in defaulted:  # BN step counters (not read by the forward) of files saved without them
        out[k] = target[k].clone()
    counts = {
        "released_keys": len(released),
        "mapped": len(km.mapped),
        "documented_unused": len(km.unused),
        "vggish_mapped": len(vg.mapped),
        "avs_keys": len(target),
        "avs_filled": len(target) - len(defaulted),
        "avs_defaulted_bn_counters": len(defaulted),
    }
    ordered = {k: out[k] for k in target}
    return ordered, counts


# ----------------------------------------------------------------------------- files
def sha256_of(path: str | Path) -> str:
    """Hex SHA-256 of a file (streamed)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_released(path: str | Path, what: str = "released checkpoint") -> dict[str, torch.Tensor]:
    """torch.load(weights_only=True) of a released state dict; unwraps {'model'|'state_dict': ...}, strips `module.`."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"{what} not found: {path}")
    obj = safe_torch_load(path, what)  # not a torch file, pickled code, truncated file: CheckpointError
    for wrapper in ("model", "state_dict"):
        if isinstance(obj, Mapping) and isinstance(obj.get(wrapper), Mapping):
            obj = obj[wrapper]
            break
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: expected a state dict of tensors ({what}), got {type(obj).__name__}")
    return _strip_module({str(k): v for k, v in obj.items()})


def _uses_vggish(cfg: DictConfig) -> bool:
    node = cfg.model.get("audio_encoder")
    return node is not None and str(node.get("_target_", "")).endswith("vggish.VGGish")


def _load_vggish(cfg: DictConfig, vggish_path: str | Path | None, released_path: Path) -> dict | None:
    """The torchvggish weights when the model's audio encoder is VGGish (the released files do not hold them)."""
    if not _uses_vggish(cfg):
        return None
    if vggish_path is None:
        raise CheckpointError(
            f"{released_path.name}: the released models run VGGish outside the model file; "
            "pass the torchvggish weights (vggish-10086976.pth) as vggish=<path>"
        )
    return load_released(vggish_path, what="VGGish weight file")


def _provenance(
    source: str, released_path: Path, vggish_path: str | Path | None, counts: dict[str, Any]
) -> dict[str, Any]:
    """The `released` record of the checkpoint: source, file names, SHA-256 sums and key counts."""
    return {
        "source": source,
        "file": released_path.name,
        "sha256": sha256_of(released_path),
        "vggish_file": None if vggish_path is None else Path(vggish_path).name,
        "vggish_sha256": None if vggish_path is None else sha256_of(vggish_path),
        "counts": counts,
    }


def import_checkpoint(
    source: str,
    released_path: str | Path,
    cfg: DictConfig,
    out_path: str | Path,
    vggish_path: str | Path | None = None,
) -> dict[str, Any]:
    """Convert `released_path` for the model of the composed train config `cfg`; write an avs checkpoint.

    `cfg` must already carry ``model.preset=release`` (scripts/import_checkpoint.py adds it). Returns
    the provenance record written into the checkpoint (``released``).
    """
    from avs.engine.checkpointer import CHECKPOINT_VERSION
    from avs.models.build import build_model, without_weight_files

    if source not in SOURCES:
        raise ValueError(f"source must be one of {list(SOURCES)}, got {source!r}")
    released_path = Path(released_path).expanduser()
    if str(cfg.model.get("preset", "paper")) != "release":
        log.warning(
            "model.preset=%s: the checkpoint will not carry the released model's legacy flags "
            "(use release_config / scripts/import_checkpoint.py)",
            cfg.model.get("preset"),
        )
    released = load_released(released_path)
    check_avss_config(source, cfg, released, released_path.name)  # AVSS file <-> AVSS data and its backbone
    vggish = _load_vggish(cfg, vggish_path, released_path)
    without_weight_files(cfg)  # every weight comes from the released file
    model = build_model(cfg)
    state, counts = convert_state_dict(source, released, model.state_dict(), vggish, name=released_path.name)
    model.load_state_dict(state, strict=True)
    flags = {k: OmegaConf.select(cfg, k) for k in RELEASE_INFERENCE_FLAGS[source]}
    record = _provenance(source, released_path, vggish_path, counts)
    checkpoint = {
        "model": state,
        "config": OmegaConf.to_yaml(cfg, resolve=True),
        "avs_checkpoint_version": CHECKPOINT_VERSION,
        "released": record,
        "release_flags": flags,
        "step": 0,
        "epoch": 0,
    }
    save_checkpoint(out_path, checkpoint)
    log.info(
        "wrote %s: %d released keys mapped, %d documented unused; %d/%d avs keys filled",
        out_path,
        counts["mapped"],
        counts["documented_unused"],
        counts["avs_filled"],
        counts["avs_keys"],
    )
    return record | {"release_flags": flags}


def release_config(overrides: Sequence[str] = ()) -> DictConfig:
    """Compose the train config from `overrides` with ``model.preset=release`` appended (resolved)."""
    from avs.config import compose_config

    cfg = compose_config("train", [*overrides, "model.preset=release"])
    # to_container, not OmegaConf.resolve: resolve cannot store a resolver's list (eval.protocols' oc.select)
    resolved = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    OmegaConf.set_struct(resolved, OmegaConf.is_struct(cfg))
    return resolved
