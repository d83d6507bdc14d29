"""ZOO-Prune: keep tokens the projector is sensitive to and that are diverse, scored by zeroth-order gradients.

Reference: "Training-Free Token Pruning via Zeroth-Order Gradient Estimation in Vision-Language Models", CVPR 2026
(arXiv 2509.24837); project page aim-skku.github.io/ZOO-Prune. The official repository (AIM-SKKU/ZOO-Prune) holds
no code, so vlprune follows the paper.

What the paper does and vlprune reproduces, before the language model:

1. Sensitivity of each visual token through the projector ``M`` by symmetric finite differences along ``m`` random
   unit directions ``u_j`` (Gaussian, normalised):
   ``S(i) = 1/m · Σ_j || M(x_i + h u_j) - M(x_i - h u_j) ||_2 / (2h)``, an estimate of ``E_u ||J(x_i) u||`` (the
   paper's Proposition 3.1). Defaults ``m = 64``, ``h = 0.01``.
2. Greedy selection: min-max normalise ``S`` to ``Ŝ``; the first token is ``argmax Ŝ``; each next token maximises
   ``Ŝ(i) · (1 - max_{j chosen} cos(z_i, z_j))`` on the projected features ``z`` (DivPrune's max-min greedy,
   weighted by sensitivity), until ``keep`` tokens; they enter the language model in their original order.

Choices the paper leaves open, and deviations, each with its reason:
- Positions: no official code says; the shortened prompt is numbered contiguously (``default_positions``), as the
  pre-LLM LLaVA references (FasterVLM, DivPrune, VisionZip) do by rebuilding ``inputs_embeds``.
- The perturbed projector runs in float32 whatever the model's dtype: in bfloat16 a step of ``h`` along a unit
  direction (about 1e-3 per component for 1024 features) is below the resolution of typical activations and the
  difference would read rounding noise.
- The same ``m`` directions serve every token of every sample, drawn from ``seed`` on the CPU, so a selection is
  deterministic and independent of the batch and the device.
- All ``2 · m · N`` perturbed inputs go through the projector in as few calls as memory allows (one call for LLaVA-1.5
  shapes: 73,728 rows), never one call per token. For LLaVA's own projector (linear, activation, linear) the same
  differences are computed with less work, exactly: the first layer's image of ``x ± h u`` is ``W1 x + b1 ± h W1 u``
  and the second layer's bias cancels, so one product per direction replaces two projector passes (2.5x fewer
  FLOPs at LLaVA-1.5's shapes). Other projectors take the generic path.
- When every token has the same sensitivity (a linear projector), ``Ŝ`` is 1 for all and the selection is DivPrune's
  max-min order started from the first token.
- On Qwen-VL, whose projector (the patch merger) turns four patches into one token, a token's input is its four
  patches' features concatenated and the merger is that token's projector; the paper evaluates LLaVA models only.

The selection is :func:`select_zoo_prune`, a function of the projector's inputs, the projected tokens and the
projector as a callable (re-exported by :mod:`vlprune.pruners.selection`), which the pruner calls and another engine
can call alike; the shortcut for LLaVA's projector is taken when the caller hands its layers as a
:class:`LinearActLinear` (the pruner does for transformers' ``LlavaMultiModalProjector``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn
from torch.func import functional_call

from vlprune.errors import VlpruneError
from vlprune.needs import Need
from vlprune.pruners import register
from vlprune.pruners.base import Pruner, Selection, Stage, StageContext, StagePlan
from vlprune.pruners.divprune import cosine_distance, greedy_max_min

_MAX_ROWS_PER_CALL = 1 << 17  # perturbed inputs per projector call; bounds the float32 activations' memory


_DIRECTIONS: dict[tuple[int, int, int, torch.device], torch.Tensor] = {}


def random_directions(count: int, dim: int, seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(count, dim) float32 Gaussian directions scaled to unit norm, drawn on the CPU from ``seed`` (the same on every
    device) once per (count, dim, seed) and copied once per device: a captured graph (whose key's first call runs
    eagerly) then reads them instead of holding a generator, which the tracer cannot."""
    cpu, device = torch.device("cpu"), torch.device(device)
    if (count, dim, seed, cpu) not in _DIRECTIONS:
        generator = torch.Generator().manual_seed(seed)
        directions = torch.randn(count, dim, generator=generator)
        _DIRECTIONS[count, dim, seed, cpu] = directions / directions.norm(dim=-1, keepdim=True)
    if (count, dim, seed, device) not in _DIRECTIONS:
        _DIRECTIONS[count, dim, seed, device] = _DIRECTIONS[count, dim, seed, cpu].to(device)
    return _DIRECTIONS[count, dim, seed, device]


