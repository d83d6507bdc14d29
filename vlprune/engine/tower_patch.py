"""What a patch tower produced during the last encoding: one sequence per crop, the [CLS] token first where the tower
has one (CLIP, SigLIP and DINOv2 in the LLaVA families).

:class:`PatchTowerRecord` keeps the feature layer's values per crop as the tower computed them; the vision bridge
(:mod:`vlprune.engine.vision_bridge`) places them on the visual tokens. The packed tower of the Qwen-VL family records
the same values another way (:mod:`vlprune.engine.tower_packed`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch

from vlprune.adapters import ModelAdapter
from vlprune.kernels import attention_rows


@dataclass(frozen=True)
class TowerWants:
    """What of the tower's feature layer the stages of a session read."""

    cls: bool = False
    keys: bool = False
    map: bool = False
    received: bool = False
    features: bool = False
    crop_map: bool = False
    early: bool = False  # the [CLS] row (or the received attention) at an earlier layer (Need.EARLY_ATTENTION)


class PatchTowerRecord:
    """The values of the last encoding of a patch tower, per crop (crops, tokens, ...), [CLS] included."""

    _RECORDED = ("cls", "keys", "features", "attention_map", "pixels", "early")

    def __init__(self, adapter: ModelAdapter, wants: TowerWants) -> None:
        self.adapter = adapter
        self.wants = wants
        self.cls: torch.Tensor | None = None  # (crops, T) [CLS] attention over the tower's tokens
        self.keys: torch.Tensor | None = None  # (crops, T, d) head-mean keys
        self.features: torch.Tensor | None = None  # (crops, T', F) projector input
        self.attention_map: torch.Tensor | None = None  # (crops, T, T)
        self.pixels: torch.Tensor | None = None
        self.early: torch.Tensor | None = None  # (crops, T) [CLS] row, or received attention, at the early layer

    @property
    def hooks_tower(self) -> bool:
        """Whether the tower's input must be recorded (the pixels of the maps)."""
        return self.wants.map or self.wants.crop_map

    # ------------------------------------------------------------------ capture

    def on_attention(self, query: torch.Tensor, key: torch.Tensor, mask: Any, scale: float) -> None:
        """The feature layer's attention call, over every crop at once."""
        if self.wants.cls:
            rows = torch.zeros(query.shape[0], 1, dtype=torch.long, device=query.device)  # row 0 is [CLS]
            self.cls = attention_rows(query, key, rows, scale, mask, causal=False)[:, 0]
        if self.wants.keys:
            self.keys = key.float().mean(dim=1)  # (crops, tokens, d)
        if self.wants.map or self.wants.received or self.wants.crop_map:
            rows = torch.arange(query.shape[2], device=query.device).expand(query.shape[0], -1)
            self.attention_map = attention_rows(query, key, rows, scale, mask, causal=False)  # (crops, T, T)

    def on_early_attention(self, query: torch.Tensor, key: torch.Tensor, mask: Any, scale: float) -> None:
        """The early layer's attention call (Need.EARLY_ATTENTION): the [CLS] row where the tower has [CLS], else
        the attention each token receives, averaged over the crop's queries (all its tokens: there is no [CLS])."""
        if self.adapter.traits.has_cls:
            rows = torch.zeros(query.shape[0], 1, dtype=torch.long, device=query.device)
            self.early = attention_rows(query, key, rows, scale, mask, causal=False)[:, 0]
        else:
            rows = torch.arange(query.shape[2], device=query.device).expand(query.shape[0], -1)
            self.early = attention_rows(query, key, rows, scale, mask, causal=False).mean(dim=1)

    def on_tower_input(self, args: tuple, kwargs: dict) -> None:
        self.pixels = args[0] if args else kwargs.get("pixel_values", kwargs.get("hidden_states"))

    def on_tower_output(self) -> None:
        pass

    def on_projector_input(self, features: torch.Tensor) -> None:
        self.features = features

    def prepare(self) -> None:
        """Nothing to assemble ahead of a captured prefill: the values are per crop already."""

    def forget(self) -> None:
        self.cls = self.keys = self.features = self.attention_map = self.pixels = self.early = None

    def recorded(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self._RECORDED}

    def restore(self, recorded: dict[str, Any]) -> None:
        for name, value in recorded.items():
            setattr(self, name, copy.copy(value) if isinstance(value, list | dict) else value)

    # ------------------------------------------------------------------ per crop

    def key_values(self) -> tuple[torch.Tensor | None, bool]:
        """(crops, T, d) head-mean keys, and whether they include the [CLS] token's."""
        return self.keys, True

    def early_values(self) -> tuple[torch.Tensor | None, bool]:
        """(crops, T, 1) the early layer's [CLS] row or received attention, and whether the tokens include [CLS]."""
        return (None if self.early is None else self.early[..., None]), self.adapter.traits.has_cls

    def feature_values(self) -> torch.Tensor | None:
        """(crops, T, F) what the projector received."""
        return self.features

    def received_values(self) -> torch.Tensor:
        """(crops, P, 1) attention each patch receives, averaged over its crop's patch queries ([CLS] excluded when
        the model drops it) and the heads."""
        attention = self.attention_map
        if attention is None:
            raise RuntimeError("the vision tower's attention map was not captured for this prefill")
        if self.adapter.traits.drops_cls:
            attention = attention[:, 1:, 1:]
        return attention.mean(dim=1)[..., None]

    def crop_maps(self, image_inputs: dict[str, Any]) -> tuple[torch.Tensor | None, dict[str, Any]]:
        """(crops, T, T) each crop's attention map, and the image inputs that place per-crop values."""
        return self.attention_map, image_inputs
