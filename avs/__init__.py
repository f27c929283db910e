"""avs: audio-visual segmentation research framework (AVSBench TPAVI, ECMVAE, AVS-BG)."""

__version__ = "0.1.0"
