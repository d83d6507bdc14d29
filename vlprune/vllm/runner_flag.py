"""Make vLLM's model runner renumber a pruned request's multimodal RoPE positions.

The V1 runner (``v1/worker/gpu_model_runner.py``) calls the model's ``recompute_mrope_positions`` only when its
``is_multimodal_pruning_enabled`` is set, which ``GPUModelRunner.load_model`` derives from vLLM's own *video*
pruning options; there is no image-pruning option (vLLM 0.32 and 0.33). And ``CPUModelRunner.load_model`` never sets
it at all (the CPU runner bug of ``docs/vllm.md``), so on the CPU even vLLM's own video pruning leaves the position
channels on the embeddings.

:func:`follow_served_model` makes the flag a property of the runner class: what the runner stored, or true when the
loaded model asks for the renumbering (``vlprune_recomputes_positions``), or, where the CPU runner's ``load_model``
does not derive the flag (the bug, detected in its source), what the GPU runner would have derived. It is installed
from a pruning model's constructor, inside the process and the runner that loads it.
"""

from __future__ import annotations

import inspect
import sys
from typing import Any

_STORED = "_vlprune_stored_pruning_flag"
_FLAG = "is_multimodal_pruning_enabled"


def cpu_runner_skips_flag(runner_class: type) -> bool:
    """Whether ``runner_class.load_model`` is the CPU runner's own and never sets the flag (vLLM 0.32, 0.33)."""
    own = runner_class.__dict__.get("load_model")
    if own is None:
        return False
    try:
        return _FLAG not in inspect.getsource(own)
    except (OSError, TypeError):
        return False


def follow_served_model() -> None:
    """Install the property on vLLM's GPU runner class (the CPU runner inherits it), once per process."""
    module = sys.modules.get("vllm.v1.worker.gpu_model_runner")
    if module is None:  # another runner (Model Runner V2 reads the model's needs itself) or none loaded yet
        return
    runner_class = module.GPUModelRunner
    if isinstance(runner_class.__dict__.get(_FLAG), property):
        return
    cpu_module = sys.modules.get("vllm.v1.worker.cpu_model_runner")
    cpu_class = getattr(cpu_module, "CPUModelRunner", None)
    cpu_bug = cpu_class is not None and cpu_runner_skips_flag(cpu_class)

    def get(runner: Any) -> bool:
        stored = bool(runner.__dict__.get(_STORED, False))
        model = runner.__dict__.get("model")
        if model is None:
            return stored
        if getattr(_unwrapped(model), "vlprune_recomputes_positions", False):
            return True
        if cpu_bug and isinstance(runner, cpu_class):
            return stored or _stock_flag(runner, model)
        return stored

    def set_(runner: Any, value: bool) -> None:
        runner.__dict__[_STORED] = value

    # A data descriptor wins over the value the runner's __init__ left in its instance dictionary.
    runner_class.is_multimodal_pruning_enabled = property(get, set_)


def _stock_flag(runner: Any, model: Any) -> bool:
    """The flag as ``GPUModelRunner.load_model`` derives it (vLLM's own video pruning)."""
    from vllm.model_executor.models.interfaces import supports_multimodal_pruning

    config = runner.model_config.multimodal_config
    return bool(supports_multimodal_pruning(model) and config is not None and config.is_multimodal_pruning_enabled())


def _unwrapped(model: Any) -> Any:
    return getattr(model, "module", model)
