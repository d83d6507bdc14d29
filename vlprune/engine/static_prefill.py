"""The prefill of a captured session: the eager part (vision encoder, projector and embedding merge, run up to
decoder layer 0), one eager probe run that fixes a key's cache lengths before its graphs are compiled, and the run of
a key's prefill graph with the eager session's stages in static mode."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import DynamicCache

from vlprune.engine.graphs import CapturedGraphs, GraphKey, compiled, new_graph_step, static_cache
from vlprune.engine.prefill import Prefill
from vlprune.engine.session import PruningSession
from vlprune.engine.static_layers import StaticLayers
from vlprune.engine.static_mode import StaticMode
from vlprune.errors import VlpruneError


class _LayerInputs(Exception):  # noqa: N818 (a signal, not an error)
    """Raised by the hook on decoder layer 0 to stop the model once its inputs are known."""

    def __init__(self, hidden: torch.Tensor, kwargs: dict[str, Any]) -> None:
        super().__init__("decoder layer 0 reached")
        self.hidden, self.kwargs = hidden, kwargs


class StaticPrefill:
    """A captured session's prefills, over the eager ``session`` whose hooks run the stages.

    Attributes:
        prompt_hidden: (B, D) the last run's final hidden state of each prompt's last token.
    """

    def __init__(self, session: PruningSession) -> None:
        self.session = session
        self.adapter = session.adapter
        self.layers = StaticLayers(session)
        self.prompt_hidden: torch.Tensor | None = None

    def layer_inputs(self, padded: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        """Run the model up to decoder layer 0 (vision encoder, projector, embedding merge, positions) and return
        that layer's hidden states and keyword arguments."""

        def stop(module: nn.Module, args: tuple, kwargs: dict) -> None:
            raise _LayerInputs(args[0] if args else kwargs["hidden_states"], kwargs)

        def record(module: nn.Module, args: tuple, kwargs: dict) -> None:
            self.layers.record(kwargs)

        handle = self.adapter.decoder_layers[0].register_forward_pre_hook(stop, with_kwargs=True)
        recorder = self.adapter.language_model.register_forward_pre_hook(record, with_kwargs=True)
        self.layers.record({})
        try:
            with self.session.calls_unwatched():  # the captured prefill runs the layers itself
                extra = {}
                positions = self.adapter.prompt_position_ids(padded["attention_mask"])
                if positions is not None:
                    extra["position_ids"] = positions
                self.adapter.base_model(**padded, **extra, use_cache=False)
        except _LayerInputs as reached:
            return reached.hidden, reached.kwargs
        finally:
            handle.remove()
            recorder.remove()
        raise RuntimeError("the model returned without calling its first decoder layer")

    def build(
        self,
        key: GraphKey,
        hidden: torch.Tensor,
        layer_kwargs: dict[str, Any],
        padded: dict[str, Any],
        visual: torch.Tensor,
        backend: Callable[..., Any],
    ) -> CapturedGraphs:
        """A key's static caches and compiled graphs. The layers' prefill lengths come from one eager run of the
        same static path (with a growing cache), which also fixes every stage's recycled count."""
        probe = DynamicCache(config=self.adapter.config.text_config)
        recorded = self.session.bridge.recorded()
        # This run is the eager engine's (no static mode): it checks the pruner's indices.
        prefill = self._start(padded, visual, hidden.device, static=None)
        try:
            self.layers.run_prefill(hidden, self.layers.first_kwargs(prefill, layer_kwargs, hidden, 0), probe)
        finally:
            self.session.end_prefill()
            self.session.bridge.restore(recorded)
        lengths = [int(layer.keys.shape[-2]) for layer in probe.layers]
        capacities = [length + key.answer_room for length in lengths]
        return CapturedGraphs(
            prefill=compiled(StaticLayers.prefill_graph, self.layers, backend),
            decode=compiled(StaticLayers.decode_graph, self.layers, backend),
            cache=static_cache(capacities, hidden, self.session.shape),
            lengths=lengths,
            capacities=capacities,
        )

    def run(
        self,
        captured: CapturedGraphs,
        key: GraphKey,
        hidden: torch.Tensor,
        layer_kwargs: dict[str, Any],
        padded: dict[str, Any],
        visual: torch.Tensor,
    ) -> tuple[torch.Tensor, list[Any]]:
        """The key's prefill graph over the prompt: the last token's logits and the decode graph's inputs; the
        session's statistics follow."""
        prefill = self._start(padded, visual, hidden.device, StaticMode(key_room=key.answer_room))
        try:
            self._check_vision_counts(prefill)
            for layer in captured.cache.layers:
                layer.cumulative_length.zero_()
            kwargs = self.layers.first_kwargs(prefill, layer_kwargs, hidden, key.answer_room)
            new_graph_step(hidden.device)
            logits, last_hidden = (output.clone() for output in captured.prefill(hidden, kwargs, captured.cache))
            self.prompt_hidden = last_hidden
            prefill.add_deferred_stats()
            decode_inputs = self.layers.decode_inputs(captured, prefill)
            self.session.finish_prefill(None)
            self._report_cache(captured, hidden)
        finally:
            self.session.end_prefill()
        return logits, decode_inputs

    def _start(
        self, padded: dict[str, Any], visual: torch.Tensor, device: torch.device, static: StaticMode | None
    ) -> Prefill:
        """The engine's prefill state for a static run: layout and geometry computed on the host, then moved."""
        mask = padded["attention_mask"].cpu()
        prefill = self.session.begin_prefill(visual, mask, {**padded, "input_ids": padded["input_ids"].cpu()}, static)
        prefill.padded = True
        prefill.geometry()
        self.session.bridge.prepare()
        # The text rows' width is a shape of the graph, so it must follow from the key, not from the prompt's own
        # text: every token of the bucket that is not visual (the rows past a prompt's text are marked invalid).
        width = padded["input_ids"].shape[1] - int(visual[0].sum())
        prefill.layout = replace(prefill.layout, text_width=width).to(device)
        prefill.original_real = prefill.original_real.to(device)
        return prefill

    def _check_vision_counts(self, prefill: Prefill) -> None:
        """A static stage after vision-encoder pruning keeps the tokens whose patches the tower kept, so each
        sample must have kept exactly the stage's count (the eager engine's pruner checks this; the graph cannot)."""
        if not self.session.vision_stages.active:
            return
        stage = prefill.plan[0]
        counts = self.session.vision_stages.token_kept(prefill.geometry()).sum(dim=1).tolist()
        if stage.layer != 0 or any(count != stage.keep for count in counts):
            raise VlpruneError(
                f"{self.session.pruner.name} kept {counts} tokens per sample in the vision tower, and its stage at "
                f"layer {stage.layer} keeps {stage.keep}: the budget counts the tokens of one image; pass one image a "
                "sample"
            )

    def _report_cache(self, captured: CapturedGraphs, hidden: torch.Tensor) -> None:
        """The statistics' KV cache: each layer's prefill length, as the eager engine reports it (the static cache
        holds ``answer_room`` more slots per layer)."""
        shape, batch = self.session.shape, hidden.shape[0]
        per_token = 2 * batch * shape.num_kv_heads * shape.head_dim * hidden.element_size()
        stats = replace(
            self.session.stats,
            kv_cache_lengths=list(captured.lengths),
            kv_cache_bytes=per_token * sum(captured.lengths),
        )
        self.session.stats = self.session.history[-1] = stats
