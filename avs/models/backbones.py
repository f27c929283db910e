"""Multi-scale visual backbones (timm PVT-v2 b0..b5, ResNet-50) with original-layout weight loading.

`VisualBackbone` wraps a timm `features_only` network and returns the four stage outputs at
strides 4/8/16/32. ImageNet weights are read from the files users actually have: the original
PVT-v2 release (`pvt_v2_b5.pth`, keys `patch_embed1.*`, `block1.0.*`, `norm1.*`, `head.*`) and
the torchvision ResNet-50 file (`resnet50-19c8e357.pth`, keys `conv1.*`, `layer1.*`, `fc.*`).
`convert_state_dict` maps those layouts (and timm's own) onto the module names used here; the
original PVT-v2 layout goes through timm's `pvt_v2.checkpoint_filter_fn`.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path

import timm
import torch
from timm.models import pvt_v2
from torch import nn

log = logging.getLogger(__name__)

PVT_NAMES: tuple[str, ...] = tuple(f"pvt_v2_b{i}" for i in range(6))
SUPPORTED_BACKBONES: tuple[str, ...] = PVT_NAMES + ("resnet50",)

# timm feature indices of the four stride-4..32 maps.
_OUT_INDICES = {name: (0, 1, 2, 3) for name in PVT_NAMES} | {"resnet50": (1, 2, 3, 4)}
_MAX_LISTED = 8  # keys shown per category in a mismatch error


def _map_pvt_original_key(key: str) -> str | None:
    """Original PVT-v2 key -> features_only key through timm's own remap; None for the head.

    One key at a time, so that two source keys landing on one name are still reported.
    """
    (timm_key,) = pvt_v2.checkpoint_filter_fn({key: None}, None)
    return _map_pvt_timm_key(timm_key)


def _map_pvt_timm_key(key: str) -> str | None:
    """timm PVT-v2 (full model) key -> features_only key; None for the head."""
    if key.startswith("head."):
        return None
    return re.sub(r"^stages\.(\d+)\.", r"stages_\1.", key)


def _map_resnet_key(key: str) -> str | None:
    """torchvision / timm ResNet key -> features_only key; None for the classifier `fc`."""
    return None if key.startswith("fc.") else key


def convert_state_dict(name: str, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an ImageNet state dict (original PVT-v2, timm or torchvision layout) to `VisualBackbone.body` keys.

    The classifier (`head.*` / `fc.*`) is dropped; keys that match no rule are kept unchanged so
    that a strict load reports them. Raises ValueError if two source keys map to one name.
    """
    if name in PVT_NAMES:
        original = any(re.match(r"^(patch_embed1|block1)\.", k) for k in state_dict)
        mapper = _map_pvt_original_key if original else _map_pvt_timm_key
    elif name == "resnet50":
        mapper = _map_resnet_key
    else:
        raise ValueError(f"backbone.name must be one of {list(SUPPORTED_BACKBONES)}, got {name!r}")
    out: dict[str, torch.Tensor] = {}
    source: dict[str, str] = {}
    for key, value in state_dict.items():
        new = mapper(key)
        if new is None:
            continue
        if new in out:
            raise ValueError(f"weight keys {source[new]!r} and {key!r} both map to {new!r}")
        out[new] = value
        source[new] = key
    return out


def _unwrap_state_dict(obj: object, path: Path) -> dict[str, torch.Tensor]:
    """Take the flat tensor dict out of {"model": ...} / {"state_dict": ...} wrappers; strip `module.`."""
    for _ in range(3):
        if isinstance(obj, Mapping) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
            for wrapper in ("model", "state_dict"):
                if isinstance(obj.get(wrapper), Mapping):
                    obj = obj[wrapper]
                    break
            else:
                break
    if not isinstance(obj, Mapping) or not obj:
        raise ValueError(
            f"{path}: expected a state dict (or {{'model': ...}} / {{'state_dict': ...}}), got {type(obj).__name__}"
        )
    sd = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not sd:
        raise ValueError(f"{path}: the state dict holds no tensors")
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    return sd


