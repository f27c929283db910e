"""VGGish audio embedding network (torchvggish layout) with the optional PCA / quantisation post-processor.

Layer order (torchvggish) and the resulting parameter names of `vggish-10086976.pth`:
features.{0,3,6,8,11,13} = conv3x3 (1->64, 64->128, 128->256, 256->256, 256->512, 512->512), ReLU after
each, 2x2 max-pools at features.{2,5,10,15}; embeddings.{0,2,4} = Linear 12288->4096->4096->128, each
followed by ReLU. 72,141,184 parameters.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from avs.data.audio import EMBEDDING_DIM, LOGMEL_SHAPE

log = logging.getLogger(__name__)

FEATURE_CFG: tuple[int | str, ...] = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M")
PCA_EIGEN_VECTORS = "pca_eigen_vectors"
PCA_MEANS = "pca_means"
QUANTIZE_MIN, QUANTIZE_MAX = -2.0, 2.0

__all__ = ["VGGish", "postprocess_embeddings"]


def _make_features(device: str | None = None) -> nn.Sequential:
    layers: list[nn.Module] = []
    c_in = 1
    for v in FEATURE_CFG:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(c_in, int(v), kernel_size=3, padding=1, device=device), nn.ReLU(inplace=True)]
            c_in = int(v)
    return nn.Sequential(*layers)


def _numpy_safe_globals() -> list[Any]:
    """Globals a torch.save'd dict of float NumPy arrays needs under weights_only=True."""
    core = getattr(np, "_core", None) or np.core
    out: list[Any] = [core.multiarray._reconstruct, np.ndarray, np.dtype]
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        out += [getattr(dtypes, n) for n in ("Float32DType", "Float64DType") if hasattr(dtypes, n)]
    return out


