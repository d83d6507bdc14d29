"""Shapes VQA: seeded scenes render as described, and every answer follows from the scene description alone.

The answers are recomputed here by :func:`expected_answer`, written independently of ``vlprune.eval.shapes.answer``:
it parses the question text with its own patterns and counts the scene's objects.
"""

from __future__ import annotations

import itertools
import re
from collections import Counter

import numpy as np
import pytest

from vlprune import VlpruneError
from vlprune.eval import shapes
from vlprune.eval.shapes import (
    ANSWER_VOCABULARY,
    BACKGROUND_JITTER,
    BACKGROUNDS,
    COLORS,
    QUESTION_KINDS,
    SHAPES,
    SPLIT_RANGE,
    SPLITS,
    Scene,
    ShapeObject,
    answer,
    generate_scene,
    question_rng,
    questions_for,
    render,
    scene_iter,
    shapes_samples,
)

COLOR = "(red|green|blue|yellow|purple|orange)"
SHAPE = "(circle|square|triangle)"
PATTERNS = {
    "color": re.compile(rf"What color is the {SHAPE}\?"),
    "shape": re.compile(rf"What shape is the {COLOR} object\?"),
    "count_shape": re.compile(rf"How many {SHAPE}s are there\?"),
    "count_color": re.compile(rf"How many {COLOR} objects are there\?"),
    "exists": re.compile(rf"Is there a {COLOR} {SHAPE}\?"),
    "side": re.compile(rf"Is the {COLOR} {SHAPE} on the left or the right\?"),
}

TEST_SAMPLES = 600


def expected_answer(scene: Scene, text: str, kind: str) -> str:
    """The answer to ``text``, asserting that the question has exactly one answer in ``scene``."""
    match = PATTERNS[kind].fullmatch(text)
    assert match is not None, f"{text!r} is not a {kind} question"
    objects = scene.objects
    if kind == "color":
        found = [obj for obj in objects if obj.shape == match[1]]
        assert len(found) == 1, f"{text!r} is ambiguous in {scene}"
        return found[0].color
    if kind == "shape":
        found = [obj for obj in objects if obj.color == match[1]]
        assert len(found) == 1, f"{text!r} is ambiguous in {scene}"
        return found[0].shape
    if kind == "count_shape":
        return str(sum(obj.shape == match[1] for obj in objects))
    if kind == "count_color":
        return str(sum(obj.color == match[1] for obj in objects))
    found = [obj for obj in objects if (obj.color, obj.shape) == (match[1], match[2])]
    if kind == "exists":
        return "yes" if found else "no"
    assert len(found) == 1, f"{text!r} names no object in {scene}"
    assert abs(found[0].x - 0.5) > 0.1, f"{text!r} asks about an object near the middle in {scene}"
    return "left" if found[0].x < 0.5 else "right"


@pytest.fixture(scope="module")
def test_samples():
    return shapes_samples("test", limit=TEST_SAMPLES, image_size=64)


@pytest.fixture(scope="module")
def scenes_with_questions():
    iterator = scene_iter("test")
    return [next(iterator) for _ in range(300)]


def test_same_seed_gives_the_same_scene_and_pixels():
    for seed in (0, 7, 20_000_123):
        assert generate_scene(seed) == generate_scene(seed)
        assert render(generate_scene(seed)).tobytes() == render(generate_scene(seed)).tobytes()
    scenes = [generate_scene(seed) for seed in range(50)]
    assert len({scene.objects for scene in scenes}) == 50
    assert len({render(scene, 64).tobytes() for scene in scenes}) == 50


def test_a_seed_gives_the_pinned_scene():
    # Pins the generator: a change here silently changes the benchmark (also when a NumPy release changes the
    # Generator streams, which NumPy does not promise to keep).
    scene = generate_scene(20_000_000)
    assert scene.background == (241, 237, 217)
    assert [(obj.shape, obj.color, obj.x, obj.y, obj.size) for obj in scene.objects] == [
        ("circle", "blue", 0.3858, 0.635, 0.1206),
        ("square", "yellow", 0.7129, 0.5984, 0.1802),
        ("square", "purple", 0.7955, 0.8697, 0.1833),
        ("circle", "yellow", 0.3122, 0.3999, 0.178),
    ]


