"""Model diagnostics: per-dimension KL of the latent codes (posterior-collapse check)."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader

from avs.models.segmentor import AVSegmentor


def gaussian_kl_per_dim(
    mu_q: torch.Tensor, logvar_q: torch.Tensor, mu_p: torch.Tensor, logvar_p: torch.Tensor
) -> torch.Tensor:
    """KL(N(mu_q, e^logvar_q) || N(mu_p, e^logvar_p)) per dimension, [N,L] -> [N,L]."""
    return 0.5 * (logvar_p - logvar_q + (logvar_q.exp() + (mu_q - mu_p) ** 2) / logvar_p.exp() - 1.0)


@torch.no_grad()
def latent_kl_per_dimension(
    model: AVSegmentor, loader: DataLoader, device: torch.device | str = "cpu"
) -> dict[str, Any]:
    """Mean over a split's frames of KL(posterior || prior) for each latent dimension of each code.

    A dimension whose KL stays near 0 carries no information from the ground truth (collapsed).
    Returns {code: [L floats]} plus "frames"; empty for models without a latent part.
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
