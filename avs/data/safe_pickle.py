"""Allow-list unpickler for the released AVSBench log-mel `.pkl` files (pickled torch tensors).

The released files are `pickle.dump(torch.Tensor)`. Unpickling one needs only these globals:
`torch._utils._rebuild_tensor_v2` (plus `_rebuild_tensor`, `_rebuild_tensor_v3`,
`_rebuild_parameter`, `torch._tensor._rebuild_from_type_v2` that other torch versions may emit),
`torch.storage._load_from_bytes` (whose original calls `torch.load` on embedded bytes; here it is
replaced by `torch.load(..., weights_only=True)`), `collections.OrderedDict` (empty backward hooks)
and, for pickled NumPy arrays, `numpy[._core|.core].multiarray._reconstruct`, `numpy.ndarray` and
`numpy.dtype`. Any other global raises `UnsafePickleError` before anything is called.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import re
import struct
from typing import Any, Callable

import numpy as np
import torch

from avs.data.avsbench import AVSDataError
from avs.utils.io import atomic_write_bytes

__all__ = ["UnsafePickleError", "SafeUnpickler", "load_pickle", "load_logmel_pkl", "dump_logmel_pkl"]


class UnsafePickleError(AVSDataError):
    """A pickle asked for a global outside the allow-list (nothing from it was executed)."""


def _numpy_multiarray():
    core = getattr(np, "_core", None)  # NumPy >= 2
    if core is not None:
        return core.multiarray
    return np.core.multiarray  # pragma: no cover - NumPy 1.x


class SafeUnpickler(pickle.Unpickler):
    """`pickle.Unpickler` whose `find_class` resolves only tensor / ndarray rebuild helpers."""

    def __init__(self, file: io.BufferedIOBase, source: str) -> None:
        super().__init__(file)
        self._source = source
        self._allowed = self._build_allow_list()

    # -- allow-list -----------------------------------------------------------------------------
    def _build_allow_list(self) -> dict[tuple[str, str], Any]:
        source = self._source
        import torch._tensor as torch_tensor
        import torch._utils as tu

        def load_from_bytes(data: bytes) -> Any:
            # Replaces torch.storage._load_from_bytes, which calls torch.load(weights_only=False).
            if not isinstance(data, (bytes, bytearray)):
                raise UnsafePickleError(f"{source}: _load_from_bytes expects bytes, got {type(data).__name__}")
            try:
                return torch.load(io.BytesIO(bytes(data)), map_location="cpu", weights_only=True)
            except pickle.UnpicklingError as exc:
                raise UnsafePickleError(
                    f"{source}: embedded torch storage refused by torch.load(weights_only=True): {exc}"
                ) from exc

        rebuilders = {
            "_rebuild_tensor": tu._rebuild_tensor,
            "_rebuild_tensor_v2": tu._rebuild_tensor_v2,
            "_rebuild_parameter": tu._rebuild_parameter,
        }
        if hasattr(tu, "_rebuild_tensor_v3"):
            rebuilders["_rebuild_tensor_v3"] = tu._rebuild_tensor_v3
        rebuild_funcs = set(rebuilders.values())
        tensor_types = (torch.Tensor, torch.nn.Parameter)

        def rebuild_from_type_v2(func: Callable, new_type: type, args: tuple, state: Any) -> Any:
            # torch._tensor._rebuild_from_type_v2, restricted to plain tensor rebuilds.
            if func not in rebuild_funcs or new_type not in tensor_types:
                raise UnsafePickleError(
                    f"{source}: _rebuild_from_type_v2 with {getattr(func, '__name__', func)!r} / {new_type!r} refused"
                )
            return torch_tensor._rebuild_from_type_v2(func, new_type, args, state)

        multiarray = _numpy_multiarray()
        allowed: dict[tuple[str, str], Any] = {
            ("torch.storage", "_load_from_bytes"): load_from_bytes,
            ("torch._tensor", "_rebuild_from_type_v2"): rebuild_from_type_v2,
            ("torch", "Tensor"): torch.Tensor,
            ("torch.nn.parameter", "Parameter"): torch.nn.Parameter,
            ("collections", "OrderedDict"): collections.OrderedDict,
            ("numpy", "ndarray"): np.ndarray,
            ("numpy", "dtype"): np.dtype,
        }
        for name, fn in rebuilders.items():
            allowed[("torch._utils", name)] = fn
        for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
            allowed[(mod, "_reconstruct")] = multiarray._reconstruct
        for dt in ("float16", "bfloat16", "float32", "float64"):
            allowed[("torch", dt)] = getattr(torch, dt)
        # dtype classes NumPy >= 1.25 pickles as numpy.dtypes.Float32DType etc.
        dtypes = getattr(np, "dtypes", None)
        if dtypes is not None:
            for cls in ("Float16DType", "Float32DType", "Float64DType"):
                if hasattr(dtypes, cls):
                    allowed[("numpy.dtypes", cls)] = getattr(dtypes, cls)
        return allowed

    def find_class(self, module: str, name: str) -> Any:
        """Return an allow-listed global; refuse everything else without importing it."""
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"{self._source}: refusing to unpickle global '{module}.{name}' "
                "(only torch tensor / NumPy array rebuild helpers are allowed)"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(f"{self._source}: persistent ids are not allowed in a log-mel pickle")


def load_pickle(path: str | os.PathLike) -> Any:
    """Unpickle `path` with the allow-list; returns the object (a tensor or ndarray in practice)."""
    source = os.fspath(path)
    if not os.path.isfile(source):
        raise AVSDataError(f"{source}: pickle file not found")
    with open(source, "rb") as fh:
        data = fh.read()
    try:
        return SafeUnpickler(io.BytesIO(data), source).load()
    except AVSDataError:
        raise
    except Exception as exc:  # truncated / corrupt / malformed arguments
        raise AVSDataError(f"{source}: cannot unpickle ({type(exc).__name__}: {exc})") from exc


def load_logmel_pkl(path: str | os.PathLike) -> np.ndarray:
    """Load a released log-mel `.pkl` (pickled tensor or ndarray) -> float32 ndarray (e.g. [5,1,96,64])."""
    obj = load_pickle(path)
    if isinstance(obj, torch.Tensor):
        arr = obj.detach().cpu().float().numpy()
    elif isinstance(obj, np.ndarray):
        if not (np.issubdtype(obj.dtype, np.floating) or np.issubdtype(obj.dtype, np.integer)):
            raise AVSDataError(f"{os.fspath(path)}: expected a numeric array, got dtype {obj.dtype}")
        arr = obj.astype(np.float32, copy=False)
    else:
        raise AVSDataError(f"{os.fspath(path)}: expected a pickled tensor or ndarray, got {type(obj).__name__}")
    return np.ascontiguousarray(arr, dtype=np.float32)


def dump_logmel_pkl(path: str | os.PathLike, array: np.ndarray | torch.Tensor) -> None:
    """Write `array` as the released format (plain pickle of a CPU float32 torch tensor), atomically."""
    if isinstance(array, torch.Tensor):
        tensor = array.detach().to("cpu", torch.float32).contiguous().clone()
    else:
        tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).clone()
    atomic_write_bytes(path, _deterministic_tensor_pickle(tensor))


class _Reduced:
    """Pickles as `fn(*args)`: lets us emit the same opcodes as a pickled tensor, minus the address."""

    def __init__(self, fn, args: tuple) -> None:
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


_STORAGE_KEY = re.compile(rb"X(....)(\d+)q\x02X\x03\x00\x00\x00cpu", re.DOTALL)


def _deterministic_tensor_pickle(tensor: torch.Tensor) -> bytes:
    """`pickle.dumps(tensor)` with the storage key (a memory address in torch's legacy format) fixed to "0".

    The result unpickles with plain `pickle` exactly like a pickled tensor (as the released files
    are read), and the same array always gives the same bytes.
    """
    raw = _storage_payload(tensor)
    match = _STORAGE_KEY.search(raw)
    if match is None:
        return pickle.dumps(tensor, protocol=pickle.DEFAULT_PROTOCOL)
    key = match.group(2)
    fixed = raw.replace(b"X" + struct.pack("<I", len(key)) + key, b"X\x01\x00\x00\x000")
    storage = _Reduced(torch.storage._load_from_bytes, (fixed,))
    rebuilt = _Reduced(
        torch._utils._rebuild_tensor_v2,
        (storage, 0, tuple(tensor.shape), tuple(tensor.stride()), False, collections.OrderedDict()),
    )
    return pickle.dumps(rebuilt, protocol=pickle.DEFAULT_PROTOCOL)


def _storage_payload(tensor: torch.Tensor) -> bytes:
    """The bytes torch embeds for the tensor's storage when the tensor is pickled."""
    import pickletools

    for opcode, arg, _ in pickletools.genops(pickle.dumps(tensor, protocol=pickle.DEFAULT_PROTOCOL)):
        if isinstance(arg, bytes):
            return arg
    raise RuntimeError("torch tensor pickle without an embedded storage payload")
