"""The lmms-eval model wrapper, found through vlprune's entry point and driven with fake requests (lmms-eval's own
tasks download their data from a hub)."""

from __future__ import annotations

import pytest

lmms_eval = pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (pip install 'vlprune[lmms]')")

import vlprune  # noqa: E402
from vlprune.errors import VlpruneError  # noqa: E402
from vlprune.testing import make_test_image  # noqa: E402


def fake_request(kind: str, arguments: tuple, index: int = 0):
    from lmms_eval.api.instance import Instance

    return Instance(
        request_type=kind, arguments=arguments, idx=index, metadata={"task": "fake", "doc_id": index, "repeats": 1}
    )


@pytest.fixture(scope="module")
def wrapper():
    from lmms_eval.models import get_model

    cls = get_model("vlprune")  # resolved through the lmms_eval.models entry point of vlprune's package metadata
    model = cls.create_from_arg_string("pretrained=tiny-random,method=fastv,keep=16", {"batch_size": "1"})
    docs = [{"image": make_test_image(0)}, {"image": make_test_image(1)}, {"images": [make_test_image(2)] * 2}]
    model.task_dict = {"fake": {"test": docs}}
    return model


def doc_to_visual(doc: dict) -> list:
    return doc.get("images") or [doc["image"]]


def test_lmms_eval_finds_the_wrapper_through_the_entry_point(wrapper) -> None:
    from vlprune.eval.lmms_model import VLPruneLMMS

    assert isinstance(wrapper, VLPruneLMMS) and wrapper.pipeline.pruner.name == "fastv"
    assert wrapper.pipeline.pruner.keep == 16  # model_args values arrive parsed


def test_generate_until_answers_like_the_pipeline(wrapper) -> None:
    requests = [
        fake_request(
            "generate_until",
            ("<image>\nWhat color?", {"max_new_tokens": 3, "until": []}, doc_to_visual, i, "fake", "test"),
            i,
        )
        for i in range(2)
    ]
    answers = wrapper.generate_until(requests)
    pipeline = vlprune.load("tiny-random", method="fastv", keep=16)
    expected = [pipeline(make_test_image(i), "What color?", max_new_tokens=3).text for i in range(2)]
    assert answers == expected


def test_loglikelihood_through_the_cache_equals_teacher_forcing_without_pruning(wrapper) -> None:
    """Oracle: with no pruner, the prompt prefilled alone and the continuation fed through the cache give the same
    log-probability as one forward pass over prompt + continuation."""
    import torch
    from lmms_eval.models import get_model

    plain = get_model("vlprune").create_from_arg_string("pretrained=tiny-random", {"batch_size": 1})
    plain.task_dict = wrapper.task_dict
    context, continuation = "What color?", " red square"
    [(log_prob, _)] = plain.loglikelihood(
        [fake_request("loglikelihood", (context, continuation, doc_to_visual, 0, "fake", "test"))]
    )
    pipeline = plain.pipeline
    prompt = pipeline.processor(images=[make_test_image(0)], text=[pipeline.chat_prompt(context)], return_tensors="pt")
    targets = pipeline.processor.tokenizer(continuation, add_special_tokens=False, return_tensors="pt")["input_ids"]
    ids = torch.cat([prompt["input_ids"], targets], dim=1)
    with torch.no_grad():
        logits = pipeline.model(input_ids=ids, pixel_values=prompt["pixel_values"]).logits[
            0, -targets.shape[1] - 1 : -1
        ]
    expected = torch.log_softmax(logits, dim=-1).gather(1, targets[0][:, None]).sum()
    assert log_prob == pytest.approx(float(expected), abs=1e-3)
    # FastV decides on the prompt alone, and what it drops changes the score.
    [(pruned, _)] = wrapper.loglikelihood(
        [fake_request("loglikelihood", (context, continuation, doc_to_visual, 0, "fake", "test"))]
    )
    assert pruned <= 0 and abs(pruned - log_prob) > 1e-3


def test_a_document_with_two_images_is_a_clear_error(wrapper) -> None:
    request = fake_request("generate_until", ("Which?", {}, doc_to_visual, 2, "fake", "test"), 2)
    with pytest.raises(VlpruneError, match="exactly one image"):
        wrapper.generate_until([request])


