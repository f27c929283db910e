"""Inference on your own data: video demo (demo.py), split visualisations (visualize.py), TorchScript export.

Heavy imports stay in the submodules: `avs.inference.video` needs PyAV (the `avs[video]` extra) only
when a video is actually decoded or written, `avs.inference.visualize` needs scikit-learn (`avs[viz]`)
only for its t-SNE plot.
"""

from avs.inference.model import LoadedModel, load_model
from avs.inference.video import MissingDependencyError, VideoError

__all__ = ["LoadedModel", "load_model", "MissingDependencyError", "VideoError"]
