"""The state of one prefill while its stages run: its plans, its layout as stages change it, its segments of
decoder layers, its stages' statistics; and, once the model has run, the statistics and the decoding state it
leaves."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from vlprune.adapters import AdapterTraits, LanguageModelShape, ModelAdapter
from vlprune.engine.decode import DecodeState, Segment, cache_size, segment_of_layer
from vlprune.engine.layout import Layout, initial_layout
from vlprune.engine.plan_check import check_plan
from vlprune.engine.scoring import QueryAttention, observed_rows
from vlprune.engine.static_mode import DeferredStage, StaticMode
from vlprune.engine.stats import PrefillStats, StageStats, layer_counts, prefill_flops, stage_stats, view_counts
from vlprune.engine.vision_bridge import VisionBridge
from vlprune.errors import VlpruneError
from vlprune.geometry import VisualGeometry
from vlprune.kernels import gather_tokens
from vlprune.needs import Need
from vlprune.pruners.base import Pruner, StagePlan, keep_range_of, sample_keep_error


@dataclass
class Prefill:
    """The prefill in progress (one call of the model with image tokens)."""

    adapter: ModelAdapter
    bridge: VisionBridge  # what the vision tower's hooks recorded, for the geometry of images encoded before the call
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
    static: StaticMode | None = None  # set when the prefill runs inside a captured graph
    segments: list[Segment] = field(default_factory=list)
    stage_stats: list[StageStats] = field(default_factory=list)
    query_attention: dict[int, QueryAttention] = field(default_factory=dict)
    mask: Any = None
    stage_at: dict[int, StagePlan] = field(default_factory=dict)
    initial_visual: torch.Tensor | None = None  # (B, N0, D) layer-0 input of the original visual tokens
    initial_text: tuple[torch.Tensor, torch.Tensor] | None = None  # (B, T, D) and (B, T) validity
    instruction_ids: tuple[torch.Tensor, torch.Tensor] | None = None  # (B, T) ids of the text after the image, validity
    cached_geometry: VisualGeometry | None = None  # computed when a stage first needs it
    cached_host_views: list[list[int]] | None = None  # geometry.view on the host, for the statistics
    visual_in: list[list[int]] = field(default_factory=list)  # per stage, each sample's visual tokens before it

    @property
    def stage_index(self) -> int:
        """How many stages have run."""
        return len(self.segments)

    @property
    def ragged(self) -> bool:
        """Whether the samples hold different numbers of visual tokens, in the prompt or now."""
        return len(set(self.current_counts)) > 1 or len(set(self.visual_counts)) > 1

    def all_image_inputs(self) -> dict[str, Any]:
        """The geometry inputs the bridge recorded when ``generate`` encoded the images, and the call's own."""
        return {**self.bridge.image_inputs, **self.image_inputs}

    def geometry(self) -> VisualGeometry:
        """The prefill's visual-token geometry, from the call's arguments or, when ``generate`` encoded the images
        before the call, from what the bridge recorded then."""
        if self.cached_geometry is None:
            on_host = self.adapter.visual_geometry(self.all_image_inputs(), self.visual_counts, torch.device("cpu"))
            self.cached_host_views = on_host.view.tolist()
            self.cached_geometry = on_host.to(self.layout.is_visual.device)
        return self.cached_geometry

    def host_views(self) -> list[list[int]]:
        """Each sample's original visual tokens' views (``VisualGeometry.view``), on the host."""
        self.geometry()
        return self.cached_host_views

    def observe_rows(
        self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: Any, scaling: float
    ) -> None:
        """Keep what the stages after decoder layer ``layer`` read of its attention (its post-RoPE queries, keys
        and values, and its mask)."""
        for stage in self.plan:
            if stage.query_rows is None or stage.own_layer_attention or stage.layer - 1 != layer:
                continue
            self.query_attention[stage.layer] = observed_rows(stage, self.layout, query, key, value, mask, scaling)

    def keep_initial_embeddings(self, hidden: torch.Tensor) -> None:
        """Keep the language model's input embeddings (decoder layer 0's input) for stages that read them."""
        layout = self.layout.to(hidden.device)
        self.initial_visual = gather_tokens(hidden, layout.visual_slots)
        rows, valid = layout.text_rows
        self.initial_text = (gather_tokens(hidden, rows), valid)

    def add_segment(
        self, stage: StagePlan, new_layout: Layout, out: list[int], reindex: bool, device: torch.device
    ) -> None:
        """The segment of layers that starts at the stage's layer, from each sample's visual tokens after the stage
        (``out``). Pruning removes only real tokens and recycling adds real ones, so the counts follow without a
        device read."""
        counts_in = self.current_counts
        # From the stage's own counts only (not the prompts' lengths), so a captured graph holds for every prompt of
        # its bucket.
        previous = self.segments[-1].dropped if self.segments else [0] * len(counts_in)
        dropped = [total + before - now for total, before, now in zip(previous, counts_in, out, strict=True)]
        self.segments.append(
            Segment(
                first_layer=stage.layer,
                real=new_layout.real,
                position_shift=torch.tensor(dropped if reindex else [0] * len(out), device=device),
                dropped=dropped,
            )
        )
        self.visual_in.append(list(counts_in))
        self.current_counts = out

    def add_stage_stats(
        self, stage: StagePlan, kept_origin: list[list[int]], recycled: list[int], out: list[int]
    ) -> None:
        """The stage's statistics, from each sample's kept tokens (their original indices, -1 for earlier recycled
        ones) and recycled count."""
        counts_in = self.visual_in[len(self.stage_stats)]
        self.stage_stats.append(stage_stats(stage.layer, counts_in, kept_origin, recycled, out, self.host_views()))

    def add_deferred_stats(self) -> None:
        """The statistics of the stages a static prefill ran, read from the device now that it has run."""
        static = self.static
        for deferred in static.deferred:
            self.add_stage_stats(deferred.stage, deferred.kept_origin.tolist(), deferred.recycled, deferred.visual_out)
        static.deferred = []

    def defer_stage_stats(
        self, stage: StagePlan, kept_origin: torch.Tensor, recycled: list[int], out: list[int]
    ) -> None:
        """Keep the stage's statistics for :meth:`add_deferred_stats` (a static prefill reads nothing yet)."""
        self.static.deferred.append(DeferredStage(stage, kept_origin, recycled, out))

    def finish(self, cache: Any, shape: LanguageModelShape, positions: str) -> tuple[PrefillStats, DecodeState | None]:
        """The prefill's statistics once the model has run, and what decoding after it needs (None when no stage
        ran or no cache was kept)."""
        seconds = clock(self.original_real.device) - self.started
        layer_segments = segment_of_layer(self.segments, shape.num_layers)
        real_per_layer, visual_per_layer = layer_counts(
            layer_segments,
            [segment.dropped for segment in self.segments],
            self.stage_stats,
            self.original_counts,
            self.visual_counts,
        )
        unpruned = [self.original_counts] * shape.num_layers
        flops, base_flops = prefill_flops(real_per_layer, shape), prefill_flops(unpruned, shape)
        lengths, size = cache_size(cache)
        views = self.host_views()
        stats = PrefillStats(
            batch_size=self.original_real.shape[0],
            visual_tokens=self.num_visual,
            visual_tokens_per_sample=list(self.visual_counts),
            visual_views=[
                view_counts(views[sample], list(range(count)), 0) for sample, count in enumerate(self.visual_counts)
            ],
            stages=self.stage_stats,
            visual_tokens_per_layer=visual_per_layer,
            equivalent_visual_tokens=sum(visual_per_layer) / len(visual_per_layer),
            prefill_flops=flops,
            unpruned_prefill_flops=base_flops,
            flops_ratio=flops / base_flops,
            prefill_seconds=seconds,
            kv_cache_lengths=lengths,
            kv_cache_bytes=size,
            positions=positions,
        )
        decode = None
        if cache is not None and self.segments:
            decode = DecodeState(
                cache=cache,
                prompt_length=self.original_real.shape[1],
                segments=self.segments,
                segment_of_layer=layer_segments,
            )
        return stats, decode


