import os
import stat

import pytest

from avs.utils.io import atomic_open, atomic_write_text


def test_atomic_write_is_all_or_nothing_with_normal_permissions(tmp_path):
    path = tmp_path / "a" / "metrics.json"
    atomic_write_text(path, "old")
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
    with pytest.raises(RuntimeError):
        with atomic_open(path, "w") as fh:
            fh.write("half")
            raise RuntimeError("interrupted")
    assert path.read_text() == "old"
    assert [p.name for p in path.parent.iterdir()] == ["metrics.json"]  # no temp file left
