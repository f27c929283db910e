"""Pretrained stand-ins made by the framework: the proxy's visual backbone and tiny audio encoder.

The real methods start from an ImageNet backbone and a pretrained VGGish; the CPU proxy
(Sounding Shapes) has neither, so `scripts/pretrain.py` trains both on procedural tasks that are
not the segmentation task, with images and clips drawn from seeds disjoint from the dataset's:

- visual (`pretrain_visual`): which categories are present in a single rendered frame
  (multi-label BCE, linear head on the pooled last stage);
- audio (`pretrain_audio`): the category of a 1-s sound (softmax, linear head on the embedding).

Each writes a weight file that the normal config path reads (`backbone.pretrained=file`,
`audio.pretrained=file`) and a manifest json beside it. See docs/synthetic.md.
"""

from avs.pretrain.run import deterministic, machine_kind, pretrain_audio, pretrain_visual

__all__ = ["deterministic", "machine_kind", "pretrain_audio", "pretrain_visual"]
