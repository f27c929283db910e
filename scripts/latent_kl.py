"""Per-dimension KL(posterior || prior) of a latent model's codes on a split (posterior-collapse check).

    python scripts/latent_kl.py checkpoint=outputs/.../checkpoints/best.ckpt split=val
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, open_dict

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import avs  # noqa: E402,F401
from avs.data import build_dataset  # noqa: E402
from avs.engine.checkpoint import load_checkpoint  # noqa: E402
from avs.engine.diagnostics import latent_kl_per_dimension  # noqa: E402
from avs.engine.evaluate import config_from_checkpoint  # noqa: E402
from avs.utils.device import select_device  # noqa: E402
from avs.models.build import build_model  # noqa: E402


@hydra.main(version_base="1.3", config_path="../configs", config_name="eval")
def main(cfg: DictConfig) -> None:
    state = load_checkpoint(cfg.checkpoint)
    run_cfg = config_from_checkpoint(state, cfg.checkpoint)
    with open_dict(run_cfg):
        run_cfg.backbone.pretrained = None  # the checkpoint holds every weight
        if "pretrained" in run_cfg.audio:
            run_cfg.audio.pretrained = False
        if cfg.get("data") is not None:
            run_cfg.data = cfg.data
    device = select_device(cfg.device)
    model = build_model(run_cfg).to(device)
    model.load_state_dict(state["model"])
    from torch.utils.data import DataLoader

    ds = build_dataset(run_cfg.data, str(cfg.split), train=False)
    loader = DataLoader(ds, batch_size=int(run_cfg.data.eval_batch_size), num_workers=0)
    result = latent_kl_per_dimension(model, loader, device)
    if not result:
        raise SystemExit(f"{cfg.checkpoint}: model {run_cfg.model.name!r} has no latent part")
    for key, values in result.items():
        if key != "frames":
            print(f"{key:>4}: " + " ".join(f"{v:.3f}" for v in values) + f"   (sum {sum(values):.3f} nats)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
