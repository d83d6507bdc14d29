"""Shared fixtures: one cached factory of tiny random models built offline (``vlprune.testing``,
``vlprune.testing_anyres``, ``vlprune.testing_qwen``), images and batched inputs, and a check after every test that
no hook, wrapper or attention-interface change is left on any model the factory handed out."""

from __future__ import annotations

import os

# Triton kernels run in Triton's interpreter on CPU tensors; the variable is read when a kernel module is imported,
# so it is set here, before any vlprune import. With VLPRUNE_TEST_DEVICE=cuda the kernels compile for the GPU instead.
if os.environ.get("VLPRUNE_TEST_DEVICE", "cpu") == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The suite runs in one worker process per core (pytest-xdist, `-n auto` in pyproject.toml): the cores are then all
# busy, and the tiny models' operations are too small to gain from threads, so each worker computes on one thread
# (two workers of two threads each on CI's 2 cores took longer than one process).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import functools
import inspect
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from torch import nn

import vlprune.api
from vlprune.testing import build_tiny_inputs, build_tiny_llava, make_test_image
from vlprune.testing_anyres import build_tiny_llava_next, build_tiny_llava_onevision
from vlprune.testing_qwen import build_tiny_qwen2_5_vl, build_tiny_qwen2_vl, build_tiny_qwen3_vl

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

# Set VLPRUNE_TEST_DEVICE=cuda to run the model tests on a GPU (the default suite runs on the CPU).
DEVICE = os.environ.get("VLPRUNE_TEST_DEVICE", "cpu")

QUESTIONS = ("What color is the square?", "How many red objects are there on the left?")

BUILDERS: dict[str, Callable[..., tuple[nn.Module, Any]]] = {
    "llava": build_tiny_llava,
    "llava-next": build_tiny_llava_next,
    "llava-onevision": build_tiny_llava_onevision,
    "qwen2-vl": build_tiny_qwen2_vl,
    "qwen2.5-vl": build_tiny_qwen2_5_vl,
    "qwen3-vl": build_tiny_qwen3_vl,
}


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)


# ---------------------------------------------------------------------------------------------- the model factory


@dataclass
class _Handed:
    """A model the factory handed out, with what the leftover check compares it against."""

    key: tuple
    model: nn.Module
    processor: Any
    modules: list[tuple[str, nn.Module]]
    sizes: list[tuple[int, int, int]]  # per module: pre-hooks, hooks, instance attributes when last seen clean
    fingerprint: tuple = ()
    used: bool = field(default=False)


_models: dict[tuple, _Handed] = {}


def _key(family: str, device: str, options: dict[str, Any]) -> tuple:
    """The cache key: the builder's arguments with its defaults filled in, so that ``tiny_model()`` and
    ``tiny_model("clip", 4)`` share one model."""
    bound = inspect.signature(BUILDERS[family]).bind(**options)
    bound.apply_defaults()
    return (family, str(device), tuple(bound.arguments.items()))


def shared_model(family: str, *, device: str = "cpu", **options: Any) -> tuple[nn.Module, Any]:
    """The tiny ``family`` model (a key of ``BUILDERS``) built with the builder's ``options``, built once per test
    session and shared by every test that asks for the same arguments.

    Use it as it is: attach, run and detach. A test that changes the model or its processor (weights, dtype, config,
    the tokenizer's padding side, a session or hook left on purpose) takes :func:`private_model` instead; the check
    after every test fails a test that leaves a change on a shared model (and drops that model from the cache)."""
    key = _key(family, device, options)
    handed = _models.get(key)
    if handed is None:
        model, processor = BUILDERS[family](**options)
        model = model.to(device)
        modules = list(model.named_modules())
        handed = _models[key] = _Handed(key, model, processor, modules, [_sizes(m) for _, m in modules])
        handed.fingerprint = _fingerprint(model, processor)
    handed.used = True
    return handed.model, handed.processor


def private_model(family: str, *, device: str = "cpu", **options: Any) -> tuple[nn.Module, Any]:
    """A fresh build of the same model, the test's own: for tests that change the model or its processor."""
    model, processor = BUILDERS[family](**options)
    return model.to(device), processor


def tiny_model(
    vision: str = "clip",
    kv_heads: int = 4,
    attn: str = "sdpa",
    layers: int = 4,
    text: str = "llama",
    vision_layers: int = 3,
    *,
    private: bool = False,
):
    """CLIP+Llama, multi-head by default; DINOv2+Llama with grouped-query attention: vision="dinov2", kv_heads=2.
    Shared and cached (:func:`shared_model`); ``private=True`` gives a fresh build the test may change."""
    options = {
        "vision": vision,
        "text": text,
        "num_key_value_heads": kv_heads,
        "attn_implementation": attn,
        "num_hidden_layers": layers,
        "vision_layers": vision_layers,
    }
    return (private_model if private else shared_model)("llava", device=DEVICE, **options)


def tiny_inputs(processor, batch: int):
    """A batch of 1 or 2 prompts; with 2 the questions differ in length, so the first sample is left-padded."""
    images = [make_test_image(seed) for seed in range(batch)]
    return build_tiny_inputs(processor, images, list(QUESTIONS[:batch])).to(DEVICE)


MODEL_KINDS = [("clip", 4), ("dinov2", 2)]


# ---------------------------------------------------------------------------------------------- the leftover check

_LIBRARIES = tuple(str(Path(module.__file__).parent) + os.sep for module in (torch, transformers))


def _sizes(module: nn.Module) -> tuple[int, int, int]:
    return len(module._forward_pre_hooks), len(module._forward_hooks), len(module.__dict__)


