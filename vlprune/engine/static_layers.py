"""The decoder layers as a captured graph runs them: a static prefill over the prompt's padded bucket (the eager
session's hooks run the stages in static mode) and one decode step over the static caches, each layer group with
its own mask and positions."""

from __future__ import annotations

from typing import Any

import torch

from vlprune.engine.decode import static_answer_slots, step_mask
from vlprune.engine.deepstack import place_planes
from vlprune.engine.graphs import CapturedGraphs, cache_keyword
from vlprune.engine.layout import prefill_mask
from vlprune.engine.prefill import Prefill
from vlprune.engine.session import PruningSession


class StaticLayers:
    """Runs the language model's decoder layers of one captured session.

    Args:
        session: the eager session whose hooks run the stages during the prefill.

    Attributes:
        prompt_positions: the language model's position ids of the last prompt (as ``generate`` passes them).
        deepstack_planes, deepstack_mask: its DeepStack planes and their visual positions (Qwen3-VL), else None.
    """

    def __init__(self, session: PruningSession) -> None:
        self.session = session
        self.adapter = session.adapter
        self.cache_name = cache_keyword(self.adapter.decoder_layers[0])
        self.prompt_positions: torch.Tensor | None = None
        self.deepstack_planes: list[torch.Tensor] | None = None
        self.deepstack_mask: torch.Tensor | None = None
        self.layer_group: list[int] = []  # per decoder layer, the decode group whose prefill it holds

    def record(self, language_model_kwargs: dict[str, Any]) -> None:
        """Keep what the language model's call carries for the layers: positions and DeepStack planes."""
        self.prompt_positions = language_model_kwargs.get("position_ids")
        self.deepstack_planes = language_model_kwargs.get("deepstack_visual_embeds")
        self.deepstack_mask = language_model_kwargs.get("visual_pos_masks")

    def first_kwargs(
        self, prefill: Prefill, layer_kwargs: dict[str, Any], hidden: torch.Tensor, room: int
    ) -> dict[str, Any]:
        """Decoder layer 0's keyword arguments for a static prefill: the model's positions and cos/sin, and a mask
        over the layer's cache slots."""
        mask = prefill_mask(prefill.layout.real, self.session.mask_style, hidden.dtype, True, room)
        kwargs = {"attention_mask": mask, "position_embeddings": layer_kwargs["position_embeddings"]}
        if layer_kwargs.get("position_ids") is not None:
            kwargs["position_ids"] = layer_kwargs["position_ids"]
        return kwargs

    def run_prefill(
        self, hidden: torch.Tensor, kwargs: dict[str, Any], cache: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The decoder layers over the prompt (the session's hooks run the stages): the last token's logits and its
        final (normalised) hidden state, as ``generate``'s last ``hidden_states`` entry holds it."""
        planes = self.deepstack_planes if self.adapter.traits.deepstack else None
        for index, layer in enumerate(self.adapter.decoder_layers):
            output = layer(hidden, **kwargs, **{self.cache_name: cache, "use_cache": True})
            hidden = output[0] if isinstance(output, tuple) else output
            if planes is not None and index < len(planes):
                layout = self.session.prefill_state().layout
                hidden = place_planes(hidden, layout, planes[index], self.deepstack_mask)
        last = self.adapter.language_model.norm(hidden[:, -1:])
        return self.adapter.model.lm_head(last)[:, 0], last[:, 0]

    def prefill_graph(
        self, hidden: torch.Tensor, kwargs: dict[str, Any], cache: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`run_prefill`, the function a key's prefill graph captures."""
        return self.run_prefill(hidden, kwargs, cache)

    def decode_inputs(self, captured: CapturedGraphs, prefill: Prefill) -> list[Any]:
        """Per layer group holding the same prefill, what a decode step's masks and positions start from: the
        prefill's real slots, the answer's room in the group's caches, and each sample's next position."""
        real = prefill.original_real
        next_positions = next_prompt_positions(self.prompt_positions, real).to(real.device)
        groups = [(0, prefill.original_real, torch.zeros_like(next_positions))]
        groups += [
            (seg.first_layer, seg.real, seg.position_shift.to(next_positions.device)) for seg in prefill.segments
        ]
        # A stage at layer 0 leaves no layer holding the prompt as it came.
        groups = [group for index, group in enumerate(groups) if group[0] not in {g[0] for g in groups[index + 1 :]}]
        inputs = []
        for first_layer, real, shift in groups:
            room = captured.capacities[first_layer] - real.shape[1]
            inputs.append((real.to(next_positions.device), room, next_positions - shift))
        self.layer_group = [
            max(index for index, (first, _, _) in enumerate(groups) if first <= layer)
            for layer in range(len(self.adapter.decoder_layers))
        ]
        return [inputs, captured.cache]

    def decode_graph(
        self, token_embeds: torch.Tensor, step: torch.Tensor, groups: list[Any], cache: Any
    ) -> torch.Tensor:
        """One decode step over the static caches: each layer group's mask (its prefill's real slots, the answer so
        far and this token) and positions (its next position plus the step)."""
        hidden = token_embeds
        style, rotary = self.session.mask_style, self.adapter.rotary_embedding
        per_group = []
        for real, room, next_positions in groups:
            mask = step_mask(real, static_answer_slots(room, step), 1, style, hidden.dtype)
            positions = (next_positions + step)[:, None]
            per_group.append((mask, positions, rotary(hidden, positions)))
        for index, layer in enumerate(self.adapter.decoder_layers):
            mask, positions, embeddings = per_group[self.layer_group[index]]
            output = layer(
                hidden,
                attention_mask=mask,
                position_ids=positions,
                position_embeddings=embeddings,
                **{self.cache_name: cache, "use_cache": True},
            )
            hidden = output[0] if isinstance(output, tuple) else output
        return self.adapter.model.lm_head(self.adapter.language_model.norm(hidden))[:, -1]


def next_prompt_positions(positions: torch.Tensor | None, real: torch.Tensor) -> torch.Tensor:
    """(B,) the position of the first token after each prompt, as ``generate`` numbers it: one past the largest
    position of the prompt's real tokens (for multimodal RoPE, over its temporal, height and width rows; the model
    stores the same as ``rope_deltas``). ``positions``: the language model's (B, L) or ([text,] 3, B, L) ids."""
    if positions is None:
        return real.long().sum(dim=-1)
    if positions.dim() == 3:
        positions = positions[-3:].amax(dim=0)  # the multimodal rows (a leading text row, if any, is left out)
    positions = positions.expand(real.shape[0], -1).to(real.device)
    return positions.masked_fill(~real, -1).amax(dim=-1) + 1
