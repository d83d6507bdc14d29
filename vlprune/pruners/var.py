"""VAR (visual attention redistribution): move attention from visual sink tokens to the other visual tokens in
image-centric heads, for the text queries, inside the language model. It prunes nothing and composes with any pruner
(``fastv+var``): pruning runs first, VAR works on the tokens that remain.

Reference: Kang et al., "See What You Are Told: Visual Attention Sink in Large Multimodal Models", ICLR 2025
(arXiv 2503.03321); official code github.com/MICV-yonsei/VisAttnSink (``src/logic/logic.py``: DimProspector,
HeadFork, VARProcessor; ``A_exps/lv1.5_7b.yml``: tau 20, rho 0.5, p 0.6, summ 0.2, except_last_layer 1).

What the reference does and vlprune reproduces, at every decoder layer from 2 to the last one included: the config's
``except_last_layer: 1`` never takes effect, because ``LogicEngine.activate`` sets it on ``LogicEngine`` while
``VARProcessor`` declares its own class attribute ``except_last_layer = False``, which shadows it (``logic.py``);
``skip_last=1`` gives what the config meant.

1. **Sink tokens**: with the model's massive-activation dimensions ``D`` (LLaVA-1.5-7B / LLaMA-2-7B: 1415 and 2533),
   ``φ(x) = max_{d in D} |x_d| / RMS(x)`` on the layer's input hidden state; tokens with ``φ >= τ = 20`` are sinks
   (found during the prefill and kept for decoding); the visual sinks are those among the image's tokens.
2. **Image-centric heads**, per sample, head and text query (the tokens after the image in the prefill, the new token
   while decoding): selected when the visual sinks hold at most ``ρ = 0.5`` of the row's attention to the image and
   the image holds at least ``summ = 0.2`` of the row. A layer at which a sample's image has no visual sink is left
   exactly as the attention computed it for that sample (``HeadFork.run_logic`` forks no head there), text sinks
   included.
3. **Redistribution** in a selected row: every sink's attention is multiplied by ``p = 0.6`` and the removed mass
   ``(1 - p) Σ_sinks α`` goes to the image's non-sink tokens in proportion to their attention; the row still sums to 1.

Deviations, each for a reason:
- The reference needs eager attention (its patched class is registered for "eager" only). vlprune lets SDPA compute
  every row, then recomputes exactly the text-query rows (softmax of ``q Kᵀ``, redistribution, ``· V``) and replaces
  them in the selected heads only; other rows and heads are untouched.
- Sink dimensions come from a built-in table for known language models (keyed by architecture, width and depth);
  for any other model ``dimensions=None`` finds them on the first prefill, as the dimensions where some token's
  ``|x_d| / RMS(x)`` reaches ``τ`` at layer 2's input; ``dimensions=[...]`` sets them.
- With pruning, "the image" is the set of visual tokens still present (kept and recycled ones), as the reference
  suggests for composition.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from vlprune.errors import VlpruneError

# (model_type, hidden_size, num_hidden_layers) of the language model -> its massive-activation dimensions.
SINK_DIMENSIONS: dict[tuple[str, int, int], tuple[int, ...]] = {
    ("llama", 4096, 32): (1415, 2533),  # LLaMA-2-7B, Vicuna-7B: LLaVA-1.5-7B, LLaVA-1.6-7B
    ("llama", 5120, 40): (2100, 4743),  # LLaMA-2-13B, Vicuna-13B: LLaVA-1.5-13B, LLaVA-1.6-13B
    ("qwen2", 3584, 28): (458, 2570),  # Qwen2-7B: Qwen2-VL-7B
}


def sink_scores(hidden: torch.Tensor, dimensions: list[int] | tuple[int, ...]) -> torch.Tensor:
    """(B, L) ``max_{d in dimensions} |x_d| / RMS(x)`` of each token's hidden state (B, L, D)."""
    values = hidden.float()
    rms = values.pow(2).mean(dim=-1).sqrt().clamp(min=torch.finfo(torch.float32).tiny)
    index = torch.as_tensor(list(dimensions), device=hidden.device)
    return values.index_select(-1, index).abs().amax(dim=-1) / rms


def find_sink_dimensions(hidden: torch.Tensor, tau: float, mask: torch.Tensor | None = None) -> list[int]:
    """Dimensions where some (real) token's ``|x_d| / RMS(x)`` reaches ``tau``, strongest first."""
    values = hidden.float()
    rms = values.pow(2).mean(dim=-1, keepdim=True).sqrt().clamp(min=torch.finfo(torch.float32).tiny)
    ratio = values.abs() / rms  # (B, L, D)
    if mask is not None:
        ratio = ratio * mask[..., None]
    peak = ratio.flatten(0, 1).amax(dim=0)  # (D,)
    found = (peak >= tau).nonzero()[:, 0]
    return found[peak[found].argsort(descending=True)].tolist()


