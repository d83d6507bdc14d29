"""The machinery of captured graphs: prompt-length buckets, the key that fixes a graph's shapes, compiling a
function as one whole graph per key (counting compilations, CUDA graphs on or off), and the static KV cache a
graph finds its buffers in."""

from __future__ import annotations

import inspect
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

# Every 64 tokens up to 1024 (a LLaVA-1.5 prompt is 576 visual tokens plus its text), then every 256 up to 4096:
# padding costs prefill compute, each bucket a compilation.
DEFAULT_BUCKETS = (*range(64, 1025, 64), *range(1280, 4097, 256))
PROMPT_TENSORS = ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids")
BACKEND_VARIABLE = "VLPRUNE_COMPILE_BACKEND"  # the default backend ("eager": the captured graph without codegen)
ANSWER_ROOM = 16  # answer capacities are multiples of this, so nearby max_new_tokens share a graph


@dataclass(frozen=True)
class GraphKey:
    """What fixes every shape of a captured prefill and decode step."""

    bucket: int  # padded prompt length
    batch: int
    visual: int  # visual tokens per sample
    answer_room: int  # decode steps the caches hold


@dataclass
class CapturedGraphs:
    """The compiled graphs of one key and the buffers they read."""

    prefill: Callable[..., torch.Tensor]
    decode: Callable[..., torch.Tensor]
    cache: Any
    lengths: list[int]  # per layer, the prefill's length
    capacities: list[int]  # per layer, KV slots


def bucket_for(buckets: Sequence[int], length: int) -> int:
    """The padded length of a prompt of ``length`` tokens: the first bucket that holds it, else a multiple of 256."""
    for bucket in buckets:
        if length <= bucket:
            return bucket
    return -(-length // 256) * 256


def answer_room(max_new_tokens: int) -> int:
    """The answer capacity of a graph for ``max_new_tokens``: the next multiple of :data:`ANSWER_ROOM`."""
    return -(-max_new_tokens // ANSWER_ROOM) * ANSWER_ROOM


def left_padded(inputs: dict[str, Any], bucket: int, pad: int) -> dict[str, Any]:
    """The inputs with every prompt-shaped tensor left-padded to ``bucket`` tokens."""
    padded = dict(inputs)
    length = inputs["input_ids"].shape[1]
    for name in PROMPT_TENSORS:
        value = inputs.get(name)
        if isinstance(value, torch.Tensor) and value.dim() == 2 and value.shape[1] == length:
            fill = pad if name == "input_ids" else 0
            padded[name] = torch.nn.functional.pad(value, (bucket - length, 0), value=fill)
    return padded


def compiled(function: Callable[..., Any], owner: object, backend: Callable[..., Any]) -> Callable[..., Any]:
    """``function`` bound to ``owner`` and compiled whole. Dynamo keeps its graphs per code object and stops
    compiling one after a few variants; each key's graph gets a code object of its own, so keys and sessions
    never share (or exhaust) a cache."""
    own = types.FunctionType(
        function.__code__.replace(), function.__globals__, function.__name__, function.__defaults__
    )
    return torch.compile(own.__get__(owner), backend=backend, fullgraph=True, dynamic=False)


def counting_backend(
    backend: str | Callable[..., Any], cuda_graphs: bool, on_compile: Callable[[], None]
) -> Callable[..., Any]:
    """The ``torch.compile`` backend ``backend`` (inductor with CUDA graphs on or off), calling ``on_compile`` at
    each compilation."""
    if isinstance(backend, str):
        if backend == "inductor":
            from torch._inductor.compile_fx import compile_fx

            def inner(graph: Any, example: Any) -> Any:
                return compile_fx(graph, example, config_patches={"triton.cudagraphs": cuda_graphs})
        else:
            inner = torch._dynamo.lookup_backend(backend)
    else:
        inner = backend

    def counting(graph: Any, example: Any) -> Any:
        on_compile()
        return inner(graph, example)

    return counting


def known_backends() -> list[str]:
    """The ``torch.compile`` backends this torch knows by name."""
    return sorted({"eager", "aot_eager", "inductor", *torch._dynamo.list_backends()})


def new_graph_step(device: torch.device) -> None:
    """On CUDA, tell the CUDA-graph runtime a new step starts: the outputs of earlier replays are cloned by then, so
    it may reuse their memory."""
    if device.type == "cuda":
        torch.compiler.cudagraph_mark_step_begin()


def first_line(error: BaseException) -> str:
    """An error's first non-empty line (at most 200 characters), for a one-line reason."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0][:200] if lines else type(error).__name__


def cache_keyword(layer: nn.Module) -> str:
    """The decoder layers' name for the KV cache argument (transformers 5.24 renamed ``past_key_values``)."""
    parameters = inspect.signature(layer.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def static_cache(capacities: list[int], hidden: torch.Tensor, shape: Any) -> Any:
    """A KV cache with one static layer per decoder layer, each of its own capacity, allocated now (a graph must
    find its buffers in place)."""
    from transformers.cache_utils import Cache, StaticLayer

    layers = [StaticLayer(max_cache_len=capacity) for capacity in capacities]
    probe = torch.empty(
        hidden.shape[0], shape.num_kv_heads, 1, shape.head_dim, dtype=hidden.dtype, device=hidden.device
    )
    for layer in layers:
        layer.lazy_initialization(probe, probe)
    return Cache(layers=layers)
