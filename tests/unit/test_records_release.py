"""metrics.json names the data release from the data config: avsbench-object (S4/MS3), avsbench-semantic
(AVSS and its one-source configs), synthetic (Sounding Shapes), null when a data config names none."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from avs.engine.records import data_release, metrics_record
from avs.engine.state import RunState
from tests.conftest import compose_cfg


@pytest.mark.parametrize(
    ("data", "release"),
    [
        ("s4", "avsbench-object"),
        ("ms3", "avsbench-object"),
        ("avss", "avsbench-semantic"),
        ("avss_v1s", "avsbench-semantic"),
        ("avss_v1m", "avsbench-semantic"),
        ("avss_v2", "avsbench-semantic"),
        ("synth_s4", "synthetic"),
        ("synth_ms3", "synthetic"),
        ("synth_avss", "synthetic"),
    ],
)
def test_metrics_record_names_the_release_of_the_data_config(tmp_path, data, release):
    cfg = compose_cfg("train", [f"data={data}", f"paths.data_dir={tmp_path}"])
    assert data_release(cfg.data) == release
    result = {"steps": 0, "train_time_s": 0.0}
    record = metrics_record(cfg, RunState(), result, world_size=1, loss_weights={})
    assert record["data"]["release"] == release
    assert record["data"]["subset"] == cfg.data.subset


def test_the_release_comes_from_the_config_not_from_the_code(tmp_path):
    cfg = compose_cfg("train", ["data=avss", f"paths.data_dir={tmp_path}"])
    cfg.data.release = "my-avss-relabelled"
    assert data_release(cfg.data) == "my-avss-relabelled"
    data = OmegaConf.create({k: v for k, v in OmegaConf.to_container(cfg.data).items() if k != "release"})
    assert data_release(data) is None  # a data config without the key: not guessed
