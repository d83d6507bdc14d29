"""Qwen2.5-VL and Qwen2-VL served pruned through vLLM equal the HF engine's pruned run on the same weights and inputs:
the kept tokens, every token's multimodal RoPE position, and the log-probabilities; with chunked prefill, batches of
requests, tall, wide and square images, and two images in a prompt (on Qwen2.5-VL)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from oracle import QWEN_PROMPT, first_token_logprobs, hf_prompt_logprobs, hf_run, record_positions, vllm_prompt_logprobs
from vllm import LLM, SamplingParams

from vlprune.testing.images import make_test_image

KEEP = 9
METHODS = ["random", "divprune", "holov", "visionzip", "zoo-prune", "vispruner"]
PROMPT = QWEN_PROMPT.format(question="What is in the picture?")
CHUNK = 16  # tokens per prefill step: every prompt here is prefilled in several steps
ENGINE = {
    "dtype": "float32",
    "enforce_eager": True,
    "max_model_len": 1024,
    "seed": 0,
    "limit_mm_per_prompt": {"image": 2, "video": 1},
    "kv_cache_memory_bytes": 1 << 27,  # on the CPU vLLM would otherwise reserve most of the machine's memory
}


def _image(seed: int, width: int, height: int):
    return make_test_image(seed, 64).resize((width, height))


SQUARE, TALL, WIDE = (48, 48), (32, 64), (64, 32)  # 36, 32 and 32 tokens


@pytest.fixture(scope="module")
def engine(qwen):
    _, _, folder = qwen
    return LLM(
        model=str(folder),
        max_num_batched_tokens=CHUNK,
        max_num_seqs=4,
        hf_overrides={"vlprune": {"method": "divprune", "keep": KEEP}},
        **ENGINE,
    )


@pytest.fixture(scope="module")
def qwen2_engine(qwen2):
    _, _, folder = qwen2
    return LLM(
        model=str(folder),
        max_num_batched_tokens=CHUNK,
        hf_overrides={"vlprune": {"method": "divprune", "keep": KEEP}},
        **ENGINE,
    )


def _serve(engine: LLM, method: str) -> None:
    engine.apply_model(lambda model: model.vlprune_serve({"method": method, "keep": KEEP}))
    engine.reset_prefix_cache()  # the tokens and encodings cached under the previous method
    engine.llm_engine.reset_encoder_cache()


def _positions(engine: LLM) -> torch.Tensor:
    return engine.apply_model(lambda model: torch.cat(model.test_positions, dim=-1))[0]


def _request(image, **kwargs) -> dict:
    return {"prompt": PROMPT, "multi_modal_data": {"image": image}, **kwargs}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(
    ("family", "size"),
    [("qwen2.5-vl", SQUARE), ("qwen2.5-vl", TALL), ("qwen2-vl", TALL)],
    ids=["qwen2.5-square", "qwen2.5-tall", "qwen2-tall"],
)
def test_kept_tokens_positions_and_logprobs_equal_the_hf_engine(request, family, size, method):
    fixtures = ("engine", "qwen") if family == "qwen2.5-vl" else ("qwen2_engine", "qwen2")
    engine = request.getfixturevalue(fixtures[0])
    model, processor, _ = request.getfixturevalue(fixtures[1])
    _serve(engine, method)
    engine.apply_model(record_positions)
    image = _image(7, *size)
    params = SamplingParams(max_tokens=1, temperature=0, logprobs=5, prompt_logprobs=1)
    out = engine.generate(_request(image), params, use_tqdm=False)[0]
    run = hf_run(model, processor, PROMPT, image, method, KEEP)

    kept = engine.apply_model(lambda model: model.vlprune.last_origins[0].tolist())[0]
    assert sorted(kept) == sorted(run.kept)
    assert out.prompt_token_ids == run.input_ids
    assert len(out.prompt_token_ids) > CHUNK  # prefilled in several steps
    positions = _positions(engine)
    assert positions.shape == run.positions.shape
    assert torch.equal(positions, run.positions)  # transformers' (t, h, w) at the kept tokens, text after as it numbers
    torch.testing.assert_close(vllm_prompt_logprobs(out), hf_prompt_logprobs(run), atol=1e-5, rtol=0)
    torch.testing.assert_close(*first_token_logprobs(out, run), atol=1e-5, rtol=0)


def test_each_image_of_a_batch_gets_its_budget_of_placeholders(engine, qwen):
    _serve(engine, "divprune")
    pad = engine.get_tokenizer().convert_tokens_to_ids("<|image_pad|>")
    requests = [
        _request(_image(1, *SQUARE)),
        _request(_image(2, *TALL), mm_processor_kwargs={"vlprune_keep": 0.5}),
        _request(_image(3, *WIDE), mm_processor_kwargs={"vlprune_keep": 20}),
    ]
    outs = engine.generate(requests, SamplingParams(max_tokens=1), use_tqdm=False)
    assert [out.prompt_token_ids.count(pad) for out in outs] == [KEEP, 16, 20]


def test_a_batch_answers_as_its_requests_one_at_a_time(engine):
    _serve(engine, "holov")
    requests = [_request(_image(seed, *size)) for seed, size in [(11, SQUARE), (12, TALL), (13, WIDE)]]
    params = SamplingParams(max_tokens=6, temperature=0)
    together = [out.outputs[0].token_ids for out in engine.generate(requests, params, use_tqdm=False)]
    engine.reset_prefix_cache()
    engine.llm_engine.reset_encoder_cache()
    alone = [engine.generate(request, params, use_tqdm=False)[0].outputs[0].token_ids for request in requests]
    assert together == alone


def test_two_images_in_a_prompt_are_pruned_each_as_alone(engine, qwen):
    model, processor, _ = qwen
    _serve(engine, "divprune")
    engine.apply_model(lambda model: model.vlprune.recent_origins.clear())
    images = [_image(21, *SQUARE), _image(22, *WIDE)]
    prompt = QWEN_PROMPT.format(question="") + "<|vision_start|><|image_pad|><|vision_end|>Which differs?"
    out = engine.generate(
        {"prompt": prompt, "multi_modal_data": {"image": images}}, SamplingParams(max_tokens=2), use_tqdm=False
    )[0]
    pad = engine.get_tokenizer().convert_tokens_to_ids("<|image_pad|>")
    assert out.prompt_token_ids.count(pad) == 2 * KEEP
    # Encoded in one step or two (the prefill is chunked): each image's selection either way.
    kept = engine.apply_model(lambda model: [origin.tolist() for origin in model.vlprune.recent_origins])[0]
    alone = [hf_run(model, processor, PROMPT, image, "divprune", KEEP).kept for image in images]
    assert kept == alone


@pytest.fixture(scope="module")
def stock(qwen):
    _, _, folder = qwen
    return LLM(model=str(folder), max_num_batched_tokens=CHUNK, **ENGINE)


def test_keeping_every_token_equals_stock_vllm(engine, stock, qwen):
    """A budget of all of an image's tokens answers as vLLM does without the plugin, on a tall image, where vLLM's own
    pruning machinery would number the text after it from the grid's width instead of its height."""
    _serve(engine, "divprune")
    image = _image(31, *TALL)
    params = SamplingParams(max_tokens=4, temperature=0, logprobs=5, prompt_logprobs=1)
    ours = engine.generate(_request(image, mm_processor_kwargs={"vlprune_keep": 32}), params, use_tqdm=False)[0]
    theirs = stock.generate(_request(image), params, use_tqdm=False)[0]
    assert ours.prompt_token_ids == theirs.prompt_token_ids
    assert ours.outputs[0].token_ids == theirs.outputs[0].token_ids
    torch.testing.assert_close(vllm_prompt_logprobs(ours), vllm_prompt_logprobs(theirs), atol=1e-6, rtol=0)


