"""The :class:`Pipeline`: a VLM, its processor and a pruner, answering questions about images with the pruner attached
only while it generates; and the :class:`Result` of one call."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vlprune import pruners
from vlprune.adapters import adapter_for
from vlprune.api.images import ImageInput, _refuse_aspect_ratio, load_image
from vlprune.engine import PrefillStats, attach
from vlprune.engine.session import resolve_positions
from vlprune.errors import VlpruneError


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

    def __init__(
        self,
        model: nn.Module,
        processor: Any,
        pruner: pruners.Pruner,
        *,
        positions: str | None = None,
        compile: bool = False,
    ) -> None:
        adapter = adapter_for(model)  # refuse an unsupported model now, before any call reads its config
        self.model = model
        self.processor = processor
        self.pruner = pruner.use_tokenizer(processor)
        self.compile = compile
        self._captured: Any = None  # the captured session, attached from the first call until close()
        if positions is not None:
            resolve_positions(pruner, positions, adapter)
        # None: every pruner run through this pipeline (its own, a sweep's, a benchmark's) follows its reference.
        self.positions = positions

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
        if not single and not image:
            raise VlpruneError("got an empty batch: pass at least one image")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise VlpruneError(f"max_new_tokens={max_new_tokens!r} must be an int of at least 1")
        images = [image] if single else list(image)
        prompts = self._prompts(len(images), question, prompt)
        inputs = self.model_inputs(images, prompts)  # it opens the images, so that its messages can name their files
        visual = inputs["input_ids"] == self.model.config.image_token_id
        num_visual = int(visual.sum(1)[0])
        if self.compile:
            session = self.captured_session(num_visual)
            output = session.generate(**inputs, max_new_tokens=max_new_tokens)
        else:
            with attach(self.model, self.pruner, positions=self.positions, num_visual=num_visual) as session:
                output = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        new_tokens = output[:, inputs["input_ids"].shape[1] :]
        texts = [t.strip() for t in self.processor.batch_decode(new_tokens, skip_special_tokens=True)]
        return Result(text=texts[0] if single else texts, stats=session.stats, token_ids=new_tokens)

    def captured_session(self, num_visual: int | None = None) -> Any:
        """The pipeline's :class:`~vlprune.engine.captured.CapturedSession` (``compile=True``), attached at the first
        call and kept, so that its graphs serve every later call; :meth:`close` detaches it."""
        if self._captured is None:
            self._captured = attach(
                self.model, self.pruner, positions=self.positions, num_visual=num_visual, compile=True
            )
        return self._captured

    def close(self) -> None:
        """Detach the captured session, if any (the model is then exactly as loaded)."""
        if self._captured is not None:
            self._captured.detach()
            self._captured = None

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def model_inputs(self, images: Sequence[ImageInput], prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """The model's inputs for images and full prompt texts: left-padded, on the model's device, pixel values in its
        dtype."""
        if not images:
            raise VlpruneError("got an empty batch: pass at least one image")
        tokenizer = getattr(self.processor, "tokenizer", None)
        side = getattr(tokenizer, "padding_side", None)
        pictures = [load_image(image) for image in images]
        try:
            if tokenizer is not None:
                # Batches are left-padded so that every sample's last token is its real last token; the caller's
                # tokenizer gets its own setting back.
                tokenizer.padding_side = "left"
            inputs = self.processor(images=pictures, text=list(prompts), return_tensors="pt", padding=True)
        except ValueError as error:
            _refuse_aspect_ratio(error, images, pictures)
            raise
        finally:
            if tokenizer is not None:
                tokenizer.padding_side = side
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
        for text in texts:
            if not isinstance(text, str):
                raise VlpruneError(f"a question or prompt must be a string, got {type(text).__name__} {text!r}")
        if prompt is not None:
            for text in texts:
                found = text.count(self.image_token)
                if found != 1:
                    raise VlpruneError(
                        f"the prompt {text!r} has {found} image tokens {self.image_token!r}; with one image per "
                        f"prompt it needs exactly one"
                    )
            return texts
        for text in texts:
            if self.image_token in text:
                raise VlpruneError(
                    f"the question {text!r} contains the image token {self.image_token!r}, which would give the "
                    f"model a second image slot; remove it (the pipeline places the image itself) or pass prompt="
                )
        return [self.chat_prompt(text) for text in texts]

    def chat_prompt(self, question: str) -> str:
        """The prompt text for ``question`` with one image: the processor's chat template, or LLaVA-1.5's format."""
        if getattr(self.processor, "chat_template", None):
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
            return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return f"USER: {self.image_token}\n{question} ASSISTANT:"
