"""Pruning inside a packed vision encoder (the Qwen-VL family), for pruners with vision-encoder stages (FlowCut).

The Qwen-VL encoders run every image of a call as one packed sequence of patches, ``cu_seqlens`` marking where each
image (and, in Qwen2.5-VL's windowed blocks, each window) starts; the merger then turns every m x m consecutive
patches into one language-model token. The tower runs unmodified; hooks do the work:

* the attention observer collects each stage block's queries, keys and values (the blocks call attention image by
  image or window by window; the calls together cover the sequence), and the pruner decides per image, on whole merge
  groups, with :meth:`Pruner.select_in_vision` (``VisionLayerContext.group``);
* a forward hook on a stage block shortens its output to the kept patches, and a forward pre-hook on every later block
  hands it the matching ``cu_seqlens`` (per image, or per window with the windows that still hold patches), the
  longest chunk and the rotary cos/sin of the kept patches: images simply keep different numbers of patches;
* forward hooks on the merger (and Qwen3-VL's DeepStack mergers) put each kept token back at its place among the
  image's tokens, zeros elsewhere, so the model reorders and splits them as always; the stage at layer 0 then keeps
  the tokens whose patches survived (:meth:`PackedVisionStages.token_kept`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from vlprune.adapters import ModelAdapter
from vlprune.engine.tower_packed import images_first
from vlprune.errors import VlpruneError
from vlprune.geometry import VisualGeometry
from vlprune.pruners.base import Pruner, VisionLayerContext, image_keep_error, keep_range_of


@dataclass
class _PackedPass:
    """One run of the packed tower."""

    image_of: torch.Tensor  # (P,) image of each patch still in the sequence
    origin: torch.Tensor  # (P,) index of each patch among its image's patches
    window_of: torch.Tensor  # (P,) window of each patch (its image for towers without windows)
    step_of: torch.Tensor  # (P,) the chunk full-attention blocks attend within: an image, or a video's time step
    original: torch.Tensor  # (P0,) the sequence index of every patch at the start
    kept: torch.Tensor  # (P,) sequence index (at the start) of each patch still in the sequence
    keep: torch.Tensor  # (images,) patches each image keeps at the end
    full_cos_sin: tuple[torch.Tensor, torch.Tensor] | None = None  # the rotary tables of the unpruned sequence
    chunks: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=list)
    state: dict = field(default_factory=dict)
    scaling: float = 1.0


class PackedVisionStages:
    """The vision-side hooks of one session on a packed (Qwen-VL) encoder."""

    def __init__(self, adapter: ModelAdapter, pruner: Pruner, image_inputs: dict[str, Any]) -> None:
        self.adapter = adapter
        self.pruner = pruner
        self.image_inputs = image_inputs
        self.visual = adapter.vision_tower
        self.blocks = adapter.vision_layers
        self.feature_layer = len(self.blocks)  # the merger reads the last block's output
        self.stage_layers = sorted(set(pruner.vision_layers(len(self.blocks), self.feature_layer)))
        if self.stage_layers and not 0 <= self.stage_layers[0] <= self.stage_layers[-1] < self.feature_layer:
            raise VlpruneError(
                f"{pruner.name}: vision pruning layers {self.stage_layers} must lie in 0..{self.feature_layer - 1}"
            )
        self.group = adapter.merge_size**2
        self.full_blocks = set(getattr(self.visual, "fullatt_block_indexes", range(len(self.blocks))))
        self._pass: _PackedPass | None = None
        self.grids: torch.Tensor | None = None  # the grid_thw of the pass running now
        # Per finished pass (the images' call, the videos' call): its grids and, per item, the kept tokens' indices in
        # the encoder's processing order, ascending.
        self.finished: list[tuple[torch.Tensor, list[torch.Tensor]]] = []

    @property
    def active(self) -> bool:
        return bool(self.stage_layers)

    def install(self) -> tuple[list[torch.utils.hooks.RemovableHandle], dict[nn.Module, Any]]:
        handles = [self.visual.register_forward_pre_hook(self._on_tower_start, with_kwargs=True)]
        for index, block in enumerate(self.blocks):
            if index > self.stage_layers[0]:
                handles.append(block.register_forward_pre_hook(self._on_block_input, with_kwargs=True))
            if index in self.stage_layers:
                handles.append(block.register_forward_hook(self._stage_hook(index)))
        mergers = [self.visual.merger, *getattr(self.visual, "deepstack_merger_list", [])]
        handles += [merger.register_forward_hook(self._on_merger_output) for merger in mergers]
        observed = {self.blocks[index].attn: self._observer() for index in self.stage_layers}
        return handles, observed

    def forget(self) -> None:
        self._pass = None
        self.finished = []

    # ------------------------------------------------------------------ per token

    def token_kept(self, geometry: VisualGeometry) -> torch.Tensor:
        """(B, N0) True at the visual tokens whose merge groups the encoder kept: one mask per chunk (an image, or a
        video's temporal patch, the images' call first), each in the raster order of its merged grid."""
        if not self.finished:
            raise RuntimeError("the vision tower did not run its pruning stages for this prefill")
        ordered = images_first(self.finished, [grids for grids, _ in self.finished], self.image_inputs)
        masks = []
        for grids, kept_units in ordered:
            for (frames, height, width), units in zip(grids.tolist(), kept_units, strict=True):
                per_frame = height * width // self.group
                mask = torch.zeros(frames * per_frame, device=units.device)
                mask[units] = 1.0
                for frame in range(frames):
                    step = mask[frame * per_frame : (frame + 1) * per_frame]
                    masks.append(self.adapter.raster_order(step, torch.tensor([1, height, width])))
        width = max(len(mask) for mask in masks)
        padded = torch.stack([nn.functional.pad(mask, (0, width - len(mask))) for mask in masks])
        return geometry.crop_values(padded[..., None])[..., 0] > 0.5

    def renormalised(
        self, hidden: torch.Tensor, slots: torch.Tensor, geometry: VisualGeometry, image_inputs: dict[str, Any]
    ) -> torch.Tensor:
        """``hidden`` unchanged: every token here is one merge group, kept or dropped whole."""
        return hidden

    # ------------------------------------------------------------------ hooks

    def _on_tower_start(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        grids = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
        hidden = args[0] if args else kwargs["hidden_states"]
        if grids is None:
            raise RuntimeError(f"{self.pruner.name}: the vision encoder was called without grid_thw")
        device = hidden.device
        counts = grids.prod(dim=-1).to(device)
        images = torch.repeat_interleave(torch.arange(len(grids), device=device), counts)
        starts = torch.cumsum(counts, 0) - counts
        origin = torch.arange(int(counts.sum()), device=device) - starts[images]
        window = self._windows(grids, images, device)
        per_step = (grids[:, 1] * grids[:, 2]).to(device)
        steps_before = torch.cumsum(grids[:, 0].to(device), 0) - grids[:, 0].to(device)
        step = steps_before[images] + origin // per_step[images]
        budgets = []
        for image, count in enumerate(counts.tolist()):
            tokens = count // self.group
            try:
                budget = self.pruner.vision_budget_for(self.adapter.traits, tokens, tokens, 1)
            except VlpruneError as error:
                keep_range = keep_range_of(error)
                if keep_range is None:
                    raise
                raise image_keep_error(*keep_range, image, tokens, item="image or video") from None
            if not 1 <= budget <= tokens:
                raise RuntimeError(f"{self.pruner.name} gave an image a budget of {budget} of its {tokens} tokens")
            budgets.append(budget * self.group)
        index = torch.arange(len(origin), device=device)
        self._pass = _PackedPass(
            image_of=images, origin=origin, window_of=window, step_of=step, original=index, kept=index,
            keep=torch.tensor(budgets, device=device),
        )  # fmt: skip
        if any(torch.equal(grids, done[0]) for done in self.finished):
            self.finished = []  # the same inputs again: a new encoding
        self.grids = grids

    def _windows(self, grids: torch.Tensor, images: torch.Tensor, device: torch.device) -> torch.Tensor:
        """(P,) window of each patch in processing order (Qwen2.5-VL), or its image where there are no windows."""
        if not hasattr(self.visual, "window_size"):
            return images
        _, bounds = self.adapter.window_index(grids)
        bounds = torch.as_tensor(bounds, device=device).unique_consecutive()
        return torch.searchsorted(bounds[1:], torch.arange(len(images), device=device), right=True)

    def _observer(self):
        def observe(module, query, key, value, mask, scaling) -> None:
            run = self._pass
            if run is not None:
                run.chunks.append((query, key, value))
                run.scaling = scaling

        return observe

    def _stage_hook(self, index: int):
        def hook(module: nn.Module, args: tuple, output: Any) -> Any:
            run = self._pass
            if run is None:
                return None
            hidden = output[0] if isinstance(output, tuple) else output
            query, key, value = (torch.cat([chunk[i] for chunk in run.chunks], dim=2)[0] for i in range(3))
            run.chunks = []
            if query.shape[1] != hidden.shape[0]:
                raise RuntimeError(
                    f"vision block {index}: attention covered {query.shape[1]} of {hidden.shape[0]} patches"
                )
            decision = self._decide(index, run, query, key, value)
            if decision is None:
                return None
            keep = decision.nonzero()[:, 0]
            run.kept, run.image_of = run.kept[keep], run.image_of[keep]
            run.origin, run.window_of, run.step_of = run.origin[keep], run.window_of[keep], run.step_of[keep]
            shortened = hidden[keep]
            return (shortened, *output[1:]) if isinstance(output, tuple) else shortened

        return hook

    def _decide(
        self, index: int, run: _PackedPass, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
    ) -> torch.Tensor | None:
        """(P,) patches that continue, from the pruner's per-image decision (images padded into one batch)."""
        images = len(run.keep)
        counts = torch.bincount(run.image_of, minlength=images)
        width = int(counts.max())
        slot = torch.arange(len(run.image_of), device=query.device) - (torch.cumsum(counts, 0) - counts)[run.image_of]
        batch = run.image_of * width + slot

        def padded(states: torch.Tensor) -> torch.Tensor:  # (H, P, d) -> (images, H, width, d)
            out = states.new_zeros(states.shape[0], images * width, states.shape[-1])
            out[:, batch] = states
            return out.view(states.shape[0], images, width, -1).transpose(0, 1)

        real = torch.zeros(images * width, dtype=torch.bool, device=query.device)
        real[batch] = True
        # Padding slots get origins no patch has, so that scores a pruner stores by origin never collide with them.
        beyond = int(self.grids.prod(dim=-1).max())
        origin = beyond + torch.arange(images * width, device=query.device)
        origin[batch] = run.origin
        context = VisionLayerContext(
            layer=index,
            feature_layer=self.feature_layer,
            query=padded(query),
            key=padded(key),
            value=padded(value),
            scaling=run.scaling,
            real=real.view(images, width),
            origin=origin.view(images, width),
            has_cls=False,
            keep=run.keep,
            state=run.state,
            group=self.group,
        )
        decision = self.pruner.select_in_vision(context)
        last = index == self.stage_layers[-1]
        if decision is None:
            if last:
                raise RuntimeError(f"{self.pruner.name} must prune to its budget at vision block {index}")
            return None
        kept = decision.reshape(-1)[batch]
        per_image = torch.bincount(run.image_of[kept], minlength=images)
        groups_whole = (kept.view(-1, self.group).all(dim=1) | ~kept.view(-1, self.group).any(dim=1)).all()
        short, uneven = torch.stack([(per_image < run.keep).any(), (per_image != run.keep).any()]).tolist()
        if not bool(groups_whole) or short or (last and uneven):
            raise RuntimeError(
                f"{self.pruner.name} kept {per_image.tolist()} patches at vision block {index} (budgets "
                f"{run.keep.tolist()}, whole merge groups of {self.group})"
            )
        return kept

    def _on_block_input(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        run = self._pass
        if run is None or len(run.kept) == len(run.original):
            return None
        index = list(self.blocks).index(module)
        if run.full_cos_sin is None:
            run.full_cos_sin = kwargs["position_embeddings"]
        cos, sin = run.full_cos_sin
        kwargs["position_embeddings"] = (cos[run.kept], sin[run.kept])
        groups = run.step_of if index in self.full_blocks else run.window_of
        lengths = torch.unique_consecutive(groups, return_counts=True)[1]
        bounds = nn.functional.pad(torch.cumsum(lengths, 0), (1, 0)).to(torch.int32)
        kwargs["cu_seqlens"] = bounds
        if kwargs.get("max_seqlen") is not None:
            kwargs["max_seqlen"] = int(lengths.max())
        return args, kwargs

    def _on_merger_output(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        run = self._pass
        if run is None or len(run.kept) == len(run.original):
            if module is self.visual.merger:
                self._finish(run)
            return None
        units = run.kept[:: self.group] // self.group  # processing-order token index of each kept group
        full = output.new_zeros(len(run.original) // self.group, output.shape[-1])
        full[units] = output
        if module is self.visual.merger:
            self._finish(run)
        return full

    def _finish(self, run: _PackedPass | None) -> None:
        if run is None:
            return
        units = run.kept[:: self.group] // self.group
        counts = (self.grids.prod(dim=-1) // self.group).tolist()
        starts = [sum(counts[:i]) for i in range(len(counts))]
        image_of_unit = run.image_of[:: self.group]
        self.finished.append((self.grids, [units[image_of_unit == i] - starts[i] for i in range(len(counts))]))
        self._pass = None
