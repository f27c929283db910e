"""Per-dimension KL(posterior || prior) of a latent model's codes on a split (posterior-collapse check).

python scripts/latent_kl.py checkpoint=outputs/.../checkpoints/best.ckpt split=val

Prints one line per code and then the record as JSON, in the shape of the lines a run writes to
latent_kl.jsonl with trainer.record_latent_kl=true (avs.engine.diagnostics.latent_kl_record).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import avs  # noqa: E402,F401
from avs.data import build_dataset  # noqa: E402
from avs.engine.diagnostics import latent_kl_per_dimension, latent_kl_record  # noqa: E402
from avs.errors import ConfigError, plain_errors, run_plain  # noqa: E402
from avs.evaluation.checkpoint import eval_data_config  # noqa: E402
from avs.inference.model import load_model  # noqa: E402
from avs.script_args import check_overrides  # noqa: E402


@hydra.main(version_base="1.3", config_path="../configs", config_name="eval")
@plain_errors
def main(cfg: DictConfig) -> None:
    loaded = load_model(cfg.checkpoint, device=cfg.device)
    data_cfg = eval_data_config(cfg, loaded.cfg.data)
    ds = build_dataset(data_cfg, str(cfg.split), train=False)
    loader = DataLoader(ds, batch_size=int(data_cfg.eval_batch_size), num_workers=0)
    result = latent_kl_per_dimension(loaded.model, loader, loaded.device)
    if not result:
        raise ConfigError(f"{cfg.checkpoint}: model {loaded.method!r} has no latent part (no KL to measure)")
    record = latent_kl_record(result, checkpoint=str(cfg.checkpoint), split=str(cfg.split))
    for key, values in record["kl"].items():
        print(f"{key:>4}: " + " ".join(f"{v:.3f}" for v in values) + f"   (sum {record['total'][key]:.3f} nats)")
    print(json.dumps(record))


if __name__ == "__main__":
    run_plain(
        lambda: check_overrides(sys.argv[1:], "scripts/latent_kl.py", "eval", from_checkpoint=True, open_nodes=["data"])
    )
    main()
