"""Tiny, offline, random-weight LLaVA-NeXT and LLaVA-OneVision models and processors for tests.

The same tiny language model, tokenizer and chat template as :mod:`vlprune.testing.llava`, with anyres vision: 28-pixel
views of 7 x 7 patches and tile grids of 28 x 56, 56 x 28 and 56 x 56 pixels, so that images of different aspect
ratios give different tile grids, unpadding and token counts (LLaVA-NeXT: 49 base tokens plus up to 14 x 14 tile
tokens and 14 line breaks). The OneVision model shrinks grids larger than two views' worth of patches
(``vision_aspect_ratio="anyres_max_2"``), so the 56 x 56 grid exercises its down-scaling at this size.
"""

from __future__ import annotations

import torch
from transformers import (
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessor,
    LlavaNextProcessor,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionImageProcessor,
    LlavaOnevisionProcessor,
    LlavaOnevisionVideoProcessor,
)

from vlprune.testing.common import finish_tiny_model
from vlprune.testing.llava import _text_config, _vision_config
from vlprune.testing.tokenizer import CHAT_TEMPLATE, IMAGE_TOKEN, build_tiny_tokenizer

__all__ = ["GRID_PINPOINTS", "VIDEO_TOKEN", "VIEW_SIZE", "build_tiny_llava_next", "build_tiny_llava_onevision"]

VIEW_SIZE = 28
"""Side of one view (the base image or a tile) in pixels."""

PATCH_SIZE = 4

VIDEO_TOKEN = "<video>"
"""The video placeholder of the OneVision model built with ``videos=True``."""

GRID_PINPOINTS = [[28, 56], [56, 28], [56, 56]]
"""(height, width) of the tile grids an image may be fitted to."""


def build_tiny_llava_next(
    num_hidden_layers: int = 4,
    attn_implementation: str = "sdpa",
    seed: int = 0,
    weight_scale: float = 8.0,
    vision_layers: int = 3,
) -> tuple[LlavaNextForConditionalGeneration, LlavaNextProcessor]:
    """A tiny random LLaVA-NeXT (CLIP tower with [CLS], "default" strategy, Llama language model) and its processor."""
    tokenizer = build_tiny_tokenizer()
    image_processor = LlavaNextImageProcessor(
        size={"shortest_edge": VIEW_SIZE},
        crop_size={"height": VIEW_SIZE, "width": VIEW_SIZE},
        image_grid_pinpoints=GRID_PINPOINTS,
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1,
    )
    config = LlavaNextConfig(
        vision_config=_vision_config("clip", VIEW_SIZE, PATCH_SIZE, vision_layers),
        text_config=_text_config("llama", tokenizer, 4, num_hidden_layers),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_grid_pinpoints=GRID_PINPOINTS,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        attn_implementation=attn_implementation,
    )
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config).to(torch.float32)
    finish_tiny_model(model, tokenizer, weight_scale)
    return model, processor


def build_tiny_llava_onevision(
    num_hidden_layers: int = 4,
    attn_implementation: str = "sdpa",
    seed: int = 0,
    weight_scale: float = 8.0,
    vision_layers: int = 3,
    videos: bool = False,
) -> tuple[LlavaOnevisionForConditionalGeneration, LlavaOnevisionProcessor]:
    """A tiny random LLaVA-OneVision (SigLIP tower without [CLS], "full" strategy, Qwen2 language model) and its
    processor, shrinking grids beyond two views' worth of patches.

    ``videos=True`` adds a ``<video>`` token to the vocabulary (a model of different random weights, as the vocabulary
    grows), so that the processor takes ``videos=`` and the model encodes them; without it the model has no video
    token."""
    tokenizer = build_tiny_tokenizer()
    if videos:
        tokenizer.add_special_tokens({"additional_special_tokens": [VIDEO_TOKEN]})
    image_processor = LlavaOnevisionImageProcessor(
        size={"height": VIEW_SIZE, "width": VIEW_SIZE}, image_grid_pinpoints=GRID_PINPOINTS
    )
    processor = LlavaOnevisionProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=LlavaOnevisionVideoProcessor(size={"height": VIEW_SIZE, "width": VIEW_SIZE}),
        num_image_tokens=(VIEW_SIZE // PATCH_SIZE) ** 2,
        vision_feature_select_strategy="full",
        chat_template=CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
        video_token=VIDEO_TOKEN,
        vision_aspect_ratio="anyres_max_2",
    )
    config = LlavaOnevisionConfig(
        vision_config=_vision_config("siglip", VIEW_SIZE, PATCH_SIZE, vision_layers),
        text_config=_text_config("qwen2", tokenizer, 2, num_hidden_layers),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        **({"video_token_index": tokenizer.convert_tokens_to_ids(VIDEO_TOKEN)} if videos else {}),
        image_grid_pinpoints=GRID_PINPOINTS,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_2",
        attn_implementation=attn_implementation,
    )
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(config).to(torch.float32)
    finish_tiny_model(model, tokenizer, weight_scale)
    return model, processor
