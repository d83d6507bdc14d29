"""LLaVA-1.5 served pruned through vLLM equals the HF engine's pruned run on the same weights and inputs."""

from __future__ import annotations

import pytest
import torch
from oracle import (
    LLAVA_PROMPT,
    first_token_logprobs,
    hf_prompt_logprobs,
    hf_run,
    record_positions,
    vllm_prompt_logprobs,
)
from vllm import LLM, SamplingParams

from vlprune.testing.images import make_test_image

KEEP = 36  # of the tiny LLaVA's 144 tokens per image
METHODS = ["random", "divprune", "holov", "visionzip", "fastervlm", "zoo-prune", "vispruner", "scope"]
PROMPT = LLAVA_PROMPT.format(question="What is in the picture?")


@pytest.fixture(scope="module")
def engine(llava):
    _, _, folder = llava
    return LLM(
        model=str(folder),
        dtype="float32",
        enforce_eager=True,
        max_model_len=1024,
        seed=0,
        limit_mm_per_prompt={"image": 2},
        kv_cache_memory_bytes=1 << 27,  # on the CPU vLLM would otherwise reserve most of the machine's memory
        hf_overrides={"vlprune": {"method": "divprune", "keep": KEEP}},
    )


def _serve(engine: LLM, method: str) -> None:
    engine.apply_model(lambda model: model.vlprune_serve({"method": method, "keep": KEEP}))
    engine.reset_prefix_cache()  # the tokens and encodings cached under the previous method
    engine.llm_engine.reset_encoder_cache()


def _last_kept(engine: LLM) -> list[list[int]]:
    return engine.apply_model(lambda model: [origin.tolist() for origin in model.vlprune.last_origins])[0]


@pytest.mark.parametrize("method", METHODS)
def test_kept_tokens_and_logprobs_equal_the_hf_engine(engine, llava, method):
    model, processor, _ = llava
    _serve(engine, method)
    image = make_test_image(3, 48)
    params = SamplingParams(max_tokens=1, temperature=0, logprobs=5, prompt_logprobs=1)
    out = engine.generate({"prompt": PROMPT, "multi_modal_data": {"image": image}}, params, use_tqdm=False)[0]
    run = hf_run(model, processor, PROMPT, image, method, KEEP)

    kept = _last_kept(engine)[0]
    assert kept[: len(run.kept)] == run.kept  # VisionZip's merged tokens come after its kept ones
    assert len(kept) == KEEP
    assert out.prompt_token_ids == run.input_ids  # the pruned prompt: KEEP image placeholders
    torch.testing.assert_close(vllm_prompt_logprobs(out), hf_prompt_logprobs(run), atol=1e-5, rtol=0)
    torch.testing.assert_close(*first_token_logprobs(out, run), atol=1e-5, rtol=0)


def test_positions_are_contiguous_as_the_references_number_them(engine, llava):
    """LLaVA's kept tokens are numbered on from the text before them: the HF engine's "reindex" positions."""
    _serve(engine, "divprune")
    engine.apply_model(record_positions)
    image = make_test_image(5, 48)
    out = engine.generate(
        {"prompt": PROMPT, "multi_modal_data": {"image": image}}, SamplingParams(max_tokens=1), use_tqdm=False
    )[0]
    positions = engine.apply_model(lambda model: torch.cat(model.test_positions).tolist())[0]
    assert positions == list(range(len(out.prompt_token_ids)))


def test_a_request_budget_overrides_the_served_one(engine):
    _serve(engine, "divprune")
    image_token = engine.get_tokenizer().convert_tokens_to_ids("<image>")
    requests = [
        {"prompt": PROMPT, "multi_modal_data": {"image": make_test_image(1, 48)}},
        {
            "prompt": PROMPT,
            "multi_modal_data": {"image": make_test_image(1, 48)},
            "mm_processor_kwargs": {"vlprune_keep": 0.5},
        },
        {
            "prompt": PROMPT,
            "multi_modal_data": {"image": make_test_image(1, 48)},
            "mm_processor_kwargs": {"vlprune_keep": 100},
        },
    ]
    outs = engine.generate(requests, SamplingParams(max_tokens=1), use_tqdm=False)
    assert [out.prompt_token_ids.count(image_token) for out in outs] == [KEEP, 72, 100]


def test_a_request_budget_above_the_image_fails_that_request(engine):
    request = {
        "prompt": PROMPT,
        "multi_modal_data": {"image": make_test_image(1, 48)},
        "mm_processor_kwargs": {"vlprune_keep": 500},
    }
    with pytest.raises(Exception, match="above this image's 144 visual tokens"):
        engine.generate(request, SamplingParams(max_tokens=1), use_tqdm=False)
