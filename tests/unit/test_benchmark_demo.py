"""Demo throughput (avs.benchmark.demo): the demo's first pass on a generated video, split into shares
that add up to the measured pass. Consistency only: no test asserts a speed."""

from __future__ import annotations

import pytest

from avs.benchmark import apply_quick
from avs.benchmark.demo import SHARES, format_demo_report, run_demo_benchmark
from tests.conftest import compose_cfg

pytest.importorskip("av", reason="PyAV (the avs[video] extra) is not installed")


def test_demo_shares_add_up_to_the_pass():
    overrides = ["model=tpavi", "quick=true", "audio=tiny", "num_frames=2", "warmup=0", "demo=true"]
    overrides += ["demo_seconds=4", "demo_fps=5", "demo_size=[48,80]", "threads=1"]
    res = run_demo_benchmark(apply_quick(compose_cfg("benchmark", overrides)))
    assert res["video_frames"] == 20
    assert res["analysed_frames"] == 4 and res["windows"] == 2  # avsbench sampling: one frame per second, T=2
    shares = res["shares"]
    assert list(shares) == list(SHARES)
    assert all(e["seconds"] >= 0 for e in shares.values())
    for k in ("video decode", "log-mel", "audio encoder", "model (excl. audio encoder)", "audio decode + resample"):
        assert shares[k]["seconds"] > 0, k
    assert sum(e["seconds"] for e in shares.values()) == pytest.approx(res["whole_s"], rel=1e-9)
    assert res["video_frames_per_s"] == pytest.approx(20 / res["whole_s"])
    assert res["hardware"]["threads"] == 1
    text = format_demo_report(res)
    assert "video decode" in text and "analysed frames/s" in text
    # the demo's functions are restored afterwards
    import avs.inference.demo as demo_mod
    from avs.inference import video

    assert demo_mod.iter_frames is video.iter_frames and demo_mod.window_logmel is video.window_logmel
