"""Listening readings: shuffled audio pairs every clip with another's, the threshold sweep, and the
report read from a results file (one line per run) instead of a run dir."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from avs.data.shuffled_audio import ShuffledAudio, derangement
from avs.metrics import frame_stats
from avs.proxy.listening import fscore_max, miou_curve, readings
from avs.proxy.results import compare, update_rows, write_protocol_snapshot
from avs.tables.proxy import load_protocol
from avs.tables.proxy_report import to_csvs, to_markdown
from tests.conftest import compose_cfg


def test_derangement_is_seeded_and_has_no_fixed_point():
    for n in (2, 3, 17):
        perm = derangement(n, 0)
        assert sorted(perm.tolist()) == list(range(n)) and not np.any(perm == np.arange(n))
        assert np.array_equal(perm, derangement(n, 0))
    assert not np.array_equal(derangement(17, 0), derangement(17, 1))
    items = [{"audio": torch.tensor([float(i)]), "video_id": f"v{i}", "frames": i} for i in range(5)]
    shuffled = ShuffledAudio(items, seed=3)
    for i in range(5):
        assert shuffled[i]["frames"] == i and shuffled[i]["audio_from"] != f"v{i}"


def test_a_low_but_right_model_gains_at_the_val_threshold():
    masks = torch.zeros(4, 8, 8, dtype=torch.bool)
    masks[:, 2:6, 2:6] = True
    logits = torch.where(masks, torch.logit(torch.tensor(0.4)), torch.logit(torch.tensor(0.1)))  # P 0.4 < 0.5
    s = frame_stats(logits, masks, 255)
    curve = miou_curve(s)
    k = int(curve.argmax())
    r = readings(s, k)
    assert r["miou_05"] < 1.0 and r["miou_val_threshold"] == 100.0 and fscore_max(s) > 99.0


def _row(cell, seed, miou, listen, shuffled, version):
    reading = {"miou_05": listen, "miou_val_threshold": listen + 1, "fscore": listen + 2}
    shuf = {"miou_05": shuffled, "miou_val_threshold": shuffled + 1, "fscore": shuffled + 2}
    return {
        "protocol_version": version,
        "subset": "ms3",
        "cell": cell,
        "seed": seed,
        "method": cell,
        "test": {"miou": miou, "fscore": miou},
        "val": {"miou": miou, "fscore": miou},
        "listening": {"test": reading, "test_shuffled_audio": shuf, "val": reading, "val_threshold": 0.3},
    }


def test_a_results_file_with_two_versions_gives_the_highest_unless_one_is_named(tmp_path):
    """The tracked file holds every protocol version's lines; the report of an older version can be rebuilt."""
    from avs.proxy.protocol import protocol_node

    cfg = compose_cfg("proxy_benchmark", [f"out_dir={tmp_path}"])
    results = tmp_path / "proxy_runs.jsonl"
    old, new = protocol_node(cfg), protocol_node(cfg)
    old.version, new.version = 4, 5
    write_protocol_snapshot(results, old, {"ms3": {"test": 40.0}})
    write_protocol_snapshot(results, new, {"ms3": {"test": 41.0}})
    update_rows(results, [_row("tpavi", 1, 50.0, 50.0, 30.0, 4), _row("tpavi", 1, 60.0, 60.0, 30.0, 5)])
    protocol, res = load_protocol(results)
    assert protocol.version == 5 and res[("ms3", "tpavi")][1]["miou"] == 60.0
    protocol, res = load_protocol(results, 4)
    assert protocol.version == 4 and res[("ms3", "tpavi")][1]["miou"] == 50.0 and protocol.ceilings.ms3.test == 40.0
    with pytest.raises(FileNotFoundError, match=r"proxy_protocol_v3.yaml: no protocol of version 3"):
        load_protocol(results, 3)


