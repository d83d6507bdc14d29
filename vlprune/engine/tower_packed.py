"""What a packed tower produced during the last encoding (the Qwen-VL family): every image in one packed sequence,
the attention run image by image (or a video's time step by time step), m x m patches merged into one token.

The feature layer's attention arrives in one call per chunk, and the tower may run twice per prefill (images, then
videos): :class:`PackedTowerRecord` keeps each call's chunks and assembles them, once per encoding, into per-chunk
values in the raster order of the merged grid, the shape the patch tower gives (:mod:`vlprune.engine.tower_patch`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch

from vlprune.adapters import ModelAdapter
from vlprune.engine.tower_patch import TowerWants
from vlprune.kernels import attention_rows


@dataclass(eq=False)
class _ChunkedPass:
    """One call of a packed tower: what it encoded and what the session read of it, chunk by chunk."""

    grids: torch.Tensor  # (items, 3) the call's grid_thw
    received: list[torch.Tensor] = field(default_factory=list)  # (n,) per chunk: attention each patch receives
    keys: list[torch.Tensor] = field(default_factory=list)  # (n, d) per chunk: head-mean keys
    maps: list[torch.Tensor] = field(default_factory=list)  # (n, n) per chunk
    early: list[torch.Tensor] = field(default_factory=list)  # (n,) per chunk: received at the early layer
    features: torch.Tensor | None = None  # (patches, D) what the merger received


class PackedTowerRecord:
    """The values of the last encoding of a packed tower, assembled per chunk when first asked."""

    def __init__(self, adapter: ModelAdapter, wants: TowerWants, image_inputs: dict[str, Any]) -> None:
        self.adapter = adapter
        self.wants = wants
        self.image_inputs = image_inputs  # the bridge's record of the last image encoding
        self.pixels: torch.Tensor | None = None
        self.passes: list[_ChunkedPass] = []  # this prefill's calls (images, videos)
        self._per_chunk: dict[str, torch.Tensor | None] = {}  # per-chunk values, once assembled
        self._tower_running = False

    hooks_tower = True  # every call's grids say which chunks it encoded
    cls = None  # no [CLS] token
    attention_map = None  # no one map per prompt image: :meth:`crop_maps` gives one per chunk

    # ------------------------------------------------------------------ capture

    def on_attention(self, query: torch.Tensor, key: torch.Tensor, mask: Any, scale: float) -> None:
        """One chunk's attention call: keep what each patch receives (and the keys and the map)."""
        rows = torch.arange(query.shape[2], device=query.device).expand(query.shape[0], -1)
        attention = attention_rows(query, key, rows, scale, mask, causal=False)  # (1, n_i, n_i)
        if self.passes:
            self.passes[-1].received.append(attention.mean(dim=1)[0])
            if self.wants.keys:
                self.passes[-1].keys.append(key[0].float().mean(dim=0))  # (n_i, d), heads averaged
            if self.wants.crop_map:
                self.passes[-1].maps.append(attention[0])

    def on_early_attention(self, query: torch.Tensor, key: torch.Tensor, mask: Any, scale: float) -> None:
        """One chunk's attention call at the early layer (Need.EARLY_ATTENTION): what each patch receives."""
        rows = torch.arange(query.shape[2], device=query.device).expand(query.shape[0], -1)
        if self.passes:
            self.passes[-1].early.append(attention_rows(query, key, rows, scale, mask, causal=False).mean(dim=1)[0])

    def on_tower_input(self, args: tuple, kwargs: dict) -> None:
        self.pixels = args[0] if args else kwargs.get("pixel_values", kwargs.get("hidden_states"))
        grids = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
        if grids is not None and any(torch.equal(grids, done.grids) for done in self.passes):
            self.passes = []  # the same images again: a new encoding
        self.passes.append(_ChunkedPass(grids=grids))
        self._per_chunk = {}
        self._tower_running = True

    def on_tower_output(self) -> None:
        self._tower_running = False

    def on_projector_input(self, features: torch.Tensor) -> None:
        # The tower calls its merger itself; a call from outside it (ZOO-Prune's perturbations) is not the encoding's.
        if self._tower_running and self.passes:
            self.passes[-1].features = features

    def prepare(self) -> None:
        """Assemble the per-chunk values now (the host work of putting the calls in crop order and the patches in
        raster order), so that a captured prefill only gathers them per token."""
        for kind in ("received", "keys", "features", "early"):
            if getattr(self.wants, kind):
                self._chunked(kind)

    def forget(self) -> None:
        self.pixels = None
        self.passes = []
        self._per_chunk = {}

    def recorded(self) -> dict[str, Any]:
        return {"pixels": self.pixels, "passes": list(self.passes), "_per_chunk": dict(self._per_chunk)}

    def restore(self, recorded: dict[str, Any]) -> None:
        for name, value in recorded.items():
            setattr(self, name, copy.copy(value) if isinstance(value, list | dict) else value)

    # ------------------------------------------------------------------ per chunk

    def key_values(self) -> tuple[torch.Tensor | None, bool]:
        """(chunks, T, d) head-mean keys pooled over each merge group, in raster order; no [CLS] among them."""
        return self._chunked("keys"), False

    def early_values(self) -> tuple[torch.Tensor | None, bool]:
        """(chunks, T, 1) attention each token's patches receive at the early layer, pooled over the merge group."""
        return self._chunked("early"), False

    def feature_values(self) -> torch.Tensor | None:
        """(chunks, T, m² · D) each token's merger input (its m x m patches concatenated)."""
        return self._chunked("features")

    def received_values(self) -> torch.Tensor:
        """(chunks, T, 1) attention each token's patches receive in their chunk, pooled over the merge group."""
        per_chunk = self._chunked("received")
        if per_chunk is None:
            raise RuntimeError("the vision tower's attention was not captured for this prefill")
        return per_chunk

    def crop_maps(self, image_inputs: dict[str, Any]) -> tuple[torch.Tensor | None, dict[str, Any]]:
        """(chunks, n, n) each chunk's attention map, zero-padded to the largest (images and frames differ in size),
        and the image inputs naming each chunk's grid."""
        passes, chunk_inputs = self._chunks()
        maps = [chunk for p in passes for chunk in p.maps]
        width = max((len(chunk) for chunk in maps), default=0)
        pad = torch.nn.functional.pad
        attention = torch.stack([pad(chunk, (0, width - len(chunk), 0, width - len(chunk))) for chunk in maps])
        return attention, {**image_inputs, "chunk_grids": chunk_inputs["chunk_grids"]}

    def _chunked(self, kind: str) -> torch.Tensor | None:
        """``kind`` ("received", "early", "keys" or "features") per chunk, assembled once per encoding."""
        if kind not in self._per_chunk:
            passes, inputs = self._chunks()
            if kind == "features":
                features = [p.features for p in passes]
                value = (
                    None
                    if any(f is None for f in features)
                    else self.adapter.feature_tokens(torch.cat(features), inputs)
                )
            else:
                chunks = [chunk for p in passes for chunk in getattr(p, kind)]
                if not chunks:
                    value = None
                elif kind in ("received", "early"):
                    value = self.adapter.received_tokens(chunks, inputs)
                else:
                    value = self.adapter.pooled_tokens(chunks, inputs)
            self._per_chunk[kind] = value
        return self._per_chunk[kind]

    def _chunks(self) -> tuple[list[_ChunkedPass], dict[str, Any]]:
        """The passes in crop order (the images' pass before the videos'), and the adapter inputs naming each chunk's
        grid: one (1, h, w) per image and per temporal patch of a video."""
        ordered = images_first(self.passes, [p.grids for p in self.passes], self.image_inputs)
        rows = [row for p in ordered for row in p.grids.tolist() for _ in range(row[0])]
        grids = torch.tensor([[1, h, w] for _, h, w in rows], dtype=torch.long)
        return ordered, {**self.image_inputs, "chunk_grids": grids}


def images_first(passes: list[Any], grids: list[torch.Tensor], image_inputs: dict[str, Any]) -> list[Any]:
    """A packed tower's passes in crop order: the one that encoded the recorded images (``image_grid_thw``) first,
    then the others (the videos') as they ran; ``grids`` is each pass's grid_thw."""
    image_grids = image_inputs.get("image_grid_thw")
    first = [
        index
        for index, grid in enumerate(grids)
        if image_grids is not None and torch.equal(grid.cpu(), image_grids.cpu())
    ][:1]
    return [passes[index] for index in first] + [run for index, run in enumerate(passes) if index not in first]