def _list(keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_LISTED])
    return shown + (f", ... ({len(keys)} in total)" if len(keys) > _MAX_LISTED else "")


def _parse_pretrained(pretrained: str | bool | None) -> str:
    if pretrained is None or pretrained is False:
        return "none"
    if pretrained is True:
        return "file"
    if isinstance(pretrained, str) and pretrained.lower() in ("none", "false", "", "file", "true", "timm"):
        p = pretrained.lower()
        return {"false": "none", "": "none", "true": "file"}.get(p, p)
    raise ValueError(f"backbone.pretrained must be null/false, true/'file' or 'timm', got {pretrained!r}")


def _parse_freeze(freeze: bool | str | None) -> tuple[str, int]:
    """-> (mode, K) with mode in none|all|bn|stages."""
    if freeze is None or freeze is False:
        return "none", 0
    if freeze is True:
        return "all", 0
    if isinstance(freeze, str):
        f = freeze.strip().lower()
        if f in ("none", "false", ""):
            return "none", 0
        if f in ("all", "true"):
            return "all", 0
        if f == "bn":
            return "bn", 0
        m = re.fullmatch(r"stages:(\d+)", f)
        if m and 0 <= int(m[1]) <= 4:
            return "stages", int(m[1])
    raise ValueError(f"backbone.freeze must be false, true, 'bn' or 'stages:K' with K in 0..4, got {freeze!r}")


