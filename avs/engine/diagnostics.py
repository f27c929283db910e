"""Model diagnostics: per-dimension KL of the latent codes (posterior-collapse check).

`latent_kl_per_dimension` measures one split; `LatentKLHook` (avs.engine.hooks, `trainer.record_latent_kl`)
appends one `latent_kl_record` per validation to `<run dir>/latent_kl.jsonl` with `append_latent_kl`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from avs.models.segmentor import AVSegmentor
from avs.utils.io import atomic_write_text

LATENT_KL_FILE = "latent_kl.jsonl"


def gaussian_kl_per_dim(
    mu_q: torch.Tensor, logvar_q: torch.Tensor, mu_p: torch.Tensor, logvar_p: torch.Tensor
) -> torch.Tensor:
    """KL(N(mu_q, e^logvar_q) || N(mu_p, e^logvar_p)) per dimension, [N,L] -> [N,L]."""
    return 0.5 * (logvar_p - logvar_q + (logvar_q.exp() + (mu_q - mu_p) ** 2) / logvar_p.exp() - 1.0)


@torch.no_grad()
def latent_kl_per_dimension(
    model: AVSegmentor, loader: DataLoader | Iterable[dict[str, Any]], device: torch.device | str = "cpu"
) -> dict[str, Any]:
    """Mean over a split's frames of KL(posterior || prior) for each latent dimension of each code.

    A dimension whose KL stays near 0 carries no information from the ground truth (collapsed).
    Returns {code: [L floats]} plus "frames"; empty for models without a latent part. The KL is the
    one between the distributions the codes are drawn from (log-variance scale, whatever
    `legacy_sigma` makes the training term see), without free bits.
    """
    if model.latent is None:
        return {}
    model.eval()
    sums: dict[str, torch.Tensor] = {}
    frames = 0
    for batch in loader:
        if "frames" not in batch:
            continue
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        x = batch["frames"].flatten(0, 1)  # [B,T,3,H,W] -> [B*T,3,H,W]
        audio = model.encode_audio(batch["audio"]) if model.use_audio else None
        masks = model._posterior_masks(batch["masks"].flatten(0, 1), batch["mask_valid"])
        state = model.latent.encode(x, audio, masks)
        for key, q in (state.posterior or {}).items():
            p = state.prior.get(key)
            if p is None or q.logvar is None or p.logvar is None:
                continue
            kl = gaussian_kl_per_dim(q.mu, q.logvar, p.mu, p.logvar).sum(0).double().cpu()
            sums[key] = sums.get(key, 0) + kl
        frames += x.shape[0]
    out: dict[str, Any] = {k: (v / max(frames, 1)).tolist() for k, v in sums.items()}
    out["frames"] = frames
    return out


def latent_kl_record(result: dict[str, Any], **meta: Any) -> dict[str, Any]:
    """One line of latent_kl.jsonl: `meta` (epoch, step, split), frames, per-dimension KL and per-code sums."""
    kl = {k: v for k, v in result.items() if k != "frames"}
    return {**meta, "frames": result.get("frames", 0), "kl": kl, "total": {k: float(sum(v)) for k, v in kl.items()}}


def append_latent_kl(run_dir: str | Path, record: dict[str, Any]) -> Path:
    """Append `record` to <run_dir>/latent_kl.jsonl (rewritten atomically; an earlier line of the same step,
    left by a run resumed at an epoch end, is replaced)."""
    path = Path(run_dir) / LATENT_KL_FILE
    lines = path.read_text().splitlines() if path.is_file() else []
    kept = [line for line in lines if line.strip() and json.loads(line).get("step") != record.get("step")]
    atomic_write_text(path, "\n".join([*kept, json.dumps(record)]) + "\n")
    return path
