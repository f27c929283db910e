"""AVSS user outputs on a tiny trained semantic checkpoint: palette PNGs from `save_masks`, the semantic
visualisation grids (scripts/visualize.py) and the demo on a video (scripts/demo.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from avs.data.avss_layout import palette
from avs.engine.trainer import Trainer
from avs.evaluation.evaluator import DatasetEvaluator
from tests.conftest import compose_cfg
from tests.integration.test_avss_train import _overrides, avss_dir  # noqa: F401  (the module's data fixture)

NUM_CLASSES = 9  # data=synth_avss: 8 categories + background


@pytest.fixture(scope="module")
def avss_ckpt(avss_dir, tmp_path_factory) -> Path:  # noqa: F811
    run = tmp_path_factory.mktemp("avss_run")
    cfg = compose_cfg(
        "train", _overrides(avss_dir) + ["model=tpavi", "trainer.max_steps=1", "trainer.test_at_end=false"]
    )
    Trainer(cfg, run).fit()
    return run / "checkpoints" / "best.ckpt"


def _val_logits(ckpt: Path, batch_size: int = 2) -> list[tuple[dict, torch.Tensor]]:
    """(batch, logits [B,T,C,H,W]) of the val split in order, batched as the eval path batches it."""
    from torch.utils.data import DataLoader

    from avs.data import build_dataset
    from avs.inference.model import load_model

    loaded = load_model(ckpt, "cpu")
    ds = build_dataset(loaded.cfg.data, "val", train=False)
    out = []
    for batch in DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=0):
        with torch.no_grad():
            out.append((batch, loaded.model(batch)["logits"].float()))
    return out


def test_save_masks_writes_palette_pngs_of_the_predicted_classes(avss_dir, avss_ckpt, tmp_path):  # noqa: F811
    from avs.evaluation.checkpoint import evaluate_checkpoint

    ecfg = compose_cfg(
        "eval",
        [f"checkpoint={avss_ckpt}", "split=val", "device=cpu", "save_masks=true", f"paths.data_dir={avss_dir}"],
    )
    result = evaluate_checkpoint(ecfg, tmp_path / "eval")
    masks_dir = result["paths"]["masks"]
    pal = palette(NUM_CLASSES)
    checked = padded = 0
    for batch, logits in _val_logits(avss_ckpt):
        probs = torch.softmax(logits, dim=2)
        top2 = probs.topk(2, dim=2).values
        decided = (top2[:, :, 0] - top2[:, :, 1] > 1e-5).numpy()  # pixels not within rounding of a tie
        want = probs.argmax(dim=2).numpy()  # [B,T,H,W]
        for b, vid in enumerate(batch["video_id"]):
            for t in range(logits.shape[1]):
                path = Path(masks_dir) / vid / f"{vid}_{t + 1}.png"
                if not batch["frame_valid"][b, t]:
                    assert not path.exists(), path  # padded frames get no file
                    padded += 1
                    continue
                with Image.open(path) as im:
                    assert im.mode == "P"
                    ids = np.asarray(im)
                    rgb = np.asarray(im.convert("RGB"))
                    file_palette = np.asarray(im.getpalette()[: 3 * NUM_CLASSES], np.uint8).reshape(-1, 3)
                np.testing.assert_array_equal(file_palette, pal)
                np.testing.assert_array_equal(ids[decided[b, t]], want[b, t][decided[b, t]])
                np.testing.assert_array_equal(rgb, pal[ids])  # opens in the dataset's colours
                checked += 1
    assert checked == 20 and padded == 10  # val: v1s 5 + v1m 5 + v2 10 real frames; 5 + 5 padded
    assert len(list(Path(masks_dir).rglob("*.png"))) == checked


def test_label_png_refuses_ids_outside_the_palette():
    from avs.evaluation.outputs import label_png_bytes

    with pytest.raises(ValueError, match="0..8"):
        label_png_bytes(np.array([[0, 9]]), NUM_CLASSES)
    with pytest.raises(ValueError, match="256"):
        label_png_bytes(np.zeros((2, 2), np.int64), 300)


def test_blend_and_legend_draw_the_palette_colours():
    from avs.inference.semantic import blend_labels, legend_strip, present_classes

    pal = palette(NUM_CLASSES)
    rgb = np.full((16, 16, 3), 200, np.uint8)
    labels = np.zeros((16, 16), np.int64)
    labels[4:12, 4:12] = 3
    out = blend_labels(rgb, labels, NUM_CLASSES, alpha=0.5, outline=False)
    np.testing.assert_array_equal(out[0, 0], rgb[0, 0])  # background is not drawn
    want = np.round(0.5 * 200 + 0.5 * pal[3].astype(np.float64)).astype(np.uint8)
    np.testing.assert_array_equal(out[8, 8], want)
    edged = blend_labels(rgb, labels, NUM_CLASSES)
    np.testing.assert_array_equal(edged[4, 8], pal[3])  # the outline in the class colour
    assert present_classes([labels, np.full((2, 2), 5)]) == [3, 5]
    strip = legend_strip([3, 5], ["bg"] + [f"class{i}" for i in range(1, NUM_CLASSES)], NUM_CLASSES, 400)
    colours = {tuple(c) for c in strip.reshape(-1, 3)}
    assert tuple(pal[3]) in colours and tuple(pal[5]) in colours and tuple(pal[1]) not in colours
    narrow = legend_strip([3, 5], [], NUM_CLASSES, 30)  # ids only, one entry per line
    assert narrow.shape[0] > strip.shape[0]


def test_visualize_draws_classes_in_the_palette_on_real_frames(avss_ckpt, tmp_path):
    from avs.inference.model import load_model
    from avs.inference.semantic import blend_labels, class_names_for, legend_strip, present_classes
    from avs.inference.visualize import denormalize, visualize_split

    tile = 64  # the frames' own size: tiles are not resized
    cfg = compose_cfg(
        "visualize", [f"checkpoint={avss_ckpt}", "split=val", "device=cpu", "progress=false", f"tile_height={tile}"]
    )
    res = visualize_split(cfg, tmp_path)
    grids = {p.stem: np.asarray(Image.open(p)) for p in res.grids}
    assert len(grids) == 3
    names = class_names_for(load_model(avss_ckpt, "cpu").cfg.data)
    drawn = set()
    for batch, logits in _val_logits(avss_ckpt):
        pred = torch.softmax(logits, 2).argmax(2).numpy()  # [B,T,H,W]
        for b, vid in enumerate(batch["video_id"]):
            grid, frames = grids[vid], denormalize(batch["frames"][b])
            real = [t for t in range(pred.shape[1]) if batch["frame_valid"][b, t]]
            label_w = grid.shape[1] - len(real) * (tile + 2)  # row labels, then (pad + tile) per real frame only
            for c, t in enumerate(real):
                y, x = 18 + 2 * (tile + 2) + 2, label_w + c * (tile + 2) + 2  # row 3: the prediction
                np.testing.assert_array_equal(
                    grid[y : y + tile, x : x + tile], blend_labels(frames[t], pred[b, t], NUM_CLASSES)
                )
            gt = [batch["masks"][b, t].numpy() for t in real if batch["mask_valid"][b, t]]
            shown = present_classes(gt + [pred[b, t] for t in real])
            strip = legend_strip(shown, names, NUM_CLASSES, grid.shape[1])
            np.testing.assert_array_equal(grid[-strip.shape[0] :], strip)  # the legend of the classes drawn
            drawn.update(present_classes([pred[b, t] for t in real]))
    assert drawn  # the tiny model predicts some foreground on the real frames


def test_class_names_come_from_label2idx_or_are_left_to_ids(avss_ckpt, tmp_path):
    from avs.inference.model import load_model
    from avs.inference.semantic import class_label, class_names_for

    data = load_model(avss_ckpt, "cpu").cfg.data
    names = class_names_for(data)
    assert len(names) == NUM_CLASSES and names[0] and class_label(3, names) == f"3 {names[3]}"
    assert class_names_for({"root": str(tmp_path), "num_classes": NUM_CLASSES}) == []
    assert class_label(3, []) == "3"


def test_demo_writes_palette_masks_legends_and_matches_the_dataset_path(avss_ckpt, tmp_path):
    pytest.importorskip("av", reason="PyAV (the avs[video] extra) is not installed")
    import json

    import soundfile as sf

    from avs.data import build_dataset
    from avs.data.avss_layout import frame_path, wav_path
    from avs.inference.demo import run_demo
    from avs.inference.model import load_model
    from avs.inference.semantic import SlotLegend, class_names_for, legend_strip, present_classes
    from avs.inference.video import probe_video
    from tests.integration.test_demo import FPS, write_video

    loaded = load_model(avss_ckpt, "cpu")
    ds = build_dataset(loaded.cfg.data, "test", train=False)
    i = next(i for i, rec in enumerate(ds.records) if rec.source == "v2")  # 10 real frames: one window, no padding
    rec, item = ds.records[i], ds[i]
    frames = [np.array(Image.open(frame_path(ds.root, rec, k)).convert("RGB")) for k in range(10)]
    audio, sr = sf.read(wav_path(ds.root, rec), dtype="int16")
    write_video(tmp_path / "clip.mkv", frames, audio, sr)
    video = tmp_path / "clip.mkv"
    cfg = compose_cfg("demo", [f"video={video}", f"checkpoint={avss_ckpt}", "device=cpu", "progress=false"])
    result = run_demo(cfg, tmp_path / "out", return_probs=True)

    with torch.no_grad():
        ref = torch.softmax(loaded.model({"frames": item["frames"][None], "audio": item["audio"][None]})["logits"], 2)
    assert result.probs.shape == (10, NUM_CLASSES, 64, 64)
    np.testing.assert_allclose(result.probs, ref[0].numpy(), atol=1e-5, rtol=0)
    pal = palette(NUM_CLASSES)
    summary = json.loads(result.summary.read_text())
    assert summary["num_classes"] == NUM_CLASSES and summary["threshold"] is None
    per_slot = []
    for k, path in enumerate(result.masks):
        with Image.open(path) as im:
            assert im.mode == "P"
            ids = np.asarray(im)
            np.testing.assert_array_equal(np.asarray(im.convert("RGB")), pal[ids])
        np.testing.assert_array_equal(ids, result.probs[k].argmax(0))
        per_slot.append(present_classes([ids]))
        assert summary["slots"][k]["classes"] == per_slot[k]

    names = class_names_for(loaded.cfg.data)
    legend = SlotLegend(per_slot, names, NUM_CLASSES, 64)
    info = probe_video(result.overlay_video)
    assert (info.width, info.height, info.num_frames) == (64, (64 + legend.height) // 2 * 2, 10 * FPS)
    sheet = np.asarray(Image.open(result.contact_sheet))
    strip = legend_strip(sorted({c for classes in per_slot for c in classes}), names, NUM_CLASSES, sheet.shape[1])
    np.testing.assert_array_equal(sheet[-strip.shape[0] :], strip)


class AudioSpy(DatasetEvaluator):
    """An eval.evaluators entry: the audio each clip was scored with (summed), and where it came from."""

    name = "audio_spy"

    def reset(self) -> None:
        self.seen: dict[str, tuple[float, str]] = {}

    def process(self, batch, output) -> None:
        froms = batch.get("audio_from", batch["video_id"])
        for b, vid in enumerate(batch["video_id"]):
            self.seen[vid] = (float(batch["audio"][b].double().abs().sum()), froms[b])

    def summarize(self):
        return self.seen


@pytest.mark.parametrize("mode", ["real", "zero", "shuffled"])
def test_eval_scores_with_the_audio_zeroed_or_shuffled_across_clips(avss_dir, avss_ckpt, tmp_path, mode):  # noqa: F811
    import json

    from avs.evaluation.checkpoint import evaluate_checkpoint

    spy = f"+eval.evaluators.spy={{_target_: {__name__}.AudioSpy}}"
    args = [f"checkpoint={avss_ckpt}", "split=val", "device=cpu", f"paths.data_dir={avss_dir}"]
    args += [f"audio_input={mode}", spy]
    result = evaluate_checkpoint(compose_cfg("eval", args), tmp_path / mode)
    meta = json.loads(Path(result["paths"]["json"]).read_text())
    seen = meta["evaluators"]["spy"]
    own = {
        vid: total
        for vid, (total, _) in json.loads(
            Path(
                evaluate_checkpoint(compose_cfg("eval", args[:4] + [spy]), tmp_path / "own")["paths"]["json"]
            ).read_text()
        )["evaluators"]["spy"].items()
    }
    assert set(seen) == set(own) and len(own) == 3 and all(v > 0 for v in own.values())
    assert meta["audio_input"] == {"real": "real", "zero": "zero", "shuffled": "shuffled (seed 0)"}[mode]
    for vid, (total, source) in seen.items():
        if mode == "real":
            assert source == vid and total == own[vid]
        elif mode == "zero":
            assert source == "zeros" and total == 0.0
        else:  # another clip's audio, every clip heard once
            assert source != vid and total == own[source]
    if mode == "shuffled":
        assert sorted(s for _, s in seen.values()) == sorted(seen)


def test_eval_refuses_an_unknown_audio_probe(avss_dir, avss_ckpt, tmp_path):  # noqa: F811
    from avs.errors import ConfigError
    from avs.evaluation.checkpoint import evaluate_checkpoint

    args = [f"checkpoint={avss_ckpt}", "split=val", "device=cpu", f"paths.data_dir={avss_dir}", "audio_input=silence"]
    with pytest.raises(ConfigError, match="audio_input=.silence.: expected one of real, zero, shuffled"):
        evaluate_checkpoint(compose_cfg("eval", args), tmp_path / "x")
