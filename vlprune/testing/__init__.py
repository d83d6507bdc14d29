"""Tiny, offline, random-weight models and processors of every supported family, for tests.

This package builds miniature models (:class:`transformers.LlavaForConditionalGeneration` and the other families'
classes) together with fully working processors (byte-level BPE tokenizer, image processor and LLaVA-1.5 chat
template) without touching the network or a model hub. Everything is built from configs and seeded, so the
same arguments always give the same weights, token ids and outputs within one environment.

It serves two purposes:

* unit and integration tests of the pruning engine across vision towers (CLIP, SigLIP, DINOv2), language
  models (Llama, Qwen2), attention layouts (MHA, GQA, MQA) and attention implementations (eager, SDPA);
* a random-weight smoke model for the command-line interface.

The weights are random: the models never produce meaningful answers. The language model is initialised with a
larger-than-usual std and its query/key projections are scaled up (``weight_scale``), so that attention is peaky
and dropping visual tokens visibly changes the logits and the greedy generations (while staying finite).

The builders live in one module per family, with what they share beside them:

* :mod:`vlprune.testing.llava`: LLaVA-1.5 (CLIP, SigLIP, DINOv2 towers; Llama or Qwen2 language models);
* :mod:`vlprune.testing.anyres`: LLaVA-NeXT and LLaVA-OneVision (multi-crop "anyres" images, OneVision videos);
* :mod:`vlprune.testing.qwen`: Qwen2-VL, Qwen2.5-VL and Qwen3-VL;
* :mod:`vlprune.testing.tokenizer`, :mod:`vlprune.testing.images` and :mod:`vlprune.testing.common`: the shared
  tokenizer and chat template, the test images, and what every builder does to a fresh model.

This package imports nothing else of vlprune. It exports what the single module ``vlprune.testing`` exported (the
LLaVA-1.5 builders and the shared pieces); ``vlprune.testing_anyres`` and ``vlprune.testing_qwen`` are the old names
of the other two families' modules.
"""

# The old module's names: its __all__, and (as redundant aliases) the public names it had outside __all__.
from vlprune.testing.common import ATTN_IMPLEMENTATIONS
from vlprune.testing.common import finish_tiny_model as finish_tiny_model
from vlprune.testing.images import make_test_image
from vlprune.testing.llava import (
    LANGUAGE_MODELS,
    VISION_TOWERS,
    build_tiny_inputs,
    build_tiny_llava,
    build_tiny_processor,
)
from vlprune.testing.tokenizer import CHAT_TEMPLATE, IMAGE_TOKEN, build_tiny_tokenizer
from vlprune.testing.tokenizer import SPECIAL_TOKENS as SPECIAL_TOKENS

__all__ = [
    "ATTN_IMPLEMENTATIONS",
    "CHAT_TEMPLATE",
    "IMAGE_TOKEN",
    "LANGUAGE_MODELS",
    "VISION_TOWERS",
    "build_tiny_inputs",
    "build_tiny_llava",
    "build_tiny_processor",
    "build_tiny_tokenizer",
    "make_test_image",
]
