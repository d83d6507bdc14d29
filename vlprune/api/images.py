"""The images a pipeline takes: a path or a PIL image opened as RGB, with one-line refusals of missing, unreadable,
empty or oversized images and of aspect ratios an image processor refuses."""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from vlprune.errors import VlpruneError
from vlprune.models.source import first_line

ImageInput = str | os.PathLike | Image.Image


_ASPECT_LIMIT = re.compile(r"aspect ratio must be smaller than (\d+(?:\.\d+)?)")


def _refuse_aspect_ratio(error: ValueError, images: Sequence[ImageInput], pictures: Sequence[Image.Image]) -> None:
    """Turn an image processor's refusal of extreme aspect ratios (Qwen-VL's resizing accepts at most 200 to 1) into
    one line naming the image, its size and the limit; any other error is left as it is.

    Raises:
        VlpruneError: when ``error`` is that refusal.
    """
    found = _ASPECT_LIMIT.search(str(error))
    if found is None:
        return
    limit = float(found.group(1))
    for index, (image, picture) in enumerate(zip(images, pictures, strict=True)):
        ratio = max(picture.size) / min(picture.size)
        if ratio > limit:
            if isinstance(image, str | os.PathLike):
                named = f"image {str(image)!r}"
            else:
                named = "the image" if len(images) == 1 else f"image {index + 1} of the batch"
            raise VlpruneError(
                f"{named} is {picture.width}x{picture.height} pixels, an aspect ratio of {ratio:g} to 1; this model's "
                f"image processor accepts at most {limit:g} to 1: crop or pad the image"
            ) from None
    raise VlpruneError(f"this model's image processor refused an image: {first_line(error)}") from None


def load_image(image: ImageInput) -> Image.Image:
    """An RGB PIL image from a path or a PIL image.

    Raises:
        VlpruneError: the file is missing, unreadable or not an image.
    """
    if isinstance(image, Image.Image):
        return _checked_size(image, "the image").convert("RGB")
    if not isinstance(image, str | os.PathLike):
        raise VlpruneError(f"image must be a path or a PIL.Image, got {type(image).__name__}")
    path = Path(image)
    if path.is_dir():
        raise VlpruneError(f"image {str(path)!r} is a folder, not an image file")
    try:
        with warnings.catch_warnings():
            # PIL only warns between its limit and twice its limit; an image that large is refused either way.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as opened:
                return _checked_size(opened, f"image {str(path)!r}").convert("RGB")
    except VlpruneError:
        raise
    except FileNotFoundError:
        raise VlpruneError(f"image file {str(path)!r} does not exist") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise VlpruneError(
            f"image {str(path)!r} is too large to open safely ({error}); PIL.Image.MAX_IMAGE_PIXELS is "
            f"{Image.MAX_IMAGE_PIXELS} pixels: downscale the image, or raise that limit in Python if you trust the file"
        ) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise VlpruneError(f"cannot read image {str(path)!r}: not a readable image file ({error})") from None


def _checked_size(image: Image.Image, described: str) -> Image.Image:
    if image.width < 1 or image.height < 1:
        raise VlpruneError(f"{described} is {image.width}x{image.height} pixels; it needs at least one pixel")
    return image