def start_prefill(
    adapter: ModelAdapter,
    bridge: VisionBridge,
    plans_for: Callable[[list[int]], list[list[StagePlan]]],
    visual: torch.Tensor,
    attention_mask: torch.Tensor | None,
    model_kwargs: dict,
    static: StaticMode | None = None,
) -> Prefill:
    """The state of a new prefill over the prompt's ``visual`` (B, L) tokens; ``plans_for(counts)`` gives each
    sample's plan for its visual-token count (:func:`sample_plans`)."""
    layout = initial_layout(visual, attention_mask)
    # One transfer for every count the prefill needs on the host (each .tolist() on a GPU is a synchronisation).
    counts, real_counts = torch.stack([visual.sum(1), layout.real.sum(1)]).tolist()
    if len(set(counts)) == 1:
        layout = replace(layout, visual_width=counts[0])
    plans = plans_for(counts)
    plan = plans[0]
    wants_ids = any(Need.INSTRUCTION_IDS in stage.needs for stage in plan)
    return Prefill(
        adapter=adapter,
        bridge=bridge,
        plan=plan,
        layout=layout,
        visual_counts=counts,
        current_counts=list(counts),
        sample_plans=plans,
        image_inputs={
            name: model_kwargs[name] for name in adapter.traits.geometry_inputs if model_kwargs.get(name) is not None
        },
        original_real=layout.real,
        original_counts=real_counts,
        padded=any(count != visual.shape[1] for count in real_counts),
        num_visual=max(counts),
        stage_at={stage.layer: stage for stage in plan},
        started=clock(visual.device),
        static=static,
        instruction_ids=instruction_ids(layout, model_kwargs.get("input_ids")) if wants_ids else None,
    )


