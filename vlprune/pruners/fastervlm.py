"""FasterVLM: keep the visual tokens that the vision tower's [CLS] token attends to most, before the language model.

Reference: Zhang et al., "[CLS] Attention is All You Need for Training-Free Visual Token Pruning: Make VLM Inference
Faster" (arXiv 2412.01818); official code github.com/Theia-4869/FasterVLM (LLaVA's ``clip_encoder.py``: the [CLS]
row of the attention at the feature-select layer, averaged over heads, top ``keep`` patches).

vlprune reproduces the selection: the attention row of [CLS] at the vision layer whose output LLaVA feeds to the
projector (``vision_feature_layer``, -2 for LLaVA-1.5), softmax over all tokens, averaged over heads, restricted to
the tokens that reach the language model, top ``keep`` in original order, the shortened prompt numbered
contiguously as the reference's rebuilt ``inputs_embeds`` are (default ``positions="reindex"``).

Deviations, each for a reason:
- The [CLS] row is computed by the engine from the layer's query and keys (one row), so the vision tower keeps SDPA
  instead of running with ``output_attentions=True``.
- Pruning happens at the input of decoder layer 0 rather than by shortening the prompt before the language model:
  every decoder layer sees exactly the kept tokens, the same computation; ``positions="original"`` keeps the kept
  tokens' positions instead.
- Towers without a [CLS] token (SigLIP) are refused with a clear error: the method is defined by that token.
"""

from __future__ import annotations

from dataclasses import dataclass

from vlprune.pruners import register
from vlprune.pruners.base import Pruner, Selection, Stage, StageContext, StagePlan, top_k_sorted


@register
@dataclass
class FasterVLM(Pruner):
    name = "fastervlm"
    stage = Stage.PRE_LLM
    reference = "FasterVLM, arXiv 2412.01818 (Theia-4869/FasterVLM)"
    default_positions = "reindex"  # the reference shortens inputs_embeds before the LLM, which numbers them 0..L-1

    def plan(self, num_visual: int, num_layers: int) -> list[StagePlan]:
        return [StagePlan(layer=0, keep=self._required_keep(num_visual), vision_cls_attention=True)]

    def select(self, ctx: StageContext) -> Selection:
        assert ctx.vision_cls_attention is not None, "the engine supplies the [CLS] attention for fastervlm"
        scores = ctx.vision_cls_attention
        return Selection(keep_index=top_k_sorted(scores, ctx.keep), scores=scores)
