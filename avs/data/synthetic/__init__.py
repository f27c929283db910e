"""Sounding Shapes: a procedural dataset in the AVSBench-object layout where only the audio says what to segment.

Each category is a coloured, textured shape paired with a tonal sound (its own fundamental,
partials and amplitude pattern). A clip shows 2-4 objects of distinct categories moving over a
low-contrast noise background. S4: one object sounds for the whole clip; MS3: each audio segment
has its own non-empty set of sounding on-screen objects, sometimes plus an off-screen sound. Which
object sounds is independent of everything visible (category, size, position, motion, draw order),
so visual-only predictors are capped (`compute_ceilings`) while audio + vision can reach 100 %.

Audio segment t is the VGGish example window [0.96 t, 0.96 (t+1)) s (the last one runs to the end
of the clip); frame t (file index t+1) and its mask belong to segment t.
See docs/synthetic.md for the layout, the world and the measured ceilings.
"""

from avs.data.synthetic.ceilings import compute_ceilings
from avs.data.synthetic.clip import video_id
from avs.data.synthetic.render import rle_decode, rle_encode
from avs.data.synthetic.world import (
    COLOURS,
    GENERATOR_VERSION,
    SHAPES,
    SOUNDS,
    Category,
    SyntheticConfig,
    build_categories,
    config_hash,
)
from avs.data.synthetic.writer import COMPLETE_MARKER, META_DIRNAME, ensure_synthetic, generate, is_complete

__all__ = [
    "GENERATOR_VERSION",
    "SHAPES",
    "COLOURS",
    "SOUNDS",
    "COMPLETE_MARKER",
    "META_DIRNAME",
    "Category",
    "SyntheticConfig",
    "build_categories",
    "config_hash",
    "generate",
    "compute_ceilings",
    "ensure_synthetic",
    "is_complete",
    "rle_encode",
    "rle_decode",
    "video_id",
]
