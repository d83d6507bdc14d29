"""Tiny random-weight models that vLLM can load, and the folders it loads them from, for the vLLM plugin's tests and
its CPU benchmark (:mod:`vlprune.vllm`).

vLLM's CPU attention supports head dimensions of 32 and more only, so these models are the tiny builders' families
(:mod:`vlprune.testing.llava`, :mod:`vlprune.testing.qwen`) with 32-wide heads: a LLaVA-1.5 with a 2-head CLIP tower
(hidden 64) and a Llama language model (hidden 128, 4 heads); a Qwen2.5-VL with a windowed 2-head tower (hidden 64)
and a Qwen2-VL with a 2-head tower (hidden 64), each with a Qwen2 language model (hidden 128, 4 query and 2 key/value
heads, M-RoPE sections [4, 6, 6]). Everything else
(tokenizer, chat template, processor geometry) is the tiny builders'. Their attention is not made peaky
(``weight_scale=1``): at the tiny builders' 8, float32 log-probabilities reach magnitudes where vLLM's and
transformers' kernels already differ by 2e-5 unpruned (3e-6 at 1), and pruning a quarter of the tokens still moves
the first token's log-probabilities by about 2.

:func:`save_for_vllm` writes a model and its processor where ``vllm.LLM(model=folder)`` reads them. transformers 5
saves a LLaVA's CLIP tower without the ``vision_model.`` level that vLLM's LLaVA loader expects, so the folder's
weights are written with it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2_5_VLTextConfig,
    Qwen2_5_VLVisionConfig,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLProcessor,
    Qwen2VLTextConfig,
    Qwen2VLVideoProcessor,
    Qwen2VLVisionConfig,
)

from vlprune.testing.common import _TEXT_INIT_STD, finish_tiny_model
from vlprune.testing.llava import build_tiny_processor
from vlprune.testing.qwen import (
    FULLATT_BLOCK_INDEXES,
    WINDOW_SIZE,
    _assemble,
    _geometry,
    _processor,
    _vision_kwargs,
)
from vlprune.testing.tokenizer import IMAGE_TOKEN

__all__ = ["VLLM_HEAD_DIM", "build_vllm_llava", "build_vllm_qwen2_5_vl", "build_vllm_qwen2_vl", "save_for_vllm"]

VLLM_HEAD_DIM = 32
"""Head dimension of every attention in these models: the smallest vLLM's CPU attention accepts."""

_TEXT_HIDDEN = 4 * VLLM_HEAD_DIM
_VISION_HIDDEN = 2 * VLLM_HEAD_DIM
_MROPE_SECTION = [4, 6, 6]  # the tiny Qwen's [2, 3, 3] for 16 rotary frequencies


def _text_kwargs(tokenizer: object, num_hidden_layers: int, num_key_value_heads: int) -> dict[str, object]:
    return {
        "vocab_size": len(tokenizer),
        "hidden_size": _TEXT_HIDDEN,
        "intermediate_size": 2 * _TEXT_HIDDEN,
        "num_hidden_layers": num_hidden_layers,
        "num_attention_heads": _TEXT_HIDDEN // VLLM_HEAD_DIM,
        "num_key_value_heads": num_key_value_heads,
        "max_position_embeddings": 1024,
        "rms_norm_eps": 1e-6,
        "initializer_range": _TEXT_INIT_STD,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }


