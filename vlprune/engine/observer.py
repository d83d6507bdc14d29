"""Read post-RoPE queries and keys from inside any attention layer, whatever the attention backend.

Every model file of transformers >= 4.48 calls its attention through the shared ``ALL_ATTENTION_FUNCTIONS``
interface (``get_interface(name, eager_attention_forward)``), with queries and keys already rotated and normalised.
While at least one session observes a module, vlprune puts a thin wrapper in that interface's *local* mapping for the
backend names in use; the wrapper hands the tensors of observed modules to their callback and then calls the real
function unchanged. The last session to leave removes the wrapper and restores the mapping exactly.

The local mapping is process-global, so sessions in several threads at once are not supported.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

Observer = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor, Any, float], Any]
"""``observer(module, query, key, value, attention_mask, scaling)``; it returns None, a tensor that replaces the
mask, or an :class:`Action`. ``scaling`` is the one the attention function applies: the call's own, or, where the
call passes none, the backends' default ``head_dim ** -0.5``."""


@dataclass
class Action:
    """What an observer asks of one attention call: a replacement mask, and a function applied to the attention output
    (B, L, H, d) before the layer continues (VAR rewrites some rows)."""

    mask: Any = None
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None


_MISSING = object()
_observers: dict[int, Observer] = {}
_saved: dict[str, Any] = {}  # backend name -> what the local mapping held before (or _MISSING)


@functools.cache
def _interface() -> Any:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS


def _module_eager_function(module: nn.Module) -> Callable[..., Any]:
    # "eager" is not in the shared mapping: each model file passes its own eager function as the default.
    function = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if function is None:
        raise RuntimeError(f"{type(module).__name__} has no module-level eager_attention_forward")
    return function


def _make_wrapper(name: str, previous: Any) -> Callable[..., Any]:
    # Looked up now, not per call: a captured graph (vlprune.engine.captured) traces the call.
    shared = type(_interface())._global_mapping.get(name)

    def original(module: nn.Module) -> Callable[..., Any]:
        if previous is not _MISSING:
            return previous
        if name == "eager":
            return _module_eager_function(module)
        return shared

    def vlprune_attention(
        module: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Any,
        **kwargs: Any,
    ) -> Any:
        observer = _observers.get(id(module))
        scaling = kwargs.get("scaling")
        scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
        action = None if observer is None else observer(module, query, key, value, attention_mask, scaling)
        if isinstance(action, torch.Tensor):
            action = Action(mask=action)
        if action is not None and action.mask is not None:
            attention_mask = action.mask
        output = original(module)(module, query, key, value, attention_mask, **kwargs)
        if action is None or action.transform is None:
            return output
        return (action.transform(output[0]), *output[1:])

    vlprune_attention.vlprune_backend = name  # type: ignore[attr-defined]
    return vlprune_attention


def observe(modules: dict[nn.Module, Observer], backends: set[str]) -> None:
    """Start calling ``modules[m](m, query, key, value, attention_mask, scaling)`` whenever module ``m`` attends; what
    it returns, unless None, is the mask the attention then uses."""
    interface = _interface()
    for name in backends:
        if name not in _saved:
            previous = interface._local_mapping.get(name, _MISSING)
            _saved[name] = previous
            interface[name] = _make_wrapper(name, previous)
    for module, observer in modules.items():
        _observers[id(module)] = observer


def stop_observing(modules: list[nn.Module]) -> None:
    """Stop observing ``modules``; when nothing is observed any more, restore the attention interface."""
    for module in modules:
        _observers.pop(id(module), None)
    if _observers:
        return
    interface = _interface()
    for name, previous in list(_saved.items()):
        if previous is _MISSING:
            interface._local_mapping.pop(name, None)
        else:
            interface[name] = previous
        del _saved[name]


def chained(first: Observer, second: Observer) -> Observer:
    """One observer calling two (a score reader and a rewriter on the same layer), their actions combined."""

    def both(*arguments: Any) -> Any:
        actions = [as_action(first(*arguments)), as_action(second(*arguments))]
        masks = [a.mask for a in actions if a is not None and a.mask is not None]
        transforms = [a.transform for a in actions if a is not None and a.transform is not None]
        if len(masks) > 1:
            raise RuntimeError("two observers replace the mask of the same attention call")
        if not masks and not transforms:
            return None

        def transform(output: torch.Tensor) -> torch.Tensor:
            for function in transforms:
                output = function(output)
            return output

        return Action(mask=masks[0] if masks else None, transform=transform if transforms else None)

    return both


def as_action(result: Any) -> Action | None:
    return Action(mask=result) if isinstance(result, torch.Tensor) else result