def test_splits_are_disjoint_seed_ranges():
    ranges = sorted((first, first + SPLIT_RANGE) for first in SPLITS.values())
    assert all(end <= next_start for (_, end), (next_start, _) in itertools.pairwise(ranges))
    seeds = {split: {scene.seed for scene, _ in _take(scene_iter(split), 20)} for split in SPLITS}
    for split, first in SPLITS.items():
        assert seeds[split] == set(range(first, first + 20))
    assert not seeds["train"] & seeds["validation"] and not seeds["validation"] & seeds["test"]
    for split in SPLITS:
        samples = shapes_samples(split, limit=3, image_size=32)
        for index, sample in enumerate(samples):
            assert sample.image.tobytes() == render(generate_scene(SPLITS[split] + index), 32).tobytes()
    first_images = {render(generate_scene(first), 32).tobytes() for first in SPLITS.values()}
    assert len(first_images) == len(SPLITS)


def test_scene_iter_starts_where_asked():
    scene, questions = next(scene_iter("validation", start=5))
    assert scene.seed == SPLITS["validation"] + 5
    assert questions == questions_for(scene, question_rng(scene.seed))


def test_shapes_samples_are_deterministic():
    once, again = (shapes_samples("test", limit=30, image_size=64) for _ in range(2))
    for first, second in zip(once, again, strict=True):
        assert (first.question, first.answer, first.kind, first.id) == (
            second.question,
            second.answer,
            second.kind,
            second.id,
        )
        assert first.image.tobytes() == second.image.tobytes()


@pytest.mark.parametrize("size", [224, 64])
def test_render_size_background_and_object_colours(size):
    for seed in range(200):
        scene = generate_scene(seed)
        image = render(scene, size)
        assert image.size == (size, size) and image.mode == "RGB"
        pixels = np.asarray(image)
        # Objects keep a margin from the border, so the corners show the background.
        assert tuple(pixels[0, 0]) == scene.background == tuple(pixels[-1, -1])
        for obj in scene.objects:
            row, column = int(obj.y * size), int(obj.x * size)
            assert tuple(pixels[row, column]) == COLORS[obj.color], (seed, obj)


def test_objects_are_inside_apart_unique_and_of_valid_kinds():
    counts = Counter()
    for seed in range(2_000):
        objects = generate_scene(seed).objects
        counts[len(objects)] += 1
        assert len({(obj.color, obj.shape) for obj in objects}) == len(objects)
        for obj in objects:
            assert obj.shape in SHAPES and obj.color in COLORS
            assert 0.1 <= obj.size <= 0.3
            assert obj.x - obj.size / 2 > 0 and obj.x + obj.size / 2 < 1
            assert obj.y - obj.size / 2 > 0 and obj.y + obj.size / 2 < 1
        for i, a in enumerate(objects):
            for b in objects[i + 1 :]:
                overlap_x = abs(a.x - b.x) < (a.size + b.size) / 2
                overlap_y = abs(a.y - b.y) < (a.size + b.size) / 2
                assert not (overlap_x and overlap_y), (seed, a, b)
    assert set(counts) == {1, 2, 3, 4, 5}
    assert min(counts.values()) > 250  # every object count is common


def test_backgrounds_are_light_and_far_from_every_object_colour():
    for base in BACKGROUNDS.values():
        assert min(base) - BACKGROUND_JITTER >= 200
        for color in COLORS.values():
            assert np.linalg.norm(np.subtract(base, color)) > 150 + BACKGROUND_JITTER * 2
    colors = list(COLORS.values())
    assert min(np.linalg.norm(np.subtract(a, b)) for i, a in enumerate(colors) for b in colors[i + 1 :]) > 85
    assert len({generate_scene(seed).background for seed in range(100)}) > 50


