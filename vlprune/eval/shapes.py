"""Shapes VQA: a seeded synthetic benchmark whose answers depend on the image.

A scene is 1 to 5 flat shapes (circle, square, triangle) in six distinct colours on a light background. Objects never
overlap, lie fully inside the image, and no two share a (colour, shape) pair, so "the red square" names at most one
object. Questions have one-word answers that follow from the scene description alone (:func:`answer` recomputes
them), in six kinds:

==============  ==================================================  ===============
kind            question                                            answers
==============  ==================================================  ===============
``color``       What color is the {shape}?                          a colour
``shape``       What shape is the {color} object?                   a shape
``count_shape`` How many {shape}s are there?                        "0" to "5"
``count_color`` How many {color} objects are there?                 "0" to "5"
``exists``      Is there a {color} {shape}?                         "yes" / "no"
``side``        Is the {color} {shape} on the left or the right?    "left" / "right"
==============  ==================================================  ===============

A "color" question is asked only when exactly one object has that shape, a "shape" question only when exactly one
object has that colour, and a "side" question only about an object whose centre is more than 0.1 of the width away
from the middle. "exists" questions are half yes, half no; half of the "no" ones name a pair that shares its colour
or its shape with an object in the scene, so that they cannot be answered from colours or shapes alone.

Scene ``seed`` is drawn with a PCG64 :class:`numpy.random.Generator`, so a seed gives the same scene on every platform
(for a given NumPy version: NumPy does not promise the same Generator streams across versions). The splits are
disjoint seed ranges: split ``s`` uses seeds ``SPLITS[s]`` to ``SPLITS[s] + SPLIT_RANGE - 1``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from vlprune.errors import VlpruneError
from vlprune.eval.vqa_sample import VQASample

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 30, 30),
    "green": (40, 160, 60),
    "blue": (40, 80, 220),
    "yellow": (245, 220, 25),
    "purple": (140, 60, 190),
    "orange": (245, 130, 15),
}
"""The object colours: saturated and far apart, so that one pixel tells them apart."""

BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "light-grey": (228, 228, 228),
    "beige": (245, 236, 215),
    "light-blue": (218, 232, 246),
    "mint": (222, 242, 228),
    "lavender": (236, 230, 246),
}
"""Light background bases; each scene shifts its base by up to ``BACKGROUND_JITTER`` per channel."""

BACKGROUND_JITTER = 8

QUESTION_KINDS: tuple[str, ...] = ("color", "shape", "count_shape", "count_color", "exists", "side")

TEMPLATES: dict[str, str] = {
    "color": "What color is the {shape}?",
    "shape": "What shape is the {color} object?",
    "count_shape": "How many {shape}s are there?",
    "count_color": "How many {color} objects are there?",
    "exists": "Is there a {color} {shape}?",
    "side": "Is the {color} {shape} on the left or the right?",
}
"""The question text of each kind; the slots are the keyword arguments of :func:`answer`."""

MAX_OBJECTS = 5
MIN_SIZE = 0.10
MAX_SIZE = 0.30
MARGIN = 0.02
"""Smallest gap, as a fraction of the side, between two objects' boxes and between a box and the image border."""

SIDE_MIN_OFFSET = 0.1
"""A "side" question is asked only about an object whose centre is further than this from the vertical midline."""

ANSWER_VOCABULARY: dict[str, tuple[str, ...]] = {
    "color": tuple(COLORS),
    "shape": SHAPES,
    "count_shape": tuple(str(n) for n in range(MAX_OBJECTS + 1)),
    "count_color": tuple(str(n) for n in range(MAX_OBJECTS + 1)),
    "exists": ("yes", "no"),
    "side": ("left", "right"),
}
"""Every answer each kind can have (to measure, for example, what a model answers for a blank image)."""

SPLITS: dict[str, int] = {"train": 0, "validation": 10_000_000, "test": 20_000_000}
"""The first scene seed of each split."""

SPLIT_RANGE = 10_000_000
"""The number of seeds in each split."""

SPLIT_SIZES: dict[str, int] = {"train": 5_000, "validation": 1_000, "test": 1_000}
"""The number of samples :func:`shapes_samples` returns without a limit. Training code that wants more scenes
iterates :func:`scene_iter` instead of holding rendered images in memory."""

_PLACEMENT_TRIES = 100
_QUESTION_STREAM = 1  # second word of the question generator's seed, so questions draw from their own stream