def _load_weights_file(path: Path) -> dict[str, Any]:
    """torch.load(weights_only=True) of a dict of tensors (or float NumPy arrays)."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as first:
        # The published PCA file may hold NumPy arrays; allow exactly the globals they need.
        try:
            with torch.serialization.safe_globals(_numpy_safe_globals()):
                obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:
            raise ValueError(f"cannot load weight file {path} with torch.load(weights_only=True): {first}") from first
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ValueError(f"weight file {path} holds a {type(obj).__name__}, expected a state dict")
    return {k: torch.as_tensor(v) for k, v in obj.items()}


def postprocess_embeddings(emb: torch.Tensor, eigen_vectors: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
    """VGGish PCA + clip [-2,2] + 8-bit quantisation: [N,128] -> [N,128] floats in {0..255}."""
    pca = (eigen_vectors @ (emb.t() - means.reshape(-1, 1))).t()  # [128,128] @ [128,N] -> [N,128]
    clipped = pca.clamp(QUANTIZE_MIN, QUANTIZE_MAX)
    return torch.round((clipped - QUANTIZE_MIN) * (255.0 / (QUANTIZE_MAX - QUANTIZE_MIN)))


class VGGish(nn.Module):
    """VGGish: log-mel examples [N,1,96,64] -> embeddings [N,128] (ReLU'd; PCA-quantised if postprocess)."""

    def __init__(
        self,
        weights_path: str | os.PathLike | None,
        pretrained: bool = True,
        pca_path: str | os.PathLike | None = None,
        postprocess: bool = False,
        trainable: bool = False,
    ) -> None:
        super().__init__()
        # Resolve files before allocating 72 M parameters, so a missing file fails fast.
        weights = self._require_file(weights_path, "weights_path", "vggish-10086976.pth") if pretrained else None
        if postprocess and pca_path is None:
            raise ValueError("VGGish postprocess=true needs pca_path (vggish_pca_params-970ea276.pth)")
        pca = self._require_file(pca_path, "pca_path", "vggish_pca_params-970ea276.pth") if postprocess else None

        init_device = "meta" if weights is not None else None  # skip the random init the file overwrites
        self.features = _make_features(init_device)
        self.embeddings = nn.Sequential(
            nn.Linear(512 * 6 * 4, 4096, device=init_device),
            nn.ReLU(inplace=True),
            nn.Linear(4096, 4096, device=init_device),
            nn.ReLU(inplace=True),
            nn.Linear(4096, EMBEDDING_DIM, device=init_device),
            nn.ReLU(inplace=True),
        )
        self.embed_dim = EMBEDDING_DIM
        self.trainable = bool(trainable)
        self.postprocess = bool(postprocess)

        if weights is not None:
            self.to_empty(device="cpu")
            self.load_weights(weights)
        if pca is not None:
            self.load_pca(pca)

        for p in self.parameters():
            p.requires_grad_(self.trainable)
        if not self.trainable:
            super().train(False)

    @staticmethod
    def _require_file(path: str | os.PathLike | None, key: str, default_name: str) -> Path:
        if path is None:
            raise FileNotFoundError(
                f"VGGish {key} is null but pretrained=true needs {default_name}; random initialisation is "
                "available only with pretrained=false (config key `audio.pretrained` for the model, "
                "`vggish.pretrained` for scripts/extract_audio.py)"
            )
        p = Path(path).expanduser()
        if not p.is_file():
            raise FileNotFoundError(
                f"VGGish {key}: weight file {p.name} not found at {p.resolve()} (looked in {p.resolve().parent}). "
                f"Download {default_name} into the weights dir (paths.weights_dir), or set pretrained=false "
                "for random initialisation (config key `audio.pretrained` for the model, "
                "`vggish.pretrained` for scripts/extract_audio.py)"
            )
        return p

    def load_weights(self, path: str | os.PathLike) -> None:
        """Strictly load a torchvggish-layout state dict (features.*, embeddings.*) from `path`."""
        path = Path(path)
        state = _load_weights_file(path)
        own = {k: v for k, v in self.state_dict().items() if k.startswith(("features.", "embeddings."))}
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        if missing or unexpected:
            raise ValueError(
                f"VGGish weight file {path} does not match the torchvggish layout: "
                f"missing keys {missing}, unexpected keys {unexpected}"
            )
        wrong = [
            f"{k}: file {list(state[k].shape)} vs model {list(v.shape)}"
            for k, v in own.items()
            if state[k].shape != v.shape
        ]
        if wrong:
            raise ValueError(f"VGGish weight file {path}: shape mismatch for {wrong}")
        with torch.no_grad():
            for k, v in own.items():
                v.copy_(state[k].to(v.dtype))

    def load_pca(self, path: str | os.PathLike) -> None:
        """Load `pca_eigen_vectors` [128,128] and `pca_means` [128] (stored as [128,1]) as buffers."""
        path = Path(path)
        state = _load_weights_file(path)
        missing = [k for k in (PCA_EIGEN_VECTORS, PCA_MEANS) if k not in state]
        if missing:
            raise ValueError(f"VGGish PCA file {path} lacks {missing} (has {sorted(state)})")
        vecs = state[PCA_EIGEN_VECTORS].float()
        means = state[PCA_MEANS].float().reshape(-1, 1)
        if tuple(vecs.shape) != (EMBEDDING_DIM, EMBEDDING_DIM) or tuple(means.shape) != (EMBEDDING_DIM, 1):
            raise ValueError(
                f"VGGish PCA file {path}: expected {PCA_EIGEN_VECTORS} [128,128] and {PCA_MEANS} [128], "
                f"got {list(vecs.shape)} and {list(state[PCA_MEANS].shape)}"
            )
        self.register_buffer(PCA_EIGEN_VECTORS, vecs)
        self.register_buffer(PCA_MEANS, means)

    def train(self, mode: bool = True) -> VGGish:
        """Stay in eval mode unless constructed with trainable=True."""
        return super().train(mode and self.trainable)

    def forward(self, logmel: torch.Tensor) -> torch.Tensor:
        """[N,1,96,64] log-mel -> [N,128] embeddings."""
        if logmel.dim() != 4 or tuple(logmel.shape[1:]) != LOGMEL_SHAPE:
            raise ValueError(f"VGGish expects log-mel shaped [N,1,96,64], got {list(logmel.shape)}")
        x = self.features(logmel)  # [N,1,96,64] -> [N,512,6,4]
        x = x.permute(0, 2, 3, 1).flatten(1)  # NHWC (TF order): [N,512,6,4] -> [N,6,4,512] -> [N,12288]
        emb = self.embeddings(x)  # [N,12288] -> [N,128]
        if self.postprocess:
            emb = postprocess_embeddings(emb, getattr(self, PCA_EIGEN_VECTORS), getattr(self, PCA_MEANS))
        return emb