def _code_file(function: Any) -> str:
    """The file a hook's or attribute's code is in ('' for built-ins); ``functools.wraps`` copies a wrapped function's
    name and module but not its code, so a wrapper is found where it was written."""
    while isinstance(function, functools.partial):
        function = function.func
    function = getattr(function, "__func__", function)
    code = getattr(function, "__code__", None)
    if code is None and not inspect.isroutine(function):
        code = getattr(inspect.getattr_static(type(function), "__call__", None), "__code__", None)
    return "" if code is None else code.co_filename


def _foreign(function: Any) -> bool:
    """Defined outside torch and transformers (by vlprune, or by a test)."""
    filename = _code_file(function)
    return bool(filename) and not filename.startswith(_LIBRARIES)


def _module_leftovers(name: str, module: nn.Module) -> list[str]:
    found = []
    for kind in ("_forward_pre_hooks", "_forward_hooks"):
        for hook in getattr(module, kind).values():
            if _foreign(hook):
                found.append(f"{name or 'model'}.{kind}: {getattr(hook, '__qualname__', hook)!r} ({_code_file(hook)})")
    cls = type(module)
    for attribute, value in vars(module).items():
        if not callable(value) or isinstance(value, nn.Module | torch.Tensor | type):
            continue
        own_method = getattr(value, "__self__", None) is module and getattr(cls, attribute, None) is getattr(
            value, "__func__", None
        )
        if _foreign(value) or (hasattr(cls, attribute) and not own_method):
            found.append(f"{name or 'model'}.{attribute}: an instance attribute {value!r} ({_code_file(value)})")
    return found


def model_leftovers(model: nn.Module, modules: list[tuple[str, nn.Module]] | None = None) -> list[str]:
    """What a vlprune session (or a test) left on ``model``: forward hooks and pre-hooks whose code is not torch's or
    transformers' (the model's own output-capturing hooks are transformers'), and instance attributes that are
    functions written outside them or that shadow a method of the module's class (per-instance wrappers such as
    ``get_image_features`` or Qwen3-VL's ``_deepstack_process``)."""
    found = []
    for name, module in model.named_modules() if modules is None else modules:
        found += _module_leftovers(name, module)
    return found


def _fingerprint(model: nn.Module, processor: Any) -> tuple:
    """What a test must not change on a shared model: its weights (in-place changes bump a tensor's version), their
    dtypes and devices, its config, and its tokenizer's padding side."""
    parameters = list(model.parameters())
    tokenizer = getattr(processor, "tokenizer", processor)
    return (
        sum(p._version for p in parameters),
        sorted({(str(p.dtype), str(p.device)) for p in parameters}),
        model.config.to_json_string(use_diff=False),
        getattr(tokenizer, "padding_side", None),
    )


def _attention_interface() -> tuple[dict, dict]:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return dict(ALL_ATTENTION_FUNCTIONS._local_mapping), dict(type(ALL_ATTENTION_FUNCTIONS)._global_mapping)


def _attached_sessions() -> dict[int, Any]:
    """id(model) -> the vlprune session attached to it now (the engine's registry of attached models)."""
    module = sys.modules.get("vlprune.engine.session")
    registry = getattr(module, "_attached", None) or {}
    return {key: session for key, claim in list(registry.items()) if (session := claim()) is not None}


def _recover(interface: tuple[dict, dict]) -> None:
    """After a leak: detach every session still attached (which also restores the attention interface), then put
    back what the interface held and forget what vlprune's attention observer still holds, so that one leak fails
    one test and not the ones after it."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    for session in _attached_sessions().values():
        session.detach()
    if _attention_interface() != interface:
        ALL_ATTENTION_FUNCTIONS._local_mapping.clear()
        ALL_ATTENTION_FUNCTIONS._local_mapping.update(interface[0])
        observer = sys.modules.get("vlprune.engine.observer")
        for name in ("_observers", "_saved"):
            state = getattr(observer, name, None)
            if isinstance(state, dict):
                state.clear()


def _check(handed: _Handed) -> list[str]:
    found = []
    for index, (name, module) in enumerate(handed.modules):
        sizes = _sizes(module)
        if sizes == handed.sizes[index]:
            continue  # unchanged since it was last seen clean
        problems = _module_leftovers(name, module)
        if problems:
            found += problems
        else:
            handed.sizes[index] = sizes  # transformers installs its own output-capturing hooks at the first call
    if id(handed.model) in _attached_sessions():
        found.append("a vlprune session is still attached")
    if handed.used and _fingerprint(handed.model, handed.processor) != handed.fingerprint:
        found.append("its weights, dtype, config or tokenizer changed (take private_model for a test that does this)")
    handed.used = False
    return found


@pytest.fixture(autouse=True)
def _no_leftovers() -> Any:
    """After every test: no hook, wrapper, session or weight change is left on any model the factory handed out, and
    transformers' attention interface holds what it held before the test. A shared model with a leftover is dropped
    from the cache (the next test builds it again) and the interface is restored, so one leak fails one test."""
    interface = _attention_interface()
    yield
    problems = []
    for key, handed in list(_models.items()):
        found = _check(handed)
        if found:
            options = ", ".join(f"{name}={value!r}" for name, value in key[2])
            problems += [f"the shared {key[0]} model ({options}):", *(f"  {problem}" for problem in found)]
            del _models[key]
    if _attention_interface() != interface:
        problems.append("transformers' attention interface differs from before the test")
    if problems:
        _recover(interface)
        pytest.fail("left after the test:\n" + "\n".join(problems), pytrace=False)


@pytest.fixture
def no_model_load(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if a command loads a model: its check must come first."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded before the bad value was reported")

    monkeypatch.setattr(vlprune.api, "load_model", refuse)
