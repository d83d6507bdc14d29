"""The vLLM plugin's checks and selection that need no vLLM: settings, refusals, budgets, one image's selection,
the version gate, the runner-flag detection and `vlprune serve`'s command (the plugin inside vLLM: tests_vllm/)."""

from __future__ import annotations

import json
import shlex
from types import SimpleNamespace

import pytest
import torch

from vlprune.adapters import traits_of
from vlprune.cli import main
from vlprune.errors import VlpruneError
from vlprune.pruners import create
from vlprune.vllm import unsupported_version
from vlprune.vllm.image_selection import ImageReads, select_image
from vlprune.vllm.processing import decode_budget, encode_budget, request_budget
from vlprune.vllm.runner_flag import cpu_runner_skips_flag
from vlprune.vllm.settings import check_family, parse_settings, settings_from_config

SERVED = ["random", "divprune", "holov", "visionzip", "fastervlm", "zoo-prune", "vispruner", "scope"]
IN_LLM = ["fastv", "sparsevlm", "pyramiddrop", "ptp", "adaptinfer"]


@pytest.mark.parametrize("method", SERVED)
def test_pre_llm_methods_are_served(method):
    settings = parse_settings({"method": method, "keep": 64})
    assert (settings.method, settings.keep, dict(settings.options)) == (method, 64, {})


def test_the_served_methods_are_derived_from_the_registry():
    from vlprune.vllm.settings import served_methods

    assert served_methods() == sorted(SERVED)


def test_no_entry_means_unpruned():
    assert settings_from_config(SimpleNamespace()) is None


@pytest.mark.parametrize("method", IN_LLM)
def test_in_llm_methods_are_refused_with_the_reason(method):
    with pytest.raises(VlpruneError, match=r"prunes inside the language model.*paged KV cache"):
        parse_settings({"method": method, "keep": 64})


def test_vision_encoder_methods_are_refused_with_the_reason():
    with pytest.raises(VlpruneError, match="prunes inside the vision encoder"):
        parse_settings({"method": "flowcut", "keep": 64})


def test_a_method_with_stages_in_the_language_model_is_refused():
    with pytest.raises(VlpruneError, match=r"stages at language-model layers 0, \d+, \d+"):
        parse_settings({"method": "vflowopt", "keep": 64})


def test_a_method_reading_the_instruction_is_refused_with_the_reason():
    with pytest.raises(VlpruneError, match="vLLM encodes each image without its prompt"):
        parse_settings({"method": "cdpruner", "keep": 64})


def test_var_is_refused():
    with pytest.raises(VlpruneError, match="VAR changes the attention of every decoder layer"):
        parse_settings({"method": "divprune+var", "keep": 64})


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"method": "nope", "keep": 64}, "unknown method 'nope'"),
        ({"method": "divprune"}, "needs a budget"),
        ({"method": "divprune", "keep": 1.0}, "ambiguous"),
        ({"method": "divprune", "keep": 0}, "at least 1"),
        ({"method": "divprune", "keep": 64, "extra": 1}, "unknown vlprune setting"),
        ({"method": "holov", "keep": 64, "options": {"nope": 1}}, "has no option nope"),
        ({"method": "divprune", "keep": 64, "options": {"keep": 3}}, "its own setting"),
        ("divprune", "must be a mapping"),
    ],
)
def test_bad_settings_fail_in_one_line(entry, message):
    with pytest.raises(VlpruneError, match=message) as error:
        parse_settings(entry)
    assert "\n" not in str(error.value)


def test_a_method_the_family_cannot_serve_is_refused_with_the_families_that_can():
    with pytest.raises(VlpruneError, match=r"\[CLS\] token.*families that serve it: llava"):
        check_family(create("fastervlm", keep=9), traits_of("qwen2.5-vl"), "qwen2_5_vl")


def test_holov_reads_received_attention_on_qwen():
    from vlprune.needs import Need

    assert check_family(create("holov", keep=9), traits_of("qwen2.5-vl"), "qwen2_5_vl") == {Need.RECEIVED_ATTENTION}


