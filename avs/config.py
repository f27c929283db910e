"""OmegaConf resolvers shared by every config (registered when `avs` is imported)."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = PROJECT_ROOT / "configs"


PRESETS: tuple[str, ...] = ("paper", "release")


def compose_config(config_name: str = "train", overrides=()):
    """The config `scripts/<name>.py` would get from these overrides (Hydra compose; `hydra.*`
    overrides are left out, no run dir is made)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            return compose(config_name, overrides=[o for o in overrides if not o.startswith("hydra.")])
    finally:
        GlobalHydra.instance().clear()


def preset_value(preset, paper, release):
    """`${avs_preset:${model.preset},<paper value>,<release value>}`: the value the preset selects."""
    name = str(preset).strip().lower()
    if name not in PRESETS:
        raise ValueError(f"model.preset must be one of {list(PRESETS)}, got {preset!r}")
    return release if name == "release" else paper


def run_tag(*, _root_) -> str:
    """`${avs_run_tag:}` in configs/hydra: '_<model.name>_<data.name>' for configs that have them, else ''."""
    parts = [OmegaConf.select(_root_, key, default=None) for key in ("model.name", "data.name")]
    parts = [str(p) for p in parts if p not in (None, "")]
    return "_" + "_".join(parts) if parts else ""


def register_resolvers() -> None:
    """Register `${avs_root:}` (the checkout root), `${avs_preset:...}` and `${avs_run_tag:}` once."""
    if not OmegaConf.has_resolver("avs_root"):
        OmegaConf.register_new_resolver("avs_root", lambda: str(PROJECT_ROOT))
    if not OmegaConf.has_resolver("avs_preset"):
        OmegaConf.register_new_resolver("avs_preset", preset_value)
    if not OmegaConf.has_resolver("avs_run_tag"):
        OmegaConf.register_new_resolver("avs_run_tag", run_tag)


def auto_flag(value, key: str, auto: bool, supported: bool = True, requirement: str = "") -> bool:
    """Resolve an `auto | true | false` option named `key`.

    auto -> `auto`; true/false (bools or the strings true/on/yes, false/off/no/none) as given;
    true where `supported` is False -> ValueError "`key`=true needs `requirement`".
    """
    if isinstance(value, str):
        text = value.strip().lower()
        if text == "auto":
            return bool(auto)
        if text not in ("true", "on", "yes", "false", "off", "no", "none"):
            raise ValueError(f"{key} must be auto, true or false, got {value!r}")
        flag = text in ("true", "on", "yes")
    else:
        flag = bool(value)
    if flag and not supported:
        raise ValueError(f"{key}=true needs {requirement}")
    return flag
