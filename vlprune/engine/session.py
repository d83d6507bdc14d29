"""The execution engine: attach a pruner to an unmodified Hugging Face VLM, prune during prefill, decode correctly.

Mechanism (see ``shared/reference/hf-internals.md`` §0 for why this design):

* a forward pre-hook on the base model reads ``input_ids`` and the 2-D attention mask of every call and decides the
  phase: *prefill* (image tokens and no cache yet), *decode* (the cache this session pruned) or *idle* (anything else);
* an attention-interface wrapper (:mod:`vlprune.engine.observer`) hands the post-RoPE queries and keys of the layer
  before each stage, and of the vision feature layer, to the engine, which computes only the attention rows a pruner
  asks for; the model keeps its SDPA or eager attention;
* a forward pre-hook on every decoder layer runs a stage at its layer (gathers hidden states, positions, cos/sin) and
  hands every later layer the pruned positions and mask; during decode it hands each layer the mask of its own,
  shorter, KV cache (``DynamicCache`` holds a different length per layer).

Detaching removes every hook and restores the attention interface, so the model computes exactly what it computed
before. Nothing in the model, its config or its weights is changed at any point.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from vlprune.adapters import ModelAdapter, adapter_for
from vlprune.engine import attachments, observer
from vlprune.engine.decode import DecodeState, start_step, step_layer_inputs
from vlprune.engine.deepstack import wrap_deepstack
from vlprune.engine.layout import Layout
from vlprune.engine.phase import Phase, read_model_call, returned_cache
from vlprune.engine.plan_check import check_plan
from vlprune.engine.positions import POSITION_MODES, resolve_positions
from vlprune.engine.prefill import Prefill, sample_plans, start_prefill
from vlprune.engine.redistribution import Redistribution
from vlprune.engine.stage_context import StageSources
from vlprune.engine.stage_runner import StageRunner
from vlprune.engine.static_mode import StaticMode
from vlprune.engine.stats import PrefillStats
from vlprune.engine.tower import vision_stages_for
from vlprune.engine.vision_bridge import VisionBridge
from vlprune.errors import VlpruneError
from vlprune.kernels import kernel_setting
from vlprune.pruners.base import PROBE_TOKENS, Pruner

__all__ = ["POSITION_MODES", "Phase", "PruningSession", "resolve_positions"]

_attached = attachments.registry  # id(model) -> the session attached to it (tests/conftest.py reads it here)
_RELEASE_HINT = "detach it first (session.detach(), or leave its `with vlprune.attach(...)` block)"


class PruningSession:
    """A pruner attached to a model. Use it as a context manager, or call :meth:`detach` yourself.

    Args:
        model: a supported Hugging Face VLM (``LlavaForConditionalGeneration``), left unmodified.
        pruner: the pruner to run, from :func:`vlprune.pruners.create`.
        positions: "original" keeps each kept token's RoPE position (exact with respect to masking); "reindex"
            renumbers the pruned sequence contiguously; None (the default) takes the pruner's reference's handling
            (:meth:`Pruner.reference_positions`). The mode that ran is in the statistics.
        num_visual: visual tokens per sample, when the caller knows it: the budget is then checked at attach time.
        release_hint: how the user releases the model, for a second attach's refusal (a session that wraps this
            one, such as the captured one, tells its own way).

    Attributes:
        stats: statistics of the most recent prefill, or None before the first one.
        history: statistics of every prefill since attaching.
    """

    def __init__(
        self,
        model: nn.Module,
        pruner: Pruner,
        *,
        positions: str | None = None,
        num_visual: int | None = None,
        release_hint: str = _RELEASE_HINT,
    ) -> None:
        kernel_setting()
        if not isinstance(pruner, Pruner):
            raise VlpruneError(f"pruner must be a vlprune Pruner (see vlprune.pruners.create), got {type(pruner)}")
        self.adapter: ModelAdapter = adapter_for(model)
        positions = resolve_positions(pruner, positions, self.adapter)
        self.model = model
        self.pruner = pruner
        self.positions = positions
        self.shape = self.adapter.language_model_shape()
        self._release_hint = release_hint
        # The layers a plan uses do not depend on the token count; the budget is checked now only if it is known.
        known = num_visual if num_visual is not None else PROBE_TOKENS
        probe = pruner.plan_for(self.adapter.traits, known, self.shape.num_layers)
        check_plan(pruner.name, probe, known, self.shape.num_layers)
        self.bridge = VisionBridge(self.adapter, pruner, probe)
        self._first_stage_layer = min((stage.layer for stage in probe), default=self.shape.num_layers)
        self._score_layers = sorted(
            {stage.layer - 1 for stage in probe if stage.query_rows is not None and not stage.own_layer_attention}
        )
        self._needs_initial = any(stage.initial_embeddings for stage in probe)
        self.vision_stages = vision_stages_for(self.adapter, pruner, self.bridge.image_inputs)
        modifier = getattr(pruner, "modifier", None)
        self._redistribution = (
            None
            if modifier is None
            else Redistribution(self.adapter, self.shape.num_layers, self._prefill_layout, modifier)
        )
        self.mask_style: str = self.adapter.config.text_config._attn_implementation
        sources = StageSources(
            self.adapter, self.bridge, self.vision_stages, self.mask_style, self.shape.num_layers, pruner.cls_substitute
        )
        self._runner = StageRunner(pruner, positions == "reindex", sources)
        self.stats: PrefillStats | None = None
        self.history: list[PrefillStats] = []
        self._phase = Phase.IDLE
        self._watching_calls = True
        self._prefill: Prefill | None = None
        self._decode: DecodeState | None = None
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._observed: list[nn.Module] = []
        self._attach()

    # ------------------------------------------------------------------ attach / detach

    def _attach(self) -> None:
        attachments.claim(self.model, self)
        try:
            self._install()
        except BaseException:
            self.detach()
            raise

    def _install(self) -> None:
        """The hooks on the base model and the decoder layers, and the observers of the attention calls."""
        base = self.adapter.base_model
        self._handles.append(base.register_forward_pre_hook(self._on_model_call, with_kwargs=True))
        self._handles.append(base.register_forward_hook(self._on_model_return, with_kwargs=True))
        if self._needs_initial and self._first_stage_layer > 0:
            first = self.adapter.decoder_layers[0]
            self._handles.append(first.register_forward_pre_hook(self._on_first_layer, with_kwargs=True))
        # Layers before the first stage never need their inputs changed, in prefill or in decode.
        for index in range(self._first_stage_layer, self.shape.num_layers):
            layer = self.adapter.decoder_layers[index]
            self._handles.append(layer.register_forward_pre_hook(self._layer_hook(index), with_kwargs=True))
        watched: dict[nn.Module, observer.Observer] = {}
        for index in self._score_layers:
            watched[self.adapter.decoder_layers[index].self_attn] = self._on_language_attention
        watched.update(self.bridge.observers())
        self._handles.extend(self.bridge.install())
        if self.adapter.traits.deepstack:
            self._handles.append(wrap_deepstack(self.adapter.language_model, self._pruned_layout))
        for extra in (self.vision_stages if self.vision_stages.active else None, self._redistribution):
            if extra is not None:
                handles, callbacks = extra.install()
                self._handles.extend(handles)
                for module, callback in callbacks.items():
                    watched[module] = observer.chained(watched[module], callback) if module in watched else callback
        if watched:
            observer.observe(watched, self.adapter.attention_implementations())
            self._observed = list(watched)

    def detach(self) -> None:
        """Remove every hook and restore the attention interface. Safe to call twice."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self._observed:
            observer.stop_observing(self._observed)
            self._observed = []
        attachments.release(self.model, self)
        self._prefill = self._decode = None
        self._forget_vision()
        self._phase = Phase.IDLE

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    @property
    def rewrites_attention(self) -> bool:
        """Whether the method rewrites the decoder layers' attention (VAR), in prefill and decoding."""
        return self._redistribution is not None

    def release_hint(self) -> str:
        """How the user releases the model from this session, for a second attach's refusal."""
        return self._release_hint

    def __enter__(self) -> PruningSession:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.detach()

    # ------------------------------------------------------------------ the prefill's lifetime

    def prefill_state(self) -> Prefill | None:
        """The prefill in progress, or None outside a prefill."""
        return self._prefill if self._phase is Phase.PREFILL else None

    def _pruned_layout(self) -> Layout | None:
        """The layout of the prefill in progress once a stage has changed it, else None."""
        prefill = self.prefill_state()
        return prefill.layout if prefill is not None and prefill.segments else None

    def _prefill_layout(self) -> Layout | None:
        """The layout of the prefill in progress, or None outside a prefill."""
        prefill = self.prefill_state()
        return prefill.layout if prefill is not None else None

    def begin_prefill(
        self,
        visual: torch.Tensor,
        attention_mask: torch.Tensor | None,
        model_kwargs: dict,
        static: StaticMode | None = None,
    ) -> Prefill:
        """Start a prefill over a prompt whose ``visual`` (B, L) tokens are marked: the decoder layers' hooks run its
        stages until :meth:`finish_prefill` or :meth:`end_prefill`. ``static``: it runs inside a captured graph."""
        layers, first = self.shape.num_layers, self._first_stage_layer
        plans_for = functools.partial(sample_plans, self.pruner, self.adapter.traits, layers, first)
        self._prefill = start_prefill(
            self.adapter, self.bridge, plans_for, visual, attention_mask, model_kwargs, static
        )
        self._decode = None
        self._phase = Phase.PREFILL
        return self._prefill

    def finish_prefill(self, cache: Any) -> PrefillStats:
        """The statistics of the prefill that has just run (kept in :attr:`stats` and :attr:`history`), and the
        decoding state its ``cache`` needs."""
        self.stats, self._decode = self._prefill.finish(cache, self.shape, self.positions)
        self.history.append(self.stats)
        self._prefill = None
        self._forget_vision()
        return self.stats

    def end_prefill(self) -> None:
        """Leave the prefill (finished or not): the session is idle until the model's next call."""
        self._prefill = None
        self._phase = Phase.IDLE

    @contextlib.contextmanager
    def calls_unwatched(self) -> Iterator[None]:
        """Within this block the model's calls are checked but start no prefill or decode step (a captured session
        runs the decoder layers itself)."""
        self._watching_calls = False
        try:
            yield
        finally:
            self._watching_calls = True

    def _forget_vision(self) -> None:
        self.bridge.forget()
        self.vision_stages.forget()

    # ------------------------------------------------------------------ hooks

    def _on_model_call(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if not self._watching_calls:
            self.adapter.check_call(kwargs)
            return
        call = read_model_call(self.adapter, args, kwargs)
        self._phase = Phase.IDLE
        if self._redistribution is not None:
            self._redistribution.decoding = call.cache is not None and call.cache is self._redistribution.cache
        if call.starts_prefill:
            self.begin_prefill(call.visual, call.attention_mask, {**kwargs, "input_ids": call.input_ids})
        elif self._decode is not None and call.cache is not None and call.cache is self._decode.cache:
            start_step(self._decode, call.attention_mask, call.query_length)
            self._phase = Phase.DECODE

    def _on_model_return(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if self._phase is Phase.PREFILL and self._prefill is not None:
            cache = returned_cache(kwargs, output)
            self.finish_prefill(cache)
            if self._redistribution is not None:
                self._redistribution.cache = cache
        elif self._phase is Phase.DECODE and self._decode is not None:
            self._decode.generated += self._decode.step_length
        self._phase = Phase.IDLE

    def _layer_hook(self, index: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            if self._phase is Phase.PREFILL and self._prefill is not None:
                return self._prefill_layer(index, args, kwargs)
            if self._phase is Phase.DECODE and self._decode is not None:
                hidden = args[0] if args else kwargs["hidden_states"]
                reindex, rotary = self.positions == "reindex", self.adapter.rotary_embedding
                kwargs = step_layer_inputs(self._decode, index, hidden, kwargs, self.mask_style, rotary, reindex)
                return None if kwargs is None else (args, kwargs)
            return None

        return hook

    def _on_first_layer(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._phase is Phase.PREFILL and self._prefill is not None:
            self._prefill.keep_initial_embeddings(args[0] if args else kwargs["hidden_states"])

    def _prefill_layer(self, index: int, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if index == 0 and self._needs_initial:
            self._prefill.keep_initial_embeddings(args[0] if args else kwargs["hidden_states"])
        return self._runner.layer_inputs(self._prefill, index, args, kwargs)

    def _on_language_attention(
        self, module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: Any, scaling: float
    ) -> None:
        if self._phase is Phase.PREFILL and self._prefill is not None:
            self._prefill.observe_rows(module.layer_idx, query, key, value, mask, scaling)
