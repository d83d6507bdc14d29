"""vlprune as an lmms-eval model: ``lmms-eval --model vlprune --model_args pretrained=M,method=sparsevlm,keep=64``.

lmms-eval (``pip install "vlprune[lmms]"``) finds this class through the entry point ``lmms_eval.models`` that
vlprune's package metadata declares (:mod:`vlprune.lmms_eval_plugin`). It is a "simple" model: requests carry the
prompt text, generation arguments and a function that returns the document's images.

``model_args``: ``pretrained`` (a built-in name, folder or Hugging Face id; default ``vlprune-tiny``), ``method``,
``keep``, ``layer``, ``positions``, ``dtype``, ``device`` and any method option (``p=0.5`` for VAR, ...).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from lmms_eval.api.model import lmms

from vlprune.adapters import adapter_for
from vlprune.api import DEFAULT_MODEL, load
from vlprune.engine import attach
from vlprune.errors import VlpruneError


class VLPruneLMMS(lmms):
    """An lmms-eval model that answers with a vlprune pipeline (a VLM with a pruner attached)."""

    is_simple = True

    def __init__(
        self,
        pretrained: str = DEFAULT_MODEL,
        method: str = "none",
        keep: int | float | None = None,
        layer: int | None = None,
        positions: str | None = None,
        dtype: str | None = None,
        device: str | None = None,
        batch_size: int | str = 1,
        max_batch_size: int | None = None,
        **options: Any,
    ) -> None:
        super().__init__()
        self.pipeline = load(
            pretrained,
            method=method,
            keep=keep,
            layer=layer,
            device=device,
            dtype=dtype,
            positions=positions,
            **options,
        )
        self.batch_size_per_gpu = _batch_size(batch_size)
        self._device = next(self.pipeline.model.parameters()).device

    @property
    def device(self) -> torch.device:
        return self._device

    def _visuals(self, doc_to_visual: Any, doc_id: int, task: str, split: str) -> list[Any]:
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual is not None else []
        images = [v for v in (visuals or []) if hasattr(v, "convert")]
        if len(images) != 1:
            raise VlpruneError(
                f"vlprune answers about exactly one image per question; {task} doc {doc_id} has {len(images)}"
            )
        return images

    def _prompt(self, context: str) -> str:
        # lmms-eval contexts may carry their own "<image>" placeholder; the chat template adds the image itself.
        return self.pipeline.chat_prompt(context.replace("<image>", "").strip())

    def generate_until(self, requests: list[Any]) -> list[str]:
        answers = []
        for request in requests:
            context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
            [image] = self._visuals(doc_to_visual, doc_id, task, split)
            gen_kwargs = dict(gen_kwargs or {})
            result = self.pipeline(
                image, prompt=self._prompt(context), max_new_tokens=int(gen_kwargs.get("max_new_tokens", 32))
            )
            text = str(result.text)
            until = gen_kwargs.get("until") or []
            for stop in [until] if isinstance(until, str) else until:
                if stop:
                    text = text.split(stop)[0]
            answers.append(text)
        return answers

    @torch.inference_mode()
    def loglikelihood(self, requests: list[Any]) -> list[tuple[float, bool]]:
        """Log-probability of each continuation after the prompt, and whether greedy decoding would produce it.

        The prompt is prefilled (and pruned) alone, then the continuation is fed through the cache, as generation
        would: a text-guided pruner decides on the prompt, never on the answer it is scored on.
        """
        results = []
        for request in requests:
            context, continuation, doc_to_visual, doc_id, task, split = request.args
            doc = self.task_dict[task][split][doc_id]
            target = continuation(doc) if callable(continuation) else continuation
            target = str(target[0] if isinstance(target, list) else target)
            [image] = self._visuals(doc_to_visual, doc_id, task, split)
            results.append(self._continuation_log_prob(image, self._prompt(context), target))
        return results

    def _continuation_log_prob(self, image: Any, prompt: str, target: str) -> tuple[float, bool]:
        pipeline, model = self.pipeline, self.pipeline.model
        inputs = pipeline.model_inputs([image], [prompt])
        targets = pipeline.processor.tokenizer(target, add_special_tokens=False, return_tensors="pt")["input_ids"]
        targets = targets[0].to(self.device)
        if len(targets) == 0:
            raise VlpruneError(f"the continuation {target!r} has no tokens")
        length = inputs["input_ids"].shape[1]
        num_visual = int((inputs["input_ids"] == model.config.image_token_id).sum())
        cache_name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        with attach(model, pipeline.pruner, positions=pipeline.positions, num_visual=num_visual):
            prefill = model(**inputs, use_cache=True)
            logits = [prefill.logits[0, -1:]]
            if len(targets) > 1:
                steps = targets[None, :-1]
                positions = adapter_for(model).continuation_position_ids(length, steps.shape[1], self.device)
                following = model(
                    input_ids=steps,
                    attention_mask=torch.ones(1, length + steps.shape[1], dtype=torch.long, device=self.device),
                    position_ids=positions,
                    use_cache=True,
                    **{cache_name: getattr(prefill, "cache", None) or prefill.past_key_values},
                )
                logits.append(following.logits[0])
        scores = torch.cat(logits).float()
        log_probs = torch.log_softmax(scores, dim=-1).gather(1, targets[:, None])
        return float(log_probs.sum()), bool((scores.argmax(dim=-1) == targets).all())

    def generate_until_multi_round(self, requests: list[Any]) -> list[str]:
        raise NotImplementedError("vlprune's lmms-eval model answers single-round questions only")


def _batch_size(value: int | str) -> int:
    """lmms-eval's ``batch_size`` as a count of at least 1 (its ``auto`` is not supported: the batch is explicit)."""
    try:
        size = int(value)
    except (TypeError, ValueError):
        raise VlpruneError(f"batch_size={value!r} must be a whole number of at least 1") from None
    if size < 1:
        raise VlpruneError(f"batch_size={value!r} must be at least 1")
    return size
