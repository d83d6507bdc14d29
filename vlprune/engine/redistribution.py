"""Attention redistribution (VAR) on top of any attention backend: the real attention function computes every row,
then the text-query rows of the chosen layers are recomputed exactly (softmax of ``q Kᵀ`` with the same mask),
rewritten by the modifier in the heads it selects, multiplied by ``V`` and put back in place of those rows.

Sink tokens and the image's tokens are recorded per layer during the prefill (on the pruned sequence when a pruner
runs first) and reused while decoding, where the query is the new token.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from vlprune.adapters import ModelAdapter
from vlprune.engine.layout import Layout
from vlprune.engine.observer import Action
from vlprune.kernels import attention_rows, gather_tokens
from vlprune.pruners.var import find_sink_dimensions


class Redistribution:
    """The hooks of an attention modifier in one session.

    Args:
        adapter: the model's adapter.
        num_layers: decoder layers of the language model.
        prefill_layout: the layout of the session's prefill in progress, or None outside a prefill.
        modifier: the attention modifier (VAR).
    """

    def __init__(
        self, adapter: ModelAdapter, num_layers: int, prefill_layout: Callable[[], Layout | None], modifier: Any
    ) -> None:
        self.adapter = adapter
        self.prefill_layout = prefill_layout
        self.modifier = modifier
        self.layers = modifier.layers(num_layers)
        self.dimensions: list[int] | None = modifier.known_dimensions(adapter.config.text_config)
        self.cache: Any = None  # the cache of the last prefill, to recognise its decoding steps
        self.decoding = False
        self._sinks: dict[int, torch.Tensor] = {}  # layer -> (B, L) sink tokens of its prefill input
        self._image: dict[int, torch.Tensor] = {}  # layer -> (B, L) visual tokens of its prefill input
        self._rows: dict[int, torch.Tensor] = {}  # layer -> (B, R) text-query slots of its prefill input

    def install(self) -> tuple[list[torch.utils.hooks.RemovableHandle], dict[nn.Module, Any]]:
        handles, observed = [], {}
        for index in self.layers:
            layer = self.adapter.decoder_layers[index]
            handles.append(layer.register_forward_pre_hook(self._input_hook(index), with_kwargs=True))
            observed[layer.self_attn] = self._observer(index)
        return handles, observed

    def _input_hook(self, index: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            layout = self.prefill_layout()
            if layout is None:
                return
            hidden = args[0] if args else kwargs["hidden_states"]
            layout = layout.to(hidden.device)
            if self.dimensions is None:
                self.dimensions = find_sink_dimensions(hidden, self.modifier.tau, layout.real)
            self._sinks[index] = self.modifier.sinks(hidden, self.dimensions) & layout.real
            self._image[index] = layout.is_visual
            self._rows[index] = layout.text_rows[0]

        return hook

    def _observer(self, index: int):
        def observe(
            module: nn.Module,
            query: torch.Tensor,
            key: torch.Tensor,
            value: torch.Tensor,
            mask: Any,
            scaling: float,
        ) -> Action | None:
            if self.prefill_layout() is not None:
                rows = self._rows.get(index)
            elif self.decoding and index in self._sinks:
                rows = torch.arange(query.shape[2], device=query.device).expand(query.shape[0], -1)
            else:
                return None
            if rows is None:
                return None
            length = key.shape[2]
            image = _padded(self._image[index], length)
            sinks = _padded(self._sinks[index], length)
            if not bool(sinks.any()):
                return None  # nothing to move: the rows stay exactly what the attention function computed
            attention = attention_rows(query, key, rows, scaling, mask, causal=True, average_heads=False)
            rewritten, selected = self.modifier.rewrite(attention, image, sinks)
            if not bool(selected.any()):
                return None
            groups = query.shape[1] // value.shape[1]
            values = value.float().repeat_interleave(groups, dim=1)  # (B, H, L, d)
            new_rows = (rewritten @ values).transpose(1, 2)  # (B, R, H, d)
            chosen = selected.transpose(1, 2)[..., None]  # (B, R, H, 1)

            def transform(output: torch.Tensor) -> torch.Tensor:  # output: (B, L, H, d)
                current = gather_tokens(output, rows)
                updated = torch.where(chosen, new_rows.to(output.dtype), current)
                index_ = rows[..., None, None].expand_as(updated)
                return output.scatter(1, index_, updated)

            return Action(transform=transform)

        return observe


def _padded(values: torch.Tensor, length: int) -> torch.Tensor:
    """(B, L0) bool extended with False to ``length`` (tokens generated after the prefill are neither)."""
    if values.shape[1] >= length:
        return values[:, :length]
    return torch.nn.functional.pad(values, (0, length - values.shape[1]), value=False)
