"""The Python API: ``vlprune.load(model, method=..., keep=...)`` returns a :class:`Pipeline` that answers questions
about images with the pruner attached only while it generates.

The package by job: :mod:`~vlprune.api.pipeline` (the :class:`Pipeline` and its :class:`Result`),
:mod:`~vlprune.api.images` (opening images), :mod:`~vlprune.api.loading` (a model and its processor),
:mod:`~vlprune.api.load_errors` (one line for a model that fails to load), :mod:`~vlprune.api.checks` (what is
checked before the weights load), :mod:`~vlprune.api.builtin` (the models vlprune builds itself). Every name is
importable from ``vlprune.api`` as before.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from vlprune import pruners
from vlprune.api.builtin import BUILTIN_FOLDERS, BUILTIN_MODELS, DEFAULT_MODEL
from vlprune.api.checks import _dtype, check_before_loading, check_compile_backend, check_device, check_family
from vlprune.api.images import ImageInput, load_image
from vlprune.api.loading import load_model
from vlprune.api.pipeline import Pipeline, Result
from vlprune.engine.session import resolve_positions
from vlprune.kernels import kernel_setting

__all__ = [
    "BUILTIN_FOLDERS",
    "BUILTIN_MODELS",
    "DEFAULT_MODEL",
    "ImageInput",
    "Pipeline",
    "Result",
    "check_before_loading",
    "check_compile_backend",
    "check_device",
    "check_family",
    "load",
    "load_image",
    "load_model",
]


# load() lives here, not in a submodule, and calls load_model through this module's namespace: replacing
# vlprune.api.load_model (as the tests' no_model_load fixture does) must reach it.
def load(
    model: str | os.PathLike | tuple[nn.Module, Any],
    method: str = "none",
    keep: int | float | None = None,
    layer: int | None = None,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    *,
    positions: str | None = None,
    device_map: str | None = None,
    compile: bool = False,
    **method_options: Any,
) -> Pipeline:
    """A :class:`Pipeline` for ``model`` (a built-in name, folder or HF id, or a ``(model, processor)`` pair) with the
    pruner ``method`` keeping ``keep`` visual tokens (an int, or a fraction in (0, 1)) and acting at ``layer``.
    ``positions`` ("original" or "reindex") overrides the RoPE numbering of the method's reference (None).
    ``compile=True`` runs each call's prefill and decode steps as captured graphs (see :mod:`vlprune.engine.captured`;
    greedy, the first call of each prompt-length bucket compiles); ``Pipeline.close()`` detaches it.

    Everything that can be checked without the weights is checked first (the method, its options, the device, the
    dtype, the positions, the compile backend, and, when the model is on disk, its config.json: a family vlprune
    supports that runs the method and the positions, and the budget and layers), so that a bad value fails in well
    under a second rather than after the model has loaded. A model folder's own Python code is never run.
    """
    kernel_setting()
    pruner = pruners.create(method, keep=keep, layer=layer, **method_options)
    resolve_positions(pruner, positions)
    _dtype(dtype)
    if isinstance(model, tuple):
        loaded, processor = model
        torch_device = check_device(device)
        if compile:
            check_compile_backend()
        if dtype is not None:
            loaded = loaded.to(_dtype(dtype))
        if torch_device is not None:
            loaded = loaded.to(torch_device)
    else:
        check_before_loading(
            str(model), [pruner], device=device, device_map=device_map, positions=positions, compile=compile
        )
        loaded, processor = load_model(model, device=device, dtype=dtype, device_map=device_map)
    return Pipeline(loaded, processor, pruner, positions=positions, compile=compile)
