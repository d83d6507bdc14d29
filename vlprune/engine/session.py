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

import enum
import time
import weakref
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from vlprune.adapters import ModelAdapter, adapter_for
from vlprune.engine import observer
from vlprune.engine.compaction import compact
from vlprune.engine.decode import DecodeState, Segment, cache_size, segment_of_layer, step_mask
from vlprune.engine.deepstack import wrap_deepstack
from vlprune.engine.layout import (
    Layout,
    initial_layout,
    order_after_stage,
    prefill_mask,
)
from vlprune.engine.packed_vision import PackedVisionStages
from vlprune.engine.plan_check import check_plan, checked_keep_index
from vlprune.engine.ragged import ragged_order, sample_context, stacked_recycled
from vlprune.engine.redistribution import Redistribution
from vlprune.engine.scoring import QueryAttention, observed_rows, own_layer_rows, query_rows
from vlprune.engine.stats import PrefillStats, StageStats, layer_counts, prefill_flops, stage_stats, view_counts
from vlprune.engine.vision import VisionStages
from vlprune.engine.vision_bridge import VisionBridge
from vlprune.errors import VlpruneError
from vlprune.geometry import VisualGeometry
from vlprune.kernels import gather_tokens, kernel_setting
from vlprune.pruners.base import (
    PROBE_TOKENS,
    Pruner,
    QueryRows,
    Selection,
    StageContext,
    StagePlan,
    keep_range_of,
    sample_keep_error,
)

POSITION_MODES = ("original", "reindex")
_attached: dict[int, weakref.ref[PruningSession]] = {}
"""id(model) -> the session attached to it. Weak, so that a model dropped without detaching frees its entry's claim
when a new model reuses its id."""


class Phase(enum.Enum):
    IDLE = "idle"
    PREFILL = "prefill"
    DECODE = "decode"


@dataclass
class _Prefill:
    """The state of the prefill in progress."""

    plan: list[StagePlan]
    layout: Layout
    visual_counts: list[int]  # per sample, visual tokens of the prompt
    current_counts: list[int]  # per sample, visual tokens now (they differ after a stage of a ragged batch)
    sample_plans: list[list[StagePlan]]  # per sample, its plan for its own count
    image_inputs: dict[str, Any]  # what the call itself carries of the adapter's geometry inputs
    original_real: torch.Tensor
    original_counts: list[int]
    padded: bool
    num_visual: int
    started: float
    segments: list[Segment]
    stage_stats: list[StageStats]
    query_attention: dict[int, QueryAttention]
    mask: Any = None
    stage_at: dict[int, StagePlan] = field(default_factory=dict)
    initial_visual: torch.Tensor | None = None  # (B, N0, D) layer-0 input of the original visual tokens
    initial_text: tuple[torch.Tensor, torch.Tensor] | None = None  # (B, T, D) and (B, T) validity
    geometry: VisualGeometry | None = None  # computed when a stage first needs it
    host_views: list[list[int]] | None = None  # geometry.view on the host, for the statistics
    visual_in: list[list[int]] = field(default_factory=list)  # per stage, each sample's visual tokens before it


