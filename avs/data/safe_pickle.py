"""Allow-list unpickler for the released AVSBench log-mel `.pkl` files (pickled torch tensors).

The released files are `pickle.dump(torch.Tensor)`. Unpickling one needs only these globals:
`torch._utils._rebuild_tensor_v2` (plus `_rebuild_tensor`, `_rebuild_tensor_v3`,
`_rebuild_parameter`, `torch._tensor._rebuild_from_type_v2` that other torch versions may emit),
`torch.storage._load_from_bytes` (whose original calls `torch.load` on embedded bytes; here it is
replaced by `torch.load(..., weights_only=True)`), `collections.OrderedDict` (empty backward hooks)
and, for pickled NumPy arrays, `numpy[._core|.core].multiarray._reconstruct`, `numpy.ndarray` and
`numpy.dtype`. Protocol 2 pickles also need `_codecs.encode` (allowed only as str -> latin-1
bytes) and protocol 5 pickles of arrays `numpy[._core|.core].numeric._frombuffer` (allowed only
for numeric dtypes whose shape matches the buffer). Any other global raises `UnsafePickleError`
before anything is called.

Every tensor's size / stride / offset is checked against its storage before it is rebuilt: torch
would otherwise grow the storage with uninitialised memory. Such a file raises `AVSDataError`.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import re
import struct
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from avs.data.layout import AVSDataError
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
        import torch._utils as tu

        source = self._source
        rebuilders = {
            "_rebuild_tensor": _checked_rebuild(tu._rebuild_tensor, source, dtype_at=None),
            "_rebuild_tensor_v2": _checked_rebuild(tu._rebuild_tensor_v2, source, dtype_at=None),
            "_rebuild_parameter": tu._rebuild_parameter,  # takes a tensor rebuilt (and checked) above
        }
        if hasattr(tu, "_rebuild_tensor_v3"):  # (storage, offset, size, stride, requires_grad, hooks, dtype, ...)
            rebuilders["_rebuild_tensor_v3"] = _checked_rebuild(tu._rebuild_tensor_v3, source, dtype_at=6)
        allowed: dict[tuple[str, str], Any] = {
            ("torch.storage", "_load_from_bytes"): _safe_load_from_bytes(source),
            ("torch._tensor", "_rebuild_from_type_v2"): _plain_rebuild_from_type_v2(set(rebuilders.values()), source),
            ("torch", "Tensor"): torch.Tensor,
            ("torch.nn.parameter", "Parameter"): torch.nn.Parameter,
            ("collections", "OrderedDict"): collections.OrderedDict,
        }
        for name, fn in rebuilders.items():
            allowed[("torch._utils", name)] = fn
        for dt in ("float16", "bfloat16", "float32", "float64"):
            allowed[("torch", dt)] = getattr(torch, dt)
        allowed[("_codecs", "encode")] = _latin1_encoder(source)  # protocol 2 bytes
        return allowed | _numpy_allow_list(source)

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


def _safe_load_from_bytes(source: str) -> Callable:
    """Replaces torch.storage._load_from_bytes, which calls torch.load(weights_only=False)."""

    def load_from_bytes(data: bytes) -> Any:
        if not isinstance(data, (bytes, bytearray)):
            raise UnsafePickleError(f"{source}: _load_from_bytes expects bytes, got {type(data).__name__}")
        try:
            return torch.load(io.BytesIO(bytes(data)), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise UnsafePickleError(
                f"{source}: embedded torch storage refused by torch.load(weights_only=True): {exc}"
            ) from exc

    return load_from_bytes


def _plain_rebuild_from_type_v2(rebuild_funcs: set[Callable], source: str) -> Callable:
    """torch._tensor._rebuild_from_type_v2, restricted to the (checked) tensor rebuilders as plain tensors."""
    import torch._tensor as torch_tensor

    tensor_types = (torch.Tensor, torch.nn.Parameter)

    def rebuild_from_type_v2(func: Callable, new_type: type, args: tuple, state: Any) -> Any:
        if func not in rebuild_funcs or new_type not in tensor_types:
            raise UnsafePickleError(
                f"{source}: _rebuild_from_type_v2 with {getattr(func, '__name__', func)!r} / {new_type!r} refused"
            )
        return torch_tensor._rebuild_from_type_v2(func, new_type, args, state)

    return rebuild_from_type_v2


def _numpy_allow_list(source: str) -> dict[tuple[str, str], Any]:
    """The NumPy globals a pickled float array needs, under both the NumPy 1.x and 2.x module names."""
    multiarray = _numpy_multiarray()
    allowed: dict[tuple[str, str], Any] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(mod, "_reconstruct")] = multiarray._reconstruct
    frombuffer = _checked_frombuffer(source)
    for mod in ("numpy.core.numeric", "numpy._core.numeric"):  # protocol 5 arrays
        allowed[(mod, "_frombuffer")] = frombuffer
    # dtype classes NumPy >= 1.25 pickles as numpy.dtypes.Float32DType etc.
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        for cls in ("Float16DType", "Float32DType", "Float64DType"):
            if hasattr(dtypes, cls):
                allowed[("numpy.dtypes", cls)] = getattr(dtypes, cls)
    return allowed


def _storage_elements(storage: Any, dtype: torch.dtype | None, source: str) -> int:
    """Number of elements a pickled tensor's storage holds."""
    if isinstance(storage, torch.storage.TypedStorage):
        return int(storage._size())
    if isinstance(storage, torch.UntypedStorage) and isinstance(dtype, torch.dtype):
        return int(storage.nbytes()) // torch.empty((), dtype=dtype).element_size()
    raise AVSDataError(f"{source}: malformed tensor: its storage is a {type(storage).__name__}, not a torch storage")


