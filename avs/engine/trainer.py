"""One trainer for every AVSegmentor variant: device, AMP, checkpoints, resume, validation, test."""

from __future__ import annotations

import json
import logging
import math
import os
import random
import subprocess
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader
from tqdm import tqdm

from avs.engine.checkpoint import (
    CheckpointError,
    capture_rng,
    load_checkpoint,
    model_state_from,
    restore_rng,
    save_checkpoint,
)
from avs.engine.sampler import ResumableSampler
from avs.metrics import MetricAccumulator
from avs.models.build import build_model
from avs.utils.io import atomic_write_text

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- setup helpers
def select_device(spec: str = "auto") -> torch.device:
    """'auto' -> CUDA when available, else CPU; otherwise the named device."""
    if spec in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(spec)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"trainer.device={spec!r} but CUDA is not available (use trainer.device=auto or cpu)")
    return dev


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python, NumPy and torch; optionally force deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False


def git_commit() -> str | None:
    """The checkout's HEAD commit, if this is a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def resolve_loss_weights(cfg: DictConfig) -> dict[str, float]:
    """`model.loss_weights` with 'auto' entries resolved per data subset (e.g. A-V loss 0 on S4, 0.5 on MS3)."""
    weights = OmegaConf.to_container(cfg.model.loss_weights, resolve=True)
    auto = OmegaConf.to_container(cfg.model.get("auto_weights", {}) or {}, resolve=True)
    subset = cfg.data.subset
    out = {}
    for name, w in weights.items():
        if w == "auto":
            if name not in auto or subset not in auto[name]:
                raise ValueError(f"model.loss_weights.{name}=auto needs model.auto_weights.{name}.{subset}")
            w = auto[name][subset]
        out[name] = float(w)
    return out


def _move(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    nb = device.type == "cuda"
    return {k: v.to(device, non_blocking=nb) if torch.is_tensor(v) else v for k, v in batch.items()}


# ----------------------------------------------------------------------------- the trainer
class Trainer:
    """Trains and evaluates one model from a composed config; writes everything under `run_dir`."""

    def __init__(self, cfg: DictConfig, run_dir: str | Path) -> None:
        from avs.config_checks import check_config

        check_config(cfg)
        self.cfg = cfg
        self.tcfg = cfg.trainer
        self.run_dir = Path(run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.device = select_device(self.tcfg.device)
        seed_everything(int(cfg.seed), bool(self.tcfg.deterministic))
        self.loss_weights = resolve_loss_weights(cfg)
        self.model = build_model(cfg).to(self.device)
        if cfg.model.get("init_from"):
            self._init_from(cfg.model.init_from)
        if self.tcfg.get("channels_last") and self.device.type == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(
            params, lr=float(self.tcfg.lr), weight_decay=float(self.tcfg.get("weight_decay", 0.0))
        )
        self.amp_dtype = self._amp_dtype()
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.best: dict[str, Any] = {"metric": -math.inf, "epoch": None, "step": None}
        self.history: list[dict[str, Any]] = []
        self.loss_history: list[float] = []
        self.skipped: list[str] = []  # clips dropped with data.on_error=skip
        self._datasets: dict[str, Any] = {}
        self._writer = None
        self.scheduler = None  # built in fit() once the number of steps is known

    # ------------------------------------------------------------------ data
    def dataset(self, split: str):
        """The split's dataset (built once; synthetic data is generated on first use)."""
        if split not in self._datasets:
            from avs.data import build_dataset

            if self.cfg.data.get("synthetic"):
                from avs.data.synthetic import ensure_synthetic

                ensure_synthetic(self.cfg.data)
            ds = build_dataset(self.cfg.data, split, train=(split == "train"))
            ds.seed = int(self.cfg.seed)  # augmentation draws follow (seed, epoch, index)
            self._datasets[split] = ds
        return self._datasets[split]

    def _loader(self, split: str, sampler=None, batch_size: int | None = None) -> DataLoader:
        dcfg = self.cfg.data
        ds = self.dataset(split)
        pin = dcfg.get("pin_memory", "auto")
        pin = self.device.type == "cuda" if pin == "auto" else bool(pin)
        workers = int(dcfg.num_workers)
        collate = None
        if dcfg.get("on_error", "raise") == "skip":
            from avs.data import collate_skip_none

            collate = collate_skip_none
        return DataLoader(
            ds,
            batch_size=batch_size or int(dcfg.eval_batch_size),
            sampler=sampler,
            shuffle=False,
            num_workers=workers,
            pin_memory=pin,
            persistent_workers=False,
            collate_fn=collate,
            generator=torch.Generator().manual_seed(int(self.cfg.seed)),
        )

    # ------------------------------------------------------------------ model helpers
    def _amp_dtype(self) -> torch.dtype | None:
        amp = str(self.tcfg.get("amp", "auto"))
        if amp in ("off", "false", "False", "none", "None"):
            return None
        if amp == "auto":
            if self.device.type != "cuda":
                return None
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        table = {"bf16": torch.bfloat16, "fp16": torch.float16}
        if amp not in table:
            raise ValueError(f"trainer.amp must be auto|off|bf16|fp16, got {amp!r}")
        if amp == "fp16" and self.device.type != "cuda":
            raise ValueError("trainer.amp=fp16 needs CUDA; use bf16 or off on CPU")
        return table[amp]

    def _autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _init_from(self, path: str) -> None:
        """S4 -> MS3 style initialisation: load matching weights, report what was skipped."""
        state = model_state_from(load_checkpoint(path), path)
        own = self.model.state_dict()
        usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
        skipped = sorted(set(state) - set(usable))
        missing = sorted(set(own) - set(usable))
        self.model.load_state_dict(usable, strict=False)
        log.info("init_from %s: loaded %d tensors, skipped %d, left %d at init", path, len(usable), len(skipped), len(missing))
        if not usable:
            raise CheckpointError(f"model.init_from={path}: no tensor matches this model")

    def _build_scheduler(self, total_steps: int):
        kind = str(self.tcfg.get("schedule", "constant"))
        if kind == "constant":
            return None
        if kind == "cosine":
            return torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=max(1, total_steps))
        if kind == "poly":
            return torch.optim.lr_scheduler.PolynomialLR(self.optimizer, total_iters=max(1, total_steps), power=0.9)
        raise ValueError(f"trainer.schedule must be constant|cosine|poly, got {kind!r}")

    # ------------------------------------------------------------------ checkpoints
    def _state(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "epoch": self.epoch,
            "step": self.step,
            "batch_in_epoch": self.batch_in_epoch,
            "best": dict(self.best),
            "history": list(self.history),
            "loss_history": list(self.loss_history),
            "rng": capture_rng(),
            "config": OmegaConf.to_yaml(self.cfg, resolve=True),
            "avs_checkpoint_version": 1,
        }

    def save(self, name: str) -> Path:
        """Write checkpoints/<name>.ckpt atomically."""
        path = self.ckpt_dir / f"{name}.ckpt"
        save_checkpoint(path, self._state())
        return path

    def resume(self, spec: str) -> bool:
        """`auto` -> last checkpoint of this run dir if any; otherwise a path. Returns True if resumed."""
        path = self.ckpt_dir / "last.ckpt" if spec == "auto" else Path(spec)
        if spec == "auto" and not path.exists():
            log.info("trainer.resume=auto: no checkpoint in %s, starting fresh", self.ckpt_dir)
            return False
        state = load_checkpoint(path)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        if self.scheduler is not None and state.get("scheduler"):
            self.scheduler.load_state_dict(state["scheduler"])
        self.epoch, self.step, self.batch_in_epoch = state["epoch"], state["step"], state["batch_in_epoch"]
        self.best = dict(state["best"])
        self.history = list(state["history"])
        self.loss_history = list(state["loss_history"])
        restore_rng(state["rng"])
        log.info("resumed from %s at epoch %d, step %d (batch %d of the epoch)", path, self.epoch, self.step, self.batch_in_epoch)
        return True

    # ------------------------------------------------------------------ logging
    def writer(self):
        if self._writer is None and self.tcfg.get("tensorboard", True):
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.run_dir / "tensorboard"))
        return self._writer

    def _log_scalars(self, prefix: str, values: dict[str, float], step: int) -> None:
        w = self.writer()
        if w is not None:
            for k, v in values.items():
                w.add_scalar(f"{prefix}/{k}", v, step)

    # ------------------------------------------------------------------ training
    def fit(self) -> dict[str, Any]:
        """Train with val-based selection; then evaluate the best checkpoint on test once."""
        tcfg = self.tcfg
        train_ds = self.dataset("train")
        bs = int(self.cfg.data.batch_size)
        accum = max(1, int(tcfg.get("grad_accum", 1)))
        drop_last = bool(tcfg.get("drop_last", False))
        batches_per_epoch = len(train_ds) // bs if drop_last else math.ceil(len(train_ds) / bs)
        if batches_per_epoch == 0:
            raise ValueError(f"data.batch_size={bs} is larger than the train split ({len(train_ds)} clips) with drop_last")
        steps_per_epoch = max(1, batches_per_epoch // accum)
        max_steps = int(tcfg.get("max_steps") or 0)
        epochs = int(tcfg.epochs)
        total_steps = max_steps if max_steps > 0 else epochs * steps_per_epoch
        if max_steps > 0:
            epochs = math.ceil(max_steps / steps_per_epoch)
        self.scheduler = self._build_scheduler(total_steps)
        if tcfg.get("resume"):
            self.resume(str(tcfg.resume))
        self.run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.run_dir / "config_resolved.yaml", OmegaConf.to_yaml(self.cfg, resolve=True))

        sampler = ResumableSampler(len(train_ds), shuffle=True, seed=int(self.cfg.seed))
        val_every = int(tcfg.get("val_every_epochs", 1))
        ckpt_every = int(tcfg.get("checkpoint_every_steps", 0) or 0)
        interrupt_after = int(tcfg.get("interrupt_after_steps", 0) or 0)
        log_every = int(tcfg.get("log_every_steps", 10))
        clip = float(tcfg.get("grad_clip", 0) or 0)
        t0 = time.time()
        bar = tqdm(total=total_steps, initial=self.step, desc="train", disable=not tcfg.get("progress", True), dynamic_ncols=True)
        stop = self.step >= total_steps
        while not stop and self.epoch < epochs:
            sampler.set_epoch(self.epoch, start=self.batch_in_epoch * bs)
            train_ds.set_epoch(self.epoch)
            loader = self._loader("train", sampler=sampler, batch_size=bs)
            self.model.train()
            micro = 0
            self.optimizer.zero_grad(set_to_none=True)
            for batch in loader:
                self.skipped += [v for v in batch.get("skipped", []) if v is not None]
                if "frames" not in batch:  # data.on_error=skip and every clip of the batch failed
                    self.batch_in_epoch += 1
                    continue
                if drop_last and batch["frames"].shape[0] < bs:
                    break
                batch = _move(batch, self.device)
                with self._autocast():
                    terms = self.model(batch)
                loss = sum(self.loss_weights.get(k, 0.0) * v for k, v in terms.items())
                self.scaler.scale(loss / accum).backward()
                micro += 1
                self.batch_in_epoch += 1
                if micro % accum:
                    continue
                if clip > 0:
                    self.scaler.unscale_(self.optimizer)
                    torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.optimizer.zero_grad(set_to_none=True)
                if self.scheduler is not None:
                    self.scheduler.step()
                self.step += 1
                loss_value = float(loss.detach())
                self.loss_history.append(loss_value)
                bar.update(1)
                bar.set_postfix(loss=f"{loss_value:.4f}", epoch=self.epoch)
                if self.step % log_every == 0 or self.step == 1:
                    scalars = {k: float(v.detach()) for k, v in terms.items()}
                    scalars["total"] = loss_value
                    scalars["lr"] = self.optimizer.param_groups[0]["lr"]
                    self._log_scalars("train", scalars, self.step)
                if ckpt_every and self.step % ckpt_every == 0:
                    self.save("last")
                if interrupt_after and self.step >= interrupt_after:
                    self.save("last")
                    bar.close()
                    log.warning("trainer.interrupt_after_steps=%d reached: stopping (resume with trainer.resume=auto)", interrupt_after)
                    return {"interrupted": True, "step": self.step}
                if self.step >= total_steps:
                    stop = True
                    break
            self.epoch += 1
            self.batch_in_epoch = 0
            if self.epoch % val_every == 0 or stop or self.epoch == epochs:
                self._validate()
            self.save("last")
        bar.close()
        train_time = time.time() - t0
        return self._finish(train_time)

    def _validate(self) -> None:
        split = str(self.tcfg.get("select_split", "val"))  # test only with allow_test_selection (config check)
        metrics = self.evaluate(split)
        key = str(self.tcfg.get("select_metric", "miou"))
        protocol = str(self.cfg.eval.protocol)
        value = metrics[protocol][key]
        entry = {"epoch": self.epoch, "step": self.step, split: metrics}
        self.history.append(entry)
        self._log_scalars("val", {f"{protocol}/{k}": v for k, v in metrics[protocol].items() if isinstance(v, (int, float))}, self.step)
        if value > self.best["metric"]:
            self.best = {"metric": float(value), "epoch": self.epoch, "step": self.step, "val": metrics}
            self.save("best")
            log.info("new best val %s/%s = %.4f at epoch %d", protocol, key, value, self.epoch)

    def _finish(self, train_time: float) -> dict[str, Any]:
        """Load the best checkpoint, evaluate test once, write metrics.json."""
        selection_split = str(self.tcfg.get("select_split", "val"))
        best_path = self.ckpt_dir / "best.ckpt"
        if best_path.exists():
            self.model.load_state_dict(load_checkpoint(best_path)["model"])
        result: dict[str, Any] = {"best": self.best, "train_time_s": train_time, "steps": self.step}
        if self.tcfg.get("test_at_end", True):
            result["test"] = self.evaluate("test")
        self._write_metrics(result, selection_split)
        if self._writer is not None:
            self._writer.close()
        return result

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, split: str, save_masks_dir: str | Path | None = None) -> dict[str, dict[str, float]]:
        """Metrics of the current weights on `split` under every configured protocol."""
        ecfg = self.cfg.eval
        ds = self.dataset(split)
        loader = self._loader(split, sampler=None, batch_size=int(self.cfg.data.eval_batch_size))
        acc = MetricAccumulator()
        self.model.eval()
        for batch in tqdm(loader, desc=f"eval {split}", leave=False, disable=not self.tcfg.get("progress", True)):
            self.skipped += [v for v in batch.get("skipped", []) if v is not None]
            if "frames" not in batch:
                continue
            batch = _move(batch, self.device)
            with self._autocast():
                out = self.model(batch)
            logits = out["logits"].float()
            acc.update(logits, batch["masks"], indices=batch["index"])
            if save_masks_dir is not None:
                from avs.engine.outputs import save_pred_masks

                save_pred_masks(save_masks_dir, ds, batch, logits)
        protocols = list(ecfg.protocols)
        lb = int(ecfg.get("legacy_batch_size", self.cfg.data.eval_batch_size))
        return {p: acc.compute(p, legacy_batch_size=lb) for p in protocols}

    def _write_metrics(self, result: dict[str, Any], selection_split: str) -> None:
        cfg = self.cfg
        record = {
            "method": cfg.model.get("name"),
            "backbone": cfg.backbone.get("name"),
            "data": {
                "name": cfg.data.get("name"),
                "subset": cfg.data.subset,
                "release": cfg.data.get("release", "synthetic" if cfg.data.get("synthetic") else "avsbench-object"),
                "root": str(cfg.data.root),
            },
            "resolution": int(cfg.data.image_size),
            "num_frames": int(cfg.data.num_frames),
            "metric_protocols": list(cfg.eval.protocols),
            "selection": {"split": selection_split, "protocol": str(cfg.eval.protocol), "metric": str(self.tcfg.get("select_metric", "miou"))},
            "eval_batch_size": int(cfg.data.eval_batch_size),
            "legacy_batch_size": int(cfg.eval.get("legacy_batch_size", cfg.data.eval_batch_size)),
            "init_from": cfg.model.get("init_from"),
            "supervised_frames": "first" if cfg.data.subset == "s4" else "all",
            "seed": int(cfg.seed),
            "git_commit": git_commit(),
            "loss_weights": self.loss_weights,
            "skipped_clips": sorted(set(self.skipped)),
            "val": self.best.get("val"),
            "test": result.get("test"),
            "best_epoch": self.best.get("epoch"),
            "best_step": self.best.get("step"),
            "steps": result["steps"],
            "train_time_s": result["train_time_s"],
            "history": self.history,
            "config": OmegaConf.to_container(cfg, resolve=True),
        }
        atomic_write_text(self.run_dir / "metrics.json", json.dumps(record, indent=2, default=str))
