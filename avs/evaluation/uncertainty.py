"""Is a latent model's uncertainty map useful? AUROC of its per-pixel errors against its predicted variance.

A latent model (ECMVAE-style) with `eval_num_samples = K > 1` draws K codes from the prior and returns
the mean probability and the per-pixel variance of the K sampled probabilities. Here every scored pixel
is labelled "wrong" when the thresholded mean probability disagrees with the ground truth, and the
variance is read as a score for "wrong": its ROC AUC is 1.0 when every wrong pixel has a larger variance
than every right one and 0.5 when the variance tells nothing. The binary entropy of the mean probability
is the baseline any segmentation model has (high near p = 0.5).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from avs.engine.hooks import HookBase
from avs.errors import ConfigError
from avs.evaluation.evaluator import DatasetEvaluator, EvaluationError, evaluate
from avs.utils.io import atomic_write_text

log = logging.getLogger(__name__)

__all__ = [
    "UNCERTAINTY_FILE",
    "UncertaintyEvaluator",
    "UncertaintyHook",
    "binary_auroc",
    "binary_entropy",
    "uncertainty_record",
    "write_uncertainty",
]

UNCERTAINTY_FILE = "uncertainty.json"


def binary_auroc(scores: Tensor, labels: Tensor) -> float | None:
    """Exact ROC AUC of `scores` for the positive `labels` (Mann-Whitney U, average ranks for ties).

    Equals the probability that a random positive scores above a random negative, ties counting one
    half. None when every label is the same (the AUC is undefined).
    """
    s = torch.as_tensor(scores).detach().reshape(-1).to("cpu", torch.float64)
    y = torch.as_tensor(labels).detach().reshape(-1).to("cpu").bool()
    if s.numel() != y.numel():
        raise ValueError(f"scores and labels differ in size: {s.numel()} vs {y.numel()}")
    if bool(torch.isnan(s).any()):
        raise ValueError("scores contain NaN")
    n_pos = int(y.sum())
    n_neg = y.numel() - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    sorted_s, order = torch.sort(s, stable=True)
    _, counts = torch.unique_consecutive(sorted_s, return_counts=True)
    ends = torch.cumsum(counts, 0).to(torch.float64)  # 1-based rank of each tie group's last member
    mean_rank = ends - (counts.to(torch.float64) - 1) / 2
    ranks = torch.repeat_interleave(mean_rank, counts)  # rank of each sorted element
    rank_sum = float(ranks[y[order]].sum())
    u = rank_sum - n_pos * (n_pos + 1) / 2
    return u / (n_pos * n_neg)


def binary_entropy(p: Tensor) -> Tensor:
    """Entropy (nats) of Bernoulli(p), elementwise; 0 at p = 0 or 1."""
    p = p.to(torch.float64)
    return -(torch.special.xlogy(p, p) + torch.special.xlogy(1 - p, 1 - p))


def _sampled_k(model: torch.nn.Module) -> int:
    net = getattr(model, "_orig_mod", model)
    if getattr(net, "latent", None) is None:
        name = type(net).__name__
        raise ConfigError(f"{name} has no latent part: the uncertainty map needs a latent model (ecmvae, ecmvae_bg)")
    k = int(getattr(net, "eval_num_samples", 1) or 1)
    if k < 2:
        raise ConfigError(f"eval.num_samples={k}: the uncertainty map needs K >= 2 prior samples")
    return k


def _mean(x: Tensor) -> float | None:
    return float(x.to(torch.float64).mean()) if x.numel() else None


class UncertaintyEvaluator(DatasetEvaluator):
    """Per-pixel error (mean prob > threshold vs GT > 0.5) against the K-sample variance, over the split.

    Frames with a False `mask_valid` (no ground truth) are left out, and so are padded AVSS frames
    (`frame_valid` False). AVSS class logits [B,T,C,H,W]: the binary view of the foreground, the mean
    P(foreground) = 1 - softmax(l)_0 (the variance is that of P(foreground) over the samples) against
    label != 0 (docs/avss.md). Summary: {"auroc", "auroc_entropy",
    "num_samples", "threshold", "frames", "pixels", "error_rate", "mean_variance", "mean_variance_error",
    "mean_variance_correct"} (the AUROCs and the conditional means are None when every pixel is right, or
    every one wrong). Needs the output's `variance` (a latent model with eval_num_samples = K >= 2).
    Single process: the AUROC needs every pixel in one place.
    """

    name = "uncertainty"

    def __init__(self, num_samples: int, threshold: float = 0.5) -> None:
        self.num_samples, self.threshold = int(num_samples), float(threshold)

    def reset(self) -> None:
        self.variances: list[Tensor] = []
        self.errors: list[Tensor] = []
        self.entropies: list[Tensor] = []
        self.frames = 0

    def process(self, batch: dict[str, Any], output: dict[str, Any]) -> None:
        if "variance" not in output:
            raise ConfigError(f"the model returned no variance map with eval.num_samples={self.num_samples}")
        logits = output["logits"].float()
        if logits.shape[2] > 1:  # AVSS: P(foreground) against the foreground of the class labels
            prob = (1.0 - torch.softmax(logits, dim=2)[:, :, :1]).flatten(0, 1)  # [B*T,1,H,W]
            gt = (batch["masks"] != 0).unsqueeze(2).flatten(0, 1)  # [B,T,H,W] -> [B*T,1,H,W]
        else:
            prob = torch.sigmoid(logits).flatten(0, 1)  # [B*T,1,H,W]
            gt = batch["masks"].flatten(0, 1) > 0.5
        var = output["variance"].float().flatten(0, 1)
        valid = batch.get("mask_valid")
        if valid is not None:
            keep = valid.reshape(-1).bool()
            if batch.get("frame_valid") is not None:
                keep = keep & batch["frame_valid"].reshape(-1).bool()
            prob, var, gt = prob[keep], var[keep], gt[keep]
        self.frames += int(prob.shape[0])
        self.errors.append(((prob > self.threshold) != gt).reshape(-1).cpu())
        self.variances.append(var.reshape(-1).cpu())
        self.entropies.append(binary_entropy(prob).reshape(-1).float().cpu())

    def summarize(self) -> dict[str, Any]:
        if self.frames == 0:
            raise EvaluationError("no annotated frame to score: the split is empty or every clip was skipped")
        err, var, ent = torch.cat(self.errors), torch.cat(self.variances), torch.cat(self.entropies)
        return {
            "auroc": binary_auroc(var, err),
            "auroc_entropy": binary_auroc(ent, err),
            "num_samples": self.num_samples,
            "threshold": self.threshold,
            "frames": self.frames,
            "pixels": int(err.numel()),
            "error_rate": float(err.double().mean()),
            "mean_variance": _mean(var),
            "mean_variance_error": _mean(var[err]),
            "mean_variance_correct": _mean(var[~err]),
        }


def uncertainty_record(
    model: torch.nn.Module, loader: Any, device: torch.device | str = "cpu", threshold: float = 0.5
) -> dict[str, Any]:
    """The UncertaintyEvaluator's summary of `model` over `loader` (one avs.evaluation.evaluate pass).

    Refuses (ConfigError) a model without a latent part or with fewer than 2 prior samples.
    """
    k = _sampled_k(model)
    return evaluate(model, loader, [UncertaintyEvaluator(k, threshold)], device=device)["uncertainty"]


def default_output(checkpoint: str | Path) -> Path:
    """`<run>/uncertainty.json` for a checkpoint `<run>/checkpoints/<name>.ckpt`."""
    return Path(checkpoint).expanduser().resolve().parent.parent / UNCERTAINTY_FILE


def write_uncertainty(
    checkpoint: str | Path,
    split: str = "test",
    num_samples: int = 8,
    out: str | Path | None = None,
    seed: int = 0,
    *,
    device: str | torch.device = "auto",
    data: Any = None,
    batch_size: int | None = None,
    threshold: float = 0.5,
) -> dict[str, Any]:
    """Score a checkpoint's uncertainty map on `split` with K = `num_samples` prior samples; write JSON.

    `out`: the JSON file (default `<run dir>/uncertainty.json`). `data`: a data config to use instead of
    the checkpoint's (scripts/uncertainty.py passes the command line's). The same `seed` gives the same
    numbers. Returns the record (uncertainty_record plus checkpoint, method, split, seed).
    """
    from avs.data import build_dataset
    from avs.inference.model import load_model

    if int(num_samples) < 2:
        raise ConfigError(f"num_samples={num_samples}: the uncertainty map needs K >= 2 prior samples")
    loaded = load_model(checkpoint, device=device, num_samples=int(num_samples))
    if not loaded.has_latent:
        raise ConfigError(f"{checkpoint}: model {loaded.method!r} has no latent part (no uncertainty map)")
    data_cfg = loaded.cfg.data if data is None else data
    if data_cfg.get("synthetic"):
        from avs.data.preflight import require_synthetic

        require_synthetic(data_cfg)  # evaluation never generates data
    ds = build_dataset(data_cfg, str(split), train=False)
    size = int(batch_size or data_cfg.get("eval_batch_size", 1) or 1)
    record = score_split(loaded.model, ds, size, loaded.device, seed, threshold)
    record = {"checkpoint": str(checkpoint), "method": loaded.method, "split": str(split), "seed": int(seed), **record}
    path = Path(out).expanduser() if out is not None else default_output(checkpoint)
    _write(path, record)
    return record


def score_split(
    model: torch.nn.Module, dataset: Any, batch_size: int, device: Any, seed: int, threshold: float
) -> dict[str, Any]:
    """uncertainty_record of `model` over `dataset` in batches of `batch_size`, the prior samples drawn
    after torch.manual_seed(`seed`)."""
    from torch.utils.data import DataLoader

    from avs.data.avsbench import collate_skip_none

    loader = DataLoader(dataset, batch_size=batch_size, num_workers=0, collate_fn=collate_skip_none)
    torch.manual_seed(int(seed))
    return uncertainty_record(model, loader, device, threshold)


def _write(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(record, indent=2) + "\n")
    log.info("uncertainty record written to %s", path)


class UncertaintyHook(HookBase):
    """At the end of training, the record `write_uncertainty` makes of best.ckpt, made in the training process
    itself: after the final evaluation (a priority above hooks.final_evaluation's) the model holds best.ckpt's
    weights; it is scored on `split` with K = `num_samples` prior samples drawn after torch.manual_seed(`seed`),
    and its eval_num_samples is then set back. `checkpoint` is only recorded. Single process only.

        '+hooks.uncertainty={_target_: avs.evaluation.uncertainty.UncertaintyHook, priority: 206, out: <file>}'
    """

    def __init__(
        self,
        out: str,
        split: str = "test",
        num_samples: int = 8,
        seed: int = 0,
        threshold: float = 0.5,
        checkpoint: str | None = None,
    ) -> None:
        if int(num_samples) < 2:
            raise ConfigError(f"num_samples={num_samples}: the uncertainty map needs K >= 2 prior samples")
        self.out, self.split, self.num_samples = Path(out), str(split), int(num_samples)
        self.seed, self.threshold, self.checkpoint = int(seed), float(threshold), checkpoint

    def before_train(self) -> None:
        net = getattr(self.loop.model, "_orig_mod", self.loop.model)
        where = f"hooks.{self.name or 'uncertainty'}"
        if self.loop.dist.enabled:
            raise ConfigError(f"{where}: the uncertainty record is made in one process, not under DDP")
        if getattr(net, "latent", None) is None:
            raise ConfigError(f"{where}: {type(net).__name__} has no latent part (no uncertainty map)")

    def after_train(self) -> None:
        loop = self.loop
        net = getattr(loop.model, "_orig_mod", loop.model)
        cfg = loop.data.cfg
        size = int(cfg.data.eval_batch_size)
        before = net.eval_num_samples
        net.eval_num_samples = self.num_samples
        try:
            record = score_split(
                loop.model, loop.data.dataset(self.split), size, loop.device, self.seed, self.threshold
            )
        finally:
            net.eval_num_samples = before
        method = str(cfg.model.name)
        head = {"checkpoint": self.checkpoint, "method": method, "split": self.split, "seed": self.seed}
        record = {**head, **record}
        _write(self.out, record)
        log.info("%s", summary_line(record))


def summary_line(record: dict[str, Any]) -> str:
    """One line for the console: AUROC of the variance and of the entropy baseline, error rate, K."""

    def fmt(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.4f}"

    return (
        f"{record.get('method', '?')} {record.get('split', '?')}: AUROC(variance) {fmt(record['auroc'])}, "
        f"AUROC(entropy) {fmt(record['auroc_entropy'])}, error rate {fmt(record['error_rate'])}, "
        f"K={record['num_samples']}, {record['pixels']} pixels"
    )