def check_tensor_fits_storage(
    source: str, storage: Any, offset: Any, size: Any, stride: Any, dtype: torch.dtype | None = None
) -> None:
    """Raise AVSDataError naming `source` unless size / stride / offset address only elements of `storage`."""

    def ints(value: Any) -> bool:
        return isinstance(value, (tuple, list, torch.Size)) and all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value
        )

    if not (isinstance(offset, int) and offset >= 0 and ints(size) and ints(stride) and len(size) == len(stride)):
        raise AVSDataError(
            f"{source}: malformed tensor: size {size!r}, stride {stride!r}, offset {offset!r} "
            "(expected equal-length tuples of non-negative ints and an offset >= 0)"
        )
    have = _storage_elements(storage, dtype, source)
    # elements addressed: offset + sum((size_i - 1) * stride_i) + 1; none when any size is 0
    need = 0 if 0 in size else offset + sum((n - 1) * st for n, st in zip(size, stride)) + 1
    if need > have:
        raise AVSDataError(
            f"{source}: malformed tensor: size {list(size)} with stride {list(stride)} and offset "
            f"{offset} needs {need} values but its storage holds {have}"
        )


def _checked_rebuild(fn: Callable, source: str, dtype_at: int | None) -> Callable:
    """Wrap a torch `_rebuild_tensor*` (storage, offset, size, stride, ...) so it refuses out-of-storage views."""

    def rebuild(storage, storage_offset, size, stride, *rest):
        dtype = rest[dtype_at - 4] if dtype_at is not None and len(rest) > dtype_at - 4 else None
        check_tensor_fits_storage(source, storage, storage_offset, size, stride, dtype)
        return fn(storage, storage_offset, size, stride, *rest)

    rebuild.__name__ = fn.__name__
    return rebuild


def _checked_frombuffer(source: str) -> Callable:
    """NumPy's `_frombuffer` (protocol 5 arrays) for numeric dtypes whose shape matches the buffer exactly."""

    def frombuffer(buf: Any, dtype: Any, shape: Any, order: Any, axis_order: Any = None) -> np.ndarray:
        if isinstance(buf, pickle.PickleBuffer):
            buf = buf.raw()
        if not isinstance(buf, (bytes, bytearray, memoryview)):
            raise UnsafePickleError(f"{source}: _frombuffer expects a byte buffer, got {type(buf).__name__}")
        if not isinstance(dtype, np.dtype) or dtype.kind not in "biuf":
            raise UnsafePickleError(f"{source}: _frombuffer with dtype {dtype!r} refused (numeric arrays only)")
        if not (isinstance(shape, tuple) and all(isinstance(n, int) and n >= 0 for n in shape)):
            raise AVSDataError(f"{source}: malformed array: shape {shape!r}")
        if order not in ("C", "F", "K", "A"):
            raise AVSDataError(f"{source}: malformed array: order {order!r}")
        need = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if need != len(bytes(buf)):
            raise AVSDataError(
                f"{source}: malformed array: shape {list(shape)} of {dtype} needs {need} bytes, "
                f"the buffer holds {len(bytes(buf))}"
            )
        array = np.frombuffer(bytes(buf), dtype=dtype).copy()  # writable, owns its memory
        if order == "K" and axis_order is not None:
            if sorted(axis_order) != list(range(len(shape))):
                raise AVSDataError(f"{source}: malformed array: axis order {axis_order!r}")
            return array.reshape(shape, order="C").transpose(axis_order)
        return array.reshape(shape, order=order)

    return frombuffer


def _latin1_encoder(source: str) -> Callable:
    """`_codecs.encode` as protocol 2 uses it for bytes: str -> latin-1 bytes, nothing else."""

    def encode(obj: Any, encoding: str = "utf-8", errors: str = "strict") -> bytes:
        if not isinstance(obj, str) or encoding not in ("latin1", "latin-1") or errors != "strict":
            raise UnsafePickleError(f"{source}: _codecs.encode is allowed only for str -> latin1 bytes")
        return obj.encode("latin1")

    return encode


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

    for _opcode, arg, _ in pickletools.genops(pickle.dumps(tensor, protocol=pickle.DEFAULT_PROTOCOL)):
        if isinstance(arg, bytes):
            return arg
    raise RuntimeError("torch tensor pickle without an embedded storage payload")
