"""The visual-token geometry of every family against the model's own packing code.

Each crop's features are replaced by their coordinates (crop, row and column in the stitched grid before unpadding,
patch index), packed by the family's own ``pack_image_features`` (unpadding, line breaks, OneVision's bilinear
down-scaling), and every packed token's coordinates are compared with what :meth:`visual_geometry` says about it.
"""

from __future__ import annotations

import pytest
import torch
from conftest import shared_model

from vlprune.adapters import adapter_for
from vlprune.geometry import NEWLINE, VisualGeometry
from vlprune.testing import build_tiny_inputs, make_test_image

SIZES = [(40, 20), (20, 40), (50, 50), (28, 28), (30, 90), (90, 30), (56, 57), (1, 250), (250, 1)]
"""(width, height) of test images: wide, tall, square, tiny, very wide, very tall, nearly square, and two slivers
that unpadding cuts to no column or no row of tiles."""

MARK = -7.0


@pytest.fixture(scope="module", params=["llava-next", "llava-onevision"])
def family(request):
    return shared_model(request.param, num_hidden_layers=2, vision_layers=1)


def _coordinate_features(model, image_sizes: torch.Tensor) -> list[torch.Tensor]:
    """Per image, (crops, patches^2, 4) features: [global crop, stitched row, stitched column, patch index]."""
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

    vision = model.config.vision_config
    side = vision.image_size // vision.patch_size
    patch = torch.arange(side * side)
    features, offset = [], 0
    for size in image_sizes.tolist():
        rows, cols = get_anyres_image_grid_shape(size, model.config.image_grid_pinpoints, vision.image_size)
        crops = []
        for crop in range(1 + rows * cols):
            tile_row, tile_col = divmod(crop - 1, cols) if crop else (0, 0)
            crops.append(
                torch.stack(
                    [
                        torch.full_like(patch, offset + crop),
                        tile_row * side + patch // side,
                        tile_col * side + patch % side,
                        patch,
                    ],
                    dim=-1,
                ).float()
            )
        features.append(torch.stack(crops))
        offset += len(crops)
    return features


def _packed(model, features: list[torch.Tensor], image_sizes: torch.Tensor) -> torch.Tensor:
    newline = torch.full((4,), MARK)
    base = model.model
    if "Onevision" in type(model).__name__:
        packed, _ = base.pack_image_features(
            features, image_sizes, image_newline=newline, vision_aspect_ratio=model.config.vision_aspect_ratio
        )
    else:
        packed, _ = base.pack_image_features(features, image_sizes, "default", image_newline=newline)
    return torch.cat(packed)


def test_geometry_matches_the_models_own_packing_on_many_aspect_ratios(family) -> None:
    model, processor = family
    adapter = adapter_for(model)
    for width, height in SIZES:
        image = make_test_image(width * 7 + height, 96).resize((width, height))
        inputs = build_tiny_inputs(processor, [image], ["Where is the square?"])
        count = int((inputs["input_ids"] == model.config.image_token_id).sum())
        geometry = adapter.visual_geometry(dict(inputs), [count], torch.device("cpu"))
        packed = _packed(model, _coordinate_features(model, inputs["image_sizes"]), inputs["image_sizes"])
        assert packed.shape[0] == count == geometry.shape[1], (width, height)
        breaks = packed[:, 0] == MARK
        assert torch.equal(geometry.is_newline[0], breaks), (width, height)
        tokens = ~breaks
        crop, stitched_row, stitched_col, patch = packed[tokens].unbind(-1)
        g = geometry.take(torch.nonzero(tokens)[:, 0][None])
        side = model.config.vision_config.image_size // model.config.vision_config.patch_size
        tile = g.view[0] > 0
        expected_row = torch.where(tile, g.tile_row[0] * side + g.row[0], g.row[0]).float()
        expected_col = torch.where(tile, g.tile_col[0] * side + g.col[0], g.col[0]).float()
        # Interpolation blends neighbours; the geometry names the nearest one, within half a patch.
        assert torch.all((stitched_row - expected_row).abs() <= 0.5), (width, height)
        assert torch.all((stitched_col - expected_col).abs() <= 0.5), (width, height)
        if torch.equal(stitched_row, stitched_row.round()) and torch.equal(stitched_col, stitched_col.round()):
            # No down-scaling: every token is one crop's patch, and the geometry names that crop and patch.
            assert torch.equal(crop.long(), g.crop[0]) and torch.equal(patch.long(), g.crop_token[0])
        assert torch.equal(g.crop_token[0], g.row[0] * side + g.col[0])
        _check_grid_facts(geometry, side)


