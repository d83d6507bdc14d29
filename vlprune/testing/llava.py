"""Tiny random-weight LLaVA-1.5 models (:class:`transformers.LlavaForConditionalGeneration`) and their processors:
CLIP, SigLIP or DINOv2 towers, Llama or Qwen2 language models, MHA, GQA or MQA, eager or SDPA attention.
See :mod:`vlprune.testing` for what the tiny models are for.
"""

from __future__ import annotations

import torch
from PIL import Image
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

from vlprune.testing.common import _TEXT_INIT_STD, ATTN_IMPLEMENTATIONS, _check_choice, finish_tiny_model
from vlprune.testing.tokenizer import CHAT_TEMPLATE, IMAGE_TOKEN, build_tiny_tokenizer

__all__ = [
    "LANGUAGE_MODELS",
    "VISION_TOWERS",
    "build_tiny_inputs",
    "build_tiny_llava",
    "build_tiny_processor",
]

VISION_TOWERS: tuple[str, ...] = ("clip", "siglip", "dinov2")
"""Supported vision towers for :func:`build_tiny_llava`."""

LANGUAGE_MODELS: tuple[str, ...] = ("llama", "qwen2")
"""Supported language models for :func:`build_tiny_llava`."""


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
