"""The released AVSBench-semantic (AVSS) TPAVI checkpoints: which file is which, and the config they need.

The AVSBench authors published two AVSS models (71 classes): TPAVI with PVT-v2-B5 and with
ResNet-50, each a plain ``Pred_endecoder`` state dict saved from the ``DataParallel`` wrapper's
``module`` (no prefix). Their key names are those of the S4/MS3 release (the ``avsbench`` rules of
`avs.inference.released` map them) except that TPAVI's ``align_channel`` has no bias. The layout
tells the backbone: ``encoder_backbone.*`` (PVT-v2-B5, 1186 keys) or ``resnet.*`` (ResNet-50, 626
keys, the unused second branch ``layer3_2`` / ``layer4_2`` included).

`source_overrides` picks the experiment (backbone) from the file and ``data=avss`` unless the user
named them; `check_avss_config` refuses a config that cannot hold the file (not AVSS data, the
other backbone) with one plain line.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from omegaconf import DictConfig

from avs.engine.checkpoint import CheckpointError

__all__ = ["AVSS_SOURCE", "AVSS_LAYOUTS", "avss_layout", "source_overrides", "check_avss_config"]

AVSS_SOURCE = "avsbench_avss"

# layout -> (key prefix of its backbone in the released file, the experiment overlay, the backbone.name
# prefix it fits: the released files are PVT-v2-B5 / ResNet-50; the shapes decide the rest)
AVSS_LAYOUTS: dict[str, tuple[str, str, str]] = {
    "pvt": ("encoder_backbone.", "experiment=avsbench_tpavi_pvt", "pvt_v2"),
    "resnet50": ("resnet.", "experiment=avsbench_tpavi_r50", "resnet50"),
}


def avss_layout(keys: Iterable[str], name: str = "<released file>") -> str:
    """'pvt' or 'resnet50' from the released keys; CheckpointError when the file is neither (or both)."""
    keys = list(keys)
    found = [layout for layout, (prefix, _, _) in AVSS_LAYOUTS.items() if any(k.startswith(prefix) for k in keys)]
    if len(found) != 1 or not any(k.startswith("tpavi_b") for k in keys):
        raise CheckpointError(
            f"{name}: not a released AVSS TPAVI checkpoint: expected the PVT-v2-B5 layout (encoder_backbone.*) "
            f"or the ResNet-50 layout (resnet.*) of Pred_endecoder with tpavi_b* blocks; found "
            f"{', '.join(found) if found else 'neither'} (docs/released_checkpoints.md)"
        )
    return found[0]


def _names_group(overrides: Sequence[str], group: str) -> bool:
    return any(o.lstrip("+~").split("=", 1)[0] == group for o in overrides)


def source_overrides(source: str, released_path: str | Path, overrides: Sequence[str]) -> list[str]:
    """The train-config overrides for importing `released_path`: for the AVSS source, the experiment of the
    file's backbone and ``data=avss`` first (unless the user names ``experiment`` / ``data``), then the
    user's overrides (they win); other sources: the user's overrides as given."""
    if source != AVSS_SOURCE:
        return list(overrides)
    from avs.inference.released import load_released

    layout = avss_layout(load_released(released_path), Path(released_path).name)
    chosen = [] if _names_group(overrides, "experiment") else [AVSS_LAYOUTS[layout][1]]
    if not _names_group(overrides, "data"):
        chosen.append("data=avss")
    return [*chosen, *overrides]


def check_avss_config(source: str, cfg: DictConfig, keys: Iterable[str], name: str) -> None:
    """The AVSS source needs AVSS data and the backbone of the file's layout; the S4/MS3 source
    (`avsbench`) is refused on AVSS data. Each refusal is one CheckpointError line."""
    subset = str(cfg.data.get("subset"))
    if source == "avsbench" and subset == "avss":
        raise CheckpointError(
            f"{name}: --source avsbench is the S4/MS3 release; on data.subset=avss use --source {AVSS_SOURCE}"
        )
    if source != AVSS_SOURCE:
        return
    if subset != "avss":
        raise CheckpointError(
            f"{name}: --source {AVSS_SOURCE} needs AVSBench-semantic data (data=avss, 71 classes), "
            f"got data.subset={subset}"
        )
    layout = avss_layout(keys, name)
    backbone = str(cfg.backbone.get("name"))
    if not backbone.startswith(AVSS_LAYOUTS[layout][2]):
        raise CheckpointError(
            f"{name}: the file holds the {layout} layout but backbone.name={backbone} "
            f"(leave the backbone to the importer or use {AVSS_LAYOUTS[layout][1]})"
        )
