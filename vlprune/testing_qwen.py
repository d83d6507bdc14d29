"""The old name of :mod:`vlprune.testing.qwen` (tiny Qwen2-VL, Qwen2.5-VL and Qwen3-VL builders), kept as a shim that
only re-exports its names."""

from vlprune.testing.qwen import (
    DEEPSTACK_VISUAL_INDEXES,
    FULLATT_BLOCK_INDEXES,
    IMAGE_PAD,
    MAX_PIXELS,
    MERGE_SIZE,
    MIN_PIXELS,
    PATCH_SIZE,
    QWEN_CHAT_TEMPLATE,
    TEMPORAL_PATCH_SIZE,
    VIDEO_PAD,
    VISION_DEPTH,
    VISION_END,
    VISION_START,
    WINDOW_SIZE,
    build_tiny_qwen2_5_vl,
    build_tiny_qwen2_vl,
    build_tiny_qwen3_vl,
    build_tiny_qwen_inputs,
)

__all__ = [
    "DEEPSTACK_VISUAL_INDEXES",
    "FULLATT_BLOCK_INDEXES",
    "IMAGE_PAD",
    "MAX_PIXELS",
    "MERGE_SIZE",
    "MIN_PIXELS",
    "PATCH_SIZE",
    "QWEN_CHAT_TEMPLATE",
    "TEMPORAL_PATCH_SIZE",
    "VIDEO_PAD",
    "VISION_DEPTH",
    "VISION_END",
    "VISION_START",
    "WINDOW_SIZE",
    "build_tiny_qwen2_5_vl",
    "build_tiny_qwen2_vl",
    "build_tiny_qwen3_vl",
    "build_tiny_qwen_inputs",
]