def image_centric(
    attention: torch.Tensor, image: torch.Tensor, visual_sinks: torch.Tensor, rho: float, summ: float
) -> torch.Tensor:
    """(B, H, R) rows whose visual sinks take at most ``rho`` of the image's attention, the image at least ``summ``.

    attention: (B, H, R, L) probabilities; image, visual_sinks: (B, L) bool.
    """
    image_mass = (attention * image[:, None, None, :]).sum(dim=-1)
    sink_mass = (attention * visual_sinks[:, None, None, :]).sum(dim=-1)
    portion = sink_mass / image_mass.clamp(min=torch.finfo(torch.float32).tiny)
    return (portion <= rho) & (image_mass >= summ)


def redistributed(attention: torch.Tensor, image: torch.Tensor, sinks: torch.Tensor, p: float) -> torch.Tensor:
    """(B, H, R, L) rows with every sink's attention scaled by ``p`` and the removed mass given to the image's
    non-sink tokens in proportion to their attention (a row without such attention is left as it is)."""
    sinks_ = sinks[:, None, None, :]
    receivers = (image & ~sinks)[:, None, None, :]
    budget = (1 - p) * (attention * sinks_).sum(dim=-1, keepdim=True)
    receiving = (attention * receivers).sum(dim=-1, keepdim=True)
    share = attention * receivers / receiving.clamp(min=torch.finfo(torch.float32).tiny)
    moved = torch.where(sinks_, attention * p, attention + budget * share)
    return torch.where(receiving > 0, moved, attention)


@dataclass
class VAR:
    """Options: ``tau`` (sink threshold, 20), ``rho`` (largest sink share of an image-centric row, 0.5), ``p`` (share
    of sink attention kept, 0.6), ``summ`` (least image attention of a row, 0.2), ``dimensions`` (sink dimensions;
    default the built-in table, else found on the first prefill), ``first_layer`` (2), ``skip_last`` (0: the last
    layer too, as the reference runs)."""

    name: ClassVar[str] = "var"
    reference: ClassVar[str] = "VAR, ICLR 2025 (MICV-yonsei/VisAttnSink)"

    tau: float = 20.0
    rho: float = 0.5
    p: float = 0.6
    summ: float = 0.2
    dimensions: list[int] | None = None
    first_layer: int = 2
    skip_last: int = 0

    def __post_init__(self) -> None:
        for option, value, low, high in (
            ("p", self.p, 0.0, 1.0),
            ("rho", self.rho, 0.0, 1.0),
            ("summ", self.summ, 0.0, 1.0),
        ):
            if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
                raise VlpruneError(f"{option}={value!r} must be a number in [{low}, {high}]")
        if not isinstance(self.tau, int | float) or self.tau <= 0:
            raise VlpruneError(f"tau={self.tau!r} must be a positive number (the reference uses 20)")

    def layers(self, num_layers: int) -> list[int]:
        """Decoder layers whose text-query rows VAR rewrites."""
        layers = list(range(self.first_layer, num_layers - self.skip_last))
        if not layers:
            raise VlpruneError(
                f"var acts on layers {self.first_layer}..{num_layers - self.skip_last - 1}, which a {num_layers}-layer "
                "language model does not have"
            )
        return layers

    def known_dimensions(self, text_config: Any) -> list[int] | None:
        """The sink dimensions from the options or the built-in table, or None when they must be found."""
        if self.dimensions is not None:
            return list(self.dimensions)
        key = (text_config.model_type, text_config.hidden_size, text_config.num_hidden_layers)
        known = SINK_DIMENSIONS.get(key)
        return None if known is None else list(known)

    def sinks(self, hidden: torch.Tensor, dimensions: list[int]) -> torch.Tensor:
        """(B, L) sink tokens of a layer's input hidden state."""
        if not dimensions:
            return torch.zeros(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
        return sink_scores(hidden, dimensions) >= self.tau

    def rewrite(
        self, attention: torch.Tensor, image: torch.Tensor, sinks: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(new rows (B, H, R, L), selected (B, H, R)): the redistributed rows of the image-centric heads; nothing is
        selected for a sample whose image has no visual sink at this layer."""
        visual_sinks = sinks & image
        selected = image_centric(attention, image, visual_sinks, self.rho, self.summ)
        selected &= visual_sinks.any(dim=-1)[:, None, None]
        return redistributed(attention, image, sinks, self.p), selected
