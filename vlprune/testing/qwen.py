"""Tiny, offline, random-weight Qwen2-VL, Qwen2.5-VL and Qwen3-VL models and processors for tests.

The same tiny byte-level BPE tokenizer as :mod:`vlprune.testing.llava` (:mod:`vlprune.testing.tokenizer`), extended
with Qwen's vision tokens (``<|vision_start|>``, ``<|vision_end|>``, ``<|image_pad|>``, ``<|video_pad|>``), the
family's own processor and a LLaVA-style chat template that places each image as
``<|vision_start|><|image_pad|><|vision_end|>`` (the processor expands the pad to one token per merged 2 x 2 patch
block).

All three families share the geometry: 4-pixel patches, 2 x 2 spatial merging and 2-frame temporal patches, so an
image is resized to a multiple of 8 pixels per side (between :data:`MIN_PIXELS` and :data:`MAX_PIXELS` pixels) and
gives ``(height // 8) * (width // 8)`` visual tokens: 16 for 32 x 32, 24 for 48 x 32, 64 for 64 x 64. A video of
``T`` frames gives ``ceil(T / 2)`` temporal patches of that many tokens each.

* Qwen2-VL: a 3-block vision tower with full attention per image.
* Qwen2.5-VL: a 3-block *windowed* vision tower (only the last block attends over the whole image, as in the
  released models) with 16-pixel windows, that is 2 x 2 merged tokens, so a 32 x 32 image is split into 4 windows
  and its patches are permuted.
* Qwen3-VL: a 3-block vision tower with learned interpolated position embeddings and DeepStack: the outputs of
  blocks 0 and 1 are merged and added to the visual positions after the first two language-model layers.

The language models are 64 wide with 4 query heads and 2 key/value heads (head dim 16) and multimodal rotary
embeddings (M-RoPE) whose sections cover the 8 rotary frequencies: ``[2, 3, 3]`` (temporal, height, width) for
Qwen2-VL and Qwen2.5-VL, ``[4, 2, 2]`` interleaved for Qwen3-VL. As in :mod:`vlprune.testing.llava`, attention is made
peaky (``weight_scale``) so that dropping visual tokens visibly changes the outputs; Qwen3-VL normalises queries and
keys per head, so there the ``q_norm``/``k_norm`` weights are scaled as well.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from transformers import (
    BatchFeature,
    PreTrainedTokenizerFast,
    ProcessorMixin,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2_5_VLTextConfig,
    Qwen2_5_VLVisionConfig,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessor,
    Qwen2VLProcessor,
    Qwen2VLTextConfig,
    Qwen2VLVideoProcessor,
    Qwen2VLVisionConfig,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLProcessor,
    Qwen3VLTextConfig,
    Qwen3VLVideoProcessor,
    Qwen3VLVisionConfig,
)

from vlprune.testing.common import _TEXT_INIT_STD, ATTN_IMPLEMENTATIONS, _check_choice, finish_tiny_model
from vlprune.testing.tokenizer import build_tiny_tokenizer

__all__ = [
    "DEEPSTACK_VISUAL_INDEXES",
    "FULLATT_BLOCK_INDEXES",
    "IMAGE_PAD",
    "MAX_PIXELS",
    "MERGE_SIZE",
    "MIN_PIXELS",
    "PATCH_SIZE",
    "QWEN_CHAT_TEMPLATE",
    "TEMPORAL_PATCH_SIZE",
    "VIDEO_PAD",
    "VISION_DEPTH",
    "VISION_END",
    "VISION_START",
    "WINDOW_SIZE",
    "build_tiny_qwen2_5_vl",
    "build_tiny_qwen2_vl",
    "build_tiny_qwen3_vl",
    "build_tiny_qwen_inputs",
]

IMAGE_PAD = "<|image_pad|>"
"""Image placeholder; the processor repeats it once per visual token."""

VIDEO_PAD = "<|video_pad|>"
"""Video placeholder; the processor repeats it once per visual token (per frame group on Qwen3-VL)."""

VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"

PATCH_SIZE = 4
"""Side of a vision patch in pixels."""

MERGE_SIZE = 2
"""Spatial merge: each visual token of the language model merges ``MERGE_SIZE x MERGE_SIZE`` patches."""

TEMPORAL_PATCH_SIZE = 2
"""Frames per temporal patch (an image is repeated to fill one)."""

MIN_PIXELS = 16 * 16
"""Images with fewer pixels are upscaled (to at least 4 visual tokens)."""

MAX_PIXELS = 64 * 64
"""Images with more pixels are downscaled (to at most 64 visual tokens)."""

VISION_DEPTH = 3
"""Blocks of every tiny vision tower."""

WINDOW_SIZE = 16
"""Qwen2.5-VL attention window side in pixels: 2 x 2 merged tokens, 4 x 4 patches."""

FULLATT_BLOCK_INDEXES = (2,)
"""The one Qwen2.5-VL vision block with full attention, the last as in the released models (0 and 1 are windowed)."""

DEEPSTACK_VISUAL_INDEXES = (0, 1)
"""Qwen3-VL vision blocks whose merged outputs are added after language-model layers 0 and 1."""

QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if not loop.first %}{{ ' ' }}{% endif %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif item['type'] == 'video' %}{{ '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}"
    "{% endif %}"
    "{% endfor %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{% if messages %}{{ ' ' }}{% endif %}{{ 'ASSISTANT:' }}{% endif %}"
)
"""``USER: <|vision_start|><|image_pad|><|vision_end|>{question} ASSISTANT:``, items in message order."""

_VISION_HIDDEN = 32
_TEXT_HIDDEN = 64
_HEAD_DIM = 16
_MROPE_SECTION = [2, 3, 3]
"""Temporal/height/width rotary frequencies of Qwen2-VL and Qwen2.5-VL: 8 = head dim / 2 (the 7B's is [16, 24, 24])."""
_MROPE_SECTION_INTERLEAVED = [4, 2, 2]
"""Qwen3-VL's interleaved sections: height takes frequencies 1 and 4, width 2 and 5, time the rest."""


def _tokenizer() -> PreTrainedTokenizerFast:
    """The tiny tokenizer of :mod:`vlprune.testing` plus Qwen's vision tokens (special, skipped when decoding).

    The Qwen processors read ``tokenizer.image_token`` when it exists, so it is pointed at ``<|image_pad|>``; the
    video and vision start/end tokens have no attribute and the processors fall back to Qwen's fixed strings.
    """
    tokenizer = build_tiny_tokenizer()
    tokenizer.add_special_tokens(
        {"extra_special_tokens": [VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD]}, replace_extra_special_tokens=False
    )
    tokenizer.image_token = IMAGE_PAD
    return tokenizer


def _token_ids(tokenizer: PreTrainedTokenizerFast) -> dict[str, int]:
    """The vision token ids of a composite Qwen-VL config."""
    return {
        "image_token_id": tokenizer.convert_tokens_to_ids(IMAGE_PAD),
        "video_token_id": tokenizer.convert_tokens_to_ids(VIDEO_PAD),
        "vision_start_token_id": tokenizer.convert_tokens_to_ids(VISION_START),
        "vision_end_token_id": tokenizer.convert_tokens_to_ids(VISION_END),
    }


def _geometry() -> dict[str, object]:
    """Image and video processor settings shared by the three families."""
    return {
        "patch_size": PATCH_SIZE,
        "merge_size": MERGE_SIZE,
        "temporal_patch_size": TEMPORAL_PATCH_SIZE,
        "size": {"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS},
    }


def _processor(processor_cls: type[ProcessorMixin], video_processor: object) -> ProcessorMixin:
    """A Qwen-VL processor: the tiny tokenizer, ``Qwen2VLImageProcessor`` at the tiny geometry and the template."""
    return processor_cls(
        image_processor=Qwen2VLImageProcessor(**_geometry()),
        tokenizer=_tokenizer(),
        video_processor=video_processor,
        chat_template=QWEN_CHAT_TEMPLATE,
    )


def _text_kwargs(tokenizer: PreTrainedTokenizerFast, num_hidden_layers: int) -> dict[str, object]:
    """Language-model config arguments shared by the three families (64 wide, 4 heads of 16, 2 key/value heads)."""
    return {
        "vocab_size": len(tokenizer),
        "hidden_size": _TEXT_HIDDEN,
        "intermediate_size": 2 * _TEXT_HIDDEN,
        "num_hidden_layers": num_hidden_layers,
        "num_attention_heads": _TEXT_HIDDEN // _HEAD_DIM,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-6,
        "initializer_range": _TEXT_INIT_STD,
        "pad_token_id": tokenizer.pad_token_id,
    }


def _vision_kwargs() -> dict[str, object]:
    """Vision-tower config arguments shared by the three families (3 blocks of 4 heads, the tiny patch geometry)."""
    return {
        "depth": VISION_DEPTH,
        "num_heads": 4,
        "patch_size": PATCH_SIZE,
        "spatial_merge_size": MERGE_SIZE,
        "temporal_patch_size": TEMPORAL_PATCH_SIZE,
    }


def _assemble(
    model_cls: type,
    config_cls: type,
    vision_config: object,
    text_config: object,
    processor: ProcessorMixin,
    attn_implementation: str,
    seed: int,
    weight_scale: float,
) -> torch.nn.Module:
    """The seeded model of a composite Qwen-VL config, finished like every tiny model (see ``finish_tiny_model``)."""
    tokenizer = processor.tokenizer
    config = config_cls(
        vision_config=vision_config,
        text_config=text_config,
        **_token_ids(tokenizer),
        attn_implementation=attn_implementation,
    )
    model = _instantiate(model_cls, config, seed)
    finish_tiny_model(model, tokenizer, weight_scale)
    return model


def _check_args(num_hidden_layers: int, attn_implementation: str, weight_scale: float) -> None:
    _check_choice("attn_implementation", attn_implementation, ATTN_IMPLEMENTATIONS)
    if num_hidden_layers <= 0:
        raise ValueError(f"num_hidden_layers must be positive, got {num_hidden_layers}.")
    if not weight_scale > 0:
        raise ValueError(f"weight_scale must be positive, got {weight_scale}.")


def _instantiate(model_cls: type, config: object, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return model_cls(config).to(torch.float32)


def build_tiny_qwen2_vl(
    num_hidden_layers: int = 4,
    attn_implementation: str = "sdpa",
    seed: int = 0,
    weight_scale: float = 8.0,
) -> tuple[Qwen2VLForConditionalGeneration, Qwen2VLProcessor]:
    """Build a tiny random Qwen2-VL (full-attention vision tower, M-RoPE language model) and its processor.

    Args:
        num_hidden_layers: Language-model decoder layers.
        attn_implementation: ``"eager"`` or ``"sdpa"``, for the language model and the vision tower.
        seed: Seed for ``torch.manual_seed`` before the weights are initialised.
        weight_scale: Attention-logit factor of the language model (see :func:`vlprune.testing.finish_tiny_model`).

    Returns:
        ``(model, processor)``: a float32 model in eval mode and a :class:`transformers.Qwen2VLProcessor`.

    Raises:
        ValueError: If ``attn_implementation`` is unknown or ``num_hidden_layers`` or ``weight_scale`` is not positive.
    """
    _check_args(num_hidden_layers, attn_implementation, weight_scale)
    processor = _processor(Qwen2VLProcessor, Qwen2VLVideoProcessor(**_geometry(), cap_pixels_per_frame=True))
    tokenizer = processor.tokenizer
    vision = Qwen2VLVisionConfig(**_vision_kwargs(), embed_dim=_VISION_HIDDEN, hidden_size=_TEXT_HIDDEN, mlp_ratio=2)
    text = Qwen2VLTextConfig(
        **_text_kwargs(tokenizer, num_hidden_layers),
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": list(_MROPE_SECTION)},
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = _assemble(
        Qwen2VLForConditionalGeneration, Qwen2VLConfig, vision, text, processor, attn_implementation, seed, weight_scale
    )
    return model, processor


def build_tiny_qwen2_5_vl(
    num_hidden_layers: int = 4,
    attn_implementation: str = "sdpa",
    seed: int = 0,
    weight_scale: float = 8.0,
) -> tuple[Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor]:
    """Build a tiny random Qwen2.5-VL (windowed vision tower with one full-attention block) and its processor.

    The vision tower attends within :data:`WINDOW_SIZE`-pixel windows except in block :data:`FULLATT_BLOCK_INDEXES`,
    so images of 32 pixels or more per side are split into several windows and their patches are reordered
    window by window before the blocks (and the merged tokens restored to raster order after the merger).
    Arguments, return value and errors as :func:`build_tiny_qwen2_vl`.
    """
    _check_args(num_hidden_layers, attn_implementation, weight_scale)
    processor = _processor(Qwen2_5_VLProcessor, Qwen2VLVideoProcessor(**_geometry(), cap_pixels_per_frame=True))
    tokenizer = processor.tokenizer
    vision = Qwen2_5_VLVisionConfig(
        **_vision_kwargs(),
        hidden_size=_VISION_HIDDEN,
        intermediate_size=2 * _VISION_HIDDEN,
        out_hidden_size=_TEXT_HIDDEN,
        window_size=WINDOW_SIZE,
        fullatt_block_indexes=list(FULLATT_BLOCK_INDEXES),
        tokens_per_second=2,
    )
    text = Qwen2_5_VLTextConfig(
        **_text_kwargs(tokenizer, num_hidden_layers),
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": list(_MROPE_SECTION)},
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = _assemble(
        Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLConfig, vision, text, processor, attn_implementation, seed,
        weight_scale,
    )  # fmt: skip
    return model, processor


def build_tiny_qwen3_vl(
    num_hidden_layers: int = 4,
    attn_implementation: str = "sdpa",
    seed: int = 0,
    weight_scale: float = 8.0,
) -> tuple[Qwen3VLForConditionalGeneration, Qwen3VLProcessor]:
    """Build a tiny random Qwen3-VL (DeepStack from vision blocks 0 and 1, interleaved M-RoPE) and its processor.

    Qwen3-VL's language model RMS-normalises every query and key head (``q_norm``/``k_norm``), which undoes the
    projection scaling of :func:`vlprune.testing.finish_tiny_model`, so the norm weights are multiplied by
    ``weight_scale ** 0.5`` too. The video processor takes the given frames as they are (no resampling).
    Arguments, return value and errors as :func:`build_tiny_qwen2_vl`; ``num_hidden_layers`` must be at least 2
    (the DeepStack features are added after layers 0 and 1).
    """
    _check_args(num_hidden_layers, attn_implementation, weight_scale)
    if num_hidden_layers < len(DEEPSTACK_VISUAL_INDEXES):
        raise ValueError(
            f"num_hidden_layers must be at least {len(DEEPSTACK_VISUAL_INDEXES)} (DeepStack), got {num_hidden_layers}."
        )
    video_processor = Qwen3VLVideoProcessor(**_geometry(), do_sample_frames=False, cap_pixels_per_frame=True)
    processor = _processor(Qwen3VLProcessor, video_processor)
    tokenizer = processor.tokenizer
    vision = Qwen3VLVisionConfig(
        **_vision_kwargs(),
        hidden_size=_VISION_HIDDEN,
        intermediate_size=2 * _VISION_HIDDEN,
        out_hidden_size=_TEXT_HIDDEN,
        num_position_embeddings=8 * 8,
        deepstack_visual_indexes=list(DEEPSTACK_VISUAL_INDEXES),
    )
    text = Qwen3VLTextConfig(
        **_text_kwargs(tokenizer, num_hidden_layers),
        head_dim=_HEAD_DIM,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 5e5,
            "mrope_section": list(_MROPE_SECTION_INTERLEAVED),
            "mrope_interleaved": True,
        },
    )
    model = _assemble(
        Qwen3VLForConditionalGeneration, Qwen3VLConfig, vision, text, processor, attn_implementation, seed, weight_scale
    )
    factor = float(weight_scale) ** 0.5
    with torch.no_grad():
        for name, param in model.model.language_model.named_parameters():
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                param.mul_(factor)
    return model, processor


def build_tiny_qwen_inputs(
    processor: ProcessorMixin,
    images: Sequence[Image.Image],
    questions: Sequence[str],
    videos: Sequence[Sequence[Image.Image] | np.ndarray] | None = None,
    video_fps: float = 2.0,
) -> BatchFeature:
    """Build a left-padded batch for a tiny Qwen-VL model: one image or one video and one question per sample.

    The samples are the images first, then the videos: ``questions[i]`` goes with ``images[i]`` for
    ``i < len(images)`` and with ``videos[i - len(images)]`` after that. Images (and videos) may differ in size.

    Args:
        processor: Processor of :func:`build_tiny_qwen2_vl`, :func:`build_tiny_qwen2_5_vl` or
            :func:`build_tiny_qwen3_vl`.
        images: The image samples' images.
        questions: One question per sample, rendered as ``USER: <|vision_start|><|image_pad|><|vision_end|>{question}
            ASSISTANT:`` (``<|video_pad|>`` for a video).
        videos: The video samples' videos, each a list of PIL frames or a ``(frames, height, width, 3)`` uint8 array.
        video_fps: Frame rate the videos were sampled at (Qwen2.5-VL's temporal positions, Qwen3-VL's timestamps).

    Returns:
        The processor's :class:`transformers.BatchFeature`: ``input_ids``, ``attention_mask``, ``mm_token_type_ids``
        (0 text, 1 image, 2 video), and ``pixel_values``/``image_grid_thw`` and/or
        ``pixel_values_videos``/``video_grid_thw`` (and ``second_per_grid_ts`` on Qwen2.5-VL).

    Raises:
        ValueError: If there is no sample, or not one question per image and video.
    """
    videos = list(videos or [])
    images = list(images)
    if not questions or len(questions) != len(images) + len(videos):
        raise ValueError(
            f"Need one question per image and video and at least one question; got {len(images)} images, "
            f"{len(videos)} videos and {len(questions)} questions."
        )
    kinds = ["image"] * len(images) + ["video"] * len(videos)
    prompts = [
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": kind}, {"type": "text", "text": question}]}],
            add_generation_prompt=True,
            tokenize=False,
        )
        for kind, question in zip(kinds, questions, strict=True)
    ]
    kwargs: dict[str, object] = {}
    if videos:
        kwargs["videos"] = [video if isinstance(video, np.ndarray) else list(video) for video in videos]
        kwargs["video_metadata"] = [
            {"total_num_frames": len(video), "fps": float(video_fps), "frames_indices": list(range(len(video)))}
            for video in videos
        ]
    return processor(images=images or None, text=prompts, padding=True, return_tensors="pt", **kwargs)
