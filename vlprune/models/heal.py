"""Loading an assembled folder, and healing it: a folder that fails to load is rebuilt once (naming its damaged file
when the fingerprints show one) and loaded again."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from vlprune.models.cache import _LOAD_ERRORS, _VERIFIED, _damage, _describe, _read_manifest, _RebuildError

if TYPE_CHECKING:
    from transformers import LlavaForConditionalGeneration, LlavaProcessor


def _load_folder(folder: Path) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """The float32 model (eval mode) and the processor saved in ``folder``."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    # local_files_only: a file missing from the folder must fail here, not send transformers to the model hub. Not for
    # the processor: its tokenizer would save the flag into tokenizer_config.json (and the base's processor is saved
    # into vlprune-tiny); a missing file fails the fingerprints first anyway.
    model = LlavaForConditionalGeneration.from_pretrained(
        folder, dtype=torch.float32, local_files_only=True, trust_remote_code=False
    )
    return model.eval(), AutoProcessor.from_pretrained(folder, trust_remote_code=False)


def _load_problem(folder: Path, error: BaseException) -> str:
    """Why ``folder`` failed to load: its damaged file if the fingerprints (hashed afresh) show one, else ``error``."""
    _VERIFIED.pop(str(folder.absolute()), None)
    manifest = _read_manifest(folder)
    damage = _damage(folder, manifest) if manifest is not None else None
    return damage or f"loading it raised {_describe(error)}"


def _load_healing(folder: Path, rebuild: Callable[[str], Path]) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """Load ``folder``; if that fails, ``rebuild(problem)`` it once and load the result.

    Raises:
        VlpruneError: the rebuild failed, or the rebuilt folder does not load either (naming the folder to delete).
    """
    try:
        return _load_folder(folder)
    except _LOAD_ERRORS as error:
        problem = _load_problem(folder, error)
    folder = rebuild(problem)
    try:
        return _load_folder(folder)
    except _LOAD_ERRORS as error:
        raise _RebuildError(
            f"{folder} was rebuilt ({problem}) but does not load either: {_describe(error)}; "
            f"delete the folder {folder} and run again"
        ) from None
