"""Tiny, offline, random-weight LLaVA models and processors for tests.

This module builds miniature :class:`transformers.LlavaForConditionalGeneration` models together with a fully
working :class:`transformers.LlavaProcessor` (byte-level BPE tokenizer, image processor and LLaVA-1.5 chat
template) without touching the network or a model hub. Everything is built from configs and seeded, so the
same arguments always give the same weights, token ids and outputs within one environment.

It serves two purposes:

* unit and integration tests of the pruning engine across vision towers (CLIP, SigLIP, DINOv2), language
  models (Llama, Qwen2), attention layouts (MHA, GQA, MQA) and attention implementations (eager, SDPA);
* a random-weight smoke model for the command-line interface.

The weights are random: the models never produce meaningful answers. The language model is initialised with a
larger-than-usual std and its query/key projections are scaled up (``weight_scale``), so that attention is peaky
and dropping visual tokens visibly changes the logits and the greedy generations (while staying finite).
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    BatchFeature,
    CLIPImageProcessor,
    CLIPVisionConfig,
    Dinov2Config,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    SiglipImageProcessor,
    SiglipVisionConfig,
)

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

VISION_TOWERS: tuple[str, ...] = ("clip", "siglip", "dinov2")
"""Supported vision towers for :func:`build_tiny_llava`."""

LANGUAGE_MODELS: tuple[str, ...] = ("llama", "qwen2")
"""Supported language models for :func:`build_tiny_llava`."""

ATTN_IMPLEMENTATIONS: tuple[str, ...] = ("eager", "sdpa")
"""Supported attention implementations for :func:`build_tiny_llava`."""

IMAGE_TOKEN = "<image>"
"""Placeholder token that the processor expands to one token per visual patch."""

SPECIAL_TOKENS: tuple[str, ...] = ("<unk>", "<s>", "</s>", "<pad>", IMAGE_TOKEN)

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if not loop.first %}{{ ' ' }}{% endif %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}"
    "{% for item in message['content'] if item['type'] == 'image' %}{{ '<image>\\n' }}{% endfor %}"
    "{% for item in message['content'] if item['type'] == 'text' %}"
    "{% if not loop.first %}{{ ' ' }}{% endif %}{{ item['text'] }}"
    "{% endfor %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{% if messages %}{{ ' ' }}{% endif %}{{ 'ASSISTANT:' }}{% endif %}"
)
r"""LLaVA-1.5 style chat template: ``USER: <image>\n{question} ASSISTANT:``."""

_CORPUS: tuple[str, ...] = (
    "USER: What colour is the square? ASSISTANT: The square is red.",
    "USER: What colour is the circle? ASSISTANT: The circle is blue.",
    "USER: How many shapes are in the image? ASSISTANT: There are three shapes.",
    "USER: Is the triangle on the left or on the right? ASSISTANT: The triangle is on the left.",
    "USER: Describe the image. ASSISTANT: A green rectangle is next to a yellow square.",
    "USER: What is in the top left corner? ASSISTANT: A small orange box.",
    "USER: Count the red squares. ASSISTANT: One, two, three, four, five.",
    "USER: Which shape is the largest? ASSISTANT: The big purple circle is the largest.",
    "USER: Are there any blue shapes? ASSISTANT: Yes, there is one blue shape.",
    "USER: Is there a white background? ASSISTANT: No, the background is black.",
    "What colour is the object on the right?",
    "What shape is in the middle of the picture?",
    "How many rectangles can you see?",
    "Where is the green square?",
    "Which colour appears most often?",
    "Is the red box above or below the blue box?",
    "The image shows a grey background with coloured rectangles.",
    "Red, green, blue, yellow, orange, purple, pink, brown, black, white and grey are colours.",
    "Squares, circles, triangles, rectangles, lines and dots are shapes.",
    "Zero, one, two, three, four, five, six, seven, eight, nine, ten.",
    "Left, right, top, bottom, centre, middle, above, below, next to.",
    "There is a small red square on the left and a large blue circle on the right.",
    "The yellow triangle is at the top and the green line is at the bottom.",
    "Please answer the question about the image in one short sentence.",
    "Look at the picture and tell me what you see.",
    "I can see two squares and one circle.",
    "The answer is yes.",
    "The answer is no.",
    "Thank you for the question.",
    "Can you describe the colours in this image?",
    "What is the colour of the biggest rectangle?",
    "How many colours are there in the picture?",
)

_VOCAB_SIZE = 400

_TEXT_INIT_STD = 0.1
"""Language-model ``initializer_range``. Larger than the usual 0.02 so that, together with ``weight_scale``,
attention is peaky and the residual stream depends strongly on the (visual) context; at 0.02 the attention of a
64-wide model stays almost uniform and pruning barely moves the logits."""


@functools.lru_cache(maxsize=1)
def _trained_tokenizer_json() -> str:
    """Train the byte-level BPE tokenizer once per process and return it serialised.

    Returns:
        The JSON serialisation of the trained :class:`tokenizers.Tokenizer`. A string is cached rather than the
        object so that every caller gets an independent, freshly deserialised copy.
    """
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=_VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS, trainer=trainer)
    bos_id = tokenizer.token_to_id("<s>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A",
        pair="<s> $A <s> $B:1",
        special_tokens=[("<s>", bos_id)],
    )
    return tokenizer.to_str()


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Build the tiny byte-level BPE tokenizer (trained once per process, then copied).

    Returns:
        A left-padding :class:`transformers.PreTrainedTokenizerFast` with ``<s>``/``</s>``/``<pad>``/``<unk>``
        and the ``<image>`` placeholder (also exposed as ``tokenizer.image_token``/``image_token_id``) as special
        tokens. ``<s>`` is prepended to every encoded sequence.
    """
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_trained_tokenizer_json()),
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side="left",
        model_input_names=["input_ids", "attention_mask"],
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        chat_template=CHAT_TEMPLATE,
    )


