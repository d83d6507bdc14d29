"""LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``): LLaVA-NeXT's anyres layout with a SigLIP tower, a
stitched tile grid shrunk by bilinear interpolation when it exceeds ``vision_aspect_ratio`` ("anyres_max_9": nine
views' worth of patches), and images of multi-image samples encoded as one view without tiles."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from vlprune.adapters.llava_next import LlavaNextAdapter
from vlprune.adapters.registry import register_adapter
from vlprune.errors import VlpruneError


@register_adapter("LlavaOnevisionForConditionalGeneration", "LlavaOnevisionModel")
class LlavaOnevisionAdapter(LlavaNextAdapter):
    """``LlavaOnevisionForConditionalGeneration`` (or a bare ``LlavaOnevisionModel``), images only: a call with a
    video is refused (``ModelAdapter.check_call``), as the model pools its frames by another path, with no geometry
    here, so its tokens would pass unpruned and uncounted."""

    # Its SigLIP tower has no [CLS] token.
    traits = replace(
        LlavaNextAdapter.traits,
        family="llava-onevision",
        has_cls=False,
        drops_cls=False,
        geometry_inputs=("image_sizes", "batch_num_images"),
    )

    @staticmethod
    def base_model_class() -> type[nn.Module]:
        from transformers import LlavaOnevisionModel

        return LlavaOnevisionModel

    @staticmethod
    def _family_module() -> Any:
        from transformers.models.llava_onevision import modeling_llava_onevision

        return modeling_llava_onevision

    def _pack(self, features: list[torch.Tensor], image_sizes: torch.Tensor, newline: torch.Tensor) -> Any:
        return self.base_model.pack_image_features(
            features, image_sizes, image_newline=newline, vision_aspect_ratio=self.config.vision_aspect_ratio
        )

    def _images(self, model_kwargs: dict[str, Any]) -> list[tuple[tuple[int, int], bool]]:
        sizes = model_kwargs["image_sizes"].tolist()
        counts = model_kwargs.get("batch_num_images")
        if counts is None:  # the model then treats every image as a sample's only one
            return [(tuple(size), True) for size in sizes]
        tiled = [int(n) == 1 for n in counts.tolist() for _ in range(int(n))]
        return [(tuple(size), flag) for size, flag in zip(sizes, tiled, strict=True)]

    def _shrunk(self, height: int, width: int) -> tuple[int, int] | None:
        """The family's rule: shrink by the ratio of the grid's area to ``max`` views' patches when it exceeds 1.1."""
        setting = self.config.vision_aspect_ratio
        if not setting.startswith("anyres_max_"):
            raise VlpruneError(f"vision_aspect_ratio={setting!r} is not supported; vlprune reads 'anyres_max_<n>'")
        vision = self.config.vision_config
        patches = vision.image_size // vision.patch_size
        ratio = math.sqrt(height * width / (int(setting.removeprefix("anyres_max_")) * patches**2))
        if ratio <= 1.1:
            return None
        return int(height // ratio), int(width // ratio)
