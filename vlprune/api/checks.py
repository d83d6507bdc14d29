"""What is checked before a model's weights load: the device, the dtype, the compile backend, and, when the model's
files are on disk, its family, positions and shape against each pruner, so that a bad value fails in well under a
second."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch

from vlprune import pruners
from vlprune.api.builtin import BUILTIN_FOLDERS, BUILTIN_MODELS
from vlprune.engine.plan_check import check_fits
from vlprune.engine.session import resolve_positions
from vlprune.errors import VlpruneError
from vlprune.models.source import model_shape_on_disk, resolve_source


def check_device(device: str | torch.device | None) -> torch.device | None:
    """``device`` as a ``torch.device`` if this machine has it; None stays None (the model stays where it loads).

    Raises:
        VlpruneError: a string torch cannot parse, or a device this machine does not have (``cuda`` without a GPU,
            ``cuda:3`` with two).
    """
    if device is None:
        return None
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise VlpruneError(
            f"device={device!r} is not a torch device; valid devices look like cpu, cuda or cuda:0"
        ) from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise VlpruneError(f"device={device!r}: this machine has no usable CUDA GPU; use --device cpu")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise VlpruneError(
                f"device={device!r}: this machine has {torch.cuda.device_count()} GPU(s), "
                f"cuda:0..cuda:{torch.cuda.device_count() - 1}"
            )
        return resolved
    try:
        torch.empty(0, device=resolved)
    except (RuntimeError, AssertionError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise VlpruneError(f"device={device!r} is not available on this machine ({first}); use --device cpu") from None
    return resolved


def _dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if dtype not in names:
        raise VlpruneError(f"dtype={dtype!r} is not valid; choose one of {sorted(names)}")
    return names[dtype]


def _folder_on_disk(name: str) -> Path | None:
    """The folder holding model ``name``'s files, if they are on disk already (a built-in model once built)."""
    if name in BUILTIN_MODELS:
        return BUILTIN_FOLDERS[name]() if name in BUILTIN_FOLDERS else None
    return resolve_source(name, builtin=sorted(BUILTIN_MODELS)).local_folder


def check_before_loading(
    model: str | os.PathLike,
    pruners_to_check: Sequence[pruners.Pruner],
    *,
    device: str | None = None,
    device_map: str | None = None,
    positions: str | Sequence[str] | None = None,
    compile: bool = False,
) -> None:
    """What can be checked before ``model``'s weights load: the device (unless ``device_map`` places the model), the
    compile backend (``compile=True``), and, when the model's files are on disk, its family from config.json against
    each pruner (the method runs on it, each of ``positions`` is a numbering it has: one mode, or a sweep's list) and
    each pruner's budget and layers against the model's shape (a fraction of a second instead of the load's seconds; a
    model not on disk yet is checked when it has loaded).

    Raises:
        VlpruneError: a device this machine lacks, an unknown compile backend, a model folder that vlprune cannot load
            (see :func:`~vlprune.models.source.model_shape_on_disk`), a method or positions mode its family refuses, a
            budget or layer the model does not have, or a model name that cannot be resolved.
    """
    if device_map is None:
        check_device(device)
    if compile:
        check_compile_backend()
    name = str(model)
    try:
        shape = model_shape_on_disk(_folder_on_disk(name))
    except VlpruneError:
        if name in BUILTIN_MODELS:  # a damaged built-in folder is rebuilt by its loader, which reports what it cannot
            return
        raise
    if shape is None:
        return
    modes = [positions] if isinstance(positions, str) or positions is None else list(positions)
    for pruner in pruners_to_check:
        check_family(pruner, shape.family, name)
        for mode in modes:
            resolve_positions(pruner, mode, shape.adapter)
        if shape.num_visual is not None and shape.num_layers is not None:
            check_fits(pruner, shape.num_visual, shape.num_layers)


def check_family(pruner: pruners.Pruner, family: str, model: str) -> None:
    """Refuse a method that does not run on ``family`` with its options (``vlprune.pruners.families_of``) before the
    model loads.

    Raises:
        VlpruneError: naming the method, the model and its family, and the families the method runs on.
    """
    try:
        families = pruners.families_of(pruner)
    except Exception:  # a pruner that cannot be planned on the probe shape (a layer past 32): the attach decides
        return
    if family not in families:
        raise VlpruneError(
            f"method {pruner.name!r} does not run on the {family} family of model {model!r}; it runs on "
            f"{', '.join(families)} (`vlprune methods` lists each method's families)"
        )


def check_compile_backend() -> None:
    """Refuse the compile backend the captured mode would use (``VLPRUNE_COMPILE_BACKEND``, else inductor) when
    torch.compile does not know it, before a model loads.

    Raises:
        VlpruneError: naming the backend, the variable and the known backends.
    """
    from vlprune.engine.captured import BACKEND_VARIABLE, _known_backends

    backend = os.environ.get(BACKEND_VARIABLE, "inductor")
    if backend not in _known_backends():
        raise VlpruneError(
            f"compile backend {backend!r} (from {BACKEND_VARIABLE}) is not known to torch.compile; set it to one of "
            f"{', '.join(_known_backends())}, or unset it for inductor"
        )
