"""What every family's tiny builder shares: the attention implementations, the language model's init std, the
argument check, and finishing a freshly built model (peaky attention, the tokenizer's special ids, eval mode)."""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerFast

ATTN_IMPLEMENTATIONS: tuple[str, ...] = ("eager", "sdpa")
"""Supported attention implementations of every tiny builder."""

_TEXT_INIT_STD = 0.1
"""Language-model ``initializer_range``. Larger than the usual 0.02 so that, together with ``weight_scale``,
attention is peaky and the residual stream depends strongly on the (visual) context; at 0.02 the attention of a
64-wide model stays almost uniform and pruning barely moves the logits."""


def _check_choice(name: str, value: object, choices: tuple[object, ...]) -> None:
    """Raise a ``ValueError`` naming ``value`` and the valid ``choices`` if ``value`` is not one of them."""
    if value not in choices:
        raise ValueError(f"Unknown {name} {value!r}; expected one of {choices!r}.")


def finish_tiny_model(model: torch.nn.Module, tokenizer: PreTrainedTokenizerFast, weight_scale: float) -> None:
    """Make a freshly built tiny model's attention peaky (every language-model ``q_proj`` and ``k_proj`` weight times
    ``weight_scale ** 0.5``), give its generation config the tokenizer's special ids, and put it in eval mode."""
    factor = float(weight_scale) ** 0.5
    with torch.no_grad():
        for name, param in model.model.language_model.named_parameters():
            if param.ndim == 2 and name.endswith(("q_proj.weight", "k_proj.weight")):
                param.mul_(factor)
    generation_config = model.generation_config
    generation_config.bos_token_id = tokenizer.bos_token_id
    generation_config.eos_token_id = tokenizer.eos_token_id
    generation_config.pad_token_id = tokenizer.pad_token_id
    model.eval()
