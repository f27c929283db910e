"""The stand-ins a proxy run starts from are pinned: the protocol's `standins` maps file name -> SHA-256.

A run whose config loads a weight file (`backbone.pretrained=file`, `audio.pretrained=file`) starts
only when the file's SHA-256 is the one the protocol pins; another file is refused, naming the
file and both hashes. Cells that load no file (random init, the toy protocol) need no pin.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from avs.errors import AVSError, ExitCode, MissingFileError

PIN_KEY = "standins"


class StandinMismatch(AVSError, ValueError, code=ExitCode.CHECKPOINT):
    """A stand-in weight file is not the one the protocol pins."""


def sha256_file(path: Path) -> str:
    """SHA-256 (hex) of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def weight_files(train_cfg: DictConfig) -> list[tuple[str, Path]]:
    """(config key, path) of every weight file a training config loads from disk."""
    files = []
    for key in ("backbone", "audio"):
        node = train_cfg.get(key)
        if node is not None and node.get("pretrained") == "file" and node.get("weights_path"):
            files.append((f"{key}.weights_path", Path(str(node.weights_path)).expanduser()))
    if not bool(train_cfg.model.get("use_audio", True)):
        files = [f for f in files if not f[0].startswith("audio.")]  # no audio encoder is built
    return files


def check_pinned(pins: Mapping[str, Any] | None, files: list[tuple[str, Path]], where: str) -> dict[str, str]:
    """Refuse a file that is missing, not pinned, or whose SHA-256 differs from the pin -> {name: sha256}."""
    pins = dict(pins or {})
    found = {}
    for key, path in files:
        if not path.is_file():
            raise MissingFileError(
                f"{key}={path}: no such file ({where}); make the stand-ins with `python scripts/pretrain.py` "
                "or point paths.weights_dir at them"
            )
        if path.name not in pins:
            raise StandinMismatch(
                f"{key}={path}: the protocol pins no SHA-256 for {path.name} ({where}); add "
                f"`{PIN_KEY}.{path.name}: <sha256>` to the protocol (pinned: {sorted(pins) or 'none'})"
            )
        digest = sha256_file(path)
        if digest != str(pins[path.name]):
            raise StandinMismatch(
                f"{path}: SHA-256 {digest} found, the protocol pins {pins[path.name]} ({PIN_KEY}.{path.name}; "
                f'{where}); use the pinned stand-ins (docs/reproducing.md, "Proxy benchmark")'
            )
        found[path.name] = digest
    return found
