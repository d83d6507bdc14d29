"""The vision bridge: what the vision tower and the projector produce during a prefill, mapped onto the visual tokens
of the language model's prompt.

The tower runs on crops (one per image for LLaVA-1.5; the base view and the tiles for the anyres families), and its
per-crop values ([CLS] attention, keys, projector inputs, the attention map) are captured by hooks and the attention
observer. A stage needs them per visual token: :class:`VisionBridge` picks each token's crop and patch from the
prefill's :class:`~vlprune.geometry.VisualGeometry` (line breaks and recycled tokens get zeros).
"""

from __future__ import annotations

import copy
import functools
import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from vlprune.adapters import ModelAdapter
from vlprune.engine.layout import Layout
from vlprune.errors import VlpruneError
from vlprune.geometry import VisualGeometry
from vlprune.kernels import attention_rows, gather_tokens
from vlprune.pruners.base import Pruner, StagePlan


class VisionBridge:
    """Captures the vision side's outputs for the next prefill and hands them to stages per visual token."""

    def __init__(self, adapter: ModelAdapter, pruner: Pruner, plan: list[StagePlan]) -> None:
        self.adapter = adapter
        self.pruner_name = pruner_name = pruner.name
        self.needs_cls = any(stage.vision_cls_attention for stage in plan)
        self.needs_keys = any(stage.vision_keys for stage in plan)
        self.needs_map = any(stage.vision_attention for stage in plan)
        self.needs_received = any(stage.vision_received_attention for stage in plan)
        self.needs_features = any(stage.vision_features for stage in plan)
        self.needs_crop_map = any(stage.vision_crop_attention for stage in plan)
        self.cls_substituted = False  # the [CLS] attention is replaced by the attention each token receives
        if self.needs_cls and not adapter.vision_has_cls:
            if pruner.cls_substitute != "received":
                raise VlpruneError(
                    f"method {pruner_name!r} needs the vision tower's [CLS] token, and "
                    f"{adapter.config.vision_config.model_type} has none"
                )
            self.needs_cls, self.needs_received, self.cls_substituted = False, True, True
        reads = {
            "cls": self.needs_cls, "keys": self.needs_keys, "map": self.needs_map, "received": self.needs_received,
            "features": self.needs_features, "crop_map": self.needs_crop_map,
        }  # fmt: skip
        allowed = adapter.vision_reads
        unsupported = [name for name, needed in reads.items() if needed and allowed is not None and name not in allowed]
        if unsupported:
            raise VlpruneError(
                f"method {pruner_name!r} reads the vision encoder's {', '.join(unsupported)}, which is not "
                f"implemented for {adapter.family} yet"
            )
        if self.needs_map and adapter.multi_crop:
            raise VlpruneError(
                f"{pruner_name} reads one vision attention map per image; {adapter.family} encodes a base view and "
                f"tiles per image, and this method's multi-crop path is not implemented yet"
            )
        self.cls: torch.Tensor | None = None  # (crops, T) [CLS] attention over the tower's tokens
        self.keys: torch.Tensor | None = None  # (crops, T, d) head-mean keys
        self.features: torch.Tensor | None = None  # (crops, T', F) projector input
        self.attention_map: torch.Tensor | None = None  # (crops, T, T)
        self.pixels: torch.Tensor | None = None
        self.passes: list[_ChunkedPass] = []  # a chunked tower's calls of this prefill (images, videos)
        self.image_inputs: dict[str, Any] = {}  # what the adapter's geometry reads, from the last image encoding
        self._per_chunk: dict[str, torch.Tensor | None] = {}  # a chunked tower's values per image, once assembled
        self._tower_running = False

    @property
    def watches_feature_layer(self) -> bool:
        return self.needs_cls or self.needs_keys or self.needs_map or self.needs_received or self.needs_crop_map

    def install(self) -> list[torch.utils.hooks.RemovableHandle]:
        """Register the tower and projector hooks; the caller observes the feature layer's attention (see
        :meth:`on_attention`) when :attr:`watches_feature_layer`."""
        handles: list[Any] = []
        if self.adapter.geometry_inputs:
            handles.append(_record_image_inputs(self.adapter, self.image_inputs))
        if self.adapter.encodes_videos:
            handles.append(_record_image_inputs(self.adapter, self.image_inputs, "get_video_features"))
        if self.needs_map or self.needs_crop_map or self.adapter.vision_chunked:
            tower = self.adapter.vision_tower
            handles.append(tower.register_forward_pre_hook(self._on_tower_input, with_kwargs=True))
            handles.append(tower.register_forward_hook(self._on_tower_output))
        if self.needs_features:
            handles.append(self.adapter.projector.register_forward_pre_hook(self._on_projector_input))
        return handles

    def recorded(self) -> dict[str, Any]:
        """What the bridge holds of the last encoding (a stage that calls the projector itself, as VisionZip does,
        overwrites the recorded projector input: a second run over the same encoding restores this first)."""
        names = ("cls", "keys", "features", "attention_map", "pixels")
        recorded = {name: getattr(self, name) for name in names}
        return {**recorded, "passes": list(self.passes), "_per_chunk": dict(self._per_chunk)}

    def restore(self, recorded: dict[str, Any]) -> None:
        for name, value in recorded.items():
            setattr(self, name, copy.copy(value) if isinstance(value, list | dict) else value)

    def prepare(self) -> None:
        """Assemble a chunked tower's per-image values now (the host work of putting its calls in crop order and
        its patches in raster order), so that a captured prefill only gathers them per token."""
        if not self.adapter.vision_chunked:
            return
        wanted = {"received": self.needs_received, "keys": self.needs_keys, "features": self.needs_features}
        for kind, needed in wanted.items():
            if needed:
                self._chunked(kind)

    def _chunked(self, kind: str) -> torch.Tensor | None:
        """A chunked tower's ``kind`` ("received", "keys" or "features") per image (or video time step), assembled
        once per encoding."""
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
                chunks = [chunk for p in passes for chunk in (p.received if kind == "received" else p.keys)]
                if not chunks:
                    value = None
                elif kind == "received":
                    value = self.adapter.received_tokens(chunks, inputs)
                else:
                    value = self.adapter.pooled_tokens(chunks, inputs)
            self._per_chunk[kind] = value
        return self._per_chunk[kind]

    def forget(self) -> None:
        self.cls = self.keys = self.features = self.attention_map = self.pixels = None
        self.passes = []
        self._per_chunk = {}
        self.image_inputs.clear()

    # ------------------------------------------------------------------ capture

    def on_attention(
        self,
        module: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        mask: Any,
        scaling: float | None,
    ) -> None:
        # The vision tower may run before the language model's call (generate encodes images first), so what it
        # produces is kept until the next prefill uses it, whatever the phase.
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        if self.needs_cls:
            rows = torch.zeros(query.shape[0], 1, dtype=torch.long, device=query.device)  # row 0 is [CLS]
            self.cls = attention_rows(query, key, rows, scale, mask, causal=False)[:, 0]
        if self.needs_keys:
            self.keys = key.float().mean(dim=1)  # (crops, tokens, d)
        if self.adapter.vision_chunked:  # one call per image: keep what each patch receives (and the map)
            rows = torch.arange(query.shape[2], device=query.device).expand(query.shape[0], -1)
            attention = attention_rows(query, key, rows, scale, mask, causal=False)  # (1, n_i, n_i)
            if self.passes:
                self.passes[-1].received.append(attention.mean(dim=1)[0])
                if self.needs_keys:
                    self.passes[-1].keys.append(key[0].float().mean(dim=0))  # (n_i, d), heads averaged
                if self.needs_crop_map:
                    self.passes[-1].maps.append(attention[0])
            return
        if self.needs_map or self.needs_received or self.needs_crop_map:
            rows = torch.arange(query.shape[2], device=query.device).expand(query.shape[0], -1)
            self.attention_map = attention_rows(query, key, rows, scale, mask, causal=False)  # (crops, T, T)

    def _on_tower_input(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.pixels = args[0] if args else kwargs.get("pixel_values", kwargs.get("hidden_states"))
        if self.adapter.vision_chunked:
            grids = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
            if grids is not None and any(torch.equal(grids, done.grids) for done in self.passes):
                self.passes = []  # the same images again: a new encoding
            self.passes.append(_ChunkedPass(grids=grids))
            self._per_chunk = {}
            self._tower_running = True

    def _on_tower_output(self, module: nn.Module, args: tuple, output: Any) -> None:
        self._tower_running = False

    def _on_projector_input(self, module: nn.Module, args: tuple) -> None:
        if self.adapter.vision_chunked:
            # A chunked tower calls its merger itself; a call from outside it (ZOO-Prune's perturbations) is not
            # the encoding's.
            if self._tower_running and self.passes:
                self.features = self.passes[-1].features = args[0]
            return
        self.features = args[0]

    def _chunks(self) -> tuple[list[_ChunkedPass], dict[str, Any]]:
        """A chunked tower's passes in crop order (the images' pass before the videos'), and the adapter inputs
        naming each chunk's grid: one (1, h, w) per image and per temporal patch of a video."""
        ordered = images_first(self.passes, [p.grids for p in self.passes], self.image_inputs)
        rows = [row for p in ordered for row in p.grids.tolist() for _ in range(row[0])]
        grids = torch.tensor([[1, h, w] for _, h, w in rows], dtype=torch.long)
        return ordered, {**self.image_inputs, "chunk_grids": grids}

    # ------------------------------------------------------------------ per visual token

    def cls_scores(self, geometry: VisualGeometry, layout: Layout, slots: torch.Tensor) -> torch.Tensor:
        """(B, N) [CLS] attention of the current visual tokens (0 for line breaks and recycled tokens)."""
        scores = None if self.cls is None else self.cls[..., None]
        return self.tokens(scores, geometry, layout, slots, "[CLS] attention", with_cls=True)[..., 0]

    def tokens(
        self,
        values: torch.Tensor | None,
        geometry: VisualGeometry,
        layout: Layout,
        slots: torch.Tensor,
        what: str,
        with_cls: bool = False,
    ) -> torch.Tensor:
        """(B, N, F) per-token values the vision side produced, for the current visual tokens (0 for line breaks
        and recycled tokens).

        ``values`` is (crops, tokens, F) as the vision tower or the projector saw them; ``with_cls`` says the tokens
        include the [CLS] token, which LLaVA drops before the projector when the strategy is "default".
        """
        if values is None:
            raise RuntimeError(f"the {what} of the vision side was not captured for this prefill")
        if with_cls and self.adapter.vision_drops_cls:
            values = values[:, 1:]
        if values.shape[0] != geometry.num_crops:
            raise VlpruneError(
                f"the vision side produced {what} values for {values.shape[0]} crops; the prompts' images have "
                f"{geometry.num_crops}"
            )
        device = slots.device
        per_token = geometry.crop_values(values.to(device))  # (B, N0, F)
        origin = gather_tokens(layout.origin.to(device), slots)
        picked = gather_tokens(per_token, origin.clamp(min=0))
        return picked.masked_fill((origin < 0)[..., None], 0.0)

    def key_tokens(self, geometry: VisualGeometry, layout: Layout, slots: torch.Tensor) -> torch.Tensor:
        """(B, N, d) head-mean keys of the current visual tokens at the feature layer (zeros for line breaks and
        recycled tokens); on a chunked tower, the mean over each token's merge group."""
        if self.adapter.vision_chunked:
            return self.tokens(self._chunked("keys"), geometry, layout, slots, "vision keys")
        return self.tokens(self.keys, geometry, layout, slots, "vision keys", with_cls=True)

    def feature_tokens(self, geometry: VisualGeometry, layout: Layout, slots: torch.Tensor) -> torch.Tensor:
        """(B, N, F) what the projector received for each current visual token (zeros for line breaks and recycled
        tokens); on a chunked tower, each token's m x m patches concatenated."""
        features = self._chunked("features") if self.adapter.vision_chunked else self.features
        return self.tokens(features, geometry, layout, slots, "projector input")

    def received(self, geometry: VisualGeometry, layout: Layout, slots: torch.Tensor) -> torch.Tensor:
        """(B, N) attention each current visual token receives at the feature layer, averaged over its crop's patch
        queries ([CLS] excluded when LLaVA drops it) and the heads; 0 for line breaks and recycled tokens."""
        if self.adapter.vision_chunked:
            per_image = self._chunked("received")
            if per_image is None:
                raise RuntimeError("the vision tower's attention was not captured for this prefill")
            return self.tokens(per_image, geometry, layout, slots, "received attention")[..., 0]
        attention = self.attention_map
        if attention is None:
            raise RuntimeError("the vision tower's attention map was not captured for this prefill")
        if self.adapter.vision_drops_cls:
            attention = attention[:, 1:, 1:]
        per_crop = attention.mean(dim=1)[..., None]  # (crops, T, 1)
        return self.tokens(per_crop, geometry, layout, slots, "received attention")[..., 0]

    def map_inputs(self, batch: int, num_visual: int, wanted: bool) -> dict[str, torch.Tensor]:
        """The attention map among the original visual tokens and the pixels, for pruners that read one square
        map per sample (PTP, VFlowOpt)."""
        if not wanted:
            return {}
        attention, pixels = self.attention_map, self.pixels
        if attention is None or pixels is None:
            raise RuntimeError("the vision tower's attention map was not captured for this prefill")
        if attention.shape[0] != batch:
            raise VlpruneError(
                f"{self.pruner_name} reads the vision attention map of one image per sample, got "
                f"{attention.shape[0]} crops for {batch} samples ({self.adapter.family} encodes a base view and "
                f"tiles per image; this method's multi-crop path is not implemented yet)"
            )
        if self.adapter.vision_drops_cls:
            attention = attention[:, 1:, 1:]
        if attention.shape[1] != num_visual:
            raise VlpruneError(f"the vision attention map covers {attention.shape[1]} tokens, not {num_visual}")
        return {"vision_attention": attention, "pixel_values": pixels}

    def crop_inputs(self, geometry: VisualGeometry, image_inputs: dict[str, Any], wanted: bool) -> dict[str, Any]:
        """Each crop's attention map among its patches, the crops' pixels and the function that places per-crop
        values on the visual tokens as the model packs its features (see ``StageContext.pack_crop_values``)."""
        if not wanted:
            return {}
        attention, pixels = self.attention_map, self.pixels
        if self.adapter.vision_chunked:  # images (and frames) of different sizes: zero-padded maps
            passes, chunk_inputs = self._chunks()
            image_inputs = {**image_inputs, "chunk_grids": chunk_inputs["chunk_grids"]}
            maps = [chunk for p in passes for chunk in p.maps]
            width = max((len(chunk) for chunk in maps), default=0)
            pad = torch.nn.functional.pad
            attention = torch.stack([pad(chunk, (0, width - len(chunk), 0, width - len(chunk))) for chunk in maps])
        if attention is None or pixels is None:
            raise RuntimeError("the vision tower's attention map was not captured for this prefill")
        if self.adapter.vision_drops_cls:
            attention = attention[:, 1:, 1:]
        if attention.shape[0] != geometry.num_crops:
            raise VlpruneError(
                f"the vision tower encoded {attention.shape[0]} crops; the prompts' images have {geometry.num_crops}"
            )
        adapter = self.adapter

        def pack(values: torch.Tensor, fill: float) -> torch.Tensor:
            return adapter.pack_crop_values(values, image_inputs, geometry, fill)

        return {"vision_crop_attention": attention, "vision_crop_pixels": pixels, "pack_crop_values": pack}


def images_first(passes: list[Any], grids: list[torch.Tensor], image_inputs: dict[str, Any]) -> list[Any]:
    """A chunked tower's passes in crop order: the one that encoded the recorded images (``image_grid_thw``) first,
    then the others (the videos') as they ran; ``grids`` is each pass's grid_thw."""
    image_grids = image_inputs.get("image_grid_thw")
    first = [
        index
        for index, grid in enumerate(grids)
        if image_grids is not None and torch.equal(grid.cpu(), image_grids.cpu())
    ][:1]
    return [passes[index] for index in first] + [run for index, run in enumerate(passes) if index not in first]


@dataclass(eq=False)
class _ChunkedPass:
    """One call of a chunked (Qwen-VL) tower: what it encoded and what the session read of it, chunk by chunk."""

    grids: torch.Tensor  # (items, 3) the call's grid_thw
    received: list[torch.Tensor] = field(default_factory=list)  # (n,) per chunk: attention each patch receives
    keys: list[torch.Tensor] = field(default_factory=list)  # (n, d) per chunk: head-mean keys
    maps: list[torch.Tensor] = field(default_factory=list)  # (n, n) per chunk
    features: torch.Tensor | None = None  # (patches, D) what the merger received


class RestoreAttribute:
    """A hook handle for an instance attribute this session set: ``remove`` deletes it, so the class's method shows
    through again."""

    def __init__(self, owner: object, name: str) -> None:
        self.owner, self.name = owner, name

    def remove(self) -> None:
        if self.name in vars(self.owner):
            delattr(self.owner, self.name)


def _record_image_inputs(
    adapter: ModelAdapter, record: dict[str, Any], encoder: str = "get_image_features"
) -> RestoreAttribute:
    """Record the keyword arguments the geometry reads (``image_sizes``, ...) each time the base model encodes
    images (``encoder``: or videos, with ``get_video_features``). ``generate`` encodes them before the language
    model's call and passes only the features to it, so the call itself no longer carries them; the wrapper is an
    attribute of this model instance only, and detaching removes it."""
    owner = adapter.base_model
    encode = getattr(owner, encoder)  # the bound method of the model's class
    names = [name for name in adapter.geometry_inputs if name in inspect.signature(encode).parameters]

    @functools.wraps(encode)
    def recording_encoder(*args: Any, **kwargs: Any) -> Any:
        bound = inspect.signature(encode).bind_partial(*args, **kwargs)
        own = {name: bound.arguments[name] for name in names if bound.arguments.get(name) is not None}
        for name in names:
            record.pop(name, None)
        record.update(own)  # the tower's hooks read it while it encodes
        before = dict(record)
        try:
            return encode(*args, **kwargs)
        finally:
            # An encoder called inside this one (Qwen3-VL encodes videos through get_image_features) records nothing.
            record.clear()
            record.update({name: value for name, value in before.items() if name not in names})
            record.update(own)

    setattr(owner, encoder, recording_encoder)
    return RestoreAttribute(owner, encoder)
