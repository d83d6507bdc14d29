"""FastV: drop the visual tokens that the last token attends to least, after layer K - 1 of the language model.

Reference: Chen et al., "An Image is Worth 1/2 Tokens After Layer 2: Plug-and-Play Inference Acceleration for Large
Vision-Language Models", ECCV 2024 (arXiv 2403.06764); official code github.com/pkunlp-icler/FastV
(``src/FastV/llava-hf/transformers/src/transformers/models/llama/modeling_llama.py``, ``fastv_forward``).

What the reference does and vlprune reproduces: at layer ``K - 1`` take the attention row of the **last** token
(the code's choice; the paper's text speaks of the average over all queries), softmax over all keys, average over
heads, keep the ``keep`` visual tokens with the highest values in their original order, and continue from layer ``K``
with the shorter sequence at the kept tokens' **original** RoPE positions. Defaults: ``K = 2`` as in the paper's
LLaVA-1.5 runs.

Deviations, each for a reason:
- The attention row is computed from the layer's post-RoPE query and keys by the engine (one row, O(L)), not by
  running the layer with ``output_attentions=True``, so the model keeps SDPA and never materialises L x L weights.
  The values are the same softmax the eager layer would produce.
- The budget is the number of visual tokens kept (``keep``), not the reference's drop ratio ``R``; ``keep=0.5``
  equals ``R = 50%``.
- Batches of more than one sample work (the reference is batch 1): each sample is scored on its own last token.
"""

from __future__ import annotations

from dataclasses import dataclass

from vlprune.pruners import register
from vlprune.pruners.base import (
    Pruner,
    QueryRows,
    Selection,
    Stage,
    StageContext,
    StagePlan,
    check_layer,
    top_k_sorted,
)


@register
@dataclass
class FastV(Pruner):
    name = "fastv"
    stage = Stage.IN_LLM
    reference = "FastV, ECCV 2024 (pkunlp-icler/FastV)"
    default_positions = "original"  # the reference sets position_ids = keep_indexs

    layer: int = 2

    def plan(self, num_visual: int, num_layers: int) -> list[StagePlan]:
        # Layer 0 has no earlier attention to score with, so FastV starts at layer 1.
        layer = check_layer(self.layer, num_layers, minimum=1, method=self.name)
        return [StagePlan(layer=layer, keep=self._required_keep(num_visual), query_rows=QueryRows.LAST)]

    def select(self, ctx: StageContext) -> Selection:
        assert ctx.query_attention is not None, "the engine supplies the last token's attention for fastv"
        scores = ctx.query_attention[:, -1, :]  # (B, N): the last row is the last token
        return Selection(keep_index=top_k_sorted(scores, ctx.keep), scores=scores)