class LinearActLinear(NamedTuple):
    """A projector ``W2 act(W1 x + b1) + b2`` given by its pieces (``b2`` cancels in the finite differences), so that
    :func:`select_zoo_prune` computes its sensitivity with the exact shortcut instead of perturbed passes."""

    weight_1: torch.Tensor
    """(H, F) the first layer's weight."""
    bias_1: torch.Tensor | None
    """(H,) its bias, or None."""
    act: Callable[[torch.Tensor], torch.Tensor]
    """The activation between the layers."""
    weight_2: torch.Tensor
    """(D, H) the second layer's weight."""


def llava_mlp(projector: object) -> LinearActLinear | None:
    """The pieces of transformers' ``LlavaMultiModalProjector`` (``linear_2(act(linear_1(x)))``, its forward
    unchanged), or of a projector that gives them itself (``linear_act_linear()``: the vLLM plugin's wrapper of vLLM's
    LLaVA projector), else None: other projectors (LLaVA-NeXT's and OneVision's own classes, Qwen-VL's mergers) take
    the generic path."""
    own = getattr(projector, "linear_act_linear", None)
    if callable(own):
        return own()
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector  # the HF engine's models only

    if not (
        isinstance(projector, LlavaMultiModalProjector) and type(projector).forward is LlavaMultiModalProjector.forward
    ):
        return None
    first, second = projector.linear_1, projector.linear_2
    return LinearActLinear(first.weight, first.bias, projector.act, second.weight)


def zeroth_order_sensitivity(
    projector: nn.Module, features: torch.Tensor, directions: torch.Tensor, step: float
) -> torch.Tensor:
    """(B, N) mean over directions of the symmetric finite-difference norm ``||M(x + hu) - M(x - hu)|| / 2h``, with
    the shortcut for transformers' LLaVA projector (:func:`llava_mlp`).

    Args:
        projector: maps (..., F) features to (..., D) embeddings; it runs with float32 copies of its weights.
        features: (B, N, F) the projector's inputs.
        directions: (m, F) unit directions.
        step: ``h``.
    """
    return projector_sensitivity(projector, features, directions, step, mlp=llava_mlp(projector))


