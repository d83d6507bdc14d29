"""What the HF engine does with the same weights and inputs: the reference the plugin's answers are checked against."""

from __future__ import annotations

from dataclasses import dataclass

import torch

import vlprune
from vlprune.pruners import create

LLAVA_PROMPT = "USER: <image>\n{question} ASSISTANT:"
QWEN_PROMPT = "USER: <|vision_start|><|image_pad|><|vision_end|>{question} ASSISTANT:"


@dataclass
class HFRun:
    """One pruned (or unpruned) HF forward over a prompt with one image."""

    input_ids: list[int]  # the prompt the language model saw (pruned)
    logprobs: torch.Tensor  # (L, V) log-softmax of the logits at each of those positions
    kept: list[int] | None  # the kept image tokens' indices (merged tokens not among them), in the model's order
    positions: torch.Tensor | None  # Qwen-VL: (3, L) transformers' positions at the kept tokens


def hf_run(model, processor, prompt: str, image, method: str | None, keep: int | None, **options) -> HFRun:
    inputs = processor(text=[prompt], images=[image], return_tensors="pt")
    full_ids = inputs["input_ids"][0]
    with torch.no_grad():
        if method is None:
            logits, kept = model(**inputs).logits[0], None
            ids = full_ids
        else:
            with vlprune.attach(model, create(method, keep=keep, **options)) as session:
                logits = model(**inputs).logits[0]
                stage = session.stats.stages[0]
                kept = stage.kept_indices[0]
            ids = _kept_ids(full_ids, model.config, stage.visual_out)
    positions = _qwen_positions(model, inputs, full_ids, kept) if hasattr(model.model, "get_rope_index") else None
    return HFRun(input_ids=ids.tolist(), logprobs=torch.log_softmax(logits.float(), -1), kept=kept, positions=positions)


def _image_token(config) -> int:
    return int(getattr(config, "image_token_id", None) or config.image_token_index)


def _kept_ids(full_ids: torch.Tensor, config, image_tokens: int) -> torch.Tensor:
    """The prompt with its image's run of placeholders cut to the ``image_tokens`` that reached the language model."""
    image = full_ids == _image_token(config)
    start = int(image.nonzero()[0])
    count = int(image.sum())
    return torch.cat([full_ids[:start], full_ids[start : start + image_tokens], full_ids[start + count :]])


def _qwen_positions(model, inputs, full_ids: torch.Tensor, kept: list[int] | None) -> torch.Tensor:
    """transformers' (3, L) positions of the prompt, at the kept image tokens (all of them when unpruned)."""
    extra = {k: inputs[k] for k in ("mm_token_type_ids",) if k in inputs}
    if "mm_token_type_ids" not in extra:
        extra["mm_token_type_ids"] = (full_ids == _image_token(model.config)).int()[None]
    positions, _ = model.model.get_rope_index(
        inputs["input_ids"], image_grid_thw=inputs["image_grid_thw"], attention_mask=inputs["attention_mask"], **extra
    )
    positions = positions[:, 0]
    if kept is None:
        return positions
    image = full_ids == _image_token(model.config)
    start, count = int(image.nonzero()[0]), int(image.sum())
    columns = [*range(start), *(start + i for i in sorted(kept)), *range(start + count, len(full_ids))]
    return positions[:, columns]


def vllm_prompt_logprobs(output) -> torch.Tensor:
    """(L - 1,) the log-probability vLLM gave each prompt token after the first."""
    ids = output.prompt_token_ids
    return torch.tensor([output.prompt_logprobs[i][ids[i]].logprob for i in range(1, len(ids))])


def hf_prompt_logprobs(run: HFRun) -> torch.Tensor:
    ids = run.input_ids
    return torch.stack([run.logprobs[i - 1, ids[i]] for i in range(1, len(ids))])


def first_token_logprobs(output, run: HFRun) -> tuple[torch.Tensor, torch.Tensor]:
    """vLLM's top log-probabilities of the first generated token and the HF run's for the same tokens."""
    top = output.outputs[0].logprobs[0]
    tokens = sorted(top)
    ours = torch.tensor([top[t].logprob for t in tokens])
    theirs = run.logprobs[-1, tokens]
    return ours, theirs


def record_positions(model) -> None:
    """Run through ``LLM.apply_model``: from now on ``model.test_positions`` collects the positions every forward of
    the served model receives (cleared at each call of this function)."""
    model.test_positions = []
    if getattr(model, "test_hook", None) is None:

        def record(module, args, kwargs):
            positions = kwargs.get("positions", args[1] if len(args) > 1 else None)
            if positions is not None:
                model.test_positions.append(positions.clone())

        model.test_hook = model.register_forward_pre_hook(record, with_kwargs=True)
