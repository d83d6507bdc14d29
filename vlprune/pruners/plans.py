"""What a pruner asks of the engine at each stage: :class:`StagePlan`, a layer, a budget and a set of needs.

A stage's inputs beyond its core are named as a set of :class:`~vlprune.needs.Need` (``needs=``); the engine
provides each of them, and the adapters declare which they can provide on their family. The flags plans were written
with before (``vision_keys=True``, ...) are still accepted as keywords and still read as attributes.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from vlprune.needs import Need, needs_from_flags


class QueryRows(enum.StrEnum):
    """Which query tokens' attention rows a stage needs from the layer before it."""

    LAST = "last"  # the last token of each sample (FastV)
    TEXT = "text"  # every non-visual, non-padding token after the first visual token


def _reads(need: Need) -> property:
    """The old flag attribute of ``need``: whether the plan needs it."""
    return property(lambda plan: need in plan.needs, doc=f"Whether the stage needs {need.name} (``Need.{need.name}``).")


@dataclass(frozen=True, init=False)
class StagePlan:
    """One pruning step: before decoder layer ``layer``, keep ``keep`` visual tokens per sample.

    Attributes:
        layer: decoder layer whose input is pruned; 0 means pre-LLM.
        keep: visual tokens per sample that continue (recycled tokens come on top of these), or None when the pruner
            decides the count from the data at :meth:`Pruner.select` (each sample its own: the engine then runs the
            stage sample by sample; the context's ``keep`` is then the number of tokens present).
        query_rows: attention rows the engine computes at layer ``layer - 1`` for this stage, or None.
        needs: the inputs the stage needs beyond its core (see :class:`~vlprune.needs.Need`):
            ``OWN_LAYER_ATTENTION``: compute the query rows with layer ``layer``'s own queries and keys, from its
            input, before pruning it (PyramidDrop), instead of from layer ``layer - 1``'s attention;
            ``PER_HEAD_ATTENTION``: those rows per head, (B, H, R, N), instead of averaged over heads;
            ``QUERY_ROW_ATTENTION``: also the attention of those rows to the query rows' own tokens (AdaptInfer);
            ``VALUE_STATES``: the value vectors of the visual tokens and of the query rows at the layer the rows come
            from (FlowCut's language-model stage; not with ``OWN_LAYER_ATTENTION``);
            ``KEY_STATES``: the post-RoPE key vectors of the visual tokens and of the query rows at that layer (DART;
            not with ``OWN_LAYER_ATTENTION``);
            ``FINAL_NORM``: the language model's final norm module (DART compares hidden states through it);
            ``TEXT_TOKENS``: the hidden states of the text after the image (the instruction);
            ``INITIAL_EMBEDDINGS``: the language model's input embeddings (layer 0's input) of the visual tokens and
            of the text after the image, whatever layer the stage runs at;
            ``INSTRUCTION_IDS``: the token ids of the text after the image (the prompt's, not re-tokenised) and the
            language model's token-embedding module (MMTok embeds the instruction's words itself);
            ``CLS_ATTENTION``: the vision tower's [CLS] attention row at the feature layer;
            ``VISION_FEATURES``: the projector's input features of the visual tokens and the projector itself;
            ``VISION_KEYS``: the head-averaged keys of the visual tokens at the vision feature layer;
            ``VISION_MAP``: the full attention map among the image's tokens at the vision feature layer (head mean)
            and the pixels the tower received;
            ``RECEIVED_ATTENTION``: the attention each visual token receives at the vision feature layer, averaged
            over its crop's patch queries and the heads (works on multi-crop families);
            ``CROP_MAPS``: each crop's attention map among its patches at the vision feature layer, the crops'
            pixels and the function that places per-crop values on the visual tokens as the model packs its
            features (multi-crop families; VFlowOpt);
            ``EARLY_ATTENTION``: the [CLS] attention row (on a tower without [CLS], the attention each token
            receives, as ``RECEIVED_ATTENTION``) at a second, earlier vision layer, which ``early_vision_depth``
            names (VScan's local scan).
        keep_at_most: ``keep`` is an upper bound: a sample with fewer visual tokens at this stage keeps them all
            (FlowCut's language-model stage runs only where the vision side left more than its budget).
        early_vision_depth: with ``EARLY_ATTENTION``, where in the vision tower to read it, as a share of its L
            layers: layer ``round(depth · L)``, or the first layer after it that attends over whole crops (not one of
            Qwen2.5-VL's windowed blocks), at most the feature layer (5/24: CLIP-L's layer 5, Qwen2.5-VL's block 7);
            None reads the feature layer.

    Each need also reads as the flag it replaced (``plan.vision_keys`` is ``Need.VISION_KEYS in plan.needs``), and
    the constructor accepts those flags as keywords (``StagePlan(0, 16, vision_keys=True)``).
    """

    layer: int
    keep: int | None
    query_rows: QueryRows | None = None
    needs: frozenset[Need] = frozenset()
    keep_at_most: bool = False
    early_vision_depth: float | None = None

    def __init__(
        self,
        layer: int,
        keep: int | None,
        query_rows: QueryRows | None = None,
        needs: frozenset[Need] | set[Need] = frozenset(),
        keep_at_most: bool = False,
        early_vision_depth: float | None = None,
        **flags: bool,
    ) -> None:
        object.__setattr__(self, "layer", layer)
        object.__setattr__(self, "keep", keep)
        object.__setattr__(self, "query_rows", query_rows)
        object.__setattr__(self, "needs", frozenset(Need(need) for need in needs) | needs_from_flags(flags))
        object.__setattr__(self, "keep_at_most", keep_at_most)
        object.__setattr__(self, "early_vision_depth", early_vision_depth)

    own_layer_attention = _reads(Need.OWN_LAYER_ATTENTION)
    per_head_attention = _reads(Need.PER_HEAD_ATTENTION)
    query_row_attention = _reads(Need.QUERY_ROW_ATTENTION)
    value_states = _reads(Need.VALUE_STATES)
    key_states = _reads(Need.KEY_STATES)
    final_norm = _reads(Need.FINAL_NORM)
    text_tokens = _reads(Need.TEXT_TOKENS)
    initial_embeddings = _reads(Need.INITIAL_EMBEDDINGS)
    instruction_ids = _reads(Need.INSTRUCTION_IDS)
    vision_cls_attention = _reads(Need.CLS_ATTENTION)
    vision_features = _reads(Need.VISION_FEATURES)
    vision_keys = _reads(Need.VISION_KEYS)
    vision_attention = _reads(Need.VISION_MAP)
    vision_received_attention = _reads(Need.RECEIVED_ATTENTION)
    vision_crop_attention = _reads(Need.CROP_MAPS)
    vision_early_attention = _reads(Need.EARLY_ATTENTION)


def plan_needs(plan: list[StagePlan]) -> frozenset[Need]:
    """Everything the stages of ``plan`` need together."""
    return frozenset().union(*(stage.needs for stage in plan))
