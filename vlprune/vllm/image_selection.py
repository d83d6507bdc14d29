"""One image's selection, as the HF engine makes it: the method's own :meth:`Pruner.select` on a stage context built
from the values vLLM's tower and projector computed for that image.

The engine hands a pre-LLM stage the projected tokens, their origins and what the plan asked of the vision side
(:mod:`vlprune.engine.stage_inputs`); here the same fields come from :class:`ImageReads`, so both engines run one
implementation of every method. The kept tokens come back in the order the language model receives them: ascending,
or the method's own order where its reference numbers the kept tokens in that order (HoloV), and a merging method's
new tokens after them (VisionZip on LLaVA) or in place of their centres (VisionZip on Qwen-VL).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from vlprune.adapters import AdapterTraits
from vlprune.errors import VlpruneError
from vlprune.pruners import Pruner
from vlprune.pruners.base import StageContext
from vlprune.pruners.plans import plan_needs

PLAN_LAYERS = 32
"""The language-model depth the plugin plans with: any will do, a served method's one stage is at layer 0."""


@dataclass
class ImageReads:
    """What the vision side gave for one image's N tokens (None where the method does not read it).

    Attributes:
        embeddings: (N, D) the tokens as the language model would receive them (the projector's or merger's output).
        cls_attention: (N,) the [CLS] query's attention to each token at the tower's feature layer, heads averaged.
        received: (N,) the attention each token receives there, averaged over the image's queries and the heads
            (pooled over its merge group on Qwen-VL).
        keys: (N, d) the tokens' keys there, heads averaged (pooled over the merge group on Qwen-VL).
        features: (N, F) what the projector received for each token (a merge group's patches, concatenated).
        projector: maps (..., F) features to (..., D) embeddings.
    """

    embeddings: torch.Tensor
    cls_attention: torch.Tensor | None = None
    received: torch.Tensor | None = None
    keys: torch.Tensor | None = None
    features: torch.Tensor | None = None
    projector: nn.Module | None = None


@dataclass
class KeptTokens:
    """An image's kept tokens in the order the language model receives them.

    Attributes:
        embeddings: (K, D) their embeddings.
        origin: (K,) each one's index among the image's N tokens (a merged token: the index of its centre, whose place
            and position it takes).
    """

    embeddings: torch.Tensor
    origin: torch.Tensor


def select_image(pruner: Pruner, traits: AdapterTraits, reads: ImageReads, keep: int, *, reindexed: bool) -> KeptTokens:
    """``pruner``'s selection of ``keep`` of one image's tokens; ``reindexed``: the language model numbers the kept
    tokens contiguously (LLaVA), so a method's own order is kept (as the HF engine does with "reindex" positions);
    otherwise each kept token keeps its position and they stay in ascending order.

    Raises:
        VlpruneError: the selection keeps another number of tokens than ``keep`` (a method whose count the plugin
            cannot know before the image is encoded).
    """
    count = reads.embeddings.shape[0]
    if pruner.keep != keep:
        pruner = _with_keep(pruner, keep)
    plan = pruner.plan_for(traits, count, PLAN_LAYERS)
    context = _stage_context(plan[0].keep, reads, plan_needs(plan))
    selection = pruner.select(context)
    index = selection.keep_index[0]
    if not (selection.ordered and reindexed):
        index = index.sort().values
    hidden = reads.embeddings[index] if selection.kept_hidden is None else selection.kept_hidden[0]
    origin = index
    if selection.recycled is not None:
        hidden = torch.cat([hidden, selection.recycled.hidden[0].to(hidden.dtype)])
        centres = selection.recycled.positions[0].to(index.device)  # the image's tokens are numbered 0..N-1 here
        origin = torch.cat([origin, centres])
    if hidden.shape[0] != keep:
        raise VlpruneError(
            f"{pruner.name} kept {hidden.shape[0]} of an image's {count} tokens where its budget is {keep}; the "
            f"plugin gives each image exactly its budget of placeholders"
        )
    return KeptTokens(embeddings=hidden.to(reads.embeddings.dtype), origin=origin)


def _stage_context(stage_keep: int, reads: ImageReads, needs: frozenset) -> StageContext:
    """The layer-0 stage context of one image (a batch of one), its tokens numbered 0..N-1."""
    count, device = reads.embeddings.shape[0], reads.embeddings.device
    numbered = torch.arange(count, device=device)[None]
    return StageContext(
        layer=0,
        keep=stage_keep,
        visual_hidden=reads.embeddings[None],
        visual_positions=numbered,
        visual_origin=numbered,
        geometry=None,  # one untiled view without line breaks: the methods' single-view path
        vision_cls_attention=_batched(reads.cls_attention),
        vision_received_attention=_batched(reads.received),
        vision_keys=_batched(reads.keys),
        vision_features=_batched(reads.features),
        projector=reads.projector,
        num_layers=PLAN_LAYERS,
    )


def _batched(values: torch.Tensor | None) -> torch.Tensor | None:
    return None if values is None else values[None]


def _with_keep(pruner: Pruner, keep: int) -> Pruner:
    """A copy of ``pruner`` with the budget ``keep`` (a request's own)."""
    import copy

    twin = copy.copy(pruner)
    twin.keep = keep
    return twin
