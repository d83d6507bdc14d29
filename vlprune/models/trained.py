"""``vlprune-tiny``: the trained projector and LoRA updates that ship with vlprune merged into the base folder
(:func:`build_vlprune_tiny`), and loading the result, healed when damaged (:func:`load_vlprune_tiny`)."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from vlprune.errors import VlpruneError
from vlprune.models.assemble import DEFAULT_IMAGE_SIZE, _ensure_base
from vlprune.models.cache import MANIFEST, _build_lock, _ensure, _log, _problem, _publish, _sha256, cache_dir
from vlprune.models.heal import _load_healing

if TYPE_CHECKING:
    from transformers import LlavaForConditionalGeneration, LlavaProcessor


TRAINED_FOLDER = "vlprune-tiny"
ADAPTER_FILE = Path(__file__).parent / "weights" / "vlprune-tiny-adapter.safetensors"


def _merge_adapter(model: LlavaForConditionalGeneration, adapter: dict[str, torch.Tensor], meta: dict) -> None:
    """Load the trained projector and add the LoRA updates (alpha / r) · B A into the language model's weights."""
    projector = {k.removeprefix("projector."): v.float() for k, v in adapter.items() if k.startswith("projector.")}
    model.model.multi_modal_projector.load_state_dict(projector, strict=True)
    scale = meta["alpha"] / meta["rank"]
    layers = model.model.language_model.layers
    merged = 0
    for key, down in adapter.items():
        if not key.endswith("lora_A.weight"):
            continue
        # key: lora.base_model.model.layers.<i>.self_attn.<proj>.lora_A.weight
        parts = key.split(".")
        index, projection = int(parts[parts.index("layers") + 1]), parts[-3]
        up = adapter[key.replace("lora_A", "lora_B")]
        linear = getattr(layers[index].self_attn, projection)
        with torch.no_grad():
            linear.weight += scale * (up.float() @ down.float())
        merged += 1
    expected = len(layers) * len(meta["targets"])
    if merged != expected:
        raise VlpruneError(f"the vlprune-tiny adapter holds {merged} LoRA pairs, expected {expected}")


def build_vlprune_tiny(cache: Path | None = None, *, force: bool = False) -> Path:
    """The folder ``cache/vlprune-tiny``: the base model of :func:`assemble_base` with the trained projector and LoRA
    updates that ship with vlprune merged in, a plain ``LlavaForConditionalGeneration`` checkpoint.

    The first call fetches and converts the weights (about a minute); later calls return the cached folder after
    checking its files against their fingerprints. It is rebuilt (from the base folder, itself checked and rebuilt if
    damaged) when a file is damaged or the shipped adapter changes (its sha256 is recorded in the folder's manifest).
    Concurrent calls build it once: the others wait for the build lock and reuse the result.

    Raises:
        VlpruneError: the folder cannot be built; for a damaged folder, the message names the file and the folder to
            delete.
    """
    return _ensure_trained(cache or cache_dir(), "force=True" if force else None)


def _ensure_trained(cache: Path, reason: str | None) -> Path:
    """The trained folder, rebuilt under the build lock if it is stale or damaged, or if there is a ``reason`` to."""
    target = cache / TRAINED_FOLDER
    adapter_sha = _sha256(ADAPTER_FILE)
    with _build_lock(cache):
        problem = reason or _problem(target, {"adapter_sha256": adapter_sha})
        return _ensure(target, problem, lambda: _build_trained(cache, target, adapter_sha))


def _build_trained(cache: Path, target: Path, adapter_sha: str) -> None:
    """Merge the shipped adapter into the base folder (rebuilt first if damaged); publish the result as ``target``."""
    from safetensors.torch import load_file

    base = _ensure_base(cache, DEFAULT_IMAGE_SIZE, None)
    model, processor = _load_healing(base, lambda problem: _ensure_base(cache, DEFAULT_IMAGE_SIZE, problem))
    start = time.perf_counter()
    _log("merging the trained vlprune-tiny projector and LoRA weights...")
    meta = json.loads(ADAPTER_FILE.with_suffix(".json").read_text())
    _merge_adapter(model, load_file(str(ADAPTER_FILE)), meta)
    built = Path(tempfile.mkdtemp(prefix=f".{TRAINED_FOLDER}-", dir=cache))
    try:
        model.save_pretrained(built)
        processor.save_pretrained(built)
        manifest = json.loads((base / MANIFEST).read_text())
        manifest.update(projector="trained", adapter_sha256=adapter_sha, training=meta)
        _publish(built, target, manifest)
    finally:
        shutil.rmtree(built, ignore_errors=True)
    _log(f"built {target} in {time.perf_counter() - start:.1f} s")


def load_vlprune_tiny(cache: Path | None = None) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """The vlprune-tiny model (float32, eval mode) and its processor, from the folder of :func:`build_vlprune_tiny`.

    The folder is built on first use. Its files are checked against their fingerprints (once per process); a damaged
    folder, or one that fails to load, is logged and rebuilt once.

    Args:
        cache: cache folder; :func:`cache_dir` by default.

    Raises:
        VlpruneError: the folder cannot be built, or a damaged one cannot be rebuilt or does not load after the
            rebuild; the message names the damaged file and the folder to delete.
    """
    cache = cache or cache_dir()
    folder = _ensure_trained(cache, None)
    return _load_healing(folder, lambda problem: _ensure_trained(cache, problem))