def _check_choice(name: str, value: object, choices: tuple[object, ...]) -> None:
    """Raise a ``ValueError`` naming ``value`` and the valid ``choices`` if ``value`` is not one of them."""
    if value not in choices:
        raise ValueError(f"Unknown {name} {value!r}; expected one of {choices!r}.")


def _check_geometry(image_size: int, patch_size: int) -> None:
    """Validate that ``image_size`` is a positive multiple of ``patch_size``."""
    if patch_size <= 0 or image_size <= 0 or image_size % patch_size != 0:
        raise ValueError(f"image_size ({image_size}) must be a positive multiple of patch_size ({patch_size}).")


def _select_strategy(vision: str) -> tuple[str, int]:
    """Return ``(vision_feature_select_strategy, num_additional_image_tokens)`` for a vision tower.

    CLIP and DINOv2 prepend a [CLS] token that LLaVA drops (strategy ``"default"``); SigLIP has none, so all
    patch features are kept (strategy ``"full"``).
    """
    if vision == "siglip":
        return "full", 0
    return "default", 1


def build_tiny_processor(image_size: int = 32, patch_size: int = 4, vision: str = "clip") -> LlavaProcessor:
    """Build a working LLaVA processor for the tiny models.

    Args:
        image_size: Side length (pixels) images are resized/cropped to.
        patch_size: Vision patch size; the processor emits ``(image_size // patch_size) ** 2`` image tokens.
        vision: Vision tower the processor is for, one of :data:`VISION_TOWERS`. Selects the image processor
            (``CLIPImageProcessor`` for clip/dinov2, ``SiglipImageProcessor`` for siglip) and whether a [CLS]
            token is accounted for.

    Returns:
        A :class:`transformers.LlavaProcessor` with the tiny tokenizer and the LLaVA-1.5 chat template.

    Raises:
        ValueError: If ``vision`` is unknown or ``image_size`` is not a positive multiple of ``patch_size``.
    """
    _check_choice("vision", vision, VISION_TOWERS)
    _check_geometry(image_size, patch_size)
    if vision == "siglip":
        image_processor = SiglipImageProcessor(size={"height": image_size, "width": image_size})
    else:
        image_processor = CLIPImageProcessor(
            size={"shortest_edge": image_size},
            crop_size={"height": image_size, "width": image_size},
            do_center_crop=True,
        )
    strategy, num_additional = _select_strategy(vision)
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=build_tiny_tokenizer(),
        patch_size=patch_size,
        vision_feature_select_strategy=strategy,
        chat_template=CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=num_additional,
    )


def _vision_config(vision: str, image_size: int, patch_size: int, layers: int = 3) -> PreTrainedConfig:
    """Build the tiny vision-tower config (hidden 32, ``layers`` layers, 4 heads, MLP 64)."""
    if vision == "clip":
        return CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            projection_dim=32,
            num_hidden_layers=layers,
            num_attention_heads=4,
            image_size=image_size,
            patch_size=patch_size,
        )
    if vision == "siglip":
        return SiglipVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=layers,
            num_attention_heads=4,
            image_size=image_size,
            patch_size=patch_size,
        )
    return Dinov2Config(
        hidden_size=32,
        mlp_ratio=2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=patch_size,
    )


