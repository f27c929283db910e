"""Allow-list unpickler: real tensors / arrays load exactly; anything else is refused unexecuted."""

from __future__ import annotations

import builtins
import os
import pickle
import subprocess

import numpy as np
import pytest
import torch

from avs.data.avsbench import AVSDataError
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