def test_every_question_of_every_scene_has_the_recomputed_answer(scenes_with_questions):
    kinds_seen = Counter()
    for scene, questions in scenes_with_questions:
        assert 3 <= len(questions) <= 6
        assert len({q.kind for q in questions}) == len(questions)
        for question in questions:
            kinds_seen[question.kind] += 1
            assert question.answer == expected_answer(scene, question.text, question.kind)
            assert answer(scene, question.kind, **dict(question.slots)) == question.answer
            assert question.answer in ANSWER_VOCABULARY[question.kind]
    assert set(kinds_seen) == set(QUESTION_KINDS)


def test_test_split_answers_kinds_and_balance(test_samples):
    kinds = Counter(sample.kind for sample in test_samples)
    assert set(kinds) == set(QUESTION_KINDS)
    assert min(kinds.values()) >= 0.10 * TEST_SAMPLES, kinds
    for index, sample in enumerate(test_samples):
        assert sample.id == f"shapes-test-{index}"
        scene = generate_scene(SPLITS["test"] + index)
        assert sample.answer == expected_answer(scene, sample.question, sample.kind)
        assert sample.answer in ANSWER_VOCABULARY[sample.kind]
    yes = sum(sample.answer == "yes" for sample in test_samples if sample.kind == "exists")
    assert 0.35 <= yes / kinds["exists"] <= 0.65
    left = sum(sample.answer == "left" for sample in test_samples if sample.kind == "side")
    assert 0.35 <= left / kinds["side"] <= 0.65
    counts = Counter(sample.answer for sample in test_samples if sample.kind.startswith("count"))
    assert {"0", "1", "2"} <= set(counts)  # absent things are asked about too


def test_answer_refuses_questions_without_one_answer():
    scene = Scene(
        seed=0,
        background=(255, 255, 255),
        objects=(
            ShapeObject("circle", "red", 0.2, 0.2, 0.1),
            ShapeObject("circle", "blue", 0.52, 0.5, 0.1),
            ShapeObject("square", "blue", 0.8, 0.8, 0.1),
        ),
    )
    assert answer(scene, "color", shape="square") == "blue"
    assert answer(scene, "shape", color="red") == "circle"
    assert answer(scene, "count_shape", shape="circle") == "2"
    assert answer(scene, "count_color", color="green") == "0"
    assert answer(scene, "exists", color="red", shape="square") == "no"
    assert answer(scene, "side", color="blue", shape="square") == "right"
    with pytest.raises(VlpruneError, match="2 objects"):
        answer(scene, "color", shape="circle")
    with pytest.raises(VlpruneError, match="2 objects"):
        answer(scene, "shape", color="blue")
    with pytest.raises(VlpruneError, match="middle"):
        answer(scene, "side", color="blue", shape="circle")
    with pytest.raises(VlpruneError, match="0 objects"):
        answer(scene, "side", color="green", shape="circle")
    with pytest.raises(VlpruneError, match=r"'size'.*color, shape, count_shape"):
        answer(scene, "size", shape="circle")
    with pytest.raises(VlpruneError, match=r"'pink'.*red, green"):
        answer(scene, "count_color", color="pink")
    with pytest.raises(VlpruneError, match=r"slots \['color', 'shape'\]"):
        answer(scene, "exists", color="red")
    # Questions are drawn only where they have one answer: none of these kinds fits this scene.
    rng = np.random.default_rng(0)
    assert shapes.make_question(scene, "side", rng).text == "Is the blue square on the left or the right?"
    crowded = Scene(0, (255, 255, 255), (*scene.objects, ShapeObject("square", "red", 0.8, 0.2, 0.1)))
    assert shapes.make_question(crowded, "color", rng) is None
    assert shapes.make_question(crowded, "shape", rng) is None


def test_bad_split_limit_and_size_name_the_value():
    with pytest.raises(VlpruneError, match=r"'dev'.*train, validation, test"):
        shapes_samples("dev")
    with pytest.raises(VlpruneError, match="'dev'"):
        scene_iter("dev")  # checked at the call, not at the first next()
    with pytest.raises(VlpruneError, match="limit=-1"):
        shapes_samples("test", limit=-1)
    with pytest.raises(VlpruneError, match="size=8"):
        render(generate_scene(0), 8)
    with pytest.raises(VlpruneError, match="seed=-3"):
        generate_scene(-3)


def _take(iterator, count):
    return [next(iterator) for _ in range(count)]