def _text_config(
    text: str, tokenizer: PreTrainedTokenizerFast, num_key_value_heads: int, num_hidden_layers: int
) -> PreTrainedConfig:
    """Build the tiny language-model config (hidden 64, 4 heads of 16, MLP 128, init std ``_TEXT_INIT_STD``)."""
    config_cls = LlamaConfig if text == "llama" else Qwen2Config
    return config_cls(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=4,
        num_key_value_heads=num_key_value_heads,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        initializer_range=_TEXT_INIT_STD,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_tiny_llava(
    vision: str = "clip",
    text: str = "llama",
    num_key_value_heads: int = 4,
    num_hidden_layers: int = 4,
    attn_implementation: str = "sdpa",
    seed: int = 0,
    image_size: int = 32,
    patch_size: int = 4,
    weight_scale: float = 8.0,
    vision_layers: int = 3,
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """Build a tiny random-weight LLaVA model and its matching processor, offline and deterministically.

    Args:
        vision: Vision tower, one of :data:`VISION_TOWERS` (``CLIPVisionConfig``, ``SiglipVisionConfig`` or
            ``Dinov2Config``; 32 hidden, 3 layers, 4 heads).
        text: Language model, one of :data:`LANGUAGE_MODELS` (``LlamaConfig`` or ``Qwen2Config``; 64 hidden,
            4 attention heads).
        num_key_value_heads: Key/value heads of the language model: 4 is MHA, 2 is GQA (ratio 2), 1 is MQA.
        num_hidden_layers: Number of language-model decoder layers.
        attn_implementation: ``"eager"`` or ``"sdpa"``, applied to the language model and the vision tower.
        seed: Seed for ``torch.manual_seed`` before the weights are initialised.
        image_size: Input image side length in pixels.
        patch_size: Vision patch size; the model uses ``(image_size // patch_size) ** 2`` visual tokens per image.
        weight_scale: Factor by which the language-model attention logits are scaled: every ``q_proj`` and
            ``k_proj`` weight matrix is multiplied by ``weight_scale ** 0.5``, making attention peaky so that
            pruning visual tokens visibly changes outputs.

    Returns:
        ``(model, processor)``: a float32 :class:`transformers.LlavaForConditionalGeneration` in eval mode and
        the matching :class:`transformers.LlavaProcessor` (see :func:`build_tiny_processor`).

    Raises:
        ValueError: If ``vision``, ``text``, ``attn_implementation`` or ``num_key_value_heads`` is not a valid
            choice, ``num_hidden_layers`` or ``weight_scale`` is not positive, or ``image_size`` is not a
            positive multiple of ``patch_size``.
    """
    _check_choice("vision", vision, VISION_TOWERS)
    _check_choice("text", text, LANGUAGE_MODELS)
    _check_choice("attn_implementation", attn_implementation, ATTN_IMPLEMENTATIONS)
    _check_choice("num_key_value_heads", num_key_value_heads, (1, 2, 4))
    _check_geometry(image_size, patch_size)
    if num_hidden_layers <= 0:
        raise ValueError(f"num_hidden_layers must be positive, got {num_hidden_layers}.")
    if not weight_scale > 0:
        raise ValueError(f"weight_scale must be positive, got {weight_scale}.")

    processor = build_tiny_processor(image_size=image_size, patch_size=patch_size, vision=vision)
    tokenizer = processor.tokenizer
    strategy, _ = _select_strategy(vision)
    config = LlavaConfig(
        vision_config=_vision_config(vision, image_size, patch_size, vision_layers),
        text_config=_text_config(text, tokenizer, num_key_value_heads, num_hidden_layers),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=(image_size // patch_size) ** 2,
        vision_feature_layer=-2,
        vision_feature_select_strategy=strategy,
        projector_hidden_act="gelu",
        # A plain string is propagated to every sub-config (text_config and vision_config).
        attn_implementation=attn_implementation,
    )

    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).to(torch.float32)
    finish_tiny_model(model, tokenizer, weight_scale)
    return model, processor


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


def make_test_image(seed: int, size: int = 32) -> Image.Image:
    """Draw a deterministic RGB test image: a few coloured rectangles on a plain background.

    Args:
        seed: Seed for the random colours and rectangle positions.
        size: Side length of the square image in pixels.

    Returns:
        A ``size`` x ``size`` RGB :class:`PIL.Image.Image`.

    Raises:
        ValueError: If ``size`` is smaller than 2.
    """
    if size < 2:
        raise ValueError(f"size must be at least 2, got {size}.")
    rng = np.random.default_rng(seed)
    pixels = np.empty((size, size, 3), dtype=np.uint8)
    pixels[:] = rng.integers(0, 256, size=3, dtype=np.uint8)
    for _ in range(int(rng.integers(2, 5))):
        top, left = (int(v) for v in rng.integers(0, size - 1, size=2))
        height, width = (int(v) for v in rng.integers(max(1, size // 8), max(2, size // 2) + 1, size=2))
        pixels[top : top + height, left : left + width] = rng.integers(0, 256, size=3, dtype=np.uint8)
    return Image.fromarray(pixels)


def build_tiny_inputs(processor: LlavaProcessor, images: list[Image.Image], questions: list[str]) -> BatchFeature:
    r"""Build a left-padded batch: one image and one question per sample, in the LLaVA-1.5 chat format.

    Args:
        processor: Processor from :func:`build_tiny_processor` or :func:`build_tiny_llava`.
        images: One image per question.
        questions: The user questions; each is rendered as ``USER: <image>\n{question} ASSISTANT:``.

    Returns:
        A :class:`transformers.BatchFeature` with ``input_ids``, ``attention_mask`` and ``pixel_values`` tensors.

    Raises:
        ValueError: If ``images`` and ``questions`` are empty or differ in length.
    """
    if not questions or len(images) != len(questions):
        raise ValueError(
            f"Need one image per question and at least one question; got {len(images)} images "
            f"and {len(questions)} questions."
        )
    prompts = [
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
            add_generation_prompt=True,
            tokenize=False,
        )
        for question in questions
    ]
    return processor(images=images, text=prompts, padding=True, return_tensors="pt")
