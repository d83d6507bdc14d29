"""The vision bridge: what the vision tower and the projector produce during a prefill, mapped onto the visual tokens
of the language model's prompt.

The tower runs on crops (one per image for LLaVA-1.5; the base view and the tiles for the anyres families), and its
per-crop values ([CLS] attention, keys, projector inputs, the attention map) are captured by hooks and the attention
observer. A stage needs them per visual token: :class:`VisionBridge` picks each token's crop and patch from the
prefill's :class:`~vlprune.geometry.VisualGeometry` (line breaks and recycled tokens get zeros).
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch
from torch import nn

from vlprune.adapters import ModelAdapter, provided_needs
from vlprune.engine import observer
from vlprune.engine.layout import Layout
from vlprune.engine.tower import TowerWants, tower_record_for
from vlprune.errors import VlpruneError
from vlprune.geometry import VisualGeometry
from vlprune.kernels import gather_tokens
from vlprune.needs import Need
from vlprune.pruners import unsupported_reason
from vlprune.pruners.base import Pruner, StagePlan
from vlprune.pruners.plans import plan_needs


class VisionBridge:
    """Captures the vision side's outputs for the next prefill and hands them to stages per visual token."""

    def __init__(self, adapter: ModelAdapter, pruner: Pruner, plan: list[StagePlan]) -> None:
        self.adapter = adapter
        self.pruner_name = pruner.name
        # One rule with `vlprune methods`: the family's declared inputs against the plan's needs.
        needs = plan_needs(plan)
        reason = unsupported_reason(pruner, adapter.traits, needs, tower_name=adapter.config.vision_config.model_type)
        if reason is not None:
            raise VlpruneError(reason)
        served = provided_needs(adapter.traits, needs, pruner.cls_substitute)  # [CLS] read as received on SigLIP
        self.needs_cls = Need.CLS_ATTENTION in served
        self.needs_keys = Need.VISION_KEYS in served
        self.needs_map = Need.VISION_MAP in served
        self.needs_received = Need.RECEIVED_ATTENTION in served
        self.needs_features = Need.VISION_FEATURES in served
        self.needs_crop_map = Need.CROP_MAPS in served
        self.needs_early = Need.EARLY_ATTENTION in served
        self.early_layer = early_vision_layer(adapter, pruner, plan) if self.needs_early else None
        self.image_inputs: dict[str, Any] = {}  # what the adapter's geometry reads, from the last image encoding
        wants = TowerWants(
            cls=self.needs_cls,
            keys=self.needs_keys,
            map=self.needs_map,
            received=self.needs_received,
            features=self.needs_features,
            crop_map=self.needs_crop_map,
            early=self.needs_early,
        )
        self.tower = tower_record_for(adapter, wants, self.image_inputs)

    @property
    def watches_feature_layer(self) -> bool:
        return self.needs_cls or self.needs_keys or self.needs_map or self.needs_received or self.needs_crop_map

    def install(self) -> list[torch.utils.hooks.RemovableHandle]:
        """Register the tower and projector hooks; the caller observes the feature layer's attention (see
        :meth:`on_attention`) when :attr:`watches_feature_layer`."""
        handles: list[Any] = []
        if self.adapter.traits.geometry_inputs:
            handles.append(_record_image_inputs(self.adapter, self.image_inputs))
        if self.adapter.traits.encodes_videos:
            handles.append(_record_image_inputs(self.adapter, self.image_inputs, "get_video_features"))
        if self.tower.hooks_tower:
            tower = self.adapter.vision_tower
            handles.append(tower.register_forward_pre_hook(self._on_tower_input, with_kwargs=True))
            handles.append(tower.register_forward_hook(self._on_tower_output))
        if self.needs_features:
            handles.append(self.adapter.projector.register_forward_pre_hook(self._on_projector_input))
        return handles

    def observers(self) -> dict[nn.Module, observer.Observer]:
        """The vision tower's attention calls the bridge reads, each with its reader: the feature layer's and, for
        ``Need.EARLY_ATTENTION``, the early layer's (one reader calling both where they are the same call)."""
        watched: dict[nn.Module, observer.Observer] = {}
        if self.watches_feature_layer:
            watched[self.adapter.vision_feature_attention()] = self.on_attention
        if self.early_layer is not None:
            module = self.adapter.vision_attention(self.early_layer)
            reader = self.on_early_attention
            watched[module] = observer.chained(watched[module], reader) if module in watched else reader
        return watched

    def recorded(self) -> dict[str, Any]:
        """What the bridge holds of the last encoding (a stage that calls the projector itself, as VisionZip does,
        overwrites the recorded projector input: a second run over the same encoding restores this first)."""
        return self.tower.recorded()

    def restore(self, recorded: dict[str, Any]) -> None:
        self.tower.restore(recorded)

    def prepare(self) -> None:
        """Assemble a packed tower's per-chunk values now, so that a captured prefill only gathers them per token."""
        self.tower.prepare()

    def forget(self) -> None:
        self.tower.forget()
        self.image_inputs.clear()

    # ------------------------------------------------------------------ capture

    def on_attention(
        self,
        module: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        mask: Any,
        scaling: float,
    ) -> None:
        # The vision tower may run before the language model's call (generate encodes images first), so what it
        # produces is kept until the next prefill uses it, whatever the phase.
        self.tower.on_attention(query, key, mask, scaling)

    def on_early_attention(
        self,
        module: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        mask: Any,
        scaling: float,
    ) -> None:
        self.tower.on_early_attention(query, key, mask, scaling)

    def _on_tower_input(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.tower.on_tower_input(args, kwargs)

    def _on_tower_output(self, module: nn.Module, args: tuple, output: Any) -> None:
        self.tower.on_tower_output()

    def _on_projector_input(self, module: nn.Module, args: tuple) -> None:
        self.tower.on_projector_input(args[0])

    # ------------------------------------------------------------------ per visual token

    def cls_scores(self, geometry: VisualGeometry, layout: Layout, slots: torch.Tensor) -> torch.Tensor:
        """(B, N) [CLS] attention of the current visual tokens (0 for line breaks and recycled tokens)."""
        scores = None if self.tower.cls is None else self.tower.cls[..., None]
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
        if with_cls and self.adapter.traits.drops_cls:
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

    def early_scores(self, geometry: VisualGeometry, layout: Layout, slots: torch.Tensor) -> torch.Tensor:
        """(B, N) the early layer's [CLS] attention (or, on a tower without [CLS], the attention each token receives)
        of the current visual tokens; 0 for line breaks and recycled tokens."""
        values, with_cls = self.tower.early_values()
        return self.tokens(values, geometry, layout, slots, "early-layer attention", with_cls=with_cls)[..., 0]

    def key_tokens(self, geometry: VisualGeometry, layout: Layout, slots: torch.Tensor) -> torch.Tensor:
        """(B, N, d) head-mean keys of the current visual tokens at the feature layer (zeros for line breaks and
        recycled tokens); on a chunked tower, the mean over each token's merge group."""
        keys, with_cls = self.tower.key_values()
        return self.tokens(keys, geometry, layout, slots, "vision keys", with_cls=with_cls)

    def feature_tokens(self, geometry: VisualGeometry, layout: Layout, slots: torch.Tensor) -> torch.Tensor:
        """(B, N, F) what the projector received for each current visual token (zeros for line breaks and recycled
        tokens); on a chunked tower, each token's m x m patches concatenated."""
        return self.tokens(self.tower.feature_values(), geometry, layout, slots, "projector input")

    def received(self, geometry: VisualGeometry, layout: Layout, slots: torch.Tensor) -> torch.Tensor:
        """(B, N) attention each current visual token receives at the feature layer, averaged over its crop's patch
        queries ([CLS] excluded when LLaVA drops it) and the heads; 0 for line breaks and recycled tokens."""
        per_crop = self.tower.received_values()  # (crops, T, 1)
        return self.tokens(per_crop, geometry, layout, slots, "received attention")[..., 0]

    def map_inputs(self, batch: int, num_visual: int, wanted: bool) -> dict[str, torch.Tensor]:
        """The attention map among the original visual tokens and the pixels, for pruners that read one square
        map per sample (PTP, VFlowOpt)."""
        if not wanted:
            return {}
        attention, pixels = self.tower.attention_map, self.tower.pixels
        if attention is None or pixels is None:
            raise RuntimeError("the vision tower's attention map was not captured for this prefill")
        if attention.shape[0] != batch:
            raise VlpruneError(
                f"{self.pruner_name} reads the vision attention map of one image per sample, got "
                f"{attention.shape[0]} crops for {batch} samples ({self.adapter.family} encodes a base view and "
                f"tiles per image; this method's multi-crop path is not implemented yet)"
            )
        if self.adapter.traits.drops_cls:
            attention = attention[:, 1:, 1:]
        if attention.shape[1] != num_visual:
            raise VlpruneError(f"the vision attention map covers {attention.shape[1]} tokens, not {num_visual}")
        return {"vision_attention": attention, "pixel_values": pixels}

    def crop_inputs(self, geometry: VisualGeometry, image_inputs: dict[str, Any], wanted: bool) -> dict[str, Any]:
        """Each crop's attention map among its patches, the crops' pixels and the function that places per-crop
        values on the visual tokens as the model packs its features (see ``StageContext.pack_crop_values``)."""
        if not wanted:
            return {}
        attention, image_inputs = self.tower.crop_maps(image_inputs)
        pixels = self.tower.pixels
        if attention is None or pixels is None:
            raise RuntimeError("the vision tower's attention map was not captured for this prefill")
        if self.adapter.traits.drops_cls:
            attention = attention[:, 1:, 1:]
        if attention.shape[0] != geometry.num_crops:
            raise VlpruneError(
                f"the vision tower encoded {attention.shape[0]} crops; the prompts' images have {geometry.num_crops}"
            )
        adapter = self.adapter

        def pack(values: torch.Tensor, fill: float) -> torch.Tensor:
            return adapter.pack_crop_values(values, image_inputs, geometry, fill)

        return {"vision_crop_attention": attention, "vision_crop_pixels": pixels, "pack_crop_values": pack}


def early_vision_layer(adapter: ModelAdapter, pruner: Pruner, plan: list[StagePlan]) -> int:
    """The vision encoder layer of ``Need.EARLY_ATTENTION``: layer ``round(depth · L)`` of the tower's L layers for
    the plan's ``early_vision_depth``, or the first layer at or after it whose attention spans whole crops (Qwen2.5-VL's
    windowed blocks do not), and at most the feature layer; a plan that names no depth reads the feature layer.

    Raises:
        VlpruneError: stages naming different depths or one outside [0, 1].
    """
    depths = {stage.early_vision_depth for stage in plan if Need.EARLY_ATTENTION in stage.needs}
    if len(depths) != 1 or not 0.0 <= (next(iter(depths)) or 1.0) <= 1.0:
        raise VlpruneError(
            f"{pruner.name}: stages that need {Need.EARLY_ATTENTION.value} name one early_vision_depth in [0, 1], "
            f"got {sorted(map(str, depths))}"
        )
    count = len(adapter.vision_layers)
    last = min(adapter.vision_feature_layer_index(), count - 1)  # the feature layer's own attention at most
    depth = next(iter(depths))
    target = count if depth is None else round(depth * count)
    candidates = [index for index in adapter.vision_full_attention_layers() if target <= index <= last]
    return candidates[0] if candidates else last


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
    names = [name for name in adapter.traits.geometry_inputs if name in inspect.signature(encode).parameters]

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
