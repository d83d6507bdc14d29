"""``random``: keep a uniformly random subset of the visual tokens (seeded).

Random pruning is a strong baseline in pruning benchmarks (UniPruneBench, arXiv 2511.02650), so every comparison
should include it. It acts pre-LLM by default (``layer=0``) and inside the language model with ``layer=K``.
The selection depends only on ``seed`` and the number of visual tokens, never on the tokens or on the other samples
of the batch: every sample of a call draws the same subset, so a batch gives what each sample gives alone.

The selection is :func:`select_random`, a function of the token count, the budget and the seed (re-exported by
:mod:`vlprune.pruners.selection`), which the pruner calls and another engine can call alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlprune.pruners import register
from vlprune.pruners.base import Pruner, Selection, Stage, StageContext, StagePlan, check_layer, is_probe

_DRAWS: dict[tuple[int, int, torch.device], torch.Tensor] = {}


def seeded_draw(seed: int, count: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(count,) uniform scores from a CPU generator seeded with ``seed`` (the same on every device), drawn once per
    (seed, count) and copied once per device: a captured graph reads them where it runs (a CUDA graph takes no CPU
    input)."""
    cpu, device = torch.device("cpu"), torch.device(device)
    if (seed, count, cpu) not in _DRAWS:
        _DRAWS[seed, count, cpu] = torch.rand(count, generator=torch.Generator().manual_seed(seed))
    if (seed, count, device) not in _DRAWS:
        _DRAWS[seed, count, device] = _DRAWS[seed, count, cpu].to(device)
    return _DRAWS[seed, count, device]


def select_random(
    num_visual: int, keep: int, *, batch: int = 1, seed: int = 0, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """The random baseline's kept tokens: the ``keep`` of ``num_visual`` tokens whose seeded uniform draw is highest.

    Args:
        num_visual: N, the visual tokens of each sample.
        keep: tokens kept per sample (a count in [1, N]).
        batch: B, samples; each keeps the same subset (the draw depends only on ``seed`` and N).
        seed: the draw's seed (:func:`seeded_draw`: a CPU generator, the same on every device).
        device: where the indices are made.

    Returns:
        (B, keep) long indices into the N tokens, ascending.
    """
    scores = seeded_draw(seed, num_visual, device).expand(batch, -1)
    return torch.topk(scores, keep, dim=-1).indices.sort(dim=-1).values


@register
@dataclass
class RandomPruner(Pruner):
    name = "random"
    stage = Stage.PRE_LLM
    reference = "uniform random subset (baseline)"
    default_positions = "reindex"  # at layer 0; see reference_positions

    layer: int = 0
    seed: int = 0

    def reference_positions(self) -> str:
        # No reference: numbered like the methods it stands in for (pre-LLM ones renumber, in-LLM FastV keeps).
        return "reindex" if self.layer == 0 else "original"

    def plan(self, num_visual: int, num_layers: int) -> list[StagePlan]:
        layer = check_layer(self.layer, num_layers, method=self.name)
        if not is_probe(num_visual):  # a probe's count is 2**30: drawing it would take seconds and gigabytes
            seeded_draw(self.seed, num_visual)  # drawn now, on the host, so that a captured graph only reads it
        return [StagePlan(layer=layer, keep=self._required_keep(num_visual))]

    def select(self, ctx: StageContext) -> Selection:
        device = ctx.visual_hidden.device
        keep_index = select_random(ctx.num_visual, ctx.keep, batch=ctx.batch_size, seed=self.seed, device=device)
        # The draw is cached per (seed, count, device): reading it again for the statistics costs nothing.
        scores = seeded_draw(self.seed, ctx.num_visual, device).expand(ctx.batch_size, -1)
        return Selection(keep_index=keep_index, scores=scores)