def test_image_budgets():
    settings = parse_settings({"method": "divprune", "keep": 0.25})
    assert settings.image_budget(144) == 36
    assert settings.image_budget(144, 100) == 100
    with pytest.raises(VlpruneError, match="above this image's 144 visual tokens"):
        settings.image_budget(144, 145)


def test_request_budgets_travel_as_one_number():
    settings = parse_settings({"method": "divprune", "keep": 64})
    assert request_budget({}, settings) == 64
    assert request_budget({"vlprune_keep": "0.5"}, settings) == 0.5
    for budget in (0.25, 1, 64, 577):
        assert decode_budget(encode_budget(budget)) == budget
    with pytest.raises(VlpruneError):
        request_budget({"vlprune_keep": -3}, settings)


def _reads(count: int = 12, seed: int = 0) -> ImageReads:
    generator = torch.Generator().manual_seed(seed)
    return ImageReads(
        embeddings=torch.randn(count, 8, generator=generator),
        cls_attention=torch.rand(count, generator=generator).softmax(-1),
        received=torch.rand(count, generator=generator).softmax(-1),
    )


def test_one_image_selection_is_the_methods_own():
    from vlprune.pruners.divprune import select_divprune

    reads = _reads()
    kept = select_image(create("divprune", keep=4), traits_of("llava"), reads, 4, reindexed=True)
    expected = select_divprune(reads.embeddings[None], 4).index[0].sort().values
    assert torch.equal(kept.origin, expected)
    assert torch.equal(kept.embeddings, reads.embeddings[expected])


def test_a_methods_own_order_is_kept_only_where_positions_are_reindexed():
    reads = _reads(16)
    holov = create("holov", keep=6)
    reindexed = select_image(holov, traits_of("llava"), reads, 6, reindexed=True).origin
    original = select_image(holov, traits_of("qwen2.5-vl"), reads, 6, reindexed=False).origin
    assert torch.equal(reindexed.sort().values, original)
    assert torch.equal(original, original.sort().values)


def test_a_request_budget_selects_that_many():
    kept = select_image(create("random", keep=4), traits_of("llava"), _reads(), 7, reindexed=True)
    assert kept.embeddings.shape == (7, 8)


@pytest.mark.parametrize(("found", "ok"), [("0.32.0", True), ("0.33.1", True), ("0.31.2", False), ("0.34.0", False)])
def test_the_vllm_version_gate(found, ok):
    reason = unsupported_version(found)
    assert (reason is None) == ok
    if not ok:
        assert found in reason and "vllm>=0.32,<0.34" in reason


def test_the_cpu_runner_bug_is_detected_in_its_source():
    class Fixed:
        def load_model(self):
            self.is_multimodal_pruning_enabled = True

    class Buggy:
        def load_model(self):
            self.model = None

    class Inherits(Fixed):
        pass

    assert cpu_runner_skips_flag(Buggy)
    assert not cpu_runner_skips_flag(Fixed)
    assert not cpu_runner_skips_flag(Inherits)


def test_serve_builds_vllms_server_command(capsys):
    status = main(
        [
            *("serve", "--model", "m", "--method", "holov", "--keep", "0.25", "--option", "crops=4"),
            *("--port", "9000", "--dry-run", "--", "--max-model-len", "2048"),
        ]
    )
    assert status == 0
    command = shlex.split(capsys.readouterr().out)
    assert command[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    assert command[command.index("--port") + 1] == "9000"
    overrides = json.loads(command[command.index("--hf-overrides") + 1])
    assert overrides == {"vlprune": {"method": "holov", "keep": 0.25, "options": {"crops": 4}}}
    assert command[-2:] == ["--max-model-len", "2048"]


def test_serve_refuses_an_in_llm_method_in_one_line(capsys):
    assert main(["serve", "--model", "m", "--method", "fastv", "--keep", "64", "--dry-run"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "prunes inside the language model" in error
