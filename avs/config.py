"""OmegaConf resolvers shared by every config (registered when `avs` is imported)."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = PROJECT_ROOT / "configs"


def register_resolvers() -> None:
    """Register `${avs_root:}` (the checkout root) once."""
    if not OmegaConf.has_resolver("avs_root"):
        OmegaConf.register_new_resolver("avs_root", lambda: str(PROJECT_ROOT))
