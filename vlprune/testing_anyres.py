"""The old name of :mod:`vlprune.testing.anyres` (tiny LLaVA-NeXT and LLaVA-OneVision builders), kept as a shim that
only re-exports its names."""

from vlprune.testing.anyres import (
    GRID_PINPOINTS,
    VIDEO_TOKEN,
    VIEW_SIZE,
    build_tiny_llava_next,
    build_tiny_llava_onevision,
)
from vlprune.testing.anyres import PATCH_SIZE as PATCH_SIZE

__all__ = ["GRID_PINPOINTS", "VIDEO_TOKEN", "VIEW_SIZE", "build_tiny_llava_next", "build_tiny_llava_onevision"]