def _check_grid_facts(geometry: VisualGeometry, side: int) -> None:
    """What holds for any anyres geometry: base view first and complete, each stitched row ends with one line break,
    tiles numbered from their grid place."""
    view = geometry.view[0]
    assert torch.equal(view[: side * side], torch.zeros(side * side, dtype=torch.long))
    tiles = view[side * side :]
    breaks = torch.nonzero(tiles == NEWLINE)[:, 0]
    width = int(geometry.full_col[0][side * side + breaks[0]])
    assert torch.equal(breaks, torch.arange(len(breaks)) * (width + 1) + width)
    tile = view > 0
    columns = int(geometry.tile_col[0].max()) + 1
    assert torch.equal(view[tile], 1 + geometry.tile_row[0][tile] * columns + geometry.tile_col[0][tile])


def test_onevision_down_scaling_is_exercised_and_changes_the_grid() -> None:
    model, processor = shared_model("llava-onevision", num_hidden_layers=2, vision_layers=1)
    image = make_test_image(3, 96).resize((50, 50))
    inputs = build_tiny_inputs(processor, [image], ["Where?"])
    count = int((inputs["input_ids"] == model.config.image_token_id).sum())
    geometry = adapter_for(model).visual_geometry(dict(inputs), [count], torch.device("cpu"))
    assert count == 49 + 9 * 10  # a 14 x 14 grid shrunk to 9 x 9, plus 9 line breaks
    assert int(geometry.full_col[0].max()) == 9 and int(geometry.is_newline.sum()) == 9


def test_a_batch_gives_each_sample_its_own_images_and_global_crops(family) -> None:
    model, processor = family
    images = [make_test_image(s, 96).resize((40, 40)) for s in (1, 2)]
    inputs = build_tiny_inputs(processor, images, ["What?", "What colour is it?"])
    counts = (inputs["input_ids"] == model.config.image_token_id).sum(1).tolist()
    geometry = adapter_for(model).visual_geometry(dict(inputs), counts, torch.device("cpu"))
    crops = geometry.crop.masked_fill(geometry.is_newline, 10**6)
    per_image = int(geometry.crop[0].max()) + 1
    assert int(crops[1].min()) == per_image  # the second sample's crops follow the first's
    assert torch.equal(geometry.crop[1][~geometry.is_newline[1]] - per_image, geometry.crop[0][~geometry.is_newline[0]])
    assert torch.equal(geometry.image, torch.zeros_like(geometry.image))
    # The host facts agree with the device fields.
    assert geometry.tiled == tuple(bool(row.any()) for row in geometry.is_tile)
    assert geometry.newlines == tuple(bool(row.any()) for row in geometry.is_newline)
    assert geometry.extents == tuple(
        (int(r.max()) + 1, int(c.max()) + 1) for r, c in zip(geometry.row, geometry.col, strict=True)
    )


def test_llava_geometry_is_one_square_grid_per_image() -> None:
    model, processor = shared_model("llava", num_hidden_layers=2, vision_layers=1)
    inputs = build_tiny_inputs(processor, [make_test_image(1), make_test_image(2)], ["What?", "Where is it?"])
    geometry = adapter_for(model).visual_geometry(dict(inputs), [64, 64], torch.device("cpu"))
    index = torch.arange(64)
    assert torch.equal(geometry.row, (index // 8).expand(2, -1))
    assert torch.equal(geometry.col, (index % 8).expand(2, -1))
    assert torch.equal(geometry.crop, torch.tensor([[0], [1]]).expand(-1, 64))
    assert torch.equal(geometry.crop_token, index.expand(2, -1)) and bool(geometry.is_base.all())
    # What pruners read on the host instead of the device: no tiles, no line breaks, an 8 x 8 grid per sample.
    assert geometry.tiled == geometry.newlines == (False, False) and geometry.extents == ((8, 8), (8, 8))


def test_llava_geometry_follows_the_pixels_not_the_towers_config() -> None:
    """vlprune-tiny's DINOv2 says 518 pixels in its config and runs at the processor's 224: the grid is the pixels'."""
    model, _ = shared_model("llava", vision="dinov2", num_hidden_layers=2, vision_layers=1)
    adapter = adapter_for(model)
    pixels = torch.zeros(2, 3, 48, 40)  # 12 x 10 patches of 4 pixels
    geometry = adapter.visual_geometry({"pixel_values": pixels}, [120, 120], torch.device("cpu"))
    assert int(geometry.row.max()) == 11 and int(geometry.col.max()) == 9
    # Without the pixels, each sample's tokens are taken as one square grid.
    geometry = adapter.visual_geometry({}, [144], torch.device("cpu"))
    assert int(geometry.row.max()) == 11 and int(geometry.col.max()) == 11