@dataclass(frozen=True)
class ShapeObject:
    """One flat shape. Positions and sizes are fractions of the image side, so a scene renders at any resolution.

    Attributes:
        shape: one of :data:`SHAPES`.
        color: one of the :data:`COLORS` names.
        x: horizontal centre, 0 = left edge, 1 = right edge.
        y: vertical centre, 0 = top edge, 1 = bottom edge.
        size: width and height of the shape's square bounding box.
    """

    shape: str
    color: str
    x: float
    y: float
    size: float

    @property
    def box(self) -> tuple[float, float, float, float]:
        """The bounding box ``(left, top, right, bottom)`` as fractions of the side."""
        half = self.size / 2
        return (self.x - half, self.y - half, self.x + half, self.y + half)


@dataclass(frozen=True)
class Scene:
    """A generated scene: its seed, background colour and objects (in drawing order)."""

    seed: int
    background: tuple[int, int, int]
    objects: tuple[ShapeObject, ...]


@dataclass(frozen=True)
class Question:
    """A question about a scene.

    Attributes:
        text: the question, one of :data:`TEMPLATES` filled in.
        answer: the one-word reference answer.
        kind: one of :data:`QUESTION_KINDS`.
        slots: the template's filled slots as ``(name, value)`` pairs; ``answer(scene, kind, **dict(slots))``
            recomputes the answer.
    """

    text: str
    answer: str
    kind: str
    slots: tuple[tuple[str, str], ...] = ()


def generate_scene(seed: int) -> Scene:
    """The scene of ``seed``: 1 to 5 non-overlapping objects with distinct (colour, shape) pairs.

    Each object draws a size in [MIN_SIZE, MAX_SIZE] and a position until its box keeps MARGIN away from the border
    and from every earlier box; an object that finds no place in 100 tries is left out (rare, only among 5 large
    objects), so a scene can have fewer objects than it first drew.

    Raises:
        VlpruneError: ``seed`` is negative (PCG64 takes non-negative seeds).
    """
    if seed < 0:
        raise VlpruneError(f"seed={seed} must be a non-negative integer")
    rng = np.random.Generator(np.random.PCG64(seed))
    base = list(BACKGROUNDS.values())[int(rng.integers(len(BACKGROUNDS)))]
    red, green, blue = (
        min(255, channel + int(shift))
        for channel, shift in zip(base, rng.integers(-BACKGROUND_JITTER, BACKGROUND_JITTER + 1, size=3), strict=True)
    )
    pairs = [(color, shape) for color in COLORS for shape in SHAPES]
    count = int(rng.integers(1, MAX_OBJECTS + 1))
    objects: list[ShapeObject] = []
    for pair_index in rng.permutation(len(pairs))[:count]:
        color, shape = pairs[int(pair_index)]
        placed = _place(rng, shape, color, objects)
        if placed is not None:
            objects.append(placed)
    return Scene(seed=seed, background=(red, green, blue), objects=tuple(objects))


def _place(rng: np.random.Generator, shape: str, color: str, placed: list[ShapeObject]) -> ShapeObject | None:
    for _ in range(_PLACEMENT_TRIES):
        # Rounded before the overlap test, so the stored scene is exactly the one that was tested.
        size = round(float(rng.uniform(MIN_SIZE, MAX_SIZE)), 4)
        low, high = size / 2 + MARGIN, 1 - size / 2 - MARGIN
        x = round(float(rng.uniform(low, high)), 4)
        y = round(float(rng.uniform(low, high)), 4)
        candidate = ShapeObject(shape=shape, color=color, x=x, y=y, size=size)
        if all(_apart(candidate.box, other.box) for other in placed):
            return candidate
    return None


