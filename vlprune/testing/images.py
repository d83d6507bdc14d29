"""Deterministic test images: a few coloured rectangles on a plain background."""

from __future__ import annotations

import numpy as np
from PIL import Image


def make_test_image(seed: int, size: int = 32) -> Image.Image:
    """Draw a deterministic RGB test image: a few coloured rectangles on a plain background.

    Args:
        seed: Seed for the random colours and rectangle positions.
        size: Side length of the square image in pixels.

    Returns:
        A ``size`` x ``size`` RGB :class:`PIL.Image.Image`.

    Raises:
        ValueError: If ``size`` is smaller than 2.
    """
    if size < 2:
        raise ValueError(f"size must be at least 2, got {size}.")
    rng = np.random.default_rng(seed)
    pixels = np.empty((size, size, 3), dtype=np.uint8)
    pixels[:] = rng.integers(0, 256, size=3, dtype=np.uint8)
    for _ in range(int(rng.integers(2, 5))):
        top, left = (int(v) for v in rng.integers(0, size - 1, size=2))
        height, width = (int(v) for v in rng.integers(max(1, size // 8), max(2, size // 2) + 1, size=2))
        pixels[top : top + height, left : left + width] = rng.integers(0, 256, size=3, dtype=np.uint8)
    return Image.fromarray(pixels)
