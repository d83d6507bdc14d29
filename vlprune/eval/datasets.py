"""The loaders of the evaluation datasets, each giving a list of :class:`~vlprune.eval.vqa_sample.VQASample`.

``load_dataset(spec, split, limit)`` understands three specs:

* ``"shapes"``: the seeded synthetic Shapes VQA benchmark (:mod:`vlprune.eval.shapes`); splits train, validation,
  test.
* ``"easy-vqa"``: the `easy-VQA <https://github.com/vzhou842/easy-VQA>`_ data bundled with the ``easy-vqa`` package
  (``pip install easy-vqa``); splits train, test.
* ``"jsonl:PATH"``: a user's JSON Lines file, one object per line, ``{"image": ..., "question": ..., "answer": ...}``
  with optional ``"kind"`` and ``"id"``. A relative image path is relative to the JSONL file's folder. The file is
  one set of samples: ``split`` is ignored.

Answers are compared with :func:`normalize_answer` on both sides (exact match after normalisation).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from vlprune.errors import VlpruneError
from vlprune.eval.shapes import shapes_samples
from vlprune.eval.vqa_sample import VQASample

DATASETS: tuple[str, ...] = ("shapes", "easy-vqa", "jsonl:PATH")
"""The dataset specs :func:`load_dataset` accepts (``PATH`` stands for a JSONL file)."""

DATASET_SPLITS: dict[str, tuple[str, ...]] = {
    "shapes": ("train", "validation", "test"),
    "easy-vqa": ("train", "test"),
}
"""The splits of each dataset; a JSONL file has none (its ``split`` argument is ignored)."""

_NUMBER_WORDS = dict(
    zero="0", one="1", two="2", three="3", four="4", five="5", six="6", seven="7", eight="8", nine="9", ten="10"
)
_ARTICLES = frozenset({"a", "an", "the"})
_TRAILING_PUNCTUATION = ".,;:!?"


def normalize_answer(text: str) -> str:
    """The form of an answer that exact-match accuracy compares.

    Lower-cases, strips whitespace and trailing punctuation, collapses inner whitespace, drops a leading article
    ("a", "an", "the") and writes the number words zero to ten as digits: ``" The Two."`` -> ``"2"``.

    Args:
        text: a generated or reference answer.

    Returns:
        The normalised answer (possibly empty).
    """
    text = text.strip().lower().rstrip(_TRAILING_PUNCTUATION + " \t\r\n")
    words = text.split()
    # Drop only one article: "the a" is no answer worth rescuing, and dropping more could empty a real answer.
    if len(words) > 1 and words[0] in _ARTICLES:
        words = words[1:]
    return " ".join(_NUMBER_WORDS.get(word, word) for word in words)


def load_dataset(spec: str, split: str = "test", limit: int | None = None) -> list[VQASample]:
    """The samples of an evaluation dataset.

    Args:
        spec: ``"shapes"``, ``"easy-vqa"`` or ``"jsonl:PATH"`` (see the module docstring).
        split: the split to load; shapes has train/validation/test, easy-vqa train/test; ignored for a JSONL file.
        limit: load at most this many samples (the first ones, in the dataset's fixed order); None loads them all.

    Returns:
        The samples, in a deterministic order.

    Raises:
        VlpruneError: an unknown spec or split, a negative limit, easy-vqa not installed, or a JSONL file that is
            missing, malformed or names a missing or unreadable image (the message names the file and the line).
    """
    if limit is not None and limit < 0:
        raise VlpruneError(f"limit={limit} must be a non-negative number of samples, or None for all")
    if spec.startswith("jsonl:"):
        path = spec.removeprefix("jsonl:")
        if not path:
            raise VlpruneError(f"dataset spec {spec!r} has no file path; write it as jsonl:PATH")
        return load_jsonl(path, limit=limit)
    if spec not in DATASET_SPLITS:
        raise VlpruneError(f"unknown dataset {spec!r}; choose one of {', '.join(DATASETS)}")
    _check_split(spec, split)
    if spec == "shapes":
        return shapes_samples(split, limit=limit)
    return _load_easy_vqa(split, limit)


def _check_split(dataset: str, split: str) -> None:
    splits = DATASET_SPLITS[dataset]
    if split not in splits:
        raise VlpruneError(f"split {split!r} is not available for {dataset}; choose one of {', '.join(splits)}")


def _load_easy_vqa(split: str, limit: int | None) -> list[VQASample]:
    try:
        import easy_vqa
    except ImportError:
        raise VlpruneError("the easy-vqa dataset needs the easy_vqa package: pip install easy-vqa") from None
    if split == "train":
        questions, answers, image_ids = easy_vqa.get_train_questions()
        paths = easy_vqa.get_train_image_paths()
    else:
        questions, answers, image_ids = easy_vqa.get_test_questions()
        paths = easy_vqa.get_test_image_paths()
    count = len(questions) if limit is None else min(limit, len(questions))
    return [
        VQASample(
            image=Path(paths[image_ids[index]]),
            question=questions[index],
            answer=answers[index],
            kind=easy_vqa_kind(questions[index]),
            id=f"easy-vqa-{split}-{index}",
        )
        for index in range(count)
    ]


def easy_vqa_kind(question: str) -> str:
    """The coarse type of an easy-VQA question: "yes/no", "color", "shape" or "other".

    easy-VQA asks "is there a red shape?", "does the image not contain a circle?" (yes/no), "what color is the
    shape?", "what is the color of the triangle?" (color) and "what is the blue shape?", "what shape is present?"
    (shape).
    """
    text = question.strip().lower()
    if re.match(r"(is|does|are|do)\b", text):
        return "yes/no"
    if "color" in text or "colour" in text:
        return "color"
    if "shape" in text:
        return "shape"
    return "other"


_REQUIRED_KEYS = ("image", "question", "answer")
_OPTIONAL_KEYS = ("kind", "id")


def load_jsonl(path: str | Path, limit: int | None = None) -> list[VQASample]:
    """The samples of a JSON Lines file, each image checked to exist and to be a readable image.

    Each non-blank line is one object: ``{"image": PATH, "question": TEXT, "answer": TEXT}`` with optional string
    keys ``"kind"`` (default "other") and ``"id"`` (default ``"<file stem>-<line number>"``); other keys are ignored.
    A relative image path is relative to the folder of the JSONL file. Blank lines are skipped.

    Args:
        path: the JSONL file.
        limit: read at most this many samples (lines after them are not checked); None reads them all.

    Raises:
        VlpruneError: the file is missing or unreadable or has no samples, or a line is not a JSON object with
            string values for the keys above, or its image is missing or not an image, or two lines have the same
            id; the message names the file and the line number(s).
    """
    file = Path(path)
    if not file.is_file():
        what = "is a folder, not a file" if file.is_dir() else "does not exist"
        raise VlpruneError(f"dataset file {str(file)!r} {what}")
    try:
        raw_lines = file.read_bytes().splitlines()
    except OSError as error:
        raise VlpruneError(f"cannot read dataset file {str(file)!r}: {error}") from None
    samples: list[VQASample] = []
    first_line_of: dict[str, int] = {}
    for number, raw in enumerate(raw_lines, start=1):
        if limit is not None and len(samples) >= limit:
            break
        where = f"{file}, line {number}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise VlpruneError(f"{where}: not valid UTF-8 text") from None
        if not line.strip():
            continue
        sample = _parse_jsonl_line(line, where, file.parent, default_id=f"{file.stem}-{number}")
        if sample.id in first_line_of:
            # Sweeps and reports key every row by the sample id: two questions under one id would count as one.
            raise VlpruneError(
                f"{where}: id {sample.id!r} is already the id of line {first_line_of[sample.id]}; give each sample "
                f"its own id"
            )
        first_line_of[sample.id] = number
        samples.append(sample)
    if not samples and limit != 0:
        raise VlpruneError(f"dataset file {str(file)!r} has no samples (expected one JSON object per line)")
    return samples


def _parse_jsonl_line(line: str, where: str, folder: Path, default_id: str) -> VQASample:
    try:
        record: Any = json.loads(line)
    except json.JSONDecodeError as error:
        raise VlpruneError(f"{where}: invalid JSON ({error.msg} at column {error.colno})") from None
    if not isinstance(record, dict):
        raise VlpruneError(f"{where}: expected a JSON object with image, question and answer, got {line.strip()!r}")
    for key in _REQUIRED_KEYS:
        if key not in record:
            raise VlpruneError(
                f"{where}: missing key {key!r} (each line needs image, question and answer; kind and id are optional)"
            )
    for key in (*_REQUIRED_KEYS, *(k for k in _OPTIONAL_KEYS if k in record)):
        if not isinstance(record[key], str):
            raise VlpruneError(
                f"{where}: {key!r} must be a string, got {type(record[key]).__name__} {json.dumps(record[key])}"
            )
    image = Path(record["image"])
    resolved = image if image.is_absolute() else folder / image
    _check_image(resolved, f"{where}: image {record['image']!r} (resolved to {str(resolved)!r})")
    return VQASample(
        image=resolved,
        question=record["question"],
        answer=record["answer"],
        kind=record.get("kind", "other"),
        id=record.get("id", default_id),
    )


def _check_image(path: Path, described: str) -> None:
    if not path.exists():
        raise VlpruneError(f"{described} does not exist")
    if path.is_dir():
        raise VlpruneError(f"{described} is a folder, not an image file")
    try:
        with Image.open(path) as opened:
            opened.verify()
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        # verify() reports a corrupt PNG as SyntaxError; UnidentifiedImageError means not an image format at all.
        raise VlpruneError(f"{described} is not a readable image ({error})") from None
