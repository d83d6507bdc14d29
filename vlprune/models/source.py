"""Where a model comes from, decided before anything loads: a local folder, the Hugging Face cache, or the hub.

Two kinds of failure are cheap to foresee and expensive to meet late: a hub id that is neither cached nor reachable
(the hub client retries for minutes before it gives up), and a model folder that cannot serve the run (a family vlprune
does not support or a method the family refuses, a budget or layer the model does not have, a damaged config.json: all
found only after the weights have loaded). :func:`resolve_source` answers the first in seconds;
:func:`model_shape_on_disk` reads what the second needs from the model's configuration and processor files alone.

Nothing here runs a model folder's own Python code: every transformers call passes ``trust_remote_code=False``, and a
folder that needs its code is refused from its config.json before transformers is asked.
"""

from __future__ import annotations

import functools
import json
import os
import re
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from vlprune.errors import VlpruneError

if TYPE_CHECKING:
    from transformers import PretrainedConfig

    from vlprune.adapters import ModelAdapter

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_PROBE_TIMEOUT_S = 3.0
"""How long the hub may take to accept a connection (name resolution included) before it counts as unreachable."""


@dataclass(frozen=True)
class ModelSource:
    """What ``from_pretrained`` should be given for a model name.

    Attributes:
        path: a local folder, or the hub id.
        offline: load with ``local_files_only=True`` (a local folder, or a cached id while the hub is unreachable).
        local_folder: the folder holding the files, when they are on disk (the folder, or the cached snapshot).
    """

    path: str
    offline: bool
    local_folder: Path | None


@dataclass(frozen=True)
class ModelShape:
    """What a model folder tells before its weights load.

    Attributes:
        adapter: the adapter class of the model's family (its ``family`` name and ``position_modes``).
        num_visual: visual tokens per image, where that does not depend on the image (LLaVA-1.5), else None.
        num_layers: decoder layers, known along with ``num_visual``.
    """

    adapter: type[ModelAdapter]
    num_visual: int | None = None
    num_layers: int | None = None

    @property
    def family(self) -> str:
        return self.adapter.family


def resolve_source(name: str, *, builtin: list[str]) -> ModelSource:
    """The source of ``name``: a local folder, or a hub id (cached, or to be downloaded when the hub answers).

    Raises:
        VlpruneError: ``name`` is a file, a path that does not exist, or a hub id that is not cached while the hub
            cannot be reached (after at most a few seconds); each message names the model and ``--model PATH``.
    """
    path = Path(name).expanduser()
    if path.is_dir():
        return ModelSource(str(path), offline=True, local_folder=path)
    if path.exists():
        raise VlpruneError(f"model {name!r} is a file; give the model's folder (with config.json) instead")
    if not _HUB_ID.match(name):
        raise VlpruneError(
            f"model folder {name!r} does not exist; give a local model folder with --model PATH, a Hugging Face id "
            f"such as llava-hf/llava-1.5-7b-hf, or one of {builtin}"
        )
    cached = cached_snapshot(name)
    if hub_reachable():
        return ModelSource(name, offline=False, local_folder=cached)
    if cached is None:
        raise VlpruneError(
            f"model {name!r} is not in the local Hugging Face cache and the hub ({_endpoint()}) cannot be reached; "
            f"give a local model folder with --model PATH, or one of {builtin}"
        )
    return ModelSource(str(cached), offline=True, local_folder=cached)


def cached_snapshot(repo_id: str) -> Path | None:
    """The folder of ``repo_id``'s snapshot in the Hugging Face cache, or None; never touches the network."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id=repo_id, local_files_only=True))
    except Exception:  # "not cached" comes as several error types across huggingface_hub versions
        return None


def _endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


@functools.cache
def hub_reachable() -> bool:
    """Whether the Hugging Face hub accepts a connection within a few seconds (False in offline mode); asked once per
    process."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    parsed = urlparse(constants.ENDPOINT)
    host, port = parsed.hostname, parsed.port or (443 if parsed.scheme == "https" else 80)
    if host is None:
        return False
    answer: list[bool] = []

    def connect() -> None:
        try:
            with socket.create_connection((host, port), timeout=_PROBE_TIMEOUT_S):
                answer.append(True)
        except OSError:
            answer.append(False)

    # Name resolution has no timeout of its own; a daemon thread bounds it without delaying the interpreter's exit.
    probe = threading.Thread(target=connect, daemon=True)
    probe.start()
    probe.join(_PROBE_TIMEOUT_S + 1.0)
    return bool(answer and answer[0])


def model_shape_on_disk(folder: Path | None) -> ModelShape | None:
    """What the model in ``folder`` is, read from its ``config.json`` (and, for LLaVA-1.5, its processor run on one
    blank image) without loading weights or running any of the folder's own code; None when there is no folder.

    Raises:
        VlpruneError: ``config.json`` is unreadable or not JSON, asks to run the folder's own Python code, names a model
            type vlprune does not support, or has a field transformers refuses (each message names the folder).
    """
    if folder is None or not (folder / "config.json").is_file():
        return None
    fields = read_config_json(folder)
    adapter = adapter_of_config(folder, fields)
    config = load_config(folder, fields)
    if adapter.traits.multi_crop or adapter.traits.packed_tower:  # then token counts depend on each image's size
        return ModelShape(adapter)
    return ModelShape(adapter, _llava_visual_tokens(folder, config), int(config.text_config.num_hidden_layers))


