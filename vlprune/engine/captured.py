"""Captured execution: the pruned prefill and every decode step as static-shape graphs, for ``torch.compile`` and,
on a GPU, CUDA graphs.

Eager PyTorch launches each kernel from the host, so a batch-1 prefill of a 7B model is bound by launches, not by the
GPU, and pruning saves little time. Here the language model's prefill (stages included) and each decode step run
with shapes that depend only on a :class:`GraphKey` and without reading the device:

* prompts are left-padded to a length **bucket**; the budget fixes every stage's kept count, so each layer's
  sequence length is known before the call;
* every layer gets a static KV cache (transformers' ``StaticLayer``) sized for its own pruned prefill plus the
  answer, and the masks cover that capacity;
* the engine's stage code (the eager :class:`~vlprune.engine.session.PruningSession` this session holds, and its
  :class:`~vlprune.engine.stage_runner.StageRunner`) runs in a static mode
  (:class:`~vlprune.engine.static_mode.StaticMode`): counts come from the plan, index checks and the statistics'
  host reads wait until the graph has run, and the fused Triton kernels give way to their PyTorch references, which
  the compiler fuses itself.

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
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

from vlprune.engine.graphs import (
    ANSWER_ROOM,
    BACKEND_VARIABLE,
    DEFAULT_BUCKETS,
    PROMPT_TENSORS,
    CapturedGraphs,
    GraphKey,
    answer_room,
    bucket_for,
    counting_backend,
    first_line,
    known_backends,
    left_padded,
    new_graph_step,
)
from vlprune.engine.prefill import clock
from vlprune.engine.session import PruningSession
from vlprune.engine.static_prefill import StaticPrefill
from vlprune.engine.stats import PrefillStats
from vlprune.errors import VlpruneError
from vlprune.needs import Need
from vlprune.pruners.base import PROBE_TOKENS, Pruner

__all__ = ["ANSWER_ROOM", "BACKEND_VARIABLE", "DEFAULT_BUCKETS", "PROMPT_TENSORS", "CapturedSession", "GraphKey"]

_known_backends = known_backends  # the name vlprune.api imports
_RELEASE_HINT = (
    "it is a captured session (compile=True), which a compiled vlprune.Pipeline keeps from its first call "
    "until Pipeline.close() or the end of its `with pipeline:` block: close that pipeline (or detach the "
    "session) first"
)
_VLPRUNE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
# Frames in these never make a warning's place: vlprune and torch (its no_grad wrapper), and runpy (`python -m`).
_INTERNAL_PREFIXES = (
    _VLPRUNE_DIR,
    os.path.dirname(os.path.abspath(torch.__file__)) + os.sep,
    os.path.abspath(runpy.__file__),
)


class CapturedSession:
    """A pruner attached to a model, running its prefill and decode steps as captured graphs (see the module). It
    holds an eager :class:`PruningSession` (``eager``), whose hooks run the stages and ``model.generate``.

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
        backend: str | Any | None = None,
        cuda_graphs: bool | None = None,
    ) -> None:
        self.eager = PruningSession(
            model, pruner, positions=positions, num_visual=num_visual, release_hint=_RELEASE_HINT
        )
        self.model, self.adapter, self.pruner = model, self.eager.adapter, pruner
        self.positions, self.shape = self.eager.positions, self.eager.shape
        if not buckets or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in buckets):
            self.detach()
            raise VlpruneError(f"buckets={buckets!r} must be positive ints")
        self.buckets = tuple(sorted(buckets))
        self._backend = backend if backend is not None else os.environ.get(BACKEND_VARIABLE, "inductor")
        if isinstance(self._backend, str) and self._backend not in known_backends():
            self.detach()
            raise VlpruneError(
                f"compile backend {self._backend!r} is not known to torch.compile; choose one of {known_backends()}"
            )
        self._cuda_graphs = cuda_graphs
        self._prefill = StaticPrefill(self.eager)
        self._graphs: dict[GraphKey, CapturedGraphs] = {}
        self._warned: set[str] = set()
        self.compilations = 0
        self.capture_seconds: dict[GraphKey, float] = {}
        self.fallback_reason = self._static_refusal()
        self.first_token_seconds: float | None = None
        self.prompt_hidden: torch.Tensor | None = None

    # ------------------------------------------------------------------ the session

    @property
    def stats(self) -> PrefillStats | None:
        """Statistics of the most recent prefill (captured or eager), or None before the first one."""
        return self.eager.stats

    @property
    def history(self) -> list[PrefillStats]:
        """Statistics of every prefill since attaching."""
        return self.eager.history

    @property
    def attached(self) -> bool:
        return self.eager.attached

    def detach(self) -> None:
        """Remove every hook and restore the attention interface. Safe to call twice."""
        self.eager.detach()

    def release_hint(self) -> str:
        return self.eager.release_hint()

    def __enter__(self) -> CapturedSession:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.detach()

    # ------------------------------------------------------------------ what can run captured

    def _static_refusal(self) -> str | None:
        """Why this method cannot run with static shapes on this model, or None."""
        probe = self.pruner.plan_for(self.adapter.traits, PROBE_TOKENS, self.shape.num_layers)
        if any(stage.keep is None for stage in probe):
            return "a stage keeps a number of tokens that the data decides"
        if any(Need.INSTRUCTION_IDS in stage.needs for stage in probe):
            return "it turns the instruction's token ids back into words with the tokenizer, on the host"
        if self.eager.rewrites_attention:
            return "it rewrites the attention of the decoder layers during decoding"
        if getattr(self.adapter.model, "lm_head", None) is None:
            return "the model has no language-model head (pass the ...ForConditionalGeneration model)"
        return None

    def _fallback(self, reason: str) -> None:
        if reason not in self._warned:
            self._warned.add(reason)
            name = self.pruner.name if not self.eager.rewrites_attention else f"{self.pruner.name}+var"
            warnings.warn(f"{name} runs eagerly, not captured: {reason}", stacklevel=_caller_stacklevel())

    def _input_refusal(self, inputs: dict[str, Any]) -> str | None:
        counts = self.adapter.visual_token_mask(inputs["input_ids"]).sum(dim=1).tolist()
        if len(set(counts)) > 1:
            return f"the samples hold different numbers of visual tokens {counts} (a ragged batch)"
        if counts[0] == 0:
            return "the prompts have no visual tokens"
        return None

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
        except (torch._dynamo.exc.TorchDynamoException, GuardOnDataDependentSymNode) as error:
            # Tracing found something a static graph cannot hold (a host loop over data, a device read): this
            # method runs eagerly from now on.
            self._graphs.clear()
            self.fallback_reason = f"its code cannot be captured ({first_line(error)})"
            self._fallback(self.fallback_reason)
            return self._eager_generate(inputs, max_new_tokens, eos, pad, return_logits)

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
        padded = left_padded(inputs, bucket, pad)
        visual = self.adapter.visual_token_mask(padded["input_ids"].cpu())
        key = GraphKey(bucket, prompt_ids.shape[0], int(visual[0].sum()), answer_room(max_new_tokens))
        started = clock(prompt_ids.device)
        hidden, layer_kwargs = self._prefill.layer_inputs(padded)
        captured = self._graphs.get(key) or self._build(key, hidden, layer_kwargs, padded, visual)
        logits, decode_inputs = self._prefill.run(captured, key, hidden, layer_kwargs, padded, visual)
        self.prompt_hidden = self._prefill.prompt_hidden
        steps = [logits]
        tokens = [logits.argmax(dim=-1)]
        self.first_token_seconds = clock(prompt_ids.device) - started
        finished = torch.zeros(key.batch, dtype=torch.bool, device=logits.device)
        embed = self.adapter.language_model.get_input_embeddings()
        for step in range(1, max_new_tokens):
            finished = finished | _is_eos(tokens[-1], eos)
            if bool(finished.all()):  # one read per step, as generate's stopping criteria
                break
            step_tensor = torch.tensor(step - 1, device=logits.device)
            token_embeds = embed(tokens[-1][:, None])
            new_graph_step(logits.device)
            logits = captured.decode(token_embeds, step_tensor, *decode_inputs).clone()
            steps.append(logits)
            tokens.append(torch.where(finished, pad, logits.argmax(dim=-1)))
        if key not in self.capture_seconds:
            self.capture_seconds[key] = clock(prompt_ids.device) - started
        sequences = torch.cat([prompt_ids, torch.stack(tokens, dim=1)], dim=1)
        return (sequences, torch.stack(steps)) if return_logits else sequences

    def bucket_for(self, length: int) -> int:
        """The padded length of a prompt of ``length`` tokens."""
        return bucket_for(self.buckets, length)

    def _build(
        self, key: GraphKey, hidden: torch.Tensor, layer_kwargs: dict[str, Any], padded: dict, visual: torch.Tensor
    ) -> CapturedGraphs:
        """A key's static caches and compiled graphs, kept for the next call with the same key."""
        cuda_graphs = self._cuda_graphs if self._cuda_graphs is not None else hidden.device.type == "cuda"
        backend = counting_backend(self._backend, cuda_graphs, self._count_compilation)
        captured = self._graphs[key] = self._prefill.build(key, hidden, layer_kwargs, padded, visual, backend)
        return captured

    def _count_compilation(self) -> None:
        self.compilations += 1


# ---------------------------------------------------------------------- helpers


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


def _token_set(tokens: int | Sequence[int] | None) -> set[int]:
    if tokens is None:
        return set()
    return {int(tokens)} if isinstance(tokens, int) else {int(t) for t in tokens}


def _is_eos(tokens: torch.Tensor, eos: set[int]) -> torch.Tensor:
    if not eos:
        return torch.zeros_like(tokens, dtype=torch.bool)
    return torch.isin(tokens, torch.tensor(sorted(eos), device=tokens.device))