def projector_sensitivity(
    projector: Callable[[torch.Tensor], torch.Tensor],
    features: torch.Tensor,
    directions: torch.Tensor,
    step: float,
    mlp: LinearActLinear | None = None,
) -> torch.Tensor:
    """(B, N) ZOO-Prune's sensitivity ``1/m Σ_j ||M(x + h u_j) - M(x - h u_j)|| / 2h`` of each token, in float32.

    Args:
        projector: maps (..., F) features to (..., D) embeddings. An ``nn.Module`` runs with float32 copies of its
            weights; any other callable is called as it is on float32 inputs (it should compute in float32 too).
        features: (B, N, F) the projector's inputs.
        directions: (m, F) unit directions.
        step: ``h``.
        mlp: the projector's pieces when it is ``W2 act(W1 x + b1) + b2``: the exact shortcut runs instead of the
            perturbed passes (``projector`` is then not called).
    """
    directions = directions.to(features.device)
    if mlp is not None:
        return _mlp_sensitivity(mlp, features, directions, step)
    if isinstance(projector, nn.Module):
        weights = {name: value.float() for name, value in projector.named_parameters()}
        weights.update({name: value.float() for name, value in projector.named_buffers()})

        def run(inputs: torch.Tensor) -> torch.Tensor:
            return functional_call(projector, weights, (inputs,))
    else:
        run = projector
    batch, count, dim = features.shape
    tokens = features.float().reshape(batch * count, 1, dim)
    per_call = max(1, _MAX_ROWS_PER_CALL // (2 * len(directions)))
    sensitivity = []
    for start in range(0, batch * count, per_call):
        chunk = tokens[start : start + per_call]
        perturbed = torch.cat([chunk + step * directions, chunk - step * directions], dim=1)  # (n, 2m, F)
        projected = run(perturbed)
        plus, minus = projected.split(len(directions), dim=1)
        sensitivity.append(((plus - minus).norm(dim=-1) / (2 * step)).mean(dim=-1))
    return torch.cat(sensitivity).reshape(batch, count)


def _mlp_sensitivity(
    mlp: LinearActLinear, features: torch.Tensor, directions: torch.Tensor, step: float
) -> torch.Tensor:
    """The same estimate for ``W2 σ(W1 x + b1) + b2``, computed with less work: the first layer is linear, so
    ``W1 (x ± h u) + b1 = a ± h W1 u`` with ``a`` computed once per token, and ``b2`` cancels in the difference, so
    one product ``W2 (σ(a + c) - σ(a - c))`` replaces two projector passes per direction."""
    w1 = mlp.weight_1.float()
    pre = torch.nn.functional.linear(features.float(), w1, None if mlp.bias_1 is None else mlp.bias_1.float())
    shift = step * directions @ w1.T  # (m, H)
    batch, count, hidden = pre.shape
    rows = pre.reshape(batch * count, 1, hidden)
    per_call = max(1, _MAX_ROWS_PER_CALL // len(directions))
    w2 = mlp.weight_2.float()
    sensitivity = []
    for start in range(0, batch * count, per_call):
        chunk = rows[start : start + per_call]
        difference = mlp.act(chunk + shift) - mlp.act(chunk - shift)  # (n, m, H)
        sensitivity.append((difference @ w2.T).norm(dim=-1).mean(dim=-1) / (2 * step))
    return torch.cat(sensitivity).reshape(batch, count)


def min_max_normalised(scores: torch.Tensor) -> torch.Tensor:
    """(B, N) scores scaled to [0, 1] per sample; a sample whose scores are all equal gets all ones."""
    low, high = scores.amin(dim=-1, keepdim=True), scores.amax(dim=-1, keepdim=True)
    span = high - low
    return torch.where(span > 0, (scores - low) / span.clamp(min=torch.finfo(scores.dtype).tiny), 1.0)


@register
@dataclass
class ZOOPrune(Pruner):
    """Options: ``directions`` (m, default 64), ``step`` (h, default 0.01), ``seed`` of the directions (0)."""

    name = "zoo-prune"
    stage = Stage.PRE_LLM
    reference = "ZOO-Prune, CVPR 2026 (arXiv 2509.24837; no official code)"
    default_positions = "reindex"  # no official code: as the pre-LLM LLaVA references do

    directions: int = 64
    step: float = 0.01
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.directions, bool) or not isinstance(self.directions, int) or self.directions < 1:
            raise VlpruneError(f"directions={self.directions!r} must be a positive int (the paper uses 16 to 160)")
        if not isinstance(self.step, int | float) or not self.step > 0:
            raise VlpruneError(f"step={self.step!r} must be a positive number (the paper uses 1e-4 to 1)")

    def plan(self, num_visual: int, num_layers: int) -> list[StagePlan]:
        return [StagePlan(layer=0, keep=self._required_keep(num_visual), needs=frozenset({Need.VISION_FEATURES}))]

    @torch.no_grad()
    def select(self, ctx: StageContext) -> Selection:
        assert ctx.vision_features is not None and ctx.projector is not None, "the engine supplies them for zoo-prune"
        kept = select_zoo_prune(
            ctx.vision_features,
            ctx.visual_hidden,
            ctx.keep,
            ctx.projector,
            directions=self.directions,
            step=self.step,
            seed=self.seed,
            mlp=llava_mlp(ctx.projector),
        )
        return Selection(keep_index=kept.index, scores=kept.sensitivity)


class SensitiveTokens(NamedTuple):
    """What :func:`select_zoo_prune` returns."""

    index: torch.Tensor
    """(B, keep) long indices of the kept tokens, ascending."""
    sensitivity: torch.Tensor
    """(B, N) float32 each token's zeroth-order sensitivity through the projector (before normalisation)."""


@torch.no_grad()
def select_zoo_prune(
    features: torch.Tensor,
    embeddings: torch.Tensor,
    keep: int,
    projector: Callable[[torch.Tensor], torch.Tensor],
    *,
    directions: int = 64,
    step: float = 0.01,
    seed: int = 0,
    mlp: LinearActLinear | None = None,
) -> SensitiveTokens:
    """ZOO-Prune's kept tokens: greedy max-min diversity on the projected tokens, weighted by each token's
    zeroth-order sensitivity through the projector.

    Args:
        features: (B, N, F) what the projector receives for each visual token (on Qwen-VL a token's merge group of
            patch features, concatenated).
        embeddings: (B, N, D) the visual tokens as they enter the language model (``projector(features)``).
        keep: tokens kept per sample (a count in [1, N]).
        projector: maps (..., F) features to (..., D) embeddings; an ``nn.Module`` runs with float32 copies of its
            weights (see :func:`projector_sensitivity`).
        directions: m, the random unit directions (the paper's default 64).
        step: h, the finite-difference step (the paper's default 0.01).
        seed: the directions' seed (:func:`random_directions`: the same directions on every device).
        mlp: the projector's pieces when it is ``W2 act(W1 x + b1) + b2``, for the exact shortcut (same estimate,
            less work; :func:`llava_mlp` gives them for transformers' LLaVA projector), else None.

    Returns:
        the kept indices and each token's sensitivity (:class:`SensitiveTokens`).
    """
    unit_directions = random_directions(directions, features.shape[-1], seed, features.device)
    sensitivity = projector_sensitivity(projector, features, unit_directions, step, mlp=mlp)
    weight = min_max_normalised(sensitivity)
    chosen = greedy_max_min(cosine_distance(embeddings), weight.argmax(dim=-1), keep, weights=weight)
    return SensitiveTokens(index=chosen.sort(dim=-1).values, sensitivity=sensitivity)