def read_config_json(folder: Path) -> dict[str, Any]:
    """The fields of ``folder/config.json``, read as plain JSON (no transformers code involved).

    Raises:
        VlpruneError: the file cannot be read, is not JSON, or is not a JSON object.
    """
    path = folder / "config.json"
    try:
        fields = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise VlpruneError(f"model folder {str(folder)!r}: config.json is not valid JSON ({error})") from None
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        raise VlpruneError(f"model folder {str(folder)!r}: cannot read config.json ({reason})") from None
    if not isinstance(fields, dict):
        raise VlpruneError(
            f"model folder {str(folder)!r}: config.json holds a JSON {type(fields).__name__}, not an object of fields"
        )
    return fields


def supported_model_types() -> dict[str, type[ModelAdapter]]:
    """``config.json``'s ``model_type`` -> the adapter of its family: the model types whose class
    ``AutoModelForImageTextToText`` (what vlprune loads with) builds and vlprune has an adapter for."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    from vlprune.adapters import FAMILIES

    names = MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
    return {model_type: FAMILIES[name] for model_type, name in sorted(names.items()) if name in FAMILIES}


def adapter_of_config(folder: Path, fields: dict[str, Any]) -> type[ModelAdapter]:
    """The adapter class of the family that ``config.json``'s fields name.

    A folder that needs its own Python code (an ``auto_map`` for a model type transformers does not know) is refused
    here, before transformers could offer to run that code: vlprune never runs a model folder's code, and every
    family it supports is built into transformers.

    Raises:
        VlpruneError: the model type is missing or not one vlprune supports, naming the folder and the supported types.
    """
    supported = supported_model_types()
    model_type = fields.get("model_type")
    if isinstance(model_type, str) and model_type in supported:
        return supported[model_type]
    valid = f"vlprune supports the model types {', '.join(supported)}"
    auto_map = fields.get("auto_map")
    if auto_map:
        code = ", ".join(sorted({str(v) for v in (auto_map.values() if isinstance(auto_map, dict) else [auto_map])}))
        raise VlpruneError(
            f"model folder {str(folder)!r} needs its own Python code to load (config.json: model_type "
            f"{model_type!r}, auto_map {code}); vlprune never runs a model folder's code: use a model that "
            f"transformers builds itself ({valid})"
        )
    if model_type is None:
        raise VlpruneError(f"model folder {str(folder)!r}: config.json has no model_type; {valid}")
    raise VlpruneError(f"model folder {str(folder)!r} holds a model of type {model_type!r}; {valid}")


def load_config(folder: Path, fields: dict[str, Any]) -> PretrainedConfig:
    """``folder``'s configuration as transformers reads it (never running the folder's own code).

    Raises:
        VlpruneError: a field of the wrong type or value, naming the folder and the field.
    """
    from huggingface_hub.errors import StrictDataclassFieldValidationError
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    except StrictDataclassFieldValidationError as error:
        raise VlpruneError(config_field_message(f"model folder {str(folder)!r}", error, fields)) from None
    except (ValueError, TypeError, KeyError) as error:
        raise VlpruneError(
            f"model folder {str(folder)!r}: config.json is not a valid {fields.get('model_type')} configuration "
            f"({first_line(error)})"
        ) from None


def config_field_message(described: str, error: Exception, fields: dict[str, Any] | None = None) -> str:
    """One line for a configuration field transformers refused (a strict-dataclass validation error): the field, with
    its place in ``fields`` (config.json's content) when known, and what was expected."""
    found = re.search(r"field '([^']+)'", str(error))
    field = found.group(1) if found else "?"
    cause = first_line(error.__cause__) if error.__cause__ is not None else first_line(error)
    cause = re.sub(rf"^Field '{re.escape(field)}' ", "", cause)
    places = _paths_of(fields, field) if fields is not None else []
    shown = re.search(r"\(value: (.*)\)$", cause)
    if shown is not None:  # a key several sub-configs have (num_hidden_layers): the one holding the refused value
        places = [(path, value) for path, value in places if repr(value) == shown.group(1)] or places
    where = " or ".join(path for path, _ in places) if places else field
    return f"{described}: config.json's field {where} is not valid ({cause}); correct it in config.json"


def _paths_of(fields: Any, key: str, prefix: str = "") -> list[tuple[str, Any]]:
    """The dotted paths of ``key`` in a nested JSON object (text_config.num_hidden_layers), with their values."""
    if not isinstance(fields, dict):
        return []
    paths = [(f"{prefix}{key}", fields[key])] if key in fields else []
    for name, value in fields.items():
        paths.extend(_paths_of(value, key, f"{prefix}{name}."))
    return paths


def first_line(error: BaseException) -> str:
    """The first non-empty line of an error's message, or its type's name."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def _llava_visual_tokens(folder: Path, config: PretrainedConfig) -> int | None:
    """Visual tokens per image of a LLaVA-1.5 folder, from its processor run on one blank image; None when the
    processor cannot tell (the full load then reports what is wrong)."""
    try:
        from PIL import Image
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
        image_token = getattr(processor, "image_token", "<image>")
        inputs = processor(images=Image.new("RGB", (336, 336)), text=image_token, return_tensors="pt")
        count = int((inputs["input_ids"] == config.image_token_id).sum())
    except Exception:  # a damaged or unusual processor: the real load says what is wrong
        return None
    return count if count > 0 else None