class PruningSession:
    """A pruner attached to a model. Use it as a context manager, or call :meth:`detach` yourself.

    Args:
        model: a supported Hugging Face VLM (``LlavaForConditionalGeneration``), left unmodified.
        pruner: the pruner to run, from :func:`vlprune.pruners.create`.
        positions: "original" keeps each kept token's RoPE position (exact with respect to masking); "reindex"
            renumbers the pruned sequence contiguously; None (the default) takes the pruner's reference's handling
            (:meth:`Pruner.reference_positions`). The mode that ran is in the statistics.
        num_visual: visual tokens per sample, when the caller knows it: the budget is then checked at attach time.

    Attributes:
        stats: statistics of the most recent prefill, or None before the first one.
        history: statistics of every prefill since attaching.
    """

    def __init__(
        self, model: nn.Module, pruner: Pruner, *, positions: str | None = None, num_visual: int | None = None
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
        # The layers a plan uses do not depend on the token count; the budget is checked now only if it is known.
        known = num_visual if num_visual is not None else PROBE_TOKENS
        probe = pruner.plan_for_family(self.adapter.family, known, self.shape.num_layers)
        check_plan(pruner.name, probe, known, self.shape.num_layers)
        self._bridge = VisionBridge(self.adapter, pruner, probe)
        self._first_stage_layer = min((stage.layer for stage in probe), default=self.shape.num_layers)
        self._score_layers = sorted(
            {stage.layer - 1 for stage in probe if stage.query_rows is not None and not stage.own_layer_attention}
        )
        self._needs_initial = any(stage.initial_embeddings for stage in probe)
        stages = PackedVisionStages if self.adapter.vision_chunked else VisionStages
        self._vision_stages = stages(self.adapter, pruner, self._bridge.image_inputs)
        modifier = getattr(pruner, "modifier", None)
        self._redistribution = (
            None
            if modifier is None
            else Redistribution(self.adapter, self.shape.num_layers, self._prefill_layout, modifier)
        )
        self._mask_style = self.adapter.config.text_config._attn_implementation
        self.stats: PrefillStats | None = None
        self.history: list[PrefillStats] = []
        self._phase = Phase.IDLE
        self._prefill: _Prefill | None = None
        self._decode: DecodeState | None = None
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._observed: list[nn.Module] = []
        # Static mode (vlprune.engine.captured): counts from the plan, no device reads until the prefill has run.
        self._static = False
        self._key_room = 0  # KV slots beyond the prefill that the masks cover (a static cache's room for the answer)
        self._deferred: list[tuple[StagePlan, torch.Tensor, list[int], list[int]]] = []
        self._attach()

    # ------------------------------------------------------------------ attach / detach

    def _attach(self) -> None:
        holder = _session_attached_to(self.model)
        if holder is not None:
            raise VlpruneError(f"this model already has a vlprune session attached; {holder.release_hint()}")
        _attached[id(self.model)] = weakref.ref(self)
        try:
            base = self.adapter.base_model
            self._handles.append(base.register_forward_pre_hook(self._on_model_call, with_kwargs=True))
            self._handles.append(base.register_forward_hook(self._on_model_return, with_kwargs=True))
            if self._needs_initial and self._first_stage_layer > 0:
                first = self.adapter.decoder_layers[0]
                self._handles.append(first.register_forward_pre_hook(self._on_first_layer, with_kwargs=True))
            # Layers before the first stage never need their inputs changed, in prefill or in decode.
            for index in range(self._first_stage_layer, self.shape.num_layers):
                hook = self._layer_hook(index)
                layer = self.adapter.decoder_layers[index]
                self._handles.append(layer.register_forward_pre_hook(hook, with_kwargs=True))
            watched: dict[nn.Module, observer.Observer] = {}
            for index in self._score_layers:
                watched[self.adapter.decoder_layers[index].self_attn] = self._on_language_attention
            if self._bridge.watches_feature_layer:
                watched[self.adapter.vision_feature_attention()] = self._bridge.on_attention
            self._handles.extend(self._bridge.install())
            if self.adapter.deepstack:
                self._handles.append(wrap_deepstack(self.adapter.language_model, self._pruned_layout))
            if self._vision_stages.active:
                handles, vision_watched = self._vision_stages.install()
                self._handles.extend(handles)
                for module, callback in vision_watched.items():
                    watched[module] = observer.chained(watched[module], callback) if module in watched else callback
            if self._redistribution is not None:
                handles, rewritten = self._redistribution.install()
                self._handles.extend(handles)
                for module, callback in rewritten.items():
                    watched[module] = observer.chained(watched[module], callback) if module in watched else callback
            if watched:
                observer.observe(watched, self.adapter.attention_implementations())
                self._observed = list(watched)
        except BaseException:
            self.detach()
            raise

    def detach(self) -> None:
        """Remove every hook and restore the attention interface. Safe to call twice."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self._observed:
            observer.stop_observing(self._observed)
            self._observed = []
        if _session_attached_to(self.model) is self:  # a refused second session must not release the first's claim
            del _attached[id(self.model)]
        self._prefill = self._decode = None
        self._forget_vision()
        self._phase = Phase.IDLE

    def _pruned_layout(self) -> Layout | None:
        """The layout of the prefill in progress once a stage has changed it, else None."""
        prefill = self.prefill_state()
        return prefill.layout if prefill is not None and prefill.segments else None

    def _prefill_layout(self) -> Layout | None:
        """The layout of the prefill in progress, or None outside a prefill."""
        prefill = self.prefill_state()
        return prefill.layout if prefill is not None else None

    def prefill_state(self) -> _Prefill | None:
        """The prefill in progress, or None outside a prefill."""
        return self._prefill if self._phase is Phase.PREFILL else None

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def release_hint(self) -> str:
        """How the user releases the model from this session, for a second attach's refusal."""
        return "detach it first (session.detach(), or leave its `with vlprune.attach(...)` block)"

    def __enter__(self) -> PruningSession:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.detach()

    # ------------------------------------------------------------------ phase detection

    def _on_model_call(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        cache = _cache_argument(kwargs)
        attention_mask = kwargs.get("attention_mask")
        has_images = kwargs.get("pixel_values") is not None or bool(kwargs.get("mm_encoder_outputs"))
        self.adapter.check_call(kwargs)
        visual = None if input_ids is None else self.adapter.visual_token_mask(input_ids)
        if has_images and (visual is None or not bool(visual.any())):
            raise VlpruneError(
                "the prompt has no image token: put the processor's image token (for LLaVA '<image>') in the text "
                "so the processor expands it into visual tokens"
            )
        if attention_mask is not None and attention_mask.dim() != 2:
            raise VlpruneError(f"vlprune needs a 2-D attention mask, got shape {tuple(attention_mask.shape)}")
        self._phase = Phase.IDLE
        if self._redistribution is not None:
            self._redistribution.decoding = cache is not None and cache is self._redistribution.cache
        if visual is not None and visual.shape[1] > 1 and not _has_past(cache) and bool(visual.any()):
            self._start_prefill(visual, attention_mask, kwargs)
        elif self._decode is not None and cache is not None and cache is self._decode.cache:
            self._start_decode_step(attention_mask, input_ids.shape[1] if input_ids is not None else 1)

    def _on_model_return(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if self._phase is Phase.PREFILL and self._prefill is not None:
            cache = (
                _cache_argument(kwargs) or getattr(output, "cache", None) or getattr(output, "past_key_values", None)
            )
            self._finish_prefill(cache)
            if self._redistribution is not None:
                self._redistribution.cache = cache
        elif self._phase is Phase.DECODE and self._decode is not None:
            self._decode.generated += self._decode.step_length
        self._phase = Phase.IDLE

    # ------------------------------------------------------------------ prefill

    def _start_prefill(self, visual: torch.Tensor, attention_mask: torch.Tensor | None, model_kwargs: dict) -> None:
        layout = initial_layout(visual, attention_mask)
        # One transfer for every count the prefill needs on the host (each .tolist() on a GPU is a synchronisation).
        counts, real_counts = torch.stack([visual.sum(1), layout.real.sum(1)]).tolist()
        if len(set(counts)) == 1:
            layout = replace(layout, visual_width=counts[0])
        plans = self._sample_plans(counts)
        plan = plans[0]
        self._prefill = _Prefill(
            plan=plan,
            layout=layout,
            visual_counts=counts,
            current_counts=list(counts),
            sample_plans=plans,
            image_inputs={
                name: model_kwargs[name] for name in self.adapter.geometry_inputs if model_kwargs.get(name) is not None
            },
            original_real=layout.real,
            original_counts=real_counts,
            padded=any(count != visual.shape[1] for count in real_counts),
            num_visual=max(counts),
            stage_at={stage.layer: stage for stage in plan},
            started=_now(visual.device),
            segments=[],
            stage_stats=[],
            query_attention={},
        )
        self._decode = None
        self._phase = Phase.PREFILL

    def _sample_plans(self, counts: list[int]) -> list[list[StagePlan]]:
        """Each sample's plan for its own visual-token count (one plan per distinct count): a budget is per sample,
        so the samples of a ragged batch keep their own numbers of tokens, at the same layers."""
        plans: dict[int, list[StagePlan]] = {}
        for count in sorted(set(counts)):
            try:
                plan = self.pruner.plan_for_family(self.adapter.family, count, self.shape.num_layers)
                check_plan(self.pruner.name, plan, count, self.shape.num_layers)
            except VlpruneError as error:
                if len(set(counts)) == 1:  # "per sample" is then true of every sample
                    raise
                raise _for_sample(error, counts.index(count), counts) from None
            if plan and plan[0].layer < self._first_stage_layer:
                raise RuntimeError(f"{self.pruner.name}: the plan's layers changed with the number of visual tokens")
            plans[count] = plan
        layers = {tuple(stage.layer for stage in plan) for plan in plans.values()}
        if len(layers) > 1:
            raise VlpruneError(
                f"{self.pruner.name} prunes at layers {sorted(layers)} for the samples' visual-token counts "
                f"{sorted(plans)}; one batch needs the same layers for every sample: batch images of one size"
            )
        return [plans[count] for count in counts]

    def _layer_hook(self, index: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            if self._phase is Phase.PREFILL and self._prefill is not None:
                return self._prefill_layer(index, args, kwargs)
            if self._phase is Phase.DECODE and self._decode is not None:
                return self._decode_layer(index, args, kwargs)
            return None

        return hook

    def _on_first_layer(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._phase is Phase.PREFILL and self._prefill is not None:
            self._keep_initial_embeddings(args[0] if args else kwargs["hidden_states"])

    def _keep_initial_embeddings(self, hidden: torch.Tensor) -> None:
        prefill = self._prefill
        layout = prefill.layout.to(hidden.device)
        prefill.initial_visual = gather_tokens(hidden, layout.visual_slots)
        rows, valid = layout.text_rows
        prefill.initial_text = (gather_tokens(hidden, rows), valid)

    def _prefill_layer(self, index: int, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        prefill = self._prefill
        stage = prefill.stage_at.get(index)
        if index == 0 and self._needs_initial:
            self._keep_initial_embeddings(args[0] if args else kwargs["hidden_states"])
        if stage is not None:
            hidden = args[0] if args else kwargs["hidden_states"]
            if not prefill.segments:
                self._adopt_model_positions(kwargs, hidden.shape[0])
            hidden = self._run_stage(stage, hidden)
            args, kwargs = _with_hidden(args, kwargs, hidden)
        if not prefill.segments:
            return None
        layout = prefill.layout
        kwargs["attention_mask"] = prefill.mask
        kwargs["position_embeddings"] = layout.position_embeddings
        if kwargs.get("position_ids") is not None:
            kwargs["position_ids"] = layout.positions
        return args, kwargs

    def _adopt_model_positions(self, kwargs: dict, batch: int) -> None:
        """Take the positions and cos/sin the model computed for the full prompt as the starting layout's."""
        prefill = self._prefill
        cos, sin = kwargs["position_embeddings"]
        positions = kwargs.get("position_ids")
        layout = prefill.layout
        if positions is not None:
            positions = positions.expand(batch, -1) if positions.dim() == 2 else positions
        else:
            positions = layout.positions
        prefill.layout = replace(
            layout,
            positions=positions.to(layout.positions.device),
            position_embeddings=(cos.expand(batch, -1, -1), sin.expand(batch, -1, -1)),
        )

    def _run_stage(self, stage: StagePlan, hidden: torch.Tensor) -> torch.Tensor:
        prefill = self._prefill
        device = hidden.device
        layout = prefill.layout = prefill.layout.to(device)
        slots = layout.visual_slots  # (B, N)
        if stage.query_rows is not None and stage.own_layer_attention:
            prefill.query_attention[stage.layer] = self._own_layer_rows(stage, hidden, layout)
        query = prefill.query_attention.pop(stage.layer, None)
        bridge, origin, geometry = self._bridge, gather_tokens(layout.origin, slots), self._geometry()
        image_inputs = {**bridge.image_inputs, **prefill.image_inputs}
        vision_kept = None
        if stage.layer == 0 and self._vision_stages.active:
            vision_kept = self._vision_kept(geometry, origin)
            hidden = self._vision_stages.renormalised(hidden, slots, geometry, image_inputs)
        present = int(slots.shape[1])
        keep = present if stage.keep is None else min(stage.keep, present) if stage.keep_at_most else stage.keep
        context = StageContext(
            layer=stage.layer,
            keep=keep,
            visual_hidden=gather_tokens(hidden, slots),
            visual_positions=gather_tokens(layout.positions, slots),
            visual_origin=origin,
            geometry=geometry.take(origin),
            query_attention=None if query is None else query.visual,
            query_mask=None if query is None else query.mask,
            query_positions=None if query is None else self._query_positions(stage, layout, device),
            query_row_attention=None if query is None else query.own,
            visual_values=None if query is None else query.values,
            query_values=None if query is None else query.query_values,
            rotary=self._rotary_for(hidden) if stage.query_rows is not None else None,
            vision_cls_attention=bridge.cls_scores(geometry, layout, slots)
            if stage.vision_cls_attention and not bridge.cls_substituted
            else None,
            vision_features=bridge.feature_tokens(geometry, layout, slots) if stage.vision_features else None,
            projector=self.adapter.token_projector if stage.vision_features else None,
            vision_keys=bridge.key_tokens(geometry, layout, slots) if stage.vision_keys else None,
            vision_kept=vision_kept,
            **self._initial_embeddings(slots, stage.initial_embeddings),
            **bridge.map_inputs(hidden.shape[0], prefill.num_visual, stage.vision_attention),
            **bridge.crop_inputs(geometry, image_inputs, stage.vision_crop_attention),
            vision_received_attention=bridge.received(geometry, layout, slots)
            if stage.vision_received_attention or (stage.vision_cls_attention and bridge.cls_substituted)
            else None,
            **self._text_tokens(layout, hidden, stage.text_tokens),
            stage_index=len(prefill.segments),
            num_layers=self.shape.num_layers,
        )
        if stage.query_rows is not None and query is None:
            raise RuntimeError(f"no attention rows were captured at layer {stage.layer - 1}")
        ragged = len(set(prefill.current_counts)) > 1 or len(set(prefill.visual_counts)) > 1
        if ragged or (stage.keep is None and context.batch_size > 1):
            return self._run_ragged_stage(stage, hidden, context, slots)
        selection = self.pruner.select(context)
        keep_index = checked_keep_index(
            selection,
            context,
            fixed=stage.keep is not None,
            keep_order=selection.ordered and self.positions == "reindex",
            check_values=not self._static,
        )
        kept_slots = gather_tokens(slots, keep_index)
        recycled = selection.recycled
        num_recycled = 0 if recycled is None else recycled.hidden.shape[1]
        order = order_after_stage(layout, kept_slots, num_recycled)
        new_hidden, new_layout = compact(
            layout, hidden, order, kept_slots, selection, rotary=self._rotary, keep_positions=self._keeps_positions
        )
        prefill.layout = new_layout
        prefill.mask = prefill_mask(
            new_layout.real, self._mask_style, hidden.dtype, prefill.padded or self._static, self._key_room
        )
        kept_origin = gather_tokens(context.visual_origin, keep_index)
        recycled_counts = [num_recycled] * context.batch_size
        out = [keep_index.shape[1] + num_recycled] * context.batch_size
        self._add_segment(stage, new_layout, out, device)
        if self._static:  # the statistics read the kept indices once the prefill has run
            self._deferred.append((stage, kept_origin, recycled_counts, out))
        else:
            self._add_stage_stats(stage, kept_origin.tolist(), recycled_counts, out)
        return new_hidden

    def _run_ragged_stage(
        self, stage: StagePlan, hidden: torch.Tensor, context: StageContext, slots: torch.Tensor
    ) -> torch.Tensor:
        """A stage of a batch whose samples hold different numbers of visual tokens: the pruner runs on each sample
        alone (see :mod:`vlprune.engine.ragged`), and the shorter samples of the next sequence are left-filled."""
        prefill = self._prefill
        layout, device = prefill.layout, hidden.device
        stage_index = len(prefill.segments)
        keep_order = self.positions == "reindex"
        kept_slots, kept_origin, selections = [], [], []
        for sample, (count, original) in enumerate(zip(prefill.current_counts, prefill.visual_counts, strict=True)):
            budget = prefill.sample_plans[sample][stage_index].keep
            if budget is not None and stage.keep_at_most:
                budget = min(budget, count)
            alone = sample_context(context, sample, count, original, budget if budget is not None else count)
            selection = self.pruner.select(alone)
            index = checked_keep_index(
                selection, alone, fixed=budget is not None, keep_order=selection.ordered and keep_order
            )[0]
            kept_slots.append(slots[sample, index])
            kept_origin.append(alone.visual_origin[0, index].tolist())
            selections.append(selection)
        if any(s.kept_hidden is not None for s in selections):  # in-place merges replace kept states before the gather
            hidden = hidden.clone()
            for sample, selection in enumerate(selections):
                if selection.kept_hidden is not None:
                    hidden[sample, kept_slots[sample]] = selection.kept_hidden[0].to(hidden.dtype)
        recycled = stacked_recycled(selections, hidden.shape[-1], hidden)
        recycled_counts = [0 if s.recycled is None else s.recycled.hidden.shape[1] for s in selections]
        order, filler = ragged_order(layout.is_visual, kept_slots, recycled_counts)
        new_hidden, new_layout = compact(
            layout,
            hidden,
            order,
            slots,
            Selection(keep_index=slots, recycled=recycled),
            rotary=self._rotary,
            keep_positions=self._keeps_positions,
            filler=filler,
        )
        prefill.layout = new_layout
        prefill.padded = prefill.padded or bool(filler.any())
        prefill.mask = prefill_mask(new_layout.real, self._mask_style, hidden.dtype, prefill.padded)
        out = [len(kept) + extra for kept, extra in zip(kept_origin, recycled_counts, strict=True)]
        self._add_segment(stage, new_layout, out, device)
        self._add_stage_stats(stage, kept_origin, recycled_counts, out)
        return new_hidden

    def _add_segment(self, stage: StagePlan, new_layout: Layout, out: list[int], device: torch.device) -> None:
        """The segment of layers that starts at the stage's layer, from each sample's visual tokens after the stage
        (``out``). Pruning removes only real tokens and recycling adds real ones, so the counts follow without a
        device read."""
        prefill = self._prefill
        counts_in = prefill.current_counts
        # From the stage's own counts only (not the prompts' lengths), so a captured graph holds for every prompt of
        # its bucket.
        previous = prefill.segments[-1].dropped if prefill.segments else [0] * len(counts_in)
        dropped = [total + before - now for total, before, now in zip(previous, counts_in, out, strict=True)]
        prefill.segments.append(
            Segment(
                first_layer=stage.layer,
                real=new_layout.real,
                position_shift=torch.tensor(dropped if self.positions == "reindex" else [0] * len(out), device=device),
                dropped=dropped,
            )
        )
        prefill.visual_in.append(list(counts_in))
        prefill.current_counts = out

    def _add_stage_stats(
        self, stage: StagePlan, kept_origin: list[list[int]], recycled: list[int], out: list[int]
    ) -> None:
        """The stage's statistics, from each sample's kept tokens (their original indices, -1 for earlier recycled
        ones) and recycled count."""
        prefill = self._prefill
        counts_in = prefill.visual_in[len(prefill.stage_stats)]
        prefill.stage_stats.append(stage_stats(stage.layer, counts_in, kept_origin, recycled, out, self._host_views()))

    def _add_deferred_stats(self) -> None:
        """The statistics of the stages a static prefill ran, read from the device now that it has run."""
        for stage, kept_origin, recycled, out in self._deferred:
            self._add_stage_stats(stage, kept_origin.tolist(), recycled, out)
        self._deferred = []

    def _geometry(self) -> VisualGeometry:
        """The prefill's visual-token geometry, from the call's arguments or, when ``generate`` encoded the images
        before the call, from what the bridge recorded then."""
        prefill = self._prefill
        if prefill.geometry is None:
            inputs = {**self._bridge.image_inputs, **prefill.image_inputs}
            on_host = self.adapter.visual_geometry(inputs, prefill.visual_counts, torch.device("cpu"))
            prefill.host_views = on_host.view.tolist()
            prefill.geometry = on_host.to(prefill.layout.is_visual.device)
        return prefill.geometry

    def _host_views(self) -> list[list[int]]:
        """Each sample's original visual tokens' views (``VisualGeometry.view``), on the host."""
        self._geometry()
        return self._prefill.host_views

    def _query_positions(self, stage: StagePlan, layout: Layout, device: torch.device) -> torch.Tensor:
        rows, _ = query_rows(stage.query_rows, layout, device)
        return torch.gather(layout.positions.to(device), 1, rows)

    def _rotary_for(self, hidden: torch.Tensor):
        def rotary(positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return self._rotary(hidden, positions)

        return rotary

    def _own_layer_rows(self, stage: StagePlan, hidden: torch.Tensor, layout: Layout) -> QueryAttention:
        """(B, R, N) attention of the stage's query rows to the visual tokens, from its own layer's queries and keys."""
        mask = self._prefill.mask
        if mask is None and self._prefill.padded:
            mask = prefill_mask(layout.real, self._mask_style, hidden.dtype, True)
        attention = self.adapter.decoder_layers[stage.layer].self_attn
        return own_layer_rows(attention, self.adapter.query_key, stage, hidden, layout, mask)

    def _rotary(self, hidden: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.adapter.rotary_embedding(hidden, positions)

    @property
    def _keeps_positions(self) -> bool:
        return self.positions != "reindex"

    def _initial_embeddings(self, slots: torch.Tensor, wanted: bool) -> dict[str, torch.Tensor | None]:
        if not wanted:
            return {}
        prefill = self._prefill
        if prefill.initial_visual is None or prefill.initial_text is None:
            raise RuntimeError("the language model's input embeddings were not captured for this prefill")
        text, valid = prefill.initial_text
        return {
            "initial_visual_hidden": prefill.initial_visual.to(slots.device),
            "initial_text_hidden": text.to(slots.device),
            "initial_text_mask": valid.to(slots.device),
        }

    def _text_tokens(self, layout: Layout, hidden: torch.Tensor, wanted: bool) -> dict[str, torch.Tensor | None]:
        if not wanted:
            return {"text_hidden": None, "text_mask": None}
        rows, valid = query_rows(QueryRows.TEXT, layout, hidden.device)
        return {"text_hidden": gather_tokens(hidden, rows), "text_mask": valid}

    def _forget_vision(self) -> None:
        self._bridge.forget()
        self._vision_stages.forget()

    def _vision_kept(self, geometry: VisualGeometry, origin: torch.Tensor) -> torch.Tensor:
        """(B, N) True at the current visual tokens whose patches the vision-encoder stages kept."""
        kept = self._vision_stages.token_kept(geometry)
        return gather_tokens(kept, origin.clamp(min=0)) & (origin >= 0)

    def _finish_prefill(self, cache: Any) -> None:
        prefill = self._prefill
        seconds = _now(prefill.original_real.device) - prefill.started
        batch = prefill.original_real.shape[0]
        layer_segments = segment_of_layer(prefill.segments, self.shape.num_layers)
        real_per_layer, visual_per_layer = layer_counts(
            layer_segments,
            [segment.dropped for segment in prefill.segments],
            prefill.stage_stats,
            prefill.original_counts,
            prefill.visual_counts,
        )
        unpruned = [prefill.original_counts] * self.shape.num_layers
        flops, base_flops = prefill_flops(real_per_layer, self.shape), prefill_flops(unpruned, self.shape)
        lengths, size = cache_size(cache)
        views = self._host_views()
        stats = PrefillStats(
            batch_size=batch,
            visual_tokens=prefill.num_visual,
            visual_tokens_per_sample=list(prefill.visual_counts),
            visual_views=[
                view_counts(views[sample], list(range(count)), 0) for sample, count in enumerate(prefill.visual_counts)
            ],
            stages=prefill.stage_stats,
            visual_tokens_per_layer=visual_per_layer,
            equivalent_visual_tokens=sum(visual_per_layer) / len(visual_per_layer),
            prefill_flops=flops,
            unpruned_prefill_flops=base_flops,
            flops_ratio=flops / base_flops,
            prefill_seconds=seconds,
            kv_cache_lengths=lengths,
            kv_cache_bytes=size,
            positions=self.positions,
        )
        self.stats = stats
        self.history.append(stats)
        self._decode = None
        if cache is not None and prefill.segments:
            self._decode = DecodeState(
                cache=cache,
                prompt_length=prefill.original_real.shape[1],
                segments=prefill.segments,
                segment_of_layer=layer_segments,
            )
        self._prefill = None
        self._forget_vision()

    # ------------------------------------------------------------------ attention rows

    def _on_language_attention(
        self,
        module: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        mask: Any,
        scaling: float | None,
    ) -> None:
        if self._phase is not Phase.PREFILL or self._prefill is None:
            return
        prefill = self._prefill
        for stage in prefill.plan:
            if stage.query_rows is None or stage.own_layer_attention or stage.layer - 1 != module.layer_idx:
                continue
            prefill.query_attention[stage.layer] = observed_rows(
                stage, prefill.layout, query, key, value, mask, scaling
            )

    # ------------------------------------------------------------------ decode

    def _start_decode_step(self, attention_mask: torch.Tensor | None, query_length: int) -> None:
        decode = self._decode
        decode.step_masks, decode.step_positions = {}, {}
        decode.step_attention_mask = attention_mask
        decode.step_length = query_length
        self._phase = Phase.DECODE

    def _decode_layer(self, index: int, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        decode = self._decode
        segment_index = decode.segment_of_layer[index]
        if segment_index is None:
            return None
        segment = decode.segments[segment_index]
        hidden = args[0] if args else kwargs["hidden_states"]
        if segment_index not in decode.step_masks:
            decode.step_masks[segment_index] = step_mask(decode, segment, hidden, self._mask_style)
        kwargs["attention_mask"] = decode.step_masks[segment_index]
        if self.positions == "reindex":
            if segment_index not in decode.step_positions:
                positions = kwargs.get("position_ids")
                if positions is None:
                    raise VlpruneError("positions='reindex' needs position_ids during decoding (generate passes them)")
                shifted = positions.expand(hidden.shape[0], -1) - segment.position_shift[:, None].to(positions.device)
                decode.step_positions[segment_index] = (shifted, self._rotary(hidden, shifted))
            shifted, embeddings = decode.step_positions[segment_index]
            kwargs["position_ids"] = shifted
            kwargs["position_embeddings"] = embeddings
        return args, kwargs


# ---------------------------------------------------------------------- helpers


def _session_attached_to(model: nn.Module) -> PruningSession | None:
    claim = _attached.get(id(model))
    session = None if claim is None else claim()
    return session if session is not None and session.model is model else None


def _cache_argument(kwargs: dict) -> Any:
    # transformers 5.24 renamed `past_key_values` to `cache`; both spellings reach the hooks depending on the version.
    return kwargs.get("cache", kwargs.get("past_key_values"))


def _has_past(cache: Any) -> bool:
    return cache is not None and int(cache.get_seq_length()) > 0


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _for_sample(error: VlpruneError, sample: int, counts: list[int]) -> VlpruneError:
    """A plan's error for one sample of a ragged batch (whose samples have ``counts`` visual tokens), naming it."""
    keep_range = keep_range_of(error)
    if keep_range is not None:
        return sample_keep_error(*keep_range, sample, counts)
    return VlpruneError(f"{error} (sample {sample} of the batch has {counts[sample]} visual tokens)")


def _with_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (hidden, *args[1:]), kwargs
    kwargs["hidden_states"] = hidden
    return args, kwargs


def resolve_positions(pruner: Pruner, positions: str | None, adapter: ModelAdapter | None = None) -> str:
    """``positions``, or the pruner's reference's handling when it is None; on a family that numbers positions in
    one way only (``ModelAdapter.position_modes``: the Qwen-VL family keeps the kept tokens' multimodal positions),
    None gives that way.

    Raises:
        VlpruneError: a value other than None, "original" or "reindex", or one the model's family does not support.
    """
    modes = POSITION_MODES if adapter is None else adapter.position_modes
    if positions is None:
        positions = pruner.reference_positions()
        return positions if positions in modes else modes[0]
    if positions not in POSITION_MODES:
        raise VlpruneError(
            f"positions={positions!r} is not valid; choose one of {POSITION_MODES} or None (the method's)"
        )
    if positions not in modes:
        raise VlpruneError(
            f"positions={positions!r} is not supported on {adapter.family}, whose multimodal RoPE positions vlprune "
            f"keeps as they are; use one of {modes}"
        )
    return positions
