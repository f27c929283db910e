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
