"""Where a model comes from, decided before anything loads: a local folder, the Hugging Face cache, or the hub.

Two failures are cheap to foresee and expensive to meet late: a hub id that is neither cached nor reachable (the hub
client retries for minutes before it gives up), and a budget or layer the model does not have (found only after the
weights have loaded). :func:`resolve_source` answers the first in seconds; :func:`model_shape_on_disk` reads what the
second needs from the model's configuration and processor files alone.
"""

from __future__ import annotations

import functools
import os
import re
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from vlprune.errors import VlpruneError

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
    """What a budget and a layer are checked against: visual tokens per image and decoder layers."""

    num_visual: int
    num_layers: int


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
    """Visual tokens per image and decoder layers of the LLaVA model in ``folder``, from its configuration and its
    processor (run on one blank image), without loading weights; None when there is no folder or it cannot tell (the
    full load then reports any problem)."""
    if folder is None or not (folder / "config.json").is_file():
        return None
    try:
        from PIL import Image
        from transformers import AutoConfig, AutoProcessor

        config = AutoConfig.from_pretrained(folder, local_files_only=True)
        if config.model_type != "llava":
            return None
        processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
        image_token = getattr(processor, "image_token", "<image>")
        inputs = processor(images=Image.new("RGB", (336, 336)), text=image_token, return_tensors="pt")
        num_visual = int((inputs["input_ids"] == config.image_token_id).sum())
        num_layers = int(config.text_config.num_hidden_layers)
    except Exception:  # a damaged or unusual folder: the real load says what is wrong
        return None
    return ModelShape(num_visual=num_visual, num_layers=num_layers) if num_visual > 0 else None