class VisualBackbone(nn.Module):
    """timm multi-scale backbone: [N,3,H,W] -> 4 maps [N,C_i,H/s_i,W/s_i], s = 4, 8, 16, 32.

    Args:
        name: `pvt_v2_b0` .. `pvt_v2_b5` or `resnet50`.
        pretrained: None/False = random init; True/"file" = load `weights_path` (original PVT-v2 or
            torchvision layout, strict); "timm" = timm hub weights (needs internet).
        weights_path: ImageNet weight file for `pretrained="file"`.
        freeze: False; True (everything); "bn" (BatchNorm affine and running stats); "stages:K"
            (stem / patch embedding and the first K stages). Frozen parts stay in eval mode.
        drop_path_rate: stochastic-depth rate, linear over blocks (PVT-v2 reference: 0.1). It is
            passed to ResNet-50 too; the reference ResNet-50 has none, so its configs set 0.0.
    """

    def __init__(
        self,
        name: str = "pvt_v2_b5",
        pretrained: str | bool | None = None,
        weights_path: str | None = None,
        freeze: bool | str = False,
        drop_path_rate: float = 0.1,
    ) -> None:
        super().__init__()
        if name not in SUPPORTED_BACKBONES:
            raise ValueError(f"backbone.name must be one of {list(SUPPORTED_BACKBONES)}, got {name!r}")
        mode = _parse_pretrained(pretrained)
        freeze_mode, freeze_k = _parse_freeze(freeze)
        if mode == "file" and not weights_path:
            raise ValueError("backbone.weights_path must be set when backbone.pretrained is true/'file'")
        if mode != "file" and weights_path:
            log.info("backbone.weights_path=%s is not read because backbone.pretrained=%r", weights_path, pretrained)
        self.name = name
        kwargs = dict(features_only=True, out_indices=_OUT_INDICES[name], drop_path_rate=float(drop_path_rate))
        if mode == "timm":
            try:
                self.body = timm.create_model(name, pretrained=True, **kwargs)
            except Exception as exc:  # no internet, hub errors, missing cache ...
                raise RuntimeError(
                    f"backbone.pretrained='timm': could not fetch timm weights for {name!r} ({exc}). "
                    f"Place the original ImageNet file locally and use backbone.pretrained=file "
                    f"with backbone.weights_path=<path>."
                ) from exc
        else:
            self.body = timm.create_model(name, pretrained=False, **kwargs)
        self.out_channels: list[int] = list(self.body.feature_info.channels())
        self.strides: list[int] = list(self.body.feature_info.reduction())
        if mode == "file":
            self.load_pretrained(weights_path)  # type: ignore[arg-type]
        self.freeze_mode = freeze_mode
        self.freeze_stages = freeze_k
        frozen = self._frozen_modules(freeze_mode, freeze_k)
        if freeze_mode == "bn" and not frozen:
            log.info("backbone.freeze='bn': %s has no BatchNorm layers; nothing frozen", self.name)
        for module in frozen:
            for p in module.parameters():
                p.requires_grad_(False)
        self.train(self.training)

    # ------------------------------------------------------------------ freezing
    def _stem_and_stages(self) -> tuple[list[nn.Module], list[nn.Module]]:
        b = self.body
        if self.name == "resnet50":
            return [b.conv1, b.bn1], [b.layer1, b.layer2, b.layer3, b.layer4]
        return [b.patch_embed], [b.stages_0, b.stages_1, b.stages_2, b.stages_3]

    def _frozen_modules(self, mode: str, k: int) -> list[nn.Module]:
        if mode == "none":
            return []
        if mode == "all":
            return [self.body]
        if mode == "bn":
            # by type, so layers swapped in later (SyncBatchNorm after convert_sync_batchnorm) are found
            return [m for m in self.body.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        stem, stages = self._stem_and_stages()
        return stem + stages[:k]

    def train(self, mode: bool = True) -> VisualBackbone:
        """Set train/eval mode; frozen parts (and their BatchNorm statistics) always stay in eval.

        The frozen modules are looked up now, not at construction: `convert_sync_batchnorm` replaces
        the BatchNorm layers (DDP with trainer.sync_bn=true) and its SyncBatchNorm layers stay frozen.
        """
        super().train(mode)
        if not hasattr(self, "freeze_stages"):  # during construction
            return self
        for module in self._frozen_modules(self.freeze_mode, self.freeze_stages):
            module.eval()
            for p in module.parameters():
                p.requires_grad_(False)
        return self

    # ------------------------------------------------------------------ weights
    def load_pretrained(self, path: str | os.PathLike) -> None:
        """Strictly load an ImageNet weight file (original PVT-v2 / torchvision / timm layout) into the body."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"backbone.weights_path: no such file {path} (place the ImageNet weight file there, point "
                f"backbone.weights_path / AVS_WEIGHTS_DIR at it, or train from random init with "
                f"backbone.pretrained=null; see README 'Bring your own AVSBench')"
            )
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ValueError(f"{path}: cannot be read as a weights-only torch file ({exc})") from exc
        sd = convert_state_dict(self.name, _unwrap_state_dict(obj, path))
        target = self.body.state_dict()
        missing = [k for k in target if k not in sd and not k.endswith("num_batches_tracked")]
        unexpected = [k for k in sd if k not in target]
        shapes = [
            f"{k}: file {tuple(sd[k].shape)} vs model {tuple(v.shape)}"
            for k, v in target.items()
            if k in sd and tuple(sd[k].shape) != tuple(v.shape)
        ]
        if missing or unexpected or shapes:
            parts = [f"{path} does not match backbone {self.name!r} (after mapping to timm names)"]
            if missing:
                parts.append(f"missing keys: {_list(missing)}")
            if unexpected:
                parts.append(f"unexpected keys: {_list(unexpected)}")
            if shapes:
                parts.append(f"shape mismatches: {_list(shapes)}")
            raise ValueError("; ".join(parts))
        # Old files (e.g. resnet50-19c8e357.pth) carry no BN `num_batches_tracked`: keep the model's.
        for k, v in target.items():
            if k.endswith("num_batches_tracked") and k not in sd:
                sd[k] = v
        self.body.load_state_dict(sd, strict=True)
        log.info("backbone %s: loaded %d tensors from %s", self.name, len(sd), path)

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """[N,3,H,W] -> [N,C_1,H/4,W/4], [N,C_2,H/8,W/8], [N,C_3,H/16,W/16], [N,C_4,H/32,W/32]."""
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"VisualBackbone expects images [N,3,H,W], got {tuple(x.shape)}")
        return list(self.body(x))
