"""LLaVA-NeXT (``LlavaNextForConditionalGeneration``): anyres images, a base view and a grid of tiles per image.

The model encodes each image as a base view (the whole image resized to the tower's input) and the tiles of the
best-fitting grid from ``image_grid_pinpoints``, stitches the tiles' patch grids into one grid, unpads it to the
image's aspect ratio and ends every row with the learned ``image_newline`` token; the base view's patches come first.
The adapter reproduces that layout per token with the family's own grid and unpadding functions.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import nn

from vlprune.adapters.llava import LlavaAdapter
from vlprune.adapters.registry import register_adapter
from vlprune.errors import VlpruneError
from vlprune.geometry import PADDING, ImageTokens, VisualGeometry, batch_geometry, single_view, tiled_view
from vlprune.needs import Need


@register_adapter("LlavaNextForConditionalGeneration", "LlavaNextModel")
class LlavaNextAdapter(LlavaAdapter):
    """``LlavaNextForConditionalGeneration`` (or a bare ``LlavaNextModel``) with a CLIP or SigLIP tower."""

    # A tiled image has no one square attention map: methods that read one have no multi-crop path here.
    traits = replace(
        LlavaAdapter.traits,
        family="llava-next",
        multi_crop=True,
        geometry_inputs=("image_sizes",),
        vision_reads=LlavaAdapter.traits.vision_reads - {Need.VISION_MAP},
    )

    @staticmethod
    def base_model_class() -> type[nn.Module]:
        from transformers import LlavaNextModel

        return LlavaNextModel

    @staticmethod
    def _family_module() -> Any:
        from transformers.models.llava_next import modeling_llava_next

        return modeling_llava_next

    def visual_geometry(
        self, model_kwargs: dict[str, Any], per_sample: list[int], device: torch.device
    ) -> VisualGeometry:
        if model_kwargs.get("image_sizes") is None:
            raise VlpruneError(
                f"the {self.family} model encoded no image_sizes for this prefill: pass pixel_values with the "
                f"processor's image_sizes (image features computed before attaching vlprune cannot be placed)"
            )
        images = [self.image_tokens((int(h), int(w)), patched) for (h, w), patched in self._images(model_kwargs)]
        try:
            return batch_geometry(images, per_sample, device)
        except ValueError as error:
            raise VlpruneError(f"{self.family}: {error}; were the prompts and pixel values made together?") from None

    def image_views(self, model_kwargs: dict[str, Any]) -> list[tuple[int, int]]:
        images = [self.image_tokens((int(h), int(w)), tiled) for (h, w), tiled in self._images(model_kwargs)]
        return [(len(image), image.num_crops) for image in images]

    def pack_crop_values(
        self, values: torch.Tensor, model_kwargs: dict[str, Any], geometry: VisualGeometry, fill: float
    ) -> torch.Tensor:
        """The family's own ``pack_image_features`` run on the values as one-channel features, so that unpadding and
        OneVision's bilinear down-scaling treat them exactly as they treat the features."""
        crops = [views for _, views in self.image_views(model_kwargs)]
        if sum(crops) != values.shape[0]:
            raise VlpruneError(f"{self.family}: values for {values.shape[0]} crops, the images have {sum(crops)}")
        per_image = list(values[..., None].split(crops))
        newline = torch.full((1,), float(fill), dtype=values.dtype, device=values.device)
        packed, _ = self._pack(per_image, model_kwargs["image_sizes"], newline)
        flat = torch.cat([image[:, 0] for image in packed])
        counts = (geometry.view != PADDING).sum(dim=1).tolist()
        rows = flat.split(counts)
        width = geometry.view.shape[1]
        return torch.stack([torch.cat([row, row.new_full((width - len(row),), fill)]) for row in rows])

    def _pack(self, features: list[torch.Tensor], image_sizes: torch.Tensor, newline: torch.Tensor) -> Any:
        strategy = self.config.vision_feature_select_strategy
        return self.base_model.pack_image_features(features, image_sizes, strategy, image_newline=newline)

    def _images(self, model_kwargs: dict[str, Any]) -> list[tuple[tuple[int, int], bool]]:
        """(size, whether it is tiled) of every image of the batch, in the order the model encodes them."""
        return [(tuple(size), True) for size in model_kwargs["image_sizes"].tolist()]

    def image_tokens(self, size: tuple[int, int], tiled: bool = True) -> ImageTokens:
        """The visual tokens of one image of ``size`` (height, width), tiled or encoded as one view."""
        vision = self.config.vision_config
        patches = vision.image_size // vision.patch_size
        if not tiled:
            return single_view(patches, patches, newline=True)
        family = self._family_module()
        tiles_down, tiles_across = family.get_anyres_image_grid_shape(
            list(size), self.config.image_grid_pinpoints, vision.image_size
        )
        height, width = tiles_down * patches, tiles_across * patches
        # Unpadding an index map with the family's own function says which rows and columns it keeps.
        index = torch.arange(height * width).view(1, height, width)
        kept = family.unpad_image(index, torch.tensor(size))
        kept_rows, kept_cols = _kept_lines(kept[0], width)
        return tiled_view(
            patches, (tiles_down, tiles_across), kept_rows, kept_cols, self._shrunk(len(kept_rows), len(kept_cols))
        )

    def _shrunk(self, height: int, width: int) -> tuple[int, int] | None:
        """The grid's size after down-scaling, when the family shrinks it (LLaVA-NeXT never does)."""
        return None


def _kept_lines(kept: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows and columns of a (height, width) index map that unpadding kept, as ``kept`` holds them.

    Unpadding crops either rows or columns, never both: when it leaves no column (an image hundreds of times taller
    than wide) or no row, the other side is whole, and the empty side has nothing to read the indices from.
    """
    if kept.numel() == 0:
        return torch.arange(kept.shape[0]), torch.arange(kept.shape[1])
    return kept[:, 0] // width, kept[0, :] % width
