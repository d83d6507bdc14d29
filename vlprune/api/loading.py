"""A model and its processor from a built-in name, a local folder or a Hugging Face id (:func:`load_model`)."""

from __future__ import annotations

import os
import pickle
from typing import Any

import torch
from huggingface_hub.errors import StrictDataclassError
from torch import nn

from vlprune.api.builtin import BUILTIN_MODELS
from vlprune.api.checks import _dtype, check_device
from vlprune.api.load_errors import _held_load_reports, _load_error_message
from vlprune.errors import VlpruneError
from vlprune.models.source import resolve_source


def load_model(
    model: str | os.PathLike,
    *,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    attn_implementation: str = "sdpa",
    device_map: str | None = None,
) -> tuple[nn.Module, Any]:
    """A model and its processor from a built-in name, a local folder or a Hugging Face id (offline cache).

    ``device_map="auto"`` spreads a model larger than one GPU over the available devices (accelerate's big-model
    loading); the engine follows each layer's device.

    Raises:
        VlpruneError: a bad device or dtype, a model that cannot be found or loaded (an id that is neither cached nor
            reachable fails in seconds, see :func:`vlprune.models.source.resolve_source`).
    """
    if device_map is not None and device is not None:
        raise VlpruneError("pass device or device_map, not both")
    torch_device = check_device(device)
    name = str(model)
    torch_dtype = _dtype(dtype)
    if device_map is not None and name in BUILTIN_MODELS:
        raise VlpruneError(f"device_map applies to checkpoints loaded from a folder or hub id, not to {name!r}")
    if name in BUILTIN_MODELS:
        loaded, processor = BUILTIN_MODELS[name]()
    else:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        source = resolve_source(name, builtin=sorted(BUILTIN_MODELS))
        reports: list[str] = []
        try:
            # trust_remote_code=False: a model's own Python code never runs (and transformers never asks to run it).
            processor = AutoProcessor.from_pretrained(
                source.path, local_files_only=source.offline, trust_remote_code=False
            )
            with _held_load_reports(reports):
                loaded = AutoModelForImageTextToText.from_pretrained(
                    source.path,
                    dtype=torch_dtype or "auto",
                    attn_implementation=attn_implementation,
                    device_map=device_map,
                    local_files_only=source.offline,
                    trust_remote_code=False,
                )
        except (OSError, ValueError, KeyError, RuntimeError, StrictDataclassError, pickle.UnpicklingError) as error:
            message = _load_error_message(name, source.local_folder, error, reports)
            if message is None:
                raise
            raise VlpruneError(message) from None
    if torch_dtype is not None and device_map is None:
        loaded = loaded.to(torch_dtype)
    if torch_device is not None:
        loaded = loaded.to(torch_device)
    return loaded.eval(), processor
