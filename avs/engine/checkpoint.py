"""Checkpoint files: atomic writes, a content hash verified on load, safe loading (weights_only), RNG state.

Integrity: `save_checkpoint` stores `state["integrity"]` = the SHA-256 of the whole state (every
tensor's dtype, shape and bytes, every other value's type and text, in key order), and
`load_checkpoint` recomputes it: a file changed after it was written (bytes zeroed or overwritten
inside the tensor data, ...) is refused with a `CheckpointError` saying it is damaged. The file
itself stays a plain `torch.save` archive. Checkpoints written before the hash existed load with a
one-line note. Model weights that are not finite are refused as well.
"""

from __future__ import annotations

import hashlib
import io
import logging
import pickle
import random
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from avs.engine.rundir import BEST_CKPT, CHECKPOINT_DIR, LAST_CKPT
from avs.errors import AVSError, ExitCode
from avs.utils.io import atomic_write_bytes

log = logging.getLogger(__name__)


class CheckpointError(AVSError, RuntimeError, code=ExitCode.CHECKPOINT):
    """A checkpoint file is missing, unreadable, or not an avs checkpoint."""


INTEGRITY_KEY = "integrity"
HASH_ALGORITHM = "sha256/avs-state-v1"


def state_digest(state: dict[str, Any]) -> str:
    """SHA-256 (hex) of `state` without its integrity entry: keys, tensor dtype/shape/bytes, other values."""
    h = hashlib.sha256()
    _feed(h, {k: v for k, v in state.items() if k != INTEGRITY_KEY})
    return h.hexdigest()


def _feed(h: hashlib._Hash, obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().to("cpu").contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)}".encode())
        for k, v in obj.items():
            h.update(f"K{k!r}".encode())
            _feed(h, v)
    elif isinstance(obj, (list, tuple)):  # tuples and lists alike (RNG states are stored as lists)
        h.update(f"L{len(obj)}".encode())
        for v in obj:
            _feed(h, v)
    else:
        h.update(f"V{type(obj).__name__}:{obj!r}".encode())


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Serialise `state` (with its content hash) fully in memory, then write it atomically.

    A failed write keeps the old file."""
    state = {**state, INTEGRITY_KEY: {"algorithm": HASH_ALGORITHM, "digest": state_digest(state)}}
    buf = io.BytesIO()
    torch.save(state, buf)
    try:
        atomic_write_bytes(path, buf.getvalue())
    except OSError as exc:
        raise CheckpointError(
            f"could not write checkpoint {path}: {exc} (the previous file, if any, is intact)"
        ) from exc


def _torch_format(path: Path) -> str | None:
    """Why `path` is not a file torch.save wrote (None when it looks like one: a zip holding a data.pkl, or a
    legacy pickle, which starts with the pickle PROTO opcode)."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
        if any(n.endswith("data.pkl") for n in names):
            return None
        return f"a zip archive of {len(names)} file(s) without the data.pkl torch.save writes"
    with open(path, "rb") as fh:
        head = fh.read(2)
    if head[:1] == b"\x80":
        return None
    return "an empty file" if not head else "neither a zip archive nor a pickle"