def _apart(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> bool:
    return a[2] + MARGIN <= b[0] or b[2] + MARGIN <= a[0] or a[3] + MARGIN <= b[1] or b[3] + MARGIN <= a[1]


def render(scene: Scene, size: int = 224) -> Image.Image:
    """Draw ``scene`` as a ``size`` x ``size`` RGB image (flat colours, no anti-aliasing).

    Raises:
        VlpruneError: ``size`` is below 16 pixels, where the smallest objects would vanish.
    """
    if size < 16:
        raise VlpruneError(f"image size={size} is too small; use at least 16 pixels")
    image = Image.new("RGB", (size, size), scene.background)
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        left, top, right, bottom = (round(value * size) for value in obj.box)
        # PIL boxes include their right and bottom pixels.
        right, bottom = right - 1, bottom - 1
        color = COLORS[obj.color]
        if obj.shape == "circle":
            draw.ellipse((left, top, right, bottom), fill=color)
        elif obj.shape == "square":
            draw.rectangle((left, top, right, bottom), fill=color)
        else:
            draw.polygon([((left + right) / 2, top), (right, bottom), (left, bottom)], fill=color)
    return image


def answer(scene: Scene, question_kind: str, **slots: str) -> str:
    """The answer to a question of ``question_kind`` with the template slots ``slots``, from the scene alone.

    Args:
        scene: the scene.
        question_kind: one of :data:`QUESTION_KINDS`.
        **slots: ``shape`` and/or ``color``, as the kind's template needs them.

    Raises:
        VlpruneError: an unknown kind, a missing, extra or unknown slot value, or a question with no single answer
            (a "color" question when not exactly one object has the shape, and so on).
    """
    if question_kind not in TEMPLATES:
        raise VlpruneError(f"unknown question kind {question_kind!r}; choose one of {', '.join(QUESTION_KINDS)}")
    _check_slots(question_kind, slots)
    shape, color = slots.get("shape"), slots.get("color")
    with_shape = [obj for obj in scene.objects if obj.shape == shape]
    with_color = [obj for obj in scene.objects if obj.color == color]
    matching = [obj for obj in with_shape if obj.color == color]
    if question_kind == "count_shape":
        return str(len(with_shape))
    if question_kind == "count_color":
        return str(len(with_color))
    if question_kind == "exists":
        return "yes" if matching else "no"
    if question_kind == "color":
        _require_one(with_shape, f"the {shape}", scene)
        return with_shape[0].color
    if question_kind == "shape":
        _require_one(with_color, f"the {color} object", scene)
        return with_color[0].shape
    _require_one(matching, f"the {color} {shape}", scene)
    if abs(matching[0].x - 0.5) <= SIDE_MIN_OFFSET:
        raise VlpruneError(f"the {color} {shape} of scene {scene.seed} is too close to the middle to be left or right")
    return "left" if matching[0].x < 0.5 else "right"


def _check_slots(kind: str, slots: dict[str, str]) -> None:
    needed = {name for name in ("shape", "color") if "{" + name + "}" in TEMPLATES[kind]}
    if set(slots) != needed:
        raise VlpruneError(f"a {kind!r} question takes slots {sorted(needed)}, got {sorted(slots)}")
    if "shape" in slots and slots["shape"] not in SHAPES:
        raise VlpruneError(f"unknown shape {slots['shape']!r}; choose one of {', '.join(SHAPES)}")
    if "color" in slots and slots["color"] not in COLORS:
        raise VlpruneError(f"unknown color {slots['color']!r}; choose one of {', '.join(COLORS)}")


def _require_one(objects: list[ShapeObject], name: str, scene: Scene) -> None:
    if len(objects) != 1:
        raise VlpruneError(
            f"scene {scene.seed} has {len(objects)} objects matching {name!r}; the question needs exactly one"
        )


def make_question(scene: Scene, kind: str, rng: np.random.Generator) -> Question | None:
    """A random question of ``kind`` about ``scene``, or None when the scene allows none of that kind.

    Raises:
        VlpruneError: ``kind`` is not one of :data:`QUESTION_KINDS`.
    """
    if kind not in TEMPLATES:
        raise VlpruneError(f"unknown question kind {kind!r}; choose one of {', '.join(QUESTION_KINDS)}")
    slots = _draw_slots(scene, kind, rng)
    if slots is None:
        return None
    return Question(
        text=TEMPLATES[kind].format(**slots),
        answer=answer(scene, kind, **slots),
        kind=kind,
        slots=tuple(sorted(slots.items())),
    )


def _draw_slots(scene: Scene, kind: str, rng: np.random.Generator) -> dict[str, str] | None:
    objects = scene.objects
    shapes = [obj.shape for obj in objects]
    colors = [obj.color for obj in objects]
    if kind == "color":
        unique = [shape for shape in SHAPES if shapes.count(shape) == 1]
        return {"shape": _pick(rng, unique)} if unique else None
    if kind == "shape":
        unique = [color for color in COLORS if colors.count(color) == 1]
        return {"color": _pick(rng, unique)} if unique else None
    if kind == "count_shape":
        return {"shape": _pick_present_or_absent(rng, SHAPES, set(shapes))}
    if kind == "count_color":
        return {"color": _pick_present_or_absent(rng, tuple(COLORS), set(colors))}
    if kind == "exists":
        return _draw_exists(scene, rng)
    away = [obj for obj in objects if abs(obj.x - 0.5) > SIDE_MIN_OFFSET]
    if not away:
        return None
    chosen = away[int(rng.integers(len(away)))]
    return {"color": chosen.color, "shape": chosen.shape}


def _pick(rng: np.random.Generator, options: list[str] | tuple[str, ...]) -> str:
    return options[int(rng.integers(len(options)))]


def _pick_present_or_absent(rng: np.random.Generator, options: tuple[str, ...], present: set[str]) -> str:
    # Mostly ask about something in the image (answers 1-5); sometimes about something absent (answer 0).
    absent = [option for option in options if option not in present]
    if absent and rng.random() < 0.3:
        return _pick(rng, absent)
    return _pick(rng, [option for option in options if option in present])


def _draw_exists(scene: Scene, rng: np.random.Generator) -> dict[str, str]:
    present = {(obj.color, obj.shape) for obj in scene.objects}
    if rng.random() < 0.5:
        color, shape = _pick_pair(rng, sorted(present))
        return {"color": color, "shape": shape}
    absent = [(color, shape) for color in COLORS for shape in SHAPES if (color, shape) not in present]
    # Half of the "no" questions name an absent pair that shares its colour or shape with a present object, so that
    # answering needs colour and shape bound to the same object.
    near = [pair for pair in absent if any(pair[0] == c or pair[1] == s for c, s in present)]
    color, shape = _pick_pair(rng, near if near and rng.random() < 0.5 else absent)
    return {"color": color, "shape": shape}


def _pick_pair(rng: np.random.Generator, pairs: list[tuple[str, str]]) -> tuple[str, str]:
    return pairs[int(rng.integers(len(pairs)))]


def questions_for(scene: Scene, rng: np.random.Generator) -> list[Question]:
    """One question of each kind the scene allows (3 to 6), in :data:`QUESTION_KINDS` order."""
    questions = (make_question(scene, kind, rng) for kind in QUESTION_KINDS)
    return [question for question in questions if question is not None]


def question_rng(seed: int) -> np.random.Generator:
    """The generator that draws the questions of scene ``seed``, independent of the one that drew the scene."""
    return np.random.Generator(np.random.PCG64([seed, _QUESTION_STREAM]))


def _check_split(split: str) -> int:
    if split not in SPLITS:
        raise VlpruneError(f"unknown shapes split {split!r}; choose one of {', '.join(SPLITS)}")
    return SPLITS[split]


def shapes_samples(split: str, limit: int | None = None, image_size: int = 224) -> list[VQASample]:
    """The Shapes VQA samples of ``split``: one question per scene, kinds in turn.

    Sample ``i`` shows scene ``SPLITS[split] + i`` and asks a question of kind ``QUESTION_KINDS[i % 6]``, or of the
    next kind in that order that the scene allows, so the kinds are close to balanced.

    Args:
        split: "train", "validation" or "test".
        limit: the number of samples; None gives ``SPLIT_SIZES[split]``.
        image_size: the side of the rendered images in pixels.

    Raises:
        VlpruneError: an unknown split, or a limit below 0 or above the split's seed range.
    """
    first = _check_split(split)
    count = SPLIT_SIZES[split] if limit is None else limit
    if not 0 <= count <= SPLIT_RANGE:
        raise VlpruneError(f"limit={limit} must be between 0 and {SPLIT_RANGE} (the seeds of one split)")
    samples = []
    for index in range(count):
        scene = generate_scene(first + index)
        question = _rotating_question(scene, index)
        samples.append(
            VQASample(
                image=render(scene, image_size),
                question=question.text,
                answer=question.answer,
                kind=question.kind,
                id=f"shapes-{split}-{index}",
            )
        )
    return samples


def _rotating_question(scene: Scene, index: int) -> Question:
    rng = question_rng(scene.seed)
    for step in range(len(QUESTION_KINDS)):
        question = make_question(scene, QUESTION_KINDS[(index + step) % len(QUESTION_KINDS)], rng)
        if question is not None:
            return question
    # count_shape, count_color and exists are possible in every scene, so the loop always returns.
    raise AssertionError(f"scene {scene.seed} allows no question")


def scene_iter(split: str, start: int = 0) -> Iterator[tuple[Scene, list[Question]]]:
    """Scenes ``start``, ``start + 1``, ... of ``split`` with all their questions, to the end of the split's range.

    Raises:
        VlpruneError: an unknown split, or ``start`` outside ``[0, SPLIT_RANGE)``.
    """
    first = _check_split(split)
    if not 0 <= start < SPLIT_RANGE:
        raise VlpruneError(f"start={start} must be between 0 and {SPLIT_RANGE - 1}")
    # The checks above run at the call, not at the first next(): the generator is a separate function.
    return _scenes(first + start, first + SPLIT_RANGE)


def _scenes(first: int, stop: int) -> Iterator[tuple[Scene, list[Question]]]:
    for seed in range(first, stop):
        scene = generate_scene(seed)
        yield scene, questions_for(scene, question_rng(seed))
