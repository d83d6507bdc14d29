"""One visual question with its reference answer: what every dataset loader returns and every evaluation reads."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from PIL import Image


@dataclass
class VQASample:
    """One question about one image, with its reference answer.

    Attributes:
        image: the image, or the path of its file (loaded when the sample is evaluated).
        question: the question text.
        answer: the reference answer.
        kind: a coarse question type ("color", "count_shape", "yes/no", ...) to report accuracy per type.
        id: an identifier that is unique within its dataset split.
    """

    image: Image.Image | str | Path
    question: str
    answer: str
    kind: str = "other"
    id: str = ""