def safe_torch_load(path: str | Path, what: str = "checkpoint", map_location: Any = "cpu") -> Any:
    """torch.load(weights_only=True) with CheckpointErrors that say what is wrong: not a torch file at all, a
    file holding objects a safe load refuses (never loaded with weights_only=False), or a damaged one."""
    path = Path(path)
    why = _torch_format(path)
    if why is not None:
        raise CheckpointError(f"{path} is not an avs or torch checkpoint ({why}): give the {what} file itself")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        text = str(exc)
        if isinstance(exc, pickle.UnpicklingError) and "weights only" in text.lower():  # a refused global
            detail = next((ln.strip() for ln in text.splitlines() if ln.strip().startswith("Unsupported")), "")
            raise CheckpointError(
                f"{what} {path} holds objects that a safe load (weights_only=True) refuses"
                + (f" ({detail[:200]})" if detail else "")
                + "; avs loads only tensors and plain values: save the weights as a state dict"
            ) from exc
        # truncated zips, overwritten headers, ...
        raise CheckpointError(
            f"{what} {path} is damaged: it cannot be read "
            f"({type(exc).__name__}: {(text.splitlines() or [''])[0][:200]}); "
            "use another checkpoint (e.g. best.ckpt, or train again)"
        ) from exc


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with `weights_only=True` (no code from the file is executed), verify its hash and weights."""
    path = Path(path)
    if path.is_dir():
        hint = next(
            (
                c
                for c in (
                    path / CHECKPOINT_DIR / BEST_CKPT,
                    path / BEST_CKPT,
                    path / CHECKPOINT_DIR / LAST_CKPT,
                    path / LAST_CKPT,
                )
                if c.is_file()
            ),
            path / CHECKPOINT_DIR / BEST_CKPT,
        )
        raise CheckpointError(f"{path} is a directory, expected a .ckpt file (did you mean {hint}?)")
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    state = safe_torch_load(path, "checkpoint", map_location)
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} does not hold a dict (got {type(state).__name__})")
    verify_checkpoint(state, path)
    return state


def verify_checkpoint(state: dict[str, Any], path: str | Path = "<checkpoint>") -> None:
    """Check the stored content hash (when present) and that the model weights are finite; CheckpointError otherwise."""
    stored = state.get(INTEGRITY_KEY)
    if stored is None:
        log.warning(
            "%s has no content hash (written before checkpoints carried one): loaded without verification", path
        )
    else:
        digest = stored.get("digest") if isinstance(stored, dict) else None
        if not isinstance(digest, str) or state_digest(state) != digest:
            raise CheckpointError(
                f"checkpoint {path} is damaged: its content does not match the SHA-256 written with it "
                "(the file changed after it was saved); use another checkpoint (e.g. best.ckpt, or train again)"
            )
    weights = state.get("model", state.get("state_dict"))
    if isinstance(weights, dict):
        bad = [
            k
            for k, v in weights.items()
            if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all())
        ]
        if bad:
            raise CheckpointError(
                f"checkpoint {path} holds non-finite model weights "
                f"({len(bad)} tensor(s), e.g. {', '.join(bad[:3])}): refused"
            )


def model_state_from(state: dict[str, Any], path: str | Path = "<checkpoint>") -> dict[str, torch.Tensor]:
    """The model weights of an avs checkpoint, or of a plain state dict (keys 'model'/'state_dict' accepted)."""
    for key in ("model", "state_dict"):
        if key in state and isinstance(state[key], dict):
            state = state[key]
            break
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: no model state dict found (expected key 'model' or a flat tensor dict)")
    return {k.removeprefix("module."): v for k, v in state.items()}


def capture_rng() -> dict[str, Any]:
    """Python, NumPy and torch RNG states as weights_only-loadable objects."""
    np_state = np.random.get_state()
    out: dict[str, Any] = {
        "python": _to_lists(random.getstate()),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()  # one state per visible device
        out["cuda_device"] = torch.cuda.current_device()  # this process's device (its own under DDP)
    return out


def restore_rng(state: dict[str, Any], own_device_only: bool = False) -> None:
    """Inverse of `capture_rng`.

    CUDA generators: the saved states of the devices visible now (the first min(saved, visible));
    the others are dropped with a log line, so a run resumes on fewer GPUs or another allocation.
    `own_device_only` (DDP, each process with its rank's state): only the current device's
    generator is set, from the state of the device the saving process used.
    """
    random.setstate(_to_tuples(state["python"]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        _restore_cuda_rng(list(state["cuda"]), state.get("cuda_device"), own_device_only)


def _restore_cuda_rng(saved: list[torch.Tensor], saved_device: int | None, own_device_only: bool) -> None:
    visible = torch.cuda.device_count()
    if own_device_only:
        src = int(saved_device) if saved_device is not None and 0 <= int(saved_device) < len(saved) else 0
        if saved:
            torch.cuda.set_rng_state(saved[src], torch.cuda.current_device())
        return
    kept = min(len(saved), visible)
    for i in range(kept):
        torch.cuda.set_rng_state(saved[i], i)
    if len(saved) > kept:
        log.info(
            "checkpoint holds CUDA RNG states of %d devices, %d visible now: the states of devices %d..%d "
            "were not restored",
            len(saved),
            visible,
            kept,
            len(saved) - 1,
        )
    elif visible > kept:
        log.info(
            "checkpoint holds CUDA RNG states of %d devices, %d visible now: devices %d..%d keep their "
            "current generator state",
            len(saved),
            visible,
            kept,
            visible - 1,
        )


def _to_lists(x: Any) -> Any:
    return [_to_lists(v) for v in x] if isinstance(x, (tuple, list)) else x


def _to_tuples(x: Any) -> Any:
    return tuple(_to_tuples(v) for v in x) if isinstance(x, list) else x