def build_vllm_llava(
    num_hidden_layers: int = 4, image_size: int = 48, patch_size: int = 4, seed: int = 0, weight_scale: float = 1.0
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """A tiny float32 LLaVA-1.5 (CLIP tower with [CLS], feature layer -2, "default" strategy) with 32-wide heads:
    ``(image_size // patch_size) ** 2`` visual tokens per image (144 at the defaults)."""
    processor = build_tiny_processor(image_size=image_size, patch_size=patch_size, vision="clip")
    tokenizer = processor.tokenizer
    vision = CLIPVisionConfig(
        hidden_size=_VISION_HIDDEN,
        intermediate_size=2 * _VISION_HIDDEN,
        projection_dim=_VISION_HIDDEN,
        num_hidden_layers=3,
        num_attention_heads=_VISION_HIDDEN // VLLM_HEAD_DIM,
        image_size=image_size,
        patch_size=patch_size,
    )
    text = LlamaConfig(**_text_kwargs(tokenizer, num_hidden_layers, 4), tie_word_embeddings=False)
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=(image_size // patch_size) ** 2,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        attn_implementation="sdpa",
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).to(torch.float32)
    finish_tiny_model(model, tokenizer, weight_scale)
    return model, processor


def build_vllm_qwen2_5_vl(
    num_hidden_layers: int = 4, seed: int = 0, weight_scale: float = 1.0
) -> tuple[Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor]:
    """A tiny float32 Qwen2.5-VL with 32-wide heads and the tiny Qwen's geometry (4-pixel patches, 2 x 2 merging,
    16-pixel windows, the last of 3 vision blocks attending over the whole image)."""
    processor = _processor(Qwen2_5_VLProcessor, Qwen2VLVideoProcessor(**_geometry(), cap_pixels_per_frame=True))
    tokenizer = processor.tokenizer
    vision = Qwen2_5_VLVisionConfig(
        **{**_vision_kwargs(), "num_heads": _VISION_HIDDEN // VLLM_HEAD_DIM},
        hidden_size=_VISION_HIDDEN,
        intermediate_size=2 * _VISION_HIDDEN,
        out_hidden_size=_TEXT_HIDDEN,
        window_size=WINDOW_SIZE,
        fullatt_block_indexes=list(FULLATT_BLOCK_INDEXES),
        tokens_per_second=2,
    )
    text = Qwen2_5_VLTextConfig(
        **_text_kwargs(tokenizer, num_hidden_layers, 2),
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": list(_MROPE_SECTION)},
    )
    model = _assemble(
        Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLConfig, vision, text, processor, "sdpa", seed, weight_scale
    )
    return model, processor


def build_vllm_qwen2_vl(
    num_hidden_layers: int = 4, seed: int = 0, weight_scale: float = 1.0
) -> tuple[Qwen2VLForConditionalGeneration, Qwen2VLProcessor]:
    """A tiny float32 Qwen2-VL with 32-wide heads and the tiny Qwen's geometry (a 3-block tower attending over the
    whole image in every block)."""
    processor = _processor(Qwen2VLProcessor, Qwen2VLVideoProcessor(**_geometry(), cap_pixels_per_frame=True))
    tokenizer = processor.tokenizer
    vision = Qwen2VLVisionConfig(
        **{**_vision_kwargs(), "num_heads": _VISION_HIDDEN // VLLM_HEAD_DIM},
        embed_dim=_VISION_HIDDEN,
        hidden_size=_TEXT_HIDDEN,
        mlp_ratio=2,
    )
    text = Qwen2VLTextConfig(
        **_text_kwargs(tokenizer, num_hidden_layers, 2),
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": list(_MROPE_SECTION)},
    )
    model = _assemble(
        Qwen2VLForConditionalGeneration, Qwen2VLConfig, vision, text, processor, "sdpa", seed, weight_scale
    )
    return model, processor


def save_for_vllm(model: torch.nn.Module, processor: object, folder: str | Path) -> Path:
    """Write ``model`` (float32 safetensors) and ``processor`` to ``folder`` as vLLM loads them; returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    if isinstance(model, LlavaForConditionalGeneration):
        _nest_clip_tower(folder)
    return folder


def _nest_clip_tower(folder: Path) -> None:
    """Rename ``...vision_tower.embeddings...`` (transformers 5's save) to ``...vision_tower.vision_model.embeddings``,
    the layout vLLM's LLaVA loader reads (the CLIP checkpoints it serves keep the ``vision_model.`` level)."""
    from safetensors.torch import load_file, save_file

    for path in folder.glob("*.safetensors"):
        tensors = load_file(path)
        renamed = {}
        for name, tensor in tensors.items():
            head, sep, tail = name.partition("vision_tower.")
            if sep and not tail.startswith("vision_model."):
                name = f"{head}vision_tower.vision_model.{tail}"
            renamed[name] = tensor
        save_file(renamed, path, metadata={"format": "pt"})