def test_tables_read_a_results_file(tmp_path):
    cfg = compose_cfg("proxy_benchmark", [f"out_dir={tmp_path}"])
    from avs.proxy.protocol import protocol_node

    results = tmp_path / "proxy_runs.jsonl"
    write_protocol_snapshot(results, protocol_node(cfg), {"ms3": {"test": 40.0}})
    v = int(cfg.version)
    rows = [_row("tpavi", k, 50.0 + k, 50.0 + k, 30.0 + 2 * k, v) for k in (1, 2, 3)]
    rows += [_row("tpavi_no_audio", k, 40.0, 40.0 + k / 10, 40.0, v) for k in (1, 2, 3)]
    update_rows(results, rows)
    update_rows(results, [_row("tpavi", 1, 51.0, 51.0, 31.0, v)])  # a rerun replaces its line
    assert len(results.read_text().splitlines()) == 6
    protocol, res = load_protocol(results)
    assert res[("ms3", "tpavi")][1]["miou"] == 51.0 and protocol.ceilings.ms3.test == 40.0
    text = to_markdown(protocol, res)
    assert "### Listening" in text and "| tpavi | MS3 | mIoU@0.5 | 3 |" in text
    csv = to_csvs(protocol, res)["listening"]
    assert "minus_shuffled_mean" in csv.splitlines()[0]
    lines, same = compare(rows[1], json.loads(json.dumps(rows[1])))
    assert same and all("differs" not in x for x in lines)
    lines, same = compare(rows[1], {**rows[1], "test": {"miou": 0.0, "fscore": rows[1]["test"]["fscore"]}})
    assert not same and any(x.startswith("test.miou: recorded 52.0, now 0.0 (differs)") for x in lines)
    assert OmegaConf.load(tmp_path / f"proxy_protocol_v{v}.yaml").version == v


def test_a_curve_is_compared_when_recorded_and_shown_when_the_line_predates_it():
    curves = {"val_miou": [[80, 30.5], [160, 31.25]], "kl": {"s_v": [[80, 0.5], [160, 0.25]]}}
    row = {**_row("ecmvae", 1, 50.0, 50.0, 30.0, 4), "curves": curves}
    assert compare(row, json.loads(json.dumps(row)))[1]
    other = {**row, "curves": {**curves, "val_miou": [[80, 30.5], [160, 31.5]]}}
    lines, same = compare(row, other)
    assert not same and any(x.startswith("curves.val_miou: recorded") and x.endswith("(differs)") for x in lines)
    old = {k: v for k, v in row.items() if k != "curves"}  # a line written before the runner recorded curves
    lines, same = compare(old, row)
    assert same and "curves.val_miou: not recorded (the line predates it), now [[80, 30.5], [160, 31.25]]" in lines
    from avs.proxy.recorded import reproduction

    assert reproduction(old, row)["same"] is True and reproduction(old, row)["differing"] == {}
    assert reproduction(row, other)["differing"] == {
        "curves.val_miou": [curves["val_miou"], other["curves"]["val_miou"]]
    }


def test_every_seed_target_names_the_worst_margin_and_fails_on_one_seed(tmp_path):
    """The per-seed listening target: every seed's run with audio must beat its shuffled-audio reading
    and its no-audio run on every reading; one seed at or below either margin fails it."""
    from avs.proxy.protocol import protocol_node
    from avs.tables.proxy_listening import every_seed_checks

    cfg = compose_cfg("proxy_benchmark", [f"out_dir={tmp_path}"])
    v = int(cfg.version)
    results = tmp_path / "proxy_runs.jsonl"
    write_protocol_snapshot(results, protocol_node(cfg), {"ms3": {"test": 40.0}})
    rows = [_row("tpavi", k, 50.0 + k, 50.0 + k, 30.0, v) for k in (1, 2, 3)]
    rows += [_row("tpavi_no_audio", k, 45.0, 45.0, 45.0, v) for k in (1, 2, 3)]
    update_rows(results, rows)

    def check(cell):
        protocol, res = load_protocol(results)
        return next(c for c in every_seed_checks(protocol, res) if c.where == f"{cell} / ms3")

    ok = check("tpavi")
    assert ok.ok is True and "min − no-audio +6.00 (seed 1, mIoU@0.5; 3 seeds)" in ok.measured
    assert "min − shuffled +21.00 (seed 1, mIoU@0.5; 3 seeds)" in ok.measured
    assert check("ecmvae").ok is None and "no paired seeds" in check("ecmvae").measured

    update_rows(results, [_row("tpavi_no_audio", 2, 45.0, 53.0, 45.0, v)])  # seed 2 without audio reads higher
    bad = check("tpavi")
    assert bad.ok is False and "min − no-audio -1.00 (seed 2, mIoU@0.5" in bad.measured


