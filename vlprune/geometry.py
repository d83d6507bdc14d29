"""Where each visual token of a prompt came from: image, view (base image, tile or line break), grid place, and the
vision-tower crop and patch its features were computed from.

LLaVA-1.5 turns one image into one square grid of patches. LLaVA-NeXT and LLaVA-OneVision ("anyres") encode a base
view of the whole image and a grid of tiles, stitch the tiles' patch grids into one large grid, cut away the rows or
columns that only show the padding added to fit the image into the tile grid, end every row of that grid with an
``image_newline`` token and, for OneVision, shrink the grid by bilinear interpolation when it holds more than
``anyres_max_9`` allows. The adapters describe the result per token with a :class:`VisualGeometry`, so that pruners
needing spatial structure read it instead of assuming a square grid, and the engine maps per-crop values of the vision
tower (its [CLS] attention, keys, features) onto the visual tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

NEWLINE = -1
"""``view`` of an ``image_newline`` token."""

PADDING = -2
"""``view`` of the entries that fill a sample with fewer visual tokens to the width of a ragged batch."""

BASE = 0
"""``view`` of the base view (the whole image resized to the tower's input); tiles are 1, 2, ... row by row."""


@dataclass(frozen=True)
class VisualGeometry:
    """Per-token facts of the visual tokens of a batch; every field is a (B, N) long tensor, N visual tokens per
    sample, in prompt order.

    Attributes:
        image: which image of the sample the token belongs to (0 for the first).
        view: :data:`BASE`, a tile number 1.. (row-major in the tile grid), or :data:`NEWLINE`.
        tile_row, tile_col: the tile's place in the tile grid; -1 for the base view and line breaks.
        row, col: the token's place in its view's patch grid (a tile's own grid); -1 for line breaks and for a
            [CLS] token kept by the "full" strategy.
        full_row, full_col: for tile tokens, the place in the stitched grid of all tiles after unpadding (and after
            OneVision's down-scaling), the grid the language model reads row by row; for a line break, the row it
            ends and the grid's width; -1 for the base view.
        crop: index of the vision-tower input (base view or tile) the token's features come from, counted over the
            whole batch as the tower receives them; -1 for line breaks.
        crop_token: index of the patch among that crop's tokens as they reach the projector; where OneVision
            interpolates, the nearest source patch (its centre-aligned nearest neighbour); -1 for line breaks.
        frame: the token's frame within its video (0 for images); -1 for line breaks and padding.
        num_crops: the crops the vision tower encodes for the whole batch.
        tiled: per sample, whether any of its tokens comes from a tile (known on the host when the geometry is built,
            so pruners choose their per-view path without reading the device).
        newlines: per sample, whether any of its tokens is a line break (known on the host likewise).
        extents: per sample, the (height, width) its tokens' patch grids span: the largest ``row`` and ``col`` plus
            one (known on the host likewise).
    """

    image: torch.Tensor
    view: torch.Tensor
    tile_row: torch.Tensor
    tile_col: torch.Tensor
    row: torch.Tensor
    col: torch.Tensor
    full_row: torch.Tensor
    full_col: torch.Tensor
    crop: torch.Tensor
    crop_token: torch.Tensor
    frame: torch.Tensor
    num_crops: int
    tiled: tuple[bool, ...]
    newlines: tuple[bool, ...]
    extents: tuple[tuple[int, int], ...]

    @property
    def has_tiles(self) -> bool:
        """Some sample's tokens come from tiles (LLaVA-NeXT and OneVision's multi-crop images)."""
        return any(self.tiled)

    @property
    def has_newlines(self) -> bool:
        """Some sample has line-break tokens (LLaVA-NeXT's and OneVision's ``image_newline``)."""
        return any(self.newlines)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.view.shape)

    @property
    def is_newline(self) -> torch.Tensor:
        return self.view == NEWLINE

    @property
    def is_base(self) -> torch.Tensor:
        return self.view == BASE

    @property
    def is_tile(self) -> torch.Tensor:
        return self.view > BASE

    def _host_fields(self) -> dict[str, tuple]:
        """The fields known on the host (see :func:`host_facts`), as they are."""
        return {"tiled": self.tiled, "newlines": self.newlines, "extents": self.extents}

    def crop_values(self, values: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """(B, N, F) per-token values picked from per-crop values (crops, P, F) by each token's crop and patch
        (OneVision's down-scaled tokens take their nearest source patch's); ``fill`` where a token has none (line
        breaks, padding, recycled tokens)."""
        crops, per_crop = values.shape[:2]
        if crops != self.num_crops:
            raise ValueError(f"values for {crops} crops, the geometry has {self.num_crops}")
        crop, token = self.crop.to(values.device), self.crop_token.to(values.device)
        has_source = (crop >= 0) & (token >= 0)
        flat = crop.clamp(min=0) * per_crop + token.clamp(min=0)  # (B, N)
        picked = values.reshape(crops * per_crop, *values.shape[2:])[flat]
        return picked.masked_fill(~has_source.view(*has_source.shape, *([1] * (picked.dim() - 2))), fill)

    def take(self, origin: torch.Tensor) -> VisualGeometry:
        """The geometry of the tokens ``origin`` (B, K): indices among the original visual tokens, -1 for tokens
        that have none (recycled ones), which get -1 in every field."""
        index = origin.clamp(min=0).to(self.view.device)
        missing = origin.to(self.view.device) < 0
        values = {
            name: torch.gather(getattr(self, name), 1, index).masked_fill(missing, -1) for name in _GEOMETRY_FIELDS
        }
        return VisualGeometry(**values, num_crops=self.num_crops, **self._host_fields())

    def sample(self, index: int, count: int) -> VisualGeometry:
        """Sample ``index``'s first ``count`` tokens alone, as a batch of one."""
        values = {name: getattr(self, name)[index : index + 1, :count] for name in _GEOMETRY_FIELDS}
        return VisualGeometry(
            **values,
            num_crops=self.num_crops,
            **{name: facts[index : index + 1] for name, facts in self._host_fields().items()},
        )

    def to(self, device: torch.device) -> VisualGeometry:
        if self.view.device == device:
            return self
        values = {name: getattr(self, name).to(device) for name in _GEOMETRY_FIELDS}
        return VisualGeometry(**values, num_crops=self.num_crops, **self._host_fields())


@dataclass(frozen=True)
class ImageTokens:
    """The visual tokens of one image, in the order the model feeds them; (T,) long tensors, fields as in
    :class:`VisualGeometry` with ``crop`` counted from this image's first crop."""

    view: torch.Tensor
    tile_row: torch.Tensor
    tile_col: torch.Tensor
    row: torch.Tensor
    col: torch.Tensor
    full_row: torch.Tensor
    full_col: torch.Tensor
    crop: torch.Tensor
    crop_token: torch.Tensor
    frame: torch.Tensor
    num_crops: int

    def __len__(self) -> int:
        return int(self.view.shape[0])


def single_view(height: int, width: int, leading_cls: bool = False, newline: bool = False) -> ImageTokens:
    """One crop's ``height`` x ``width`` patches in raster order (LLaVA-1.5, or an anyres image encoded without
    tiles), optionally after a [CLS] token the projector keeps and followed by one line break (the anyres models
    append one ``image_newline`` to an image encoded without tiles)."""
    count = height * width
    index = torch.arange(count)
    row, col, token = index // width, index % width, index
    if leading_cls:
        row, col = torch.cat([torch.tensor([-1]), row]), torch.cat([torch.tensor([-1]), col])
        token = torch.arange(count + 1)
    length = len(token)
    minus = torch.full((length,), -1)
    parts = {
        "view": torch.full((length,), BASE),
        "tile_row": minus,
        "tile_col": minus,
        "row": row,
        "col": col,
        "full_row": minus,
        "full_col": minus,
        "crop": torch.zeros(length, dtype=torch.long),
        "crop_token": token,
        "frame": torch.zeros(length, dtype=torch.long),
    }
    if newline:
        parts = {name: torch.cat([value, torch.tensor([-1])]) for name, value in parts.items()}
        parts["view"][-1] = NEWLINE
        parts["full_row"][-1], parts["full_col"][-1] = height - 1, width
    return ImageTokens(**parts, num_crops=1)


def tiled_view(
    patches: int,
    tile_grid: tuple[int, int],
    kept_rows: torch.Tensor,
    kept_cols: torch.Tensor,
    shrunk_to: tuple[int, int] | None = None,
) -> ImageTokens:
    """An anyres image: the base view's ``patches`` x ``patches`` grid, then the stitched tile grid row by row, each
    row ending with a line break.

    Args:
        patches: patches per side of one view (the tower's image size over its patch size).
        tile_grid: (rows, columns) of tiles.
        kept_rows, kept_cols: the stitched grid's rows and columns that unpadding keeps (ascending).
        shrunk_to: OneVision's (rows, columns) after down-scaling, when it shrinks the grid; each token then takes
            its centre-aligned nearest source patch.
    """
    base = single_view(patches, patches)
    tiles_down, tiles_across = tile_grid
    rows, cols = kept_rows, kept_cols
    if shrunk_to is not None:
        rows = rows[_nearest_source(len(rows), shrunk_to[0])]
        cols = cols[_nearest_source(len(cols), shrunk_to[1])]
    height, width = len(rows), len(cols)
    source_row = rows[:, None].expand(height, width)
    source_col = cols[None, :].expand(height, width)
    tile_row, tile_col = source_row // patches, source_col // patches
    within_row, within_col = source_row % patches, source_col % patches
    line = torch.arange(height)[:, None].expand(height, width)
    column = torch.arange(width)[None, :].expand(height, width)

    def with_breaks(grid: torch.Tensor, fill: torch.Tensor | int) -> torch.Tensor:
        end = fill if isinstance(fill, torch.Tensor) else torch.full((height, 1), fill)
        return torch.cat([grid, end.reshape(height, 1)], dim=1).reshape(-1)

    tiles = {
        "view": with_breaks(1 + tile_row * tiles_across + tile_col, NEWLINE),
        "tile_row": with_breaks(tile_row, -1),
        "tile_col": with_breaks(tile_col, -1),
        "row": with_breaks(within_row, -1),
        "col": with_breaks(within_col, -1),
        "full_row": with_breaks(line, torch.arange(height)),
        "full_col": with_breaks(column, width),
        "crop": with_breaks(1 + tile_row * tiles_across + tile_col, -1),
        "crop_token": with_breaks(within_row * patches + within_col, -1),
        "frame": with_breaks(torch.zeros_like(within_row), -1),
    }
    parts = {name: torch.cat([getattr(base, name), value]) for name, value in tiles.items()}
    return ImageTokens(**parts, num_crops=1 + tiles_down * tiles_across)


def _nearest_source(source: int, target: int) -> torch.Tensor:
    """(target,) index of the source cell nearest to each target cell's centre when ``source`` cells are resampled to
    ``target`` (the centre alignment of bilinear interpolation without ``align_corners``)."""
    grid = torch.arange(source, dtype=torch.float32)[None, None, :]
    picked = torch.nn.functional.interpolate(grid, size=target, mode="nearest-exact")
    return picked[0, 0].long()


def batch_geometry(images: Sequence[ImageTokens], per_sample: Sequence[int], device: torch.device) -> VisualGeometry:
    """The geometry of a batch whose samples hold ``per_sample`` visual tokens each, filled by ``images`` in order,
    as the model scatters image features into the image tokens row by row; (B, max(per_sample)) fields.

    Raises:
        ValueError: the images' tokens do not add up to the samples' (the processor and the model disagree).
    """
    total = sum(len(image) for image in images)
    if total != sum(per_sample):
        raise ValueError(f"the images give {total} visual tokens, the prompts hold {sum(per_sample)}")
    columns: dict[str, list[torch.Tensor]] = {name: [] for name in ("image", *TOKEN_FIELDS)}
    crop_offset, image_index, filled, sample = 0, 0, 0, 0
    for image in images:
        if filled == per_sample[sample]:
            sample, filled, image_index = sample + 1, 0, 0
        for name in TOKEN_FIELDS:
            value = getattr(image, name)
            columns[name].append(torch.where(value >= 0, value + crop_offset, value) if name == "crop" else value)
        columns["image"].append(torch.full((len(image),), image_index))
        crop_offset += image.num_crops
        filled += len(image)
        image_index += 1
    width = max(per_sample)
    tensors = {}
    for name, parts in columns.items():
        # A sample with fewer tokens than the batch's largest (a ragged batch) is filled to the width; no token of
        # the sample points there (its view says PADDING).
        samples = torch.cat(parts).split(list(per_sample))
        fill = PADDING if name == "view" else -1
        tensors[name] = torch.stack(
            [torch.cat([row, torch.full((width - len(row),), fill, dtype=torch.long)]) for row in samples]
        ).to(device)
    per_sample_rows = {name: torch.cat(columns[name]).split(list(per_sample)) for name in ("view", "row", "col")}
    return VisualGeometry(**tensors, num_crops=crop_offset, **host_facts(**per_sample_rows))


def host_facts(
    view: Sequence[torch.Tensor], row: Sequence[torch.Tensor], col: Sequence[torch.Tensor]
) -> dict[str, tuple]:
    """:class:`VisualGeometry`'s host fields (``tiled``, ``newlines``, ``extents``) from each sample's host rows of
    views, rows and columns, so that pruners choose their path and grid without reading the device."""
    return {
        "tiled": tuple(bool((views > BASE).any()) for views in view),
        "newlines": tuple(bool((views == NEWLINE).any()) for views in view),
        "extents": tuple(
            (int(rows.max()) + 1, int(cols.max()) + 1) if len(rows) else (0, 0)
            for rows, cols in zip(row, col, strict=True)
        ),
    }


TOKEN_FIELDS = ("view", "tile_row", "tile_col", "row", "col", "full_row", "full_col", "crop", "crop_token", "frame")
_GEOMETRY_FIELDS = ("image", *TOKEN_FIELDS)


def interleaved_geometry(
    images: list[ImageTokens],
    videos: list[ImageTokens],
    input_ids: torch.Tensor,
    image_token: int,
    video_token: int,
    device: torch.device,
) -> VisualGeometry:
    """The geometry of a batch whose image and video tokens are filled, each kind in order over the batch, from the
    images' and the videos' tokens; ``image`` numbers each sample's images and videos in the order they appear."""
    streams = {}
    image_crops = sum(item.num_crops for item in images)
    for kind, items, offset, first_crop in (
        (image_token, images, 0, 0),
        (video_token, videos, len(images), image_crops),  # the encoder's video pass follows its image pass
    ):
        table = {name: [getattr(item, name) for item in items] for name in TOKEN_FIELDS}
        crop_offsets = (first_crop + torch.tensor([0] + [item.num_crops for item in items]).cumsum(0)[:-1]).tolist()
        table["crop"] = [
            torch.where(item.crop >= 0, item.crop + start, item.crop)
            for item, start in zip(items, crop_offsets, strict=True)
        ]
        columns = {
            name: torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long) for name, parts in table.items()
        }
        owner = [torch.full((len(item),), offset + index) for index, item in enumerate(items)]
        columns["item"] = torch.cat(owner) if owner else torch.zeros(0, dtype=torch.long)
        streams[kind] = columns
    taken = dict.fromkeys(streams, 0)
    rows: list[dict[str, torch.Tensor]] = []
    for sample_ids in input_ids.cpu():
        kinds = sample_ids[(sample_ids == image_token) | (sample_ids == video_token)]
        index = torch.empty(len(kinds), dtype=torch.long)
        row = {name: torch.empty(len(kinds), dtype=torch.long) for name in (*TOKEN_FIELDS, "item")}
        for kind, columns in streams.items():
            at = kinds == kind
            count = int(at.sum())
            if taken[kind] + count > len(columns["view"]):
                raise ValueError("the prompts hold more image or video tokens than the encoded grids give")
            index[at] = torch.arange(taken[kind], taken[kind] + count)
            for name in row:
                row[name][at] = columns[name][index[at]]
            taken[kind] += count
        items = row.pop("item").tolist()
        first_seen = {item: rank for rank, item in enumerate(dict.fromkeys(items))}
        row["image"] = torch.tensor([first_seen[item] for item in items], dtype=torch.long)
        rows.append(row)
    if any(taken[kind] != len(columns["view"]) for kind, columns in streams.items()):
        raise ValueError("the encoded grids give more image or video tokens than the prompts hold")
    width = max(len(row["view"]) for row in rows)
    fields = {}
    for name in ("image", *TOKEN_FIELDS):
        fill = PADDING if name == "view" else -1
        fields[name] = torch.stack(
            [torch.cat([row[name], torch.full((width - len(row[name]),), fill, dtype=torch.long)]) for row in rows]
        ).to(device)
    facts = host_facts(*([row[name] for row in rows] for name in ("view", "row", "col")))
    return VisualGeometry(**fields, num_crops=image_crops + sum(item.num_crops for item in videos), **facts)
