"""Dataset loading: answer normalisation, the JSONL loader and its errors, easy-VQA and the shapes spec."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
from PIL import Image

from vlprune import VlpruneError
from vlprune.eval import VQASample, load_dataset, normalize_answer, shapes_samples


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Red", "red"),
        ("  yes. ", "yes"),
        ("No!", "no"),
        ("Two", "2"),
        ("ten.", "10"),
        ("3", "3"),
        ("The circle.", "circle"),
        ("an Orange", "orange"),
        ("A  blue   square?!", "blue square"),
        ("there are three", "there are 3"),
        ("the", "the"),  # a lone article is the whole answer, not an article
        ("", ""),
        ("left\n", "left"),
    ],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def _image(path: Path, color=(255, 0, 0)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), color).save(path)
    return path


def _write_jsonl(path: Path, lines: list[object]) -> Path:
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


def test_jsonl_loads_relative_and_absolute_image_paths(tmp_path):
    _image(tmp_path / "data" / "images" / "a.png")
    absolute = _image(tmp_path / "elsewhere" / "b.jpg", (0, 0, 255))
    jsonl = _write_jsonl(
        tmp_path / "data" / "set.jsonl",
        [
            {"image": "images/a.png", "question": "What color?", "answer": "red"},
            "",  # blank lines are skipped
            {"image": str(absolute), "question": "What color?", "answer": "blue", "kind": "color", "id": "b"},
        ],
    )
    # Resolved against the JSONL file's folder, not the working directory.
    samples = load_dataset(f"jsonl:{jsonl}", split="whatever")
    assert samples == [
        VQASample(tmp_path / "data" / "images" / "a.png", "What color?", "red", "other", "set-1"),
        VQASample(absolute, "What color?", "blue", "color", "b"),
    ]
    assert Image.open(samples[0].image).getpixel((0, 0)) == (255, 0, 0)
    assert load_dataset(f"jsonl:{jsonl}", limit=1) == samples[:1]


@pytest.mark.parametrize(
    ("second_line", "message"),
    [
        ('{"image": "a.png", "question": "Q?"', r"line 2: invalid JSON"),
        ('["a.png", "Q?", "yes"]', r"line 2: expected a JSON object"),
        ({"image": "a.png", "question": "Q?"}, r"line 2: missing key 'answer'"),
        ({"image": "a.png", "question": "Q?", "answer": 3}, r"line 2: 'answer' must be a string, got int 3"),
        ({"image": "a.png", "question": "Q?", "answer": "x", "kind": None}, r"line 2: 'kind' must be a string"),
        ({"image": "missing.png", "question": "Q?", "answer": "x"}, r"line 2: image 'missing.png'.*does not exist"),
        ({"image": "notes.txt", "question": "Q?", "answer": "x"}, r"line 2: image 'notes.txt'.*not a readable image"),
        ({"image": ".", "question": "Q?", "answer": "x"}, r"line 2: image '\.'.*is a folder"),
    ],
)
def test_jsonl_bad_line_names_file_and_line(tmp_path, second_line, message):
    _image(tmp_path / "a.png")
    (tmp_path / "notes.txt").write_text("not an image\n")
    good = {"image": "a.png", "question": "Q?", "answer": "yes"}
    jsonl = _write_jsonl(tmp_path / "bad.jsonl", [good, second_line])
    with pytest.raises(VlpruneError, match=message) as caught:
        load_dataset(f"jsonl:{jsonl}")
    assert str(jsonl) in str(caught.value)
    # The bad line is beyond the limit: it is not read.
    assert len(load_dataset(f"jsonl:{jsonl}", limit=1)) == 1


def test_jsonl_truncated_png_is_not_an_image(tmp_path):
    whole = _image(tmp_path / "whole.png")
    # The header is intact, so Image.open() accepts the file; only verify() finds the missing pixel data.
    (tmp_path / "cut.png").write_bytes(whole.read_bytes()[:-12])
    jsonl = _write_jsonl(tmp_path / "set.jsonl", [{"image": "cut.png", "question": "Q?", "answer": "x"}])
    with pytest.raises(VlpruneError, match=r"line 1: image 'cut.png'.*not a readable image"):
        load_dataset(f"jsonl:{jsonl}")


def test_jsonl_missing_empty_or_unnamed_file(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(VlpruneError, match=rf"{re.escape(str(missing))}.*does not exist"):
        load_dataset(f"jsonl:{missing}")
    with pytest.raises(VlpruneError, match="is a folder"):
        load_dataset(f"jsonl:{tmp_path}")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(VlpruneError, match="has no samples"):
        load_dataset(f"jsonl:{empty}")
    with pytest.raises(VlpruneError, match="no file path"):
        load_dataset("jsonl:")


def test_unknown_spec_split_or_limit_lists_what_is_valid():
    with pytest.raises(VlpruneError, match=r"'vqav2'.*shapes, easy-vqa, jsonl:PATH"):
        load_dataset("vqav2")
    with pytest.raises(VlpruneError, match=r"'validation'.*easy-vqa.*train, test"):
        load_dataset("easy-vqa", split="validation")
    with pytest.raises(VlpruneError, match=r"'dev'.*shapes.*train, validation, test"):
        load_dataset("shapes", split="dev")
    with pytest.raises(VlpruneError, match="limit=-2"):
        load_dataset("shapes", limit=-2)


def test_shapes_spec_gives_shapes_samples():
    loaded = load_dataset("shapes", split="validation", limit=4)
    direct = shapes_samples("validation", limit=4)
    assert [(s.question, s.answer, s.kind, s.id) for s in loaded] == [
        (s.question, s.answer, s.kind, s.id) for s in direct
    ]
    assert [s.image.tobytes() for s in loaded] == [s.image.tobytes() for s in direct]
    assert loaded[0].image.size == (224, 224)


def test_easy_vqa_test_split():
    easy_vqa = pytest.importorskip("easy_vqa")
    answers = set(easy_vqa.get_answers())
    samples = load_dataset("easy-vqa", split="test")
    assert len(samples) == len(easy_vqa.get_test_questions()[0]) > 9000
    assert {normalize_answer(sample.answer) for sample in samples} == answers
    assert len({sample.id for sample in samples}) == len(samples)
    kinds = {sample.kind for sample in samples}
    assert kinds == {"yes/no", "color", "shape"}
    for sample in samples:
        if sample.kind == "yes/no":
            assert sample.answer in ("yes", "no"), sample
        elif sample.kind == "shape":
            assert sample.answer in ("circle", "rectangle", "triangle"), sample
        else:
            assert sample.answer not in ("yes", "no", "circle", "rectangle", "triangle"), sample
    first = load_dataset("easy-vqa", split="test", limit=5)
    assert first == samples[:5]
    with Image.open(first[0].image) as image:
        assert image.size == (64, 64)


def test_easy_vqa_train_split_differs_from_test():
    pytest.importorskip("easy_vqa")
    train = load_dataset("easy-vqa", split="train", limit=3)
    test = load_dataset("easy-vqa", split="test", limit=3)
    assert len(train) == 3 and train[0].id == "easy-vqa-train-0"
    assert {s.image for s in train}.isdisjoint({s.image for s in test})


def test_easy_vqa_not_installed_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "easy_vqa", None)  # makes `import easy_vqa` raise ImportError
    with pytest.raises(VlpruneError, match="pip install easy-vqa"):
        load_dataset("easy-vqa")