@pytest.mark.parametrize(
    ("arguments", "shown"),
    [
        ("keep=1.0", "keep=1.0 is ambiguous"),
        ("keep=64.0", "write keep=64 for 64 visual tokens"),
        ("keep=16,seed=abc", "option seed='abc' of method 'random' must be an int"),
    ],
)
def test_model_args_follow_the_api_rules(arguments: str, shown: str) -> None:
    from lmms_eval.models import get_model

    with pytest.raises(VlpruneError, match=shown):
        get_model("vlprune").create_from_arg_string(f"pretrained=tiny-random,method=random,{arguments}", {})


def test_model_args_as_text_are_converted_to_the_option_types() -> None:
    from lmms_eval.models import get_model

    model = get_model("vlprune").create_from_arg_string("pretrained=tiny-random,method=random,keep=0.25,seed=3", {})
    assert model.pipeline.pruner.keep == 0.25 and model.pipeline.pruner.seed == 3


def test_a_llava_next_folder_answers_a_ragged_batch_like_the_pipeline(tmp_path) -> None:
    """pretrained=<a LLaVA-NeXT folder>, two images of different aspect ratios in one batch (different numbers of
    visual tokens): the answers are the pipeline's, one sample at a time."""
    from lmms_eval.models import get_model

    from vlprune.testing_anyres import build_tiny_llava_next

    model, processor = build_tiny_llava_next()
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    images = [make_test_image(0, 96).resize((40, 20)), make_test_image(1, 96).resize((30, 60))]
    docs = [{"image": image} for image in images]
    wrapper = get_model("vlprune").create_from_arg_string(
        f"pretrained={tmp_path},method=fastv,keep=0.25", {"batch_size": "2"}
    )
    wrapper.task_dict = {"fake": {"test": docs}}
    requests = [
        fake_request(
            "generate_until",
            ("<image>\nWhat color?", {"max_new_tokens": 3, "until": []}, doc_to_visual, i, "fake", "test"),
            i,
        )
        for i in range(2)
    ]
    answers = wrapper.generate_until(requests)
    pipeline = vlprune.load(str(tmp_path), method="fastv", keep=0.25)
    assert answers == [pipeline(image, "What color?", max_new_tokens=3).text for image in images]


def test_a_qwen_folder_answers_and_scores_through_the_wrapper(tmp_path) -> None:
    """pretrained=<a Qwen2.5-VL folder>: generate_until answers as the pipeline does, and a continuation fed through
    the cache after the multimodal-RoPE prompt (positions continued from rope_deltas) scores as one forward pass over
    prompt + continuation, unpruned."""
    import torch
    from lmms_eval.models import get_model

    from vlprune.testing_qwen import build_tiny_qwen2_5_vl

    model, processor = build_tiny_qwen2_5_vl()
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    image = make_test_image(0, 96).resize((48, 32))
    docs = [{"image": image}]
    wrapper = get_model("vlprune").create_from_arg_string(f"pretrained={tmp_path},method=fastv,keep=0.25", {})
    wrapper.task_dict = {"fake": {"test": docs}}
    request = ("<image>\nWhat color?", {"max_new_tokens": 3, "until": []}, doc_to_visual, 0, "fake", "test")
    [answer] = wrapper.generate_until([fake_request("generate_until", request)])
    assert answer == vlprune.load(str(tmp_path), method="fastv", keep=0.25)(image, "What color?", max_new_tokens=3).text
    plain = get_model("vlprune").create_from_arg_string(f"pretrained={tmp_path}", {})
    plain.task_dict = wrapper.task_dict
    context, continuation = "What color?", " red square"
    [(log_prob, _)] = plain.loglikelihood(
        [fake_request("loglikelihood", (context, continuation, doc_to_visual, 0, "fake", "test"))]
    )
    pipeline = plain.pipeline
    prompt = pipeline.model_inputs([image], [pipeline.chat_prompt(context)])
    targets = pipeline.processor.tokenizer(continuation, add_special_tokens=False, return_tensors="pt")["input_ids"]
    ids = torch.cat([prompt["input_ids"], targets], dim=1)
    types = torch.cat([prompt["mm_token_type_ids"], torch.zeros_like(targets)], dim=1)
    pipeline.model.model.rope_deltas = None
    with torch.no_grad():
        logits = pipeline.model(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            mm_token_type_ids=types,
            pixel_values=prompt["pixel_values"],
            image_grid_thw=prompt["image_grid_thw"],
        ).logits[0, -targets.shape[1] - 1 : -1]
    expected = torch.log_softmax(logits, dim=-1).gather(1, targets[0][:, None]).sum()
    assert log_prob == pytest.approx(float(expected), abs=1e-4)
