"""SmolLM2-135M-Instruct out of its Q4_1 GGUF file: dequantised to a float32 ``LlamaForCausalLM``, with its tokenizer
fixed for ChatML (``<|im_end|>`` ends a turn, no BOS prepended), and the ChatML chat template vlprune-tiny uses."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from vlprune.errors import VlpruneError
from vlprune.models.optional import _require

if TYPE_CHECKING:
    from transformers import LlamaForCausalLM
    from transformers.tokenization_utils_base import PreTrainedTokenizerBase

IM_START, IM_END = "<|im_start|>", "<|im_end|>"


CHAT_TEMPLATE = (
    "{%- macro render(content) -%}"
    "{%- if content is string -%}{{ content }}"
    "{%- else -%}"
    "{%- for item in content if item['type'] == 'image' -%}{{ '<image>\\n' }}{%- endfor -%}"
    "{%- for item in content if item['type'] == 'text' -%}"
    "{%- if not loop.first -%}{{ '\\n' }}{%- endif -%}{{ item['text'] }}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{%- endmacro -%}"
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['role'] == 'assistant' -%}"
    "{% generation %}{{ render(message['content']) + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
    "{%- else -%}"
    "{{ render(message['content']) + '<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)
r"""SmolLM2's ChatML without its default system prompt; one user turn with an image renders as
``<|im_start|>user\n<image>\n{question}<|im_end|>\n<|im_start|>assistant\n``. Assistant turns render as
``<|im_start|>assistant\n{answer}<|im_end|>\n``; ``{answer}<|im_end|>`` is the generation block, so
``return_assistant_tokens_mask=True`` marks the tokens a training loss should cover (the answer and its end token)."""


def _adds_special_tokens(tokenizer: PreTrainedTokenizerBase) -> bool:
    return tokenizer("a").input_ids != tokenizer("a", add_special_tokens=False).input_ids


def _fix_tokenizer(tokenizer: PreTrainedTokenizerBase) -> None:
    """Make a SmolLM2 tokenizer behave as in SmolLM2's ChatML use: ``<|im_end|>`` ends a turn, no BOS is prepended.

    The prompt's own ``<|im_start|>`` opens each turn; a GGUF-converted tokenizer may treat it as a BOS token to
    prepend, which would double it.

    Raises:
        VlpruneError: the tokenizer lacks the ChatML tokens, or still adds special tokens after the fix.
    """
    for token in (IM_START, IM_END):
        if token not in tokenizer.get_vocab():
            raise VlpruneError(f"the tokenizer has no {token!r} token; it is not a SmolLM2 (ChatML) tokenizer")
    tokenizer.bos_token = IM_START
    tokenizer.eos_token = IM_END
    if tokenizer.pad_token is None:
        tokenizer.pad_token = IM_END
    if _adds_special_tokens(tokenizer):
        for flag in ("add_bos_token", "add_eos_token"):
            if hasattr(tokenizer, flag):
                setattr(tokenizer, flag, False)
    if _adds_special_tokens(tokenizer) and hasattr(tokenizer, "backend_tokenizer"):
        from tokenizers import processors

        tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B:1")
    if _adds_special_tokens(tokenizer):
        added = tokenizer("a").input_ids
        raise VlpruneError(f"cannot stop the SmolLM2 tokenizer from adding special tokens: 'a' encodes to {added}")


def load_smollm2(gguf_path: Path) -> tuple[LlamaForCausalLM, PreTrainedTokenizerBase]:
    """SmolLM2-135M-Instruct dequantised from its GGUF file to float32, and its tokenizer (fixed for ChatML).

    Takes 20-50 s on a small CPU: transformers converts the tokenizer and dequantises every tensor.

    Returns:
        ``(model, tokenizer)``: a ``LlamaForCausalLM`` in eval mode whose config carries no GGUF quantisation entry,
        and a tokenizer with eos ``<|im_end|>`` that prepends no BOS.
    """
    _require("gguf")
    from transformers import AutoTokenizer, LlamaForCausalLM

    if not gguf_path.is_file():
        raise VlpruneError(f"the GGUF file {str(gguf_path)!r} does not exist")
    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, trust_remote_code=False)
    model = LlamaForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32, trust_remote_code=False)
    _fix_tokenizer(tokenizer)
    # The weights are now plain float32: a saved config that still names the GGUF file would make from_pretrained
    # look for it again.
    for attribute in ("quantization_config", "_model_name_or_path"):
        if hasattr(model.config, attribute):
            delattr(model.config, attribute)
    model.config.bos_token_id = tokenizer.bos_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    return model.eval(), tokenizer
