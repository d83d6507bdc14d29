"""Captured execution: the pruned prefill and every decode step as static-shape graphs, for ``torch.compile`` and,
on a GPU, CUDA graphs.

Eager PyTorch launches each kernel from the host, so a batch-1 prefill of a 7B model is bound by launches, not by the
GPU, and pruning saves little time. Here the language model's prefill (stages included) and each decode step run
with shapes that depend only on a :class:`GraphKey` and without reading the device:

* prompts are left-padded to a length **bucket**; the budget fixes every stage's kept count, so each layer's
  sequence length is known before the call;
* every layer gets a static KV cache (transformers' ``StaticLayer``) sized for its own pruned prefill plus the
  answer, and the masks cover that capacity;
* the engine's stage code (the same code as the eager engine's, :class:`~vlprune.engine.session.PruningSession`)
  runs in a static mode: counts come from the plan, index checks and the statistics' host reads wait until the
  graph has run, and the fused Triton kernels give way to their PyTorch references, which the compiler fuses itself.

The vision encoder and the projector run eagerly before the prefill graph (their hooks record what the pruner
reads). One compiled prefill and one compiled decode step are kept per key (bucket, batch, visual tokens per sample,
answer capacity) and reused; :attr:`CapturedSession.compilations` counts the graphs compiled. On a GPU the default
backend is inductor with CUDA graphs (``mode="reduce-overhead"``); on the CPU, inductor. Vision-encoder pruning
(FlowCut) runs in the eager part, and its tokens enter the graph at the budget's count. A method or input that
cannot run with static shapes (a count the data decides, a ragged batch, VAR's attention rewrite) runs on the eager
engine, with one warning naming the method and the reason.

Decoding is greedy.
"""

from __future__ import annotations

import inspect
import os
import runpy
import types
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import DynamicCache

from vlprune.engine.layout import format_mask, prefill_mask
from vlprune.engine.session import Phase, PruningSession, _now
from vlprune.errors import VlpruneError
from vlprune.pruners.base import PROBE_TOKENS, Pruner

# Every 64 tokens up to 1024 (a LLaVA-1.5 prompt is 576 visual tokens plus its text), then every 256 up to 4096:
# padding costs prefill compute, each bucket a compilation.
DEFAULT_BUCKETS = (*range(64, 1025, 64), *range(1280, 4097, 256))
PROMPT_TENSORS = ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids")
BACKEND_VARIABLE = "VLPRUNE_COMPILE_BACKEND"  # the default backend ("eager": the captured graph without codegen)
ANSWER_ROOM = 16  # answer capacities are multiples of this, so nearby max_new_tokens share a graph


_VLPRUNE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
# Frames in these never make a warning's place: vlprune and torch (its no_grad wrapper), and runpy (`python -m`).
_INTERNAL_PREFIXES = (
    _VLPRUNE_DIR,
    os.path.dirname(os.path.abspath(torch.__file__)) + os.sep,
    os.path.abspath(runpy.__file__),
)


def _caller_stacklevel() -> int:
    """The ``stacklevel`` that attributes a warning, issued by the function that calls this one, to the first frame
    outside vlprune and torch, the user's call: a fixed level lands in torch's ``no_grad`` wrapper or in vlprune's
    own API, depending on the caller. Without such a frame (vlprune's CLI) the outermost vlprune frame."""
    frame, level, outermost_vlprune = inspect.currentframe().f_back, 1, 1
    while frame is not None:
        filename = os.path.abspath(frame.f_code.co_filename)
        if not filename.startswith(_INTERNAL_PREFIXES):
            return level
        if filename.startswith(_VLPRUNE_DIR):
            outermost_vlprune = level
        frame, level = frame.f_back, level + 1
    return outermost_vlprune


@dataclass(frozen=True)
class GraphKey:
    """What fixes every shape of a captured prefill and decode step."""

    bucket: int  # padded prompt length
    batch: int
    visual: int  # visual tokens per sample
    answer_room: int  # decode steps the caches hold