def test_a_video_beside_an_image_keeps_its_tokens_and_positions(engine, stock):
    """Videos are not pruned: with the image's budget at all its tokens, a prompt with an image and a video answers as
    stock vLLM does (the video's tokens carry their full positions through the plugin's renumbering)."""
    _serve(engine, "divprune")
    frames = np.stack([np.asarray(_image(40 + i, *SQUARE)) for i in range(4)])
    metadata = {"total_num_frames": 4, "fps": 2.0, "duration": 2.0, "video_backend": "opencv"}
    metadata |= {"frames_indices": [0, 1, 2, 3], "do_sample_frames": False}
    prompt = QWEN_PROMPT.format(question="") + "<|vision_start|><|video_pad|><|vision_end|>What moves?"
    request = {"prompt": prompt, "multi_modal_data": {"image": _image(41, *TALL), "video": (frames, metadata)}}
    params = SamplingParams(max_tokens=4, temperature=0, prompt_logprobs=1)
    ours = engine.generate({**request, "mm_processor_kwargs": {"vlprune_keep": 32}}, params, use_tqdm=False)[0]
    theirs = stock.generate(request, params, use_tqdm=False)[0]
    assert ours.prompt_token_ids == theirs.prompt_token_ids
    assert ours.outputs[0].token_ids == theirs.outputs[0].token_ids
    torch.testing.assert_close(vllm_prompt_logprobs(ours), vllm_prompt_logprobs(theirs), atol=1e-6, rtol=0)
