"""Evaluation data: the Shapes VQA benchmark, easy-VQA and JSONL files as lists of :class:`VQASample`."""

from vlprune.eval.datasets import DATASET_SPLITS, DATASETS, VQASample, load_dataset, load_jsonl, normalize_answer
from vlprune.eval.shapes import (
    ANSWER_VOCABULARY,
    COLORS,
    QUESTION_KINDS,
    SHAPES,
    SPLITS,
    Question,
    Scene,
    ShapeObject,
    answer,
    generate_scene,
    questions_for,
    render,
    scene_iter,
    shapes_samples,
)

__all__ = [
    "ANSWER_VOCABULARY",
    "COLORS",
    "DATASETS",
    "DATASET_SPLITS",
    "QUESTION_KINDS",
    "SHAPES",
    "SPLITS",
    "Question",
    "Scene",
    "ShapeObject",
    "VQASample",
    "answer",
    "generate_scene",
    "load_dataset",
    "load_jsonl",
    "normalize_answer",
    "questions_for",
    "render",
    "scene_iter",
    "shapes_samples",
]
