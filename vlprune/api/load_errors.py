"""One line instead of a traceback for a model whose files fail to load: transformers' weight-loading reports held
while it loads, and the failure explained (an unsupported family, a bad config.json field, weights of other sizes
than the config's, a pickle checkpoint, a model that needs its own code)."""

from __future__ import annotations

import contextlib
import logging
import pickle
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from huggingface_hub.errors import StrictDataclassError, StrictDataclassFieldValidationError

from vlprune.api.builtin import BUILTIN_MODELS
from vlprune.errors import VlpruneError
from vlprune.models.source import (
    adapter_of_config,
    config_field_message,
    first_line,
    read_config_json,
    supported_model_types,
)

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_MISMATCH_ROW = re.compile(
    r"^(?P<key>[^|\n]+?)\s*\|\s*MISMATCH\s*\|.*?ckpt: (?P<ckpt>torch\.Size\(\[[^\]]*\]\)) vs "
    r"model:\s*(?P<model>torch\.Size\(\[[^\]]*\]\))",
    re.MULTILINE,
)


@contextlib.contextmanager
def _held_load_reports(held: list[str]) -> Iterator[None]:
    """Hold transformers' weight-loading reports (its "LOAD REPORT" tables) in ``held`` while a model loads: a load
    that fails on them (weights of other sizes than the config's) ends in vlprune's one line instead of a table and
    a traceback, and a load that succeeds shows them as transformers would."""
    logger = logging.getLogger("transformers.modeling_utils")
    records: list[logging.LogRecord] = []

    def hold(record: logging.LogRecord) -> bool:
        if "LOAD REPORT" not in record.getMessage():
            return True
        records.append(record)
        held.append(_ANSI.sub("", record.getMessage()))
        return False

    logger.addFilter(hold)
    try:
        yield
    finally:
        logger.removeFilter(hold)
    for record in records:  # reached only when the load succeeded
        logger.handle(record)


def _load_error_message(name: str, folder: Path | None, error: BaseException, reports: list[str]) -> str | None:
    """One line for a failed ``from_pretrained`` of model ``name`` (on disk in ``folder``, if it is), or None for an
    error that is not about the model's files (it propagates as it is)."""
    given_folder = folder is not None and Path(name).expanduser() == folder
    described = f"model folder {name!r}" if given_folder else f"model {name!r}"
    fields = _config_fields(folder)
    if fields is not None and folder is not None:
        try:  # a model type vlprune does not support explains any failure (load() refuses it before loading)
            adapter_of_config(folder, fields)
        except VlpruneError as refusal:
            return str(refusal)
    text = str(error)
    if isinstance(error, StrictDataclassFieldValidationError):
        return config_field_message(described, error, fields)
    if isinstance(error, StrictDataclassError):
        return f"{described}: config.json is not valid ({first_line(error)})"
    if isinstance(error, pickle.UnpicklingError):
        return _pickle_message(described, folder, text)
    if isinstance(error, RuntimeError):
        if "ignore_mismatched_sizes" not in text and "size mismatch" not in text:
            return None
        return (
            f"{described}: its weights do not match its config.json{_first_mismatch(reports)}; use the config.json "
            f"that came with these weights"
        )
    if "trust_remote_code" in text:  # a hub model that needs its own code (a folder on disk is refused before)
        return (
            f"{described} needs its own Python code to load, which vlprune never runs; use a model that transformers "
            f"builds itself ({', '.join(supported_model_types())})"
        )
    return (
        f"cannot load model {name!r}: {first_line(error)} "
        f"(give a local folder, a cached Hugging Face id, or one of {sorted(BUILTIN_MODELS)})"
    )


def _config_fields(folder: Path | None) -> dict[str, Any] | None:
    """config.json's fields, to name where a refused field lies; None when they cannot be read."""
    if folder is None:
        return None
    try:
        return read_config_json(folder)
    except VlpruneError:
        return None


def _first_mismatch(reports: list[str]) -> str:
    """The first mismatched weight of the held reports, as " (KEY: SIZE in the weights, SIZE from config.json)"."""
    for report in reports:
        found = _MISMATCH_ROW.search(report)
        if found:
            key = found.group("key").strip()
            return f" ({key}: {found.group('ckpt')} in the weights, {found.group('model')} from config.json)"
    return ""


def _pickle_message(described: str, folder: Path | None, text: str) -> str:
    """One line for a pickle checkpoint that torch's safe loader refused: what it holds, and to convert it."""
    files = sorted(path.name for path in folder.glob("*.bin")) if folder is not None else []
    found = re.search(r"GLOBAL (\S+)", text)
    holds = f" ({found.group(1)} among them)" if found else ""
    return (
        f"{described} holds a pickle checkpoint ({', '.join(files) or 'pytorch_model.bin'}) with Python objects "
        f"besides tensors{holds}, which vlprune will not load: unpickling them can run any code; convert it to "
        f"safetensors (model.safetensors) where you trust its source"
    )