def instruction_ids(layout: Layout, input_ids: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The (B, T) token ids of the prompt's text after its first visual token (0 where padded) and their validity,
    from the prompt's ``input_ids``; None when the call carried none (``inputs_embeds`` only)."""
    if input_ids is None:
        return None
    rows, valid = layout.text_rows
    ids = torch.gather(input_ids.to(rows.device), 1, rows)
    return ids.masked_fill(~valid, 0), valid


def sample_plans(
    pruner: Pruner, traits: AdapterTraits, num_layers: int, first_stage_layer: int, counts: list[int]
) -> list[list[StagePlan]]:
    """Each sample's plan for its own visual-token count (one plan per distinct count): a budget is per sample,
    so the samples of a ragged batch keep their own numbers of tokens, at the same layers."""
    plans: dict[int, list[StagePlan]] = {}
    for count in sorted(set(counts)):
        try:
            plan = pruner.plan_for(traits, count, num_layers)
            check_plan(pruner.name, plan, count, num_layers)
        except VlpruneError as error:
            if len(set(counts)) == 1:  # "per sample" is then true of every sample
                raise
            raise _for_sample(error, counts.index(count), counts) from None
        if plan and plan[0].layer < first_stage_layer:
            raise RuntimeError(f"{pruner.name}: the plan's layers changed with the number of visual tokens")
        plans[count] = plan
    layers = {tuple(stage.layer for stage in plan) for plan in plans.values()}
    if len(layers) > 1:
        raise VlpruneError(
            f"{pruner.name} prunes at layers {sorted(layers)} for the samples' visual-token counts "
            f"{sorted(plans)}; one batch needs the same layers for every sample: batch images of one size"
        )
    return [plans[count] for count in counts]


def clock(device: torch.device) -> float:
    """The wall clock, once the device has finished what it was given (CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _for_sample(error: VlpruneError, sample: int, counts: list[int]) -> VlpruneError:
    """A plan's error for one sample of a ragged batch (whose samples have ``counts`` visual tokens), naming it."""
    keep_range = keep_range_of(error)
    if keep_range is not None:
        return sample_keep_error(*keep_range, sample, counts)
    return VlpruneError(f"{error} (sample {sample} of the batch has {counts[sample]} visual tokens)")
