"""avs: audio-visual segmentation research framework (AVSBench TPAVI, ECMVAE, AVS-BG)."""

from avs.config import register_resolvers as _register_resolvers

__version__ = "0.1.0"
_register_resolvers()
