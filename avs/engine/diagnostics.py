"""Model diagnostics: per-dimension KL of the latent codes (posterior-collapse check).

`latent_kl_per_dimension` measures one split (scripts/latent_kl.py) through avs.evaluation.evaluate and
avs.evaluation.evaluators.LatentKLEvaluator; `LatentKLHook` (avs.engine.hooks, `trainer.record_latent_kl`)
runs that evaluator inside each validation pass and appends one `latent_kl_record` per validation to
`<run dir>/latent_kl.jsonl` with `append_latent_kl`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from avs.utils.io import atomic_write_text

LATENT_KL_FILE = "latent_kl.jsonl"


def gaussian_kl_per_dim(
    mu_q: torch.Tensor, logvar_q: torch.Tensor, mu_p: torch.Tensor, logvar_p: torch.Tensor
) -> torch.Tensor:
    """KL(N(mu_q, e^logvar_q) || N(mu_p, e^logvar_p)) per dimension, [N,L] -> [N,L]."""
    return 0.5 * (logvar_p - logvar_q + (logvar_q.exp() + (mu_q - mu_p) ** 2) / logvar_p.exp() - 1.0)


def latent_kl_per_dimension(
    model: torch.nn.Module, loader: DataLoader | Iterable[dict[str, Any]], device: torch.device | str = "cpu"
) -> dict[str, Any]:
    """Mean over a split's frames of KL(posterior || prior) for each latent dimension of each code.

    Returns {code: [L floats]} plus "frames"; empty for models without a latent part. One pass of
    avs.evaluation.evaluate with avs.evaluation.evaluators.LatentKLEvaluator (which says what is measured).
    """
    from avs.evaluation.evaluator import evaluate
    from avs.evaluation.evaluators import LatentKLEvaluator

    if getattr(getattr(model, "_orig_mod", model), "latent", None) is None:
        return {}
    return evaluate(model, loader, [LatentKLEvaluator()], device=device)["latent_kl"]


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
