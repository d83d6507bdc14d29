"""What a method reads of vLLM's vision tower and projector, per image, computed as the HF engine computes it.

vLLM's encoder attention returns no weights, so :class:`TowerRecorder` hooks the feature layer's attention module
(vLLM's ``MMEncoderAttention``, which receives the post-RoPE queries and keys) and the projector's input, while the
plugin encodes images (:meth:`TowerRecorder.recording`). The values are then put per image:

- :func:`patch_tower_reads` (LLaVA's CLIP or SigLIP: one sequence per image, [CLS] first where the tower has one):
  the [CLS] row of the attention, the attention each patch receives, the keys, the projector's input; the [CLS]
  column dropped where the model drops that token before the projector (the HF engine's
  :mod:`vlprune.engine.tower_patch`).
- :func:`packed_tower_reads` (Qwen-VL: every image in one packed sequence, attention image by image): per image, the
  attention each patch receives and its keys, pooled over its m x m merge group, and the merger's input per token,
  put back from the tower's window order into raster order (:mod:`vlprune.engine.tower_packed`).

Heads are averaged over the heads this process computes: vLLM's default data-parallel or single-process encoder
computes them all; a tensor-parallel encoder would split them, and the recorder refuses it.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from vlprune.errors import VlpruneError
from vlprune.kernels import attention_rows
from vlprune.needs import Need
from vlprune.vllm.image_selection import ImageReads

ATTENTION_NEEDS = frozenset({Need.CLS_ATTENTION, Need.RECEIVED_ATTENTION, Need.VISION_KEYS})


@dataclass
class AttentionCall:
    """One call of the feature layer's attention: (B, H, T, d) queries and keys, and the packed sequence's bounds."""

    query: torch.Tensor
    key: torch.Tensor
    scale: float
    cu_seqlens: torch.Tensor | None


@dataclass
class Recording:
    """What one encoding of images recorded."""

    calls: list[AttentionCall] = field(default_factory=list)
    features: list[torch.Tensor] = field(default_factory=list)


class TowerRecorder:
    """Hooks on the feature layer's attention and the projector, live inside :meth:`recording` only."""

    def __init__(self, attention: nn.Module | None, projector: nn.Module | None, heads: int) -> None:
        self.attention, self.projector, self.heads = attention, projector, heads
        self._recording: Recording | None = None
        self.handles: list[Any] = []
        if attention is not None:
            self.handles.append(attention.register_forward_pre_hook(self._on_attention, with_kwargs=True))
        if projector is not None:
            self.handles.append(projector.register_forward_pre_hook(self._on_projector))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    @contextmanager
    def recording(self) -> Iterator[Recording]:
        self._recording = Recording()
        try:
            yield self._recording
        finally:
            self._recording = None

    def _on_attention(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._recording is None:
            return
        names = ("query", "key", "value", "cu_seqlens")
        given = dict(zip(names, args, strict=False)) | kwargs
        heads, size = module.num_heads, module.head_size
        if heads != self.heads:
            raise VlpruneError(
                f"vlprune reads the vision tower's attention over all its {self.heads} heads; this process computes "
                f"{heads} (a tensor-parallel encoder): serve with --mm-encoder-tp-mode data"
            )
        self._recording.calls.append(
            AttentionCall(
                query=_heads_first(given["query"], heads, size),
                key=_heads_first(given["key"], heads, size),
                scale=float(module.scale),
                cu_seqlens=given.get("cu_seqlens"),
            )
        )

    def _on_projector(self, module: nn.Module, args: tuple) -> None:
        if self._recording is not None:
            self._recording.features.append(args[0])


def _heads_first(states: torch.Tensor, heads: int, size: int) -> torch.Tensor:
    """(B, T, H·d) or (B, T, H, d) -> (B, H, T, d)."""
    batch, tokens = states.shape[:2]
    return states.reshape(batch, tokens, heads, size).transpose(1, 2)


def patch_tower_reads(
    recording: Recording,
    embeddings: torch.Tensor,
    needs: frozenset[Need],
    drops_cls: bool,
    projector: nn.Module | None,
) -> list[ImageReads]:
    """Per image of a patch tower's batch, the values ``needs`` asks for. ``embeddings``: (images, N, D)."""
    images = embeddings.shape[0]
    cls = received = keys = features = None
    first = 1 if drops_cls else 0
    if needs & ATTENTION_NEEDS:
        call = _single_call(recording)
        query, key = call.query, call.key
        if Need.CLS_ATTENTION in needs:
            rows = torch.zeros(images, 1, dtype=torch.long, device=query.device)
            cls = attention_rows(query, key, rows, call.scale, None, causal=False)[:, 0, first:]
        if Need.RECEIVED_ATTENTION in needs:
            rows = torch.arange(query.shape[2], device=query.device).expand(images, -1)
            attention = attention_rows(query, key, rows, call.scale, None, causal=False)
            received = attention[:, first:, first:].mean(dim=1)
        if Need.VISION_KEYS in needs:
            keys = key.float().mean(dim=1)[:, first:]
    if Need.VISION_FEATURES in needs:
        features = _single_feature(recording)
    return [
        ImageReads(
            embeddings=embeddings[image],
            cls_attention=_row(cls, image),
            received=_row(received, image),
            keys=_row(keys, image),
            features=_row(features, image),
            projector=projector if Need.VISION_FEATURES in needs else None,
        )
        for image in range(images)
    ]


def packed_tower_reads(
    recording: Recording,
    embeddings: list[torch.Tensor],
    needs: frozenset[Need],
    merge_unit: int,
    raster_orders: list[torch.Tensor],
    projector: nn.Module | None,
) -> list[ImageReads]:
    """Per image of a packed tower's batch, the values ``needs`` asks for. ``embeddings``: each image's (N, D) tokens
    in raster order; ``raster_orders``: each image's permutation from the tower's token order to raster order."""
    received: list[torch.Tensor | None] = [None] * len(embeddings)
    keys: list[torch.Tensor | None] = [None] * len(embeddings)
    features: list[torch.Tensor | None] = [None] * len(embeddings)
    if needs & ATTENTION_NEEDS:
        call = _single_call(recording)
        bounds = call.cu_seqlens.tolist()
        if len(bounds) != len(embeddings) + 1:
            raise VlpruneError(
                f"the vision tower's feature layer attended over {len(bounds) - 1} sequences for {len(embeddings)} "
                f"images; vlprune reads it from a block that attends image by image"
            )
        for image, (start, end) in enumerate(itertools.pairwise(bounds)):
            query, key = call.query[:, :, start:end], call.key[:, :, start:end]
            order = raster_orders[image]
            if Need.RECEIVED_ATTENTION in needs:
                rows = torch.arange(end - start, device=query.device)[None]
                attention = attention_rows(query, key, rows, call.scale, None, causal=False)
                received[image] = _pooled(attention.mean(dim=1)[0][:, None], merge_unit, order)[:, 0]
            if Need.VISION_KEYS in needs:
                keys[image] = _pooled(key[0].float().mean(dim=0), merge_unit, order)
    if Need.VISION_FEATURES in needs:
        merged = _single_feature(recording)
        sizes = [len(tokens) * merge_unit for tokens in embeddings]
        for image, chunk in enumerate(merged.split(sizes)):
            features[image] = chunk.reshape(-1, merge_unit * chunk.shape[-1])[raster_orders[image]]
    return [
        ImageReads(
            embeddings=tokens,
            received=received[image],
            keys=keys[image],
            features=features[image],
            projector=projector if Need.VISION_FEATURES in needs else None,
        )
        for image, tokens in enumerate(embeddings)
    ]


def _pooled(values: torch.Tensor, merge_unit: int, order: torch.Tensor) -> torch.Tensor:
    """(patches, F) values in the tower's order -> (tokens, F), the mean over each merge group, in raster order."""
    return values.float().view(-1, merge_unit, values.shape[-1]).mean(dim=1)[order.to(values.device)]


def _single_call(recording: Recording) -> AttentionCall:
    if len(recording.calls) != 1:
        raise RuntimeError(f"the vision tower's feature layer ran {len(recording.calls)} times for one encoding")
    return recording.calls[0]


def _single_feature(recording: Recording) -> torch.Tensor:
    if len(recording.features) != 1:
        raise RuntimeError(f"the projector ran {len(recording.features)} times for one encoding")
    return recording.features[0]


def _row(values: torch.Tensor | None, image: int) -> torch.Tensor | None:
    return None if values is None else values[image]