class _AudioModel(torch.nn.Module):
    """Logits from the frames and the clip's audio: shuffling the audio changes them."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 1, 3, padding=1)

    def forward(self, batch):
        b, t = batch["frames"].shape[:2]
        x = self.conv(batch["frames"].flatten(0, 1)).view(b, t, 1, *batch["frames"].shape[-2:])
        return {"logits": x + batch["audio"].mean(dim=(3, 4), keepdim=True) * 3.0}


def _clips(n: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    clips = []
    for i in range(n):
        masks = (torch.rand(3, 1, 8, 8, generator=g) > 0.6).float()
        frames = torch.randn(3, 3, 8, 8, generator=g) + masks
        audio = torch.randn(3, 1, 4, 4, generator=g)
        valid = torch.tensor([True, i % 2 == 0, True])  # some frames without annotation
        clips.append({"frames": frames, "masks": masks, "audio": audio, "mask_valid": valid, "video_id": f"v{i}"})
    return clips


def _fake_loop(model, data_sets: dict, best_step=None):
    from types import SimpleNamespace

    data = SimpleNamespace(cfg=OmegaConf.create({"data": {"eval_batch_size": 2}}), dataset=lambda s: data_sets[s])
    state = SimpleNamespace(step=10, history=[], best={"step": best_step})
    return SimpleNamespace(
        model=model, data=data, state=state, evaluations={}, result={}, dist=SimpleNamespace(enabled=False)
    )


def _evaluate_with(hook, loop, split: str) -> None:
    """What the trainer's evaluation does with a hook's evaluators: every batch through each of them."""
    from torch.utils.data import DataLoader

    from avs.data.avsbench import collate_skip_none

    evaluators = hook.evaluators(split)
    for ev in evaluators:
        ev.reset()
    with torch.no_grad():
        for batch in DataLoader(loop.data.dataset(split), batch_size=3, collate_fn=collate_skip_none):
            out = loop.model(batch)
            for ev in evaluators:
                ev.process(batch, out)
    loop.evaluations[split] = {ev.name: ev.summarize() for ev in evaluators}


def test_listening_hook_counts_the_trainers_passes_or_scores_again(tmp_path):
    """The record from the counts of the trainer's own val (best epoch) and test passes equals the one the
    hook makes when it has to score both splits itself (a resumed run, no test at the end), and the
    standalone pass's record of the same weights (split_stats, make_record)."""
    from avs.proxy.listening import ListeningHook, make_record, split_stats

    torch.manual_seed(0)
    model = _AudioModel().eval()
    sets = {"val": _clips(5, 1), "test": _clips(6, 2)}
    counted = ListeningHook(str(tmp_path / "a.json"), shuffle_seed=1, checkpoint="best.ckpt")
    counted.loop = loop = _fake_loop(model, sets, best_step=10)
    _evaluate_with(counted, loop, "val")  # batches of 3 here, of 2 in the hook's own passes
    loop.state.history.append({"epoch": 2, "step": 10})
    counted.after_epoch()
    _evaluate_with(counted, loop, "test")
    loop.result["test"] = {"per_frame": {}}
    counted.after_train()
    alone = ListeningHook(str(tmp_path / "b.json"), shuffle_seed=1, checkpoint="best.ckpt")
    alone.loop = _fake_loop(model, sets)  # nothing counted: val, test and shuffled test scored at the end
    alone.after_train()
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("a.json", "b.json"))
    assert a == b
    stats = {
        "val": split_stats(model, sets["val"], 2),
        "test": split_stats(model, sets["test"], 2),
        "test_shuffled_audio": split_stats(model, ShuffledAudio(sets["test"], 1), 2),
    }
    assert make_record(stats, "best.ckpt", 1) == a
    assert a["test"]["miou_05"] != a["test_shuffled_audio"]["miou_05"]  # the audio reached the logits


def test_listening_hook_keeps_only_the_best_epochs_val_counts(tmp_path):
    from avs.proxy.listening import ListeningHook

    hook = ListeningHook(str(tmp_path / "a.json"))
    hook.loop = loop = _fake_loop(_AudioModel().eval(), {"val": _clips(4, 3)}, best_step=4)
    _evaluate_with(hook, loop, "val")
    loop.state.history.append({"step": 10})
    hook.after_epoch()  # step 10's validation is not the best (step 4's is): its counts are not kept
    assert hook._best_val is None
    loop.state.best = {"step": 10}
    hook.after_epoch()
    assert hook._best_val is loop.evaluations["val"]["listening_frame_stats"]


def test_listening_hook_refuses_ddp(tmp_path):
    from avs.errors import ConfigError
    from avs.proxy.listening import ListeningHook

    hook = ListeningHook(str(tmp_path / "a.json"))
    hook.loop = _fake_loop(_AudioModel(), {})
    hook.loop.dist.enabled = True
    with pytest.raises(ConfigError, match="not under DDP"):
        hook.before_train()
