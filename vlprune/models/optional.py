"""The optional packages vlprune-tiny's conversion needs (onnx, onnxruntime, gguf): not vlprune dependencies, so
they are imported on demand, with an install hint when missing."""

from __future__ import annotations

import importlib
from types import ModuleType

from vlprune.errors import VlpruneError


def _require(module: str, package: str | None = None) -> ModuleType:
    """Import ``module``, or raise a VlpruneError saying which package to install (these are not vlprune deps)."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise VlpruneError(
            f"vlprune-tiny needs the {package or module!r} package, which is not installed: "
            f"pip install {package or module}"
        ) from None