class _LayerInputs(Exception):  # noqa: N818 (a signal, not an error)
    """Raised by the hook on decoder layer 0 to stop the model once its inputs are known."""

    def __init__(self, hidden: torch.Tensor, kwargs: dict[str, Any]) -> None:
        super().__init__("decoder layer 0 reached")
        self.hidden, self.kwargs = hidden, kwargs


@dataclass
class _Captured:
    """The compiled graphs of one key and the buffers they read."""

    prefill: Callable[..., torch.Tensor]
    decode: Callable[..., torch.Tensor]
    cache: Any
    lengths: list[int]  # per layer, the prefill's length
    capacities: list[int]  # per layer, KV slots


class CapturedSession(PruningSession):
    """A pruner attached to a model, running its prefill and decode steps as captured graphs (see the module).

    Args:
        model, pruner, positions, num_visual: as :class:`PruningSession`.
        buckets: the padded prompt lengths (default every 64 tokens to 1024, then every 256 to 4096; a longer
            prompt is padded to a multiple of 256).
        backend: a ``torch.compile`` backend name ("inductor", "aot_eager", "eager", ...) or callable; None: the
            ``VLPRUNE_COMPILE_BACKEND`` environment variable, else inductor.
        cuda_graphs: capture CUDA graphs (inductor's ``triton.cudagraphs``); None: on CUDA models only.

    Attributes:
        compilations: graphs compiled so far (a second call with the same key compiles none).
        capture_seconds: per key, the seconds its first call took (compilation and capture included).
        fallback_reason: why this session runs on the eager engine, or None.
        first_token_seconds: the last captured call's time from its start to the first token.
        prompt_hidden: (B, D) the last captured call's final hidden state of each prompt's last token.
    """

    def __init__(
        self,
        model: nn.Module,
        pruner: Pruner,
        *,
        positions: str | None = None,
        num_visual: int | None = None,
        buckets: Sequence[int] = DEFAULT_BUCKETS,
        backend: str | Callable[..., Any] | None = None,
        cuda_graphs: bool | None = None,
    ) -> None:
        super().__init__(model, pruner, positions=positions, num_visual=num_visual)
        if not buckets or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in buckets):
            self.detach()
            raise VlpruneError(f"buckets={buckets!r} must be positive ints")
        self.buckets = tuple(sorted(buckets))
        self._backend = backend if backend is not None else os.environ.get(BACKEND_VARIABLE, "inductor")
        if isinstance(self._backend, str) and self._backend not in _known_backends():
            self.detach()
            raise VlpruneError(
                f"compile backend {self._backend!r} is not known to torch.compile; choose one of {_known_backends()}"
            )
        self._cuda_graphs = cuda_graphs
        self._capturing = False
        self._graphs: dict[GraphKey, _Captured] = {}
        self._warned: set[str] = set()
        self.compilations = 0
        self.capture_seconds: dict[GraphKey, float] = {}
        self.fallback_reason = self._static_refusal()
        self.first_token_seconds: float | None = None
        self.prompt_hidden: torch.Tensor | None = None
        self._cache_name = _cache_keyword(self.adapter.decoder_layers[0])

    def release_hint(self) -> str:
        return (
            "it is a captured session (compile=True), which a compiled vlprune.Pipeline keeps from its first call "
            "until Pipeline.close() or the end of its `with pipeline:` block: close that pipeline (or detach the "
            "session) first"
        )

    # ------------------------------------------------------------------ what can run captured

    def _static_refusal(self) -> str | None:
        """Why this method cannot run with static shapes on this model, or None."""
        probe = self.pruner.plan_for_family(self.adapter.family, PROBE_TOKENS, self.shape.num_layers)
        if any(stage.keep is None for stage in probe):
            return "a stage keeps a number of tokens that the data decides"
        if self._redistribution is not None:
            return "it rewrites the attention of the decoder layers during decoding"
        if getattr(self.adapter.model, "lm_head", None) is None:
            return "the model has no language-model head (pass the ...ForConditionalGeneration model)"
        return None

    def _fallback(self, reason: str) -> None:
        if reason not in self._warned:
            self._warned.add(reason)
            name = self.pruner.name if self._redistribution is None else f"{self.pruner.name}+var"
            warnings.warn(f"{name} runs eagerly, not captured: {reason}", stacklevel=_caller_stacklevel())

    # ------------------------------------------------------------------ generation

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        max_new_tokens: int,
        eos_token_id: int | Sequence[int] | None = None,
        pad_token_id: int | None = None,
        return_logits: bool = False,
        **model_inputs: Any,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Greedy generation as ``model.generate(..., do_sample=False)``: the prompt followed by up to
        ``max_new_tokens`` tokens (``pad_token_id`` after a sample's end of sequence). ``return_logits`` also gives
        the (steps, B, vocab) logits of each generated token.
        """
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise VlpruneError(f"max_new_tokens={max_new_tokens!r} must be an int of at least 1")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        generation = self.model.generation_config
        eos = _token_set(eos_token_id if eos_token_id is not None else generation.eos_token_id)
        pad = pad_token_id if pad_token_id is not None else generation.pad_token_id
        pad = pad if pad is not None else (min(eos) if eos else 0)
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, **model_inputs}
        reason = self.fallback_reason or self._input_refusal(inputs)
        if reason is not None:
            self._fallback(reason)
            return self._eager_generate(inputs, max_new_tokens, eos, pad, return_logits)
        try:
            return self._captured_generate(inputs, max_new_tokens, eos, pad, return_logits)
        except torch._dynamo.exc.TorchDynamoException as error:
            # Tracing found something a static graph cannot hold (a host loop over data, a device read): this
            # method runs eagerly from now on.
            self._graphs.clear()
            self.fallback_reason = f"its code cannot be captured ({_first_line(error)})"
            self._fallback(self.fallback_reason)
            return self._eager_generate(inputs, max_new_tokens, eos, pad, return_logits)

    def _input_refusal(self, inputs: dict[str, Any]) -> str | None:
        counts = self.adapter.visual_token_mask(inputs["input_ids"]).sum(dim=1).tolist()
        if len(set(counts)) > 1:
            return f"the samples hold different numbers of visual tokens {counts} (a ragged batch)"
        if counts[0] == 0:
            return "the prompts have no visual tokens"
        return None

    def _eager_generate(
        self, inputs: dict[str, Any], max_new_tokens: int, eos: set[int], pad: int, return_logits: bool
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        output = self.model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=sorted(eos) or None,
            pad_token_id=pad,
            output_logits=return_logits,
            return_dict_in_generate=return_logits,
        )
        if not return_logits:
            return output
        return output.sequences, torch.stack(output.logits)

    def _captured_generate(
        self, inputs: dict[str, Any], max_new_tokens: int, eos: set[int], pad: int, return_logits: bool
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        prompt_ids = inputs["input_ids"]
        length = prompt_ids.shape[1]
        bucket = self.bucket_for(length)
        padded = _left_padded(inputs, bucket, pad)
        visual = self.adapter.visual_token_mask(padded["input_ids"].cpu())
        key = GraphKey(bucket, prompt_ids.shape[0], int(visual[0].sum()), _room(max_new_tokens))
        started = _now(prompt_ids.device)
        hidden, layer_kwargs = self._layer_inputs(padded)
        captured = self._graphs.get(key) or self._build(key, hidden, layer_kwargs, padded, visual)
        logits, decode_inputs = self._run_prefill(captured, key, hidden, layer_kwargs, padded, visual)
        steps = [logits]
        tokens = [logits.argmax(dim=-1)]
        self.first_token_seconds = _now(prompt_ids.device) - started
        finished = torch.zeros(key.batch, dtype=torch.bool, device=logits.device)
        embed = self.adapter.language_model.get_input_embeddings()
        for step in range(1, max_new_tokens):
            finished = finished | _is_eos(tokens[-1], eos)
            if bool(finished.all()):  # one read per step, as generate's stopping criteria
                break
            step_tensor = torch.tensor(step - 1, device=logits.device)
            token_embeds = embed(tokens[-1][:, None])
            _new_graph_step(logits.device)
            logits = captured.decode(token_embeds, step_tensor, *decode_inputs).clone()
            steps.append(logits)
            tokens.append(torch.where(finished, pad, logits.argmax(dim=-1)))
        if key not in self.capture_seconds:
            self.capture_seconds[key] = _now(prompt_ids.device) - started
        sequences = torch.cat([prompt_ids, torch.stack(tokens, dim=1)], dim=1)
        return (sequences, torch.stack(steps)) if return_logits else sequences

    def bucket_for(self, length: int) -> int:
        """The padded length of a prompt of ``length`` tokens."""
        for bucket in self.buckets:
            if length <= bucket:
                return bucket
        return -(-length // 256) * 256

    # ------------------------------------------------------------------ the eager part: vision, embeddings

    def _layer_inputs(self, padded: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        """Run the model up to decoder layer 0 (vision encoder, projector, embedding merge, positions) and return
        that layer's hidden states and keyword arguments."""

        def stop(module: nn.Module, args: tuple, kwargs: dict) -> None:
            raise _LayerInputs(args[0] if args else kwargs["hidden_states"], kwargs)

        def record_positions(module: nn.Module, args: tuple, kwargs: dict) -> None:
            self._prompt_positions = kwargs.get("position_ids")
            self._deepstack_planes = kwargs.get("deepstack_visual_embeds")

        handle = self.adapter.decoder_layers[0].register_forward_pre_hook(stop, with_kwargs=True)
        recorder = self.adapter.language_model.register_forward_pre_hook(record_positions, with_kwargs=True)
        self._capturing = True
        self._prompt_positions = self._deepstack_planes = None
        try:
            extra = {}
            positions = self.adapter.prompt_position_ids(padded["attention_mask"])
            if positions is not None:
                extra["position_ids"] = positions
            self.adapter.base_model(**padded, **extra, use_cache=False)
        except _LayerInputs as reached:
            return reached.hidden, reached.kwargs
        finally:
            self._capturing = False
            handle.remove()
            recorder.remove()
        raise RuntimeError("the model returned without calling its first decoder layer")

    def _on_model_call(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._capturing:  # the captured prefill runs the layers itself
            self.adapter.check_call(kwargs)
            return None
        return super()._on_model_call(module, args, kwargs)

    # ------------------------------------------------------------------ building a key's graphs

    def _build(
        self, key: GraphKey, hidden: torch.Tensor, layer_kwargs: dict[str, Any], padded: dict, visual
    ) -> _Captured:
        """A key's static caches and compiled graphs. The layers' prefill lengths come from one eager run of the
        same static path (with a growing cache), which also fixes every stage's recycled count."""
        probe = DynamicCache(config=self.adapter.config.text_config)
        recorded = self._bridge.recorded()
        self._start_static_prefill(padded, visual, hidden.device, room=0)
        self._static = False  # this run is the eager engine's: it checks the pruner's indices
        try:
            self._run_layers(hidden, self._first_kwargs(layer_kwargs, hidden, room=0), probe)
        finally:
            self._static, self._key_room, self._deferred = False, 0, []
            self._prefill = None
            self._phase = Phase.IDLE
            self._bridge.restore(recorded)
        lengths = [int(layer.keys.shape[-2]) for layer in probe.layers]
        capacities = [length + key.answer_room for length in lengths]
        backend = self._counting_backend(hidden.device)
        captured = _Captured(
            prefill=self._compiled(CapturedSession._prefill_graph, backend),
            decode=self._compiled(CapturedSession._decode_graph, backend),
            cache=_static_cache(capacities, hidden, self.shape),
            lengths=lengths,
            capacities=capacities,
        )
        self._graphs[key] = captured
        return captured

    def _compiled(self, function: Callable[..., Any], backend: Callable[..., Any]) -> Callable[..., Any]:
        """``function`` bound to this session and compiled whole. Dynamo keeps its graphs per code object and stops
        compiling one after a few variants; each key's graph gets a code object of its own, so keys and sessions
        never share (or exhaust) a cache."""
        own = types.FunctionType(
            function.__code__.replace(), function.__globals__, function.__name__, function.__defaults__
        )
        return torch.compile(own.__get__(self), backend=backend, fullgraph=True, dynamic=False)

    def _counting_backend(self, device: torch.device) -> Callable[..., Any]:
        backend = self._backend
        cuda_graphs = self._cuda_graphs if self._cuda_graphs is not None else device.type == "cuda"
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
            self.compilations += 1
            return inner(graph, example)

        return counting

    # ------------------------------------------------------------------ the prefill

    def _start_static_prefill(self, padded: dict[str, Any], visual: torch.Tensor, device: torch.device, room: int):
        """The engine's prefill state for a static run: layout and geometry computed on the host, then moved."""
        self._static, self._key_room, self._deferred = True, room, []
        mask = padded["attention_mask"].cpu()
        self._start_prefill(visual, mask, {**padded, "input_ids": padded["input_ids"].cpu()})
        prefill = self._prefill
        prefill.padded = True
        self._geometry()
        self._bridge.prepare()
        # The text rows' width is a shape of the graph, so it must follow from the key, not from the prompt's own
        # text: every token of the bucket that is not visual (the rows past a prompt's text are marked invalid).
        width = padded["input_ids"].shape[1] - int(visual[0].sum())
        prefill.layout = replace(prefill.layout, text_width=width).to(device)
        prefill.original_real = prefill.original_real.to(device)
        self._phase = Phase.PREFILL

    def _check_vision_counts(self) -> None:
        """A static stage after vision-encoder pruning keeps the tokens whose patches the tower kept, so each
        sample must have kept exactly the stage's count (the eager engine's pruner checks this; the graph cannot)."""
        if not self._vision_stages.active:
            return
        stage = self._prefill.plan[0]
        counts = self._vision_stages.token_kept(self._geometry()).sum(dim=1).tolist()
        if stage.layer != 0 or any(count != stage.keep for count in counts):
            raise VlpruneError(
                f"{self.pruner.name} kept {counts} tokens per sample in the vision tower, and its stage at layer "
                f"{stage.layer} keeps {stage.keep}: the budget counts the tokens of one image; pass one image a sample"
            )

    def _first_kwargs(self, layer_kwargs: dict[str, Any], hidden: torch.Tensor, room: int) -> dict[str, Any]:
        """Decoder layer 0's keyword arguments for a static prefill: the model's positions and cos/sin, and a mask
        over the layer's cache slots."""
        prefill = self._prefill
        mask = prefill_mask(prefill.layout.real, self._mask_style, hidden.dtype, True, room)
        kwargs = {"attention_mask": mask, "position_embeddings": layer_kwargs["position_embeddings"]}
        if layer_kwargs.get("position_ids") is not None:
            kwargs["position_ids"] = layer_kwargs["position_ids"]
        return kwargs

    def _run_layers(
        self, hidden: torch.Tensor, kwargs: dict[str, Any], cache: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The decoder layers over the prompt (the session's hooks run the stages): the last token's logits and its
        final (normalised) hidden state, as ``generate``'s last ``hidden_states`` entry holds it."""
        planes = self._deepstack_planes if self.adapter.deepstack else None
        for index, layer in enumerate(self.adapter.decoder_layers):
            output = layer(hidden, **kwargs, **{self._cache_name: cache, "use_cache": True})
            hidden = output[0] if isinstance(output, tuple) else output
            if planes is not None and index < len(planes):
                hidden = self._add_deepstack_plane(hidden, planes[index])
        last = self.adapter.language_model.norm(hidden[:, -1:])
        return self.adapter.model.lm_head(last)[:, 0], last[:, 0]

    def _add_deepstack_plane(self, hidden: torch.Tensor, plane: torch.Tensor) -> torch.Tensor:
        """DeepStack (Qwen3-VL) after a prefill layer: each current visual token that is an original one gets its
        own row of ``plane`` (V, D), the rows of the batch's visual tokens in prompt order; recycled tokens get none.
        The model's ``_deepstack_process`` indexes with a boolean mask, whose shape depends on the data; here every
        sample has the same number of visual tokens, so the rows are found by arithmetic."""
        layout = self._prefill.layout
        slots = layout.visual_slots  # (B, N)
        origin = torch.gather(layout.origin, 1, slots)
        per_sample = plane.shape[0] // hidden.shape[0]
        rows = torch.arange(hidden.shape[0], device=slots.device)[:, None] * per_sample + origin.clamp(min=0)
        added = plane.to(hidden.device, hidden.dtype)[rows] * (origin >= 0)[..., None].to(hidden.dtype)
        index = slots[..., None].expand(-1, -1, hidden.shape[-1])
        return hidden.scatter_add(1, index, added)

    def _prefill_graph(
        self, hidden: torch.Tensor, kwargs: dict[str, Any], cache: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self._run_layers(hidden, kwargs, cache)

    def _run_prefill(
        self, captured: _Captured, key: GraphKey, hidden: torch.Tensor, layer_kwargs: dict, padded: dict, visual
    ) -> tuple[torch.Tensor, list[Any]]:
        self._start_static_prefill(padded, visual, hidden.device, room=key.answer_room)
        try:
            self._check_vision_counts()
            for layer in captured.cache.layers:
                layer.cumulative_length.zero_()
            kwargs = self._first_kwargs(layer_kwargs, hidden, room=key.answer_room)
            _new_graph_step(hidden.device)
            logits, last_hidden = (output.clone() for output in captured.prefill(hidden, kwargs, captured.cache))
            self.prompt_hidden = last_hidden
            prefill = self._prefill
            self._add_deferred_stats()
            segments = self._decode_segments(captured, prefill, padded)
            self._finish_prefill(None)
            self._report_cache(captured, hidden)
        finally:
            self._static, self._key_room, self._deferred = False, 0, []
            self._prefill = None
            self._phase = Phase.IDLE
        return logits, segments

    def _report_cache(self, captured: _Captured, hidden: torch.Tensor) -> None:
        """The statistics' KV cache: each layer's prefill length, as the eager engine reports it (the static cache
        holds ``answer_room`` more slots per layer)."""
        batch = hidden.shape[0]
        per_token = 2 * batch * self.shape.num_kv_heads * self.shape.head_dim * hidden.element_size()
        stats = replace(
            self.stats, kv_cache_lengths=list(captured.lengths), kv_cache_bytes=per_token * sum(captured.lengths)
        )
        self.stats = self.history[-1] = stats

    # ------------------------------------------------------------------ decoding

    def _decode_segments(self, captured: _Captured, prefill: Any, padded: dict[str, Any]) -> list[Any]:
        """Per layer group holding the same prefill, what a decode step's masks and positions start from: the
        prefill's real slots (padded to the cache's capacity), its length, and each sample's next position."""
        real = prefill.original_real
        next_positions = _next_positions(self._prompt_positions, real).to(real.device)
        groups = [(0, prefill.original_real, torch.zeros_like(next_positions))]
        groups += [
            (seg.first_layer, seg.real, seg.position_shift.to(next_positions.device)) for seg in prefill.segments
        ]
        inputs = []
        for first_layer, real, shift in groups:
            capacity = captured.capacities[first_layer]
            slots = torch.nn.functional.pad(real.to(next_positions.device), (0, capacity - real.shape[1]), value=False)
            inputs.append((slots, real.shape[1], next_positions - shift))
        self._layer_group = [
            max(index for index, (first, _, _) in enumerate(groups) if first <= layer)
            for layer in range(self.shape.num_layers)
        ]
        return [inputs, captured.cache]

    def _decode_graph(
        self, token_embeds: torch.Tensor, step: torch.Tensor, groups: list[Any], cache: Any
    ) -> torch.Tensor:
        """One decode step over the static caches: each layer group's mask (its prefill's real slots, the answer so
        far and this token) and positions (its next position plus the step)."""
        hidden = token_embeds
        per_group = []
        for slots, filled, next_positions in groups:
            columns = torch.arange(slots.shape[1], device=slots.device)
            allowed = slots | ((columns >= filled) & (columns <= filled + step))[None, :]
            mask = format_mask(allowed[:, None, None, :], self._mask_style, hidden.dtype)
            positions = (next_positions + step)[:, None]
            per_group.append((mask, positions, self._rotary(hidden, positions)))
        for index, layer in enumerate(self.adapter.decoder_layers):
            mask, positions, embeddings = per_group[self._layer_group[index]]
            output = layer(
                hidden,
                attention_mask=mask,
                position_ids=positions,
                position_embeddings=embeddings,
                **{self._cache_name: cache, "use_cache": True},
            )
            hidden = output[0] if isinstance(output, tuple) else output
        return self.adapter.model.lm_head(self.adapter.language_model.norm(hidden))[:, -1]


# ---------------------------------------------------------------------- helpers


def _next_positions(positions: torch.Tensor | None, real: torch.Tensor) -> torch.Tensor:
    """(B,) the position of the first token after each prompt, as ``generate`` numbers it: one past the largest
    position of the prompt's real tokens (for multimodal RoPE, over its temporal, height and width rows; the model
    stores the same as ``rope_deltas``). ``positions``: the language model's (B, L) or ([text,] 3, B, L) ids."""
    if positions is None:
        return real.long().sum(dim=-1)
    if positions.dim() == 3:
        positions = positions[-3:].amax(dim=0)  # the multimodal rows (a leading text row, if any, is left out)
    positions = positions.expand(real.shape[0], -1).to(real.device)
    return positions.masked_fill(~real, -1).amax(dim=-1) + 1


def _new_graph_step(device: torch.device) -> None:
    """On CUDA, tell the CUDA-graph runtime a new step starts: the outputs of earlier replays are cloned by then, so
    it may reuse their memory."""
    if device.type == "cuda":
        torch.compiler.cudagraph_mark_step_begin()


def _known_backends() -> list[str]:
    return sorted({"eager", "aot_eager", "inductor", *torch._dynamo.list_backends()})


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0][:200] if lines else type(error).__name__


def _cache_keyword(layer: nn.Module) -> str:
    """The decoder layers' name for the KV cache argument (transformers 5.24 renamed ``past_key_values``)."""
    parameters = inspect.signature(layer.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def _static_cache(capacities: list[int], hidden: torch.Tensor, shape: Any) -> Any:
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


def _left_padded(inputs: dict[str, Any], bucket: int, pad: int) -> dict[str, Any]:
    """The inputs with every prompt-shaped tensor left-padded to ``bucket`` tokens."""
    padded = dict(inputs)
    length = inputs["input_ids"].shape[1]
    for name in PROMPT_TENSORS:
        value = inputs.get(name)
        if isinstance(value, torch.Tensor) and value.dim() == 2 and value.shape[1] == length:
            fill = pad if name == "input_ids" else 0
            padded[name] = torch.nn.functional.pad(value, (bucket - length, 0), value=fill)
    return padded


def _room(max_new_tokens: int) -> int:
    return -(-max_new_tokens // ANSWER_ROOM) * ANSWER_ROOM


def _token_set(tokens: int | Sequence[int] | None) -> set[int]:
    if tokens is None:
        return set()
    return {int(tokens)} if isinstance(tokens, int) else {int(t) for t in tokens}


def _is_eos(tokens: torch.Tensor, eos: set[int]) -> torch.Tensor:
    if not eos:
        return torch.zeros_like(tokens, dtype=torch.bool)
    return torch.isin(tokens, torch.tensor(sorted(eos), device=tokens.device))
