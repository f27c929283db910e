"""Allow-list unpickler: real tensors / arrays load exactly; anything else is refused unexecuted."""

from __future__ import annotations

import builtins
import os
import pickle
import subprocess

import numpy as np
import pytest
import torch

from avs.data.layout import AVSDataError
from avs.data.safe_pickle import UnsafePickleError, dump_logmel_pkl, load_logmel_pkl, load_pickle


class _Reduce:
    """Pickles as `fn(*args)`."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def _write(path, obj) -> None:
    with open(path, "wb") as fh:
        pickle.dump(obj, fh)


def test_dump_and_load_roundtrip_exact(tmp_path):
    arr = np.random.default_rng(0).standard_normal((5, 1, 96, 64)).astype(np.float32)
    p = tmp_path / "a" / "clip.pkl"
    dump_logmel_pkl(p, arr)
    # the written file is the released format: a plain pickle of a torch tensor
    obj = pickle.loads(p.read_bytes())
    assert isinstance(obj, torch.Tensor) and obj.dtype == torch.float32
    out = load_logmel_pkl(p)
    assert out.dtype == np.float32 and out.shape == (5, 1, 96, 64)
    np.testing.assert_array_equal(out, arr)
    assert sorted(os.listdir(p.parent)) == ["clip.pkl"]  # no temp files left


def test_released_style_tensor_with_autograd_state(tmp_path):
    # vggish_input builds the tensor with requires_grad=True, then indexes and casts (a non-leaf).
    base = torch.tensor(np.random.default_rng(1).standard_normal((5, 96, 64)), requires_grad=True)
    t = base[:, None, :, :].float()
    p = tmp_path / "released.pkl"
    _write(p, t)
    np.testing.assert_array_equal(load_logmel_pkl(p), t.detach().numpy())


def test_strided_view_and_parameter(tmp_path):
    full = torch.arange(60, dtype=torch.float32).reshape(6, 10)
    view = full[1:, 2:7]  # non-zero storage offset, non-contiguous
    p = tmp_path / "view.pkl"
    _write(p, view)
    np.testing.assert_array_equal(load_logmel_pkl(p), view.numpy())
    p2 = tmp_path / "param.pkl"
    _write(p2, torch.nn.Parameter(torch.ones(3, 2)))
    np.testing.assert_array_equal(load_logmel_pkl(p2), np.ones((3, 2), np.float32))


def test_numpy_arrays_load(tmp_path):
    a64 = np.random.default_rng(2).standard_normal((3, 1, 96, 64))
    p = tmp_path / "np.pkl"
    _write(p, a64)
    out = load_logmel_pkl(p)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, a64.astype(np.float32))


@pytest.mark.parametrize(
    "fn, args_of",
    [
        (os.system, lambda m: (f"touch {m}",)),
        (builtins.eval, lambda m: (f"open({str(m)!r}, 'w').close()",)),
        (subprocess.call, lambda m: (["touch", str(m)],)),
        (builtins.exec, lambda m: (f"open({str(m)!r}, 'w').close()",)),
    ],
)
def test_malicious_global_refused_without_executing(tmp_path, fn, args_of):
    marker = tmp_path / "pwned"
    p = tmp_path / "evil.pkl"
    _write(p, _Reduce(fn, *args_of(marker)))
    with pytest.raises(UnsafePickleError) as err:
        load_logmel_pkl(p)
    msg = str(err.value)
    assert str(p) in msg
    assert fn.__name__ in msg  # names the refused global
    assert not marker.exists()
    # control: the payload is live under plain pickle
    control = tmp_path / "control"
    p_control = tmp_path / "control.pkl"
    _write(p_control, _Reduce(fn, *args_of(control)))
    pickle.loads(p_control.read_bytes())
    assert control.exists()


def test_payload_hidden_in_embedded_torch_bytes_refused(tmp_path):
    # torch.storage._load_from_bytes is allowed, but its bytes go through torch.load(weights_only=True).
    marker = tmp_path / "pwned"
    inner = pickle.dumps(_Reduce(os.system, f"touch {marker}"), protocol=2)
    p = tmp_path / "nested.pkl"
    _write(p, _Reduce(torch.storage._load_from_bytes, inner))
    with pytest.raises(UnsafePickleError, match="weights_only") as err:
        load_logmel_pkl(p)
    assert str(p) in str(err.value)
    assert not marker.exists()


def test_unsafe_is_a_data_error():
    assert issubclass(UnsafePickleError, AVSDataError)


def test_corrupt_missing_and_wrong_type(tmp_path):
    arr = np.zeros((5, 1, 96, 64), np.float32)
    p = tmp_path / "trunc.pkl"
    dump_logmel_pkl(p, arr)
    p.write_bytes(p.read_bytes()[:200])
    with pytest.raises(AVSDataError, match="trunc.pkl") as err:
        load_logmel_pkl(p)
    assert not isinstance(err.value, UnsafePickleError)
    with pytest.raises(AVSDataError, match="nope.pkl"):
        load_logmel_pkl(tmp_path / "nope.pkl")
    p2 = tmp_path / "dict.pkl"
    _write(p2, {"a": 1})
    assert load_pickle(p2) == {"a": 1}  # plain containers need no globals
    with pytest.raises(AVSDataError, match="expected a pickled tensor or ndarray"):
        load_logmel_pkl(p2)


def test_dump_is_byte_deterministic_and_plain_pickle_compatible(tmp_path):
    import pickle

    import numpy as np
    import torch

    from avs.data.safe_pickle import dump_logmel_pkl, load_logmel_pkl

    arr = np.random.default_rng(0).standard_normal((5, 1, 96, 64)).astype(np.float32)
    dump_logmel_pkl(tmp_path / "a.pkl", arr)
    dump_logmel_pkl(tmp_path / "b.pkl", arr.copy())
    assert (tmp_path / "a.pkl").read_bytes() == (tmp_path / "b.pkl").read_bytes()
    with open(tmp_path / "a.pkl", "rb") as fh:  # the released loaders use plain pickle
        plain = pickle.load(fh)
    assert isinstance(plain, torch.Tensor) and torch.equal(plain, torch.from_numpy(arr))
    np.testing.assert_array_equal(load_logmel_pkl(tmp_path / "a.pkl"), arr)


# ------------------------------------------------------------------ protocol 2 / 5, malformed tensors
def _logmel(seed: int, n: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 1, 96, 64)).astype(np.float32)


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
@pytest.mark.parametrize("kind", ["tensor", "float32", "float64"])
def test_benign_pickles_of_every_protocol_load_exactly(tmp_path, protocol, kind):
    arr = _logmel(protocol)
    obj = torch.from_numpy(arr) if kind == "tensor" else arr.astype(kind)
    p = tmp_path / f"{kind}_p{protocol}.pkl"
    p.write_bytes(pickle.dumps(obj, protocol=protocol))
    out = load_logmel_pkl(p)
    assert out.dtype == np.float32 and out.flags.writeable
    np.testing.assert_array_equal(out, arr)  # float64 of float32 values round-trips exactly


def test_protocol5_fortran_and_strided_arrays_load_exactly(tmp_path):
    arr = np.asfortranarray(_logmel(7)[:, 0])  # [3,96,64], Fortran order
    p = tmp_path / "f.pkl"
    p.write_bytes(pickle.dumps(arr, protocol=5))
    np.testing.assert_array_equal(load_logmel_pkl(p), arr)
    view = _logmel(8)[:, :, ::2, 1:]  # non-contiguous view
    p.write_bytes(pickle.dumps(view, protocol=5))
    np.testing.assert_array_equal(load_logmel_pkl(p), view)


def test_codecs_and_frombuffer_are_allowed_only_for_their_pickle_uses(tmp_path):
    import _codecs

    frombuffer = np._core.numeric._frombuffer if hasattr(np, "_core") else np.core.numeric._frombuffer
    cases = {
        "codecs_rot13": _Reduce(_codecs.encode, "abc", "rot13"),
        "codecs_not_str": _Reduce(_codecs.encode, b"abc", "latin1"),
        "frombuffer_object": _Reduce(frombuffer, b"\x00" * 8, np.dtype("O"), (1,), "C"),
    }
    for name, obj in cases.items():
        p = tmp_path / f"{name}.pkl"
        p.write_bytes(pickle.dumps(obj, protocol=2))
        with pytest.raises(UnsafePickleError, match=name + ".pkl"):
            load_pickle(p)
    short = tmp_path / "short_buffer.pkl"  # 4 values of bytes claimed to be [5,1,96,64]
    short.write_bytes(pickle.dumps(_Reduce(frombuffer, b"\x00" * 16, np.dtype("f4"), (5, 1, 96, 64), "C")))
    with pytest.raises(AVSDataError, match=r"short_buffer.pkl: malformed array: shape \[5, 1, 96, 64\]"):
        load_pickle(short)


@pytest.mark.parametrize("protocol", [2, 5])
def test_other_globals_stay_refused_at_protocols_2_and_5(tmp_path, protocol):
    marker = tmp_path / "pwned"
    p = tmp_path / "evil.pkl"
    p.write_bytes(pickle.dumps(_Reduce(os.system, f"touch {marker}"), protocol=protocol))
    with pytest.raises(UnsafePickleError, match="system"):
        load_logmel_pkl(p)
    assert not marker.exists()


def _malformed_tensor(size, stride, offset=0, values=4):
    storage = torch.arange(1, values + 1, dtype=torch.float32).storage()  # TypedStorage of `values` floats
    from collections import OrderedDict

    return _Reduce(torch._utils._rebuild_tensor_v2, storage, offset, size, stride, False, OrderedDict())


@pytest.mark.parametrize(
    "size, stride, offset",
    [
        ((5, 1, 96, 64), (6144, 6144, 64, 1), 0),  # needs 30720 values, storage holds 4
        ((2, 2), (2, 1), 1),  # offset pushes the last element past the end
        ((4,), (2,), 0),  # stride too wide
        ((2,), (-1,), 1),  # negative stride
    ],
)
def test_tensor_larger_than_its_storage_is_refused_with_the_file_named(tmp_path, size, stride, offset):
    import warnings

    p = tmp_path / "malformed.pkl"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TypedStorage deprecation
        p.write_bytes(pickle.dumps(_malformed_tensor(size, stride, offset)))
    with pytest.raises(AVSDataError, match=r"malformed.pkl: malformed tensor") as err:
        load_logmel_pkl(p)
    assert "storage holds 4" in str(err.value) or "non-negative" in str(err.value)
    # control: plain pickle builds it (reading memory the file never held) for the oversized cases
    if all(s >= 0 for s in stride):
        assert tuple(pickle.loads(p.read_bytes()).shape) == size


def test_tensor_that_fits_its_storage_exactly_still_loads(tmp_path):
    import warnings

    p = tmp_path / "fits.pkl"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p.write_bytes(pickle.dumps(_malformed_tensor((2, 2), (1, 2), 0)))  # transposed view of 4 values
    np.testing.assert_array_equal(load_logmel_pkl(p), np.array([[1, 3], [2, 4]], np.float32))
