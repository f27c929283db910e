"""Train the stand-ins, score them on held-out examples, write weights + manifest."""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from avs.models.audio_encoders import TinyAudioEncoder
from avs.models.backbones import VisualBackbone
from avs.pretrain.data import data_hash, image_set, sound_set

log = logging.getLogger(__name__)


class _PooledClassifier(nn.Module):
    """Visual backbone -> mean-pooled last stage -> linear head (logits [N,K])."""

    def __init__(self, backbone: VisualBackbone, num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.out_channels[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x)[-1].mean(dim=(2, 3)))


class _EmbeddingClassifier(nn.Module):
    """Audio encoder -> linear head on the embedding (logits [N,K])."""

    def __init__(self, encoder: TinyAudioEncoder, num_classes: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.embed_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


def _exact_match(logits: torch.Tensor, y: torch.Tensor) -> float:
    """Multi-label: fraction of examples whose whole predicted set (logit > 0) is right."""
    return float(((logits > 0).float() == y).all(dim=1).float().mean())


def _top1(logits: torch.Tensor, y: torch.Tensor) -> float:
    return float((logits.argmax(dim=1) == y).float().mean())


@torch.no_grad()
def _predict(model: nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    model.eval()
    return torch.cat([model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])


def _fit(model: nn.Module, loss_fn: Callable, train: tuple, opt: Mapping[str, Any], seed: int) -> float:
    """Adam over shuffled mini-batches for `opt.epochs` epochs -> mean loss of the last epoch."""
    x, y = train
    optim = torch.optim.Adam(model.parameters(), lr=float(opt["lr"]))
    gen = torch.Generator().manual_seed(int(seed))
    bs = int(opt["batch_size"])
    last = float("nan")
    for epoch in range(int(opt["epochs"])):
        model.train()
        perm = torch.randperm(len(x), generator=gen)
        total, steps = 0.0, 0
        for i in range(0, len(x) - bs + 1 if len(x) >= bs else 1, bs):
            idx = perm[i : i + bs]
            loss = loss_fn(model(x[idx]), y[idx])
            optim.zero_grad(set_to_none=True)
            loss.backward()
            optim.step()
            total, steps = total + loss.item(), steps + 1
        last = total / max(steps, 1)
        log.info("epoch %d/%d: loss %.4f", epoch + 1, int(opt["epochs"]), last)
    return last


def _save(state: Mapping[str, torch.Tensor], path: Path) -> str:
    """Write a weights-only state dict (contiguous CPU tensors) -> its sha256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().cpu().contiguous().clone() for k, v in state.items()}, path)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def machine_kind() -> str:
    """What, besides the config and the thread count, decides the stand-ins' bytes: OS, CPU
    architecture, the SIMD level torch dispatches to, the torch version (docs/synthetic.md)."""
    cap = torch.backends.cpu.get_cpu_capability()
    return f"{platform.system()} {platform.machine()} {cap} torch {torch.__version__}"


@contextmanager
def deterministic(num_threads: int | None) -> Iterator[int]:
    """Within: torch's CPU threads fixed (None keeps torch's default) and nondeterministic kernels
    refused; yields the thread count. Same config, threads and machine kind -> the same weight bytes.
    Both settings are restored on exit."""
    threads, flag = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    if num_threads:
        torch.set_num_threads(int(num_threads))
    torch.use_deterministic_algorithms(True)
    try:
        yield torch.get_num_threads()
    finally:
        torch.use_deterministic_algorithms(flag)
        torch.set_num_threads(threads)


def _write_manifest(path: Path, record: dict[str, Any]) -> None:
    """Add the command line, torch version, threads, machine kind (with the SIMD level torch dispatched
    to) and the CPU's own widest level to `record` (in place) and write it beside the weights."""
    from avs.utils.simd import cpu_level

    record["command"] = " ".join([Path(sys.argv[0]).name] + sys.argv[1:])
    record["torch_version"] = torch.__version__
    record["num_threads"] = torch.get_num_threads()
    record["machine_kind"] = machine_kind()
    record["cpu_level"] = cpu_level()
    path.with_suffix(".json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")


def pretrain_visual(cfg: Mapping[str, Any], out_dir: str | Path, seed: int) -> dict[str, Any]:
    """Train the visual stand-in (cfg = the `visual` node of configs/pretrain.yaml) -> manifest dict."""
    start = time.perf_counter()
    k = int(cfg["num_categories"])
    sets = {
        split: image_set(seed, split, int(cfg[f"{split}_images"]), int(cfg["image_size"]), k, cfg["num_objects"])
        for split in ("train", "val")
    }
    torch.manual_seed(int(seed))
    backbone = VisualBackbone(name=str(cfg["name"]), pretrained=None, drop_path_rate=0.0)
    model = _PooledClassifier(backbone, k)
    loss = _fit(model, nn.BCEWithLogitsLoss(), sets["train"], cfg, seed)
    (xv, yv), (_, yt) = sets["val"], sets["train"]
    logits = _predict(model, xv, int(cfg["batch_size"]))
    sets_seen, counts = torch.unique(yt, dim=0, return_counts=True)
    common = sets_seen[counts.argmax()]  # the most frequent training label set: the chance predictor
    path = Path(out_dir) / str(cfg["file"])
    record = {
        "task": "visual: which categories are present in a single Sounding Shapes frame (multi-label BCE)",
        "seed": int(seed),
        "config": dict(cfg),
        "data_hash": data_hash(*sets["train"], *sets["val"]),
        "train_loss_last_epoch": round(loss, 5),
        "heldout_exact_match": round(_exact_match(logits, yv), 4),
        "heldout_label_accuracy": round(float(((logits > 0).float() == yv).float().mean()), 4),
        "chance_exact_match": round(float((yv == common).all(dim=1).float().mean()), 4),
        "weights_file": path.name,
        "weights_sha256": _save(backbone.body.state_dict(), path),
        "load_with": f"backbone={cfg['name']} backbone.pretrained=file backbone.weights_path={path}",
        "wall_time_s": round(time.perf_counter() - start, 1),
    }
    _write_manifest(path, record)
    return record


def pretrain_audio(cfg: Mapping[str, Any], out_dir: str | Path, seed: int) -> dict[str, Any]:
    """Train the tiny audio stand-in (cfg = the `audio` node of configs/pretrain.yaml) -> manifest dict."""
    start = time.perf_counter()
    k = int(cfg["num_categories"])
    sets = {split: sound_set(seed, split, int(cfg[f"{split}_clips"]), k, cfg["snr_db"]) for split in ("train", "val")}
    torch.manual_seed(int(seed))
    encoder = TinyAudioEncoder(embed_dim=int(cfg["embed_dim"]), width=int(cfg["width"]))
    model = _EmbeddingClassifier(encoder, k)
    loss = _fit(model, nn.CrossEntropyLoss(), sets["train"], cfg, seed)
    (xv, yv), (_, yt) = sets["val"], sets["train"]
    logits = _predict(model, xv, int(cfg["batch_size"]))
    common = int(torch.bincount(yt, minlength=k).argmax())
    path = Path(out_dir) / str(cfg["file"])
    sizes = f"audio.embed_dim={cfg['embed_dim']} audio.width={cfg['width']}"
    record = {
        "task": "audio: the category of a 1-s Sounding Shapes sound over pink noise (softmax)",
        "seed": int(seed),
        "config": dict(cfg),
        "data_hash": data_hash(*sets["train"], *sets["val"]),
        "train_loss_last_epoch": round(loss, 5),
        "heldout_accuracy": round(_top1(logits, yv), 4),
        "chance_accuracy": round(float((yv == common).float().mean()), 4),
        "weights_file": path.name,
        "weights_sha256": _save(encoder.state_dict(), path),
        "load_with": f"audio=tiny {sizes} audio.pretrained=file audio.weights_path={path}",
        "wall_time_s": round(time.perf_counter() - start, 1),
    }
    _write_manifest(path, record)
    return record
