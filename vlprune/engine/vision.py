"""Pruning inside the vision tower, for pruners with vision-encoder stages (FlowCut).

The tower runs unmodified; hooks do the work:

* the attention-interface wrapper hands each encoder layer's queries, keys and values to the pruner
  (:meth:`Pruner.select_in_vision`) and, while some image of the batch carries filler tokens, masks them as keys;
* a forward hook on a pruning layer shortens its output to the tokens the pruner keeps, so every later layer runs on
  fewer tokens. Images of a batch may keep different numbers of tokens at intermediate layers (FlowCut's count
  depends on each image's attention entropy): the batch then keeps the largest count and the others carry fillers
  that no token attends to, so each image computes exactly what it computes alone. The last pruning layer leaves
  exactly each crop's ``keep`` patches (:meth:`Pruner.vision_budget_for`; the crops of the anyres families' images may
  keep different numbers, and the shorter ones then carry fillers to the end);
* a forward hook on the tower shortens every hidden state it returns to those tokens, so LLaVA's feature selection
  (one layer or several concatenated) reads the kept tokens of each layer;
* a forward hook on the projector puts the kept tokens back at their slots among each crop's patches (zeros at the
  others), so the model packs them as always, and the language-model stage at layer 0 keeps the visual tokens whose
  patches survived (:meth:`VisionStages.token_kept`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from vlprune.adapters import ModelAdapter
from vlprune.errors import VlpruneError
from vlprune.geometry import VisualGeometry
from vlprune.kernels import gather_tokens
from vlprune.pruners.base import Pruner, VisionLayerContext, image_keep_error, keep_range_of


@dataclass
class _Pass:
    """One run of the vision tower."""

    origin: torch.Tensor  # (B, T) index of each token in the tower's original sequence
    real: torch.Tensor  # (B, T) False at fillers
    keep: torch.Tensor  # (B,) patches each crop keeps
    state: dict = field(default_factory=dict)
    pending: torch.Tensor | None = None  # (B, T) decision of the layer running now
    origins: list[torch.Tensor] = field(default_factory=list)  # every token set the tower went through


class VisionStages:
    """The vision-side hooks of one session."""

    def __init__(self, adapter: ModelAdapter, pruner: Pruner, image_inputs: dict[str, Any]) -> None:
        self.adapter = adapter
        self.image_inputs = image_inputs  # the bridge's record of the last image encoding (image_sizes, ...)
        self.pruner = pruner
        self.layers = adapter.vision_layers
        self.feature_layer, self.stage_layers = -1, []
        # Only pruners that override vision_layers prune inside the tower; the others never need its feature layer.
        # (Whether the family allows it, the bridge has checked: vlprune.pruners.unsupported_reason.)
        if pruner.prunes_vision_tower():
            self.feature_layer = adapter.vision_feature_layer_index()
            self.stage_layers = sorted(set(pruner.vision_layers(len(self.layers), self.feature_layer)))
        if self.stage_layers and not 0 <= self.stage_layers[0] <= self.stage_layers[-1] < self.feature_layer:
            raise VlpruneError(
                f"{pruner.name}: vision pruning layers {self.stage_layers} must lie in 0..{self.feature_layer - 1}, "
                f"before the feature layer {self.feature_layer}"
            )
        self.has_cls = adapter.traits.has_cls
        if self.stage_layers and self.has_cls and not adapter.traits.drops_cls:
            raise VlpruneError(
                f"{pruner.name} prunes inside the vision tower, which needs vision_feature_select_strategy='default' "
                "(the [CLS] token dropped before the projector) on a tower with a [CLS] token"
            )
        self.style = adapter.config.vision_config._attn_implementation
        self.kept: torch.Tensor | None = None  # (crops, K) patch indices of the last pass, for the LLM stage
        self.kept_real: torch.Tensor | None = None  # (crops, K) False at the fillers of crops that keep fewer
        self._visual_per_image = 0
        self._pass: _Pass | None = None

    @property
    def active(self) -> bool:
        return bool(self.stage_layers)

    def install(self) -> tuple[list[torch.utils.hooks.RemovableHandle], dict[nn.Module, Any]]:
        """Register the hooks; returns their handles and the attention modules to observe with their callbacks."""
        handles = [self.layers[0].register_forward_pre_hook(self._on_tower_start, with_kwargs=True)]
        for index in self.stage_layers:
            handles.append(self.layers[index].register_forward_hook(self._on_stage_output))
        handles.append(self.adapter.vision_tower.register_forward_hook(self._on_tower_output))
        handles.append(self.adapter.projector.register_forward_hook(self._on_projector_output))
        # Up to the feature layer: crops that keep fewer patches than others carry fillers to the end.
        observed = {self.adapter.vision_attention(i): self._observer(i) for i in range(self.feature_layer + 1)}
        return handles, observed

    def forget(self) -> None:
        self.kept = self.kept_real = None
        self._pass = None

    def crop_kept(self) -> torch.Tensor:
        """(crops, P) True at the patches of each crop that reached the projector in the last pass."""
        if self.kept is None or self.kept_real is None:
            raise RuntimeError("the vision tower did not run its pruning stages for this prefill")
        crops, patches = self.kept.shape[0], self._visual_per_image
        mask = torch.zeros(crops, patches + 1, dtype=torch.bool, device=self.kept.device)
        mask.scatter_(1, self.kept.masked_fill(~self.kept_real, patches), True)
        return mask[:, :patches]

    def token_kept(self, geometry: VisualGeometry) -> torch.Tensor:
        """(B, N0) True at the visual tokens whose patch reached the projector (a token of OneVision's down-scaled
        grid: its nearest source patch); line breaks are not kept (no reference keeps them after vision pruning)."""
        mask = self.crop_kept()
        if mask.shape[0] != geometry.num_crops:
            raise VlpruneError(
                f"{self.pruner.name} pruned {mask.shape[0]} crops in the vision tower; the prompts' images have "
                f"{geometry.num_crops}"
            )
        return geometry.crop_values(mask[..., None].float())[..., 0] > 0.5

    def kept_share(self, geometry: VisualGeometry, image_inputs: dict[str, Any]) -> torch.Tensor:
        """(B, N0) share of each visual token's packed value that comes from kept patches: 1 or 0 where a token is
        one patch; between them where OneVision's down-scaling blends a kept patch with dropped (zero) ones."""
        return self.adapter.pack_crop_values(self.crop_kept().float(), image_inputs, geometry, 0.0)

    def renormalised(
        self, hidden: torch.Tensor, slots: torch.Tensor, geometry: VisualGeometry, image_inputs: dict[str, Any]
    ) -> torch.Tensor:
        """The language model's input ``hidden`` (B, L, D) with each visual token (at ``slots``) that blends kept and
        dropped patches (OneVision's down-scaled grid; the dropped patches reach the projector as zeros) divided by
        its kept share, so that it is the down-scaling of the kept patches alone, weights renormalised. Tokens of
        one patch are left as they are."""
        if not self.adapter.traits.multi_crop:
            return hidden
        share = self.kept_share(geometry, image_inputs).to(hidden.device)  # (B, N0)
        blended = (share > 0) & (share < 1)
        if not bool(blended.any()):
            return hidden
        scale = torch.where(blended, share, torch.ones_like(share)).to(hidden.dtype)
        scaled = gather_tokens(hidden, slots) / scale[..., None]
        return hidden.scatter(1, slots[..., None].expand(-1, -1, hidden.shape[-1]), scaled)

    # ------------------------------------------------------------------ hooks

    def _on_tower_start(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        images, tokens = hidden.shape[:2]
        patches = tokens - 1 if self.has_cls else tokens
        origin = torch.arange(tokens, device=hidden.device).expand(images, -1)
        keep = torch.tensor(self._crop_budgets(images, patches), device=hidden.device)
        self._pass = _Pass(origin=origin, real=torch.ones_like(origin, dtype=torch.bool), keep=keep, origins=[origin])
        self.kept = self.kept_real = None

    def _crop_budgets(self, crops: int, patches: int) -> list[int]:
        """Patches each crop of this pass keeps: the pruner's budget per view, for the image each crop belongs to."""
        if self.pruner.keep is None:
            raise VlpruneError(f"method {self.pruner.name!r} needs a budget: pass keep=<count> or keep=<fraction>")
        if not self.adapter.traits.multi_crop:
            return [self.pruner.vision_budget_for(self.adapter.traits, patches, patches, 1)] * crops
        images = self.adapter.image_views(self.image_inputs)
        if sum(views for _, views in images) != crops:
            raise VlpruneError(
                f"{self.pruner.name}: the vision tower encodes {crops} crops, and the recorded images have "
                f"{sum(views for _, views in images)}; call the model with pixel_values and image_sizes together"
            )
        budgets = []
        for image, (tokens, views) in enumerate(images):
            try:
                budget = self.pruner.vision_budget_for(self.adapter.traits, tokens, patches, views)
            except VlpruneError as error:
                keep_range = keep_range_of(error)
                if keep_range is None:
                    raise
                raise image_keep_error(*keep_range, image, tokens, _sample_of_image(self.image_inputs, image)) from None
            if not 1 <= budget <= patches:
                raise RuntimeError(f"{self.pruner.name} gave a view a budget of {budget} of its {patches} patches")
            budgets += [budget] * views
        return budgets

    def _observer(self, index: int):
        def observe(
            module: nn.Module,
            query: torch.Tensor,
            key: torch.Tensor,
            value: torch.Tensor,
            mask: Any,
            scaling: float,
        ) -> Any:
            run = self._pass
            if run is None or run.origin.shape[1] != key.shape[2]:
                return None  # not a pass this session started (or a tower called layer by layer)
            if index in self.stage_layers:
                context = VisionLayerContext(
                    layer=index,
                    feature_layer=self.feature_layer,
                    query=query,
                    key=key,
                    value=value,
                    scaling=scaling,
                    real=run.real,
                    origin=run.origin,
                    has_cls=self.has_cls,
                    keep=run.keep,
                    state=run.state,
                )
                run.pending = self._checked(self.pruner.select_in_vision(context), index, run)
            return self._filler_mask(mask, run.real, query.dtype)

        return observe

    def _checked(self, decision: torch.Tensor | None, index: int, run: _Pass) -> torch.Tensor | None:
        last = index == self.stage_layers[-1]
        if decision is None:
            if last:
                raise RuntimeError(f"{self.pruner.name} must prune to keep={run.keep} at vision layer {index}")
            return None
        if decision.shape != run.real.shape or decision.dtype != torch.bool:
            raise RuntimeError(f"{self.pruner.name} returned a decision of shape {tuple(decision.shape)}")
        if bool((decision & ~run.real).any()):
            raise RuntimeError(f"{self.pruner.name} kept a filler token at vision layer {index}")
        if self.has_cls and not bool(decision[:, 0].all()):
            raise RuntimeError(f"{self.pruner.name} dropped the [CLS] token at vision layer {index}")
        patches = decision.sum(dim=1) - (1 if self.has_cls else 0)
        short, uneven = torch.stack([(patches < run.keep).any(), (patches != run.keep).any()]).tolist()
        if short or (last and uneven):
            raise RuntimeError(
                f"{self.pruner.name} kept {patches.tolist()} patches at vision layer {index}; keep={run.keep.tolist()} "
                f"{'exactly at the last layer' if last else 'at least'}"
            )
        return decision

    def _filler_mask(self, mask: Any, real: torch.Tensor, dtype: torch.dtype) -> Any:
        if bool(real.all()):
            return None
        allowed = real[:, None, None, :]  # (B, 1, 1, T): no query attends to a filler
        if self.style == "sdpa":
            combined = allowed if mask is None else (mask.bool() if mask.dtype == torch.bool else mask == 0) & allowed
            return combined.expand(-1, -1, real.shape[1], -1)
        blocked = torch.zeros(allowed.shape, dtype=dtype, device=real.device).masked_fill(
            ~allowed, torch.finfo(dtype).min
        )
        return blocked if mask is None else mask + blocked

    def _on_stage_output(self, module: nn.Module, args: tuple, output: Any) -> Any:
        run = self._pass
        if run is None or run.pending is None:
            return None
        decision, run.pending = run.pending, None
        hidden = output[0] if isinstance(output, tuple) else output
        if hidden.shape[1] != decision.shape[1]:
            return None
        width = int(decision.sum(dim=1).max())
        # Kept tokens first in their original order, then fillers (the image's other tokens, masked from now on).
        columns = torch.arange(decision.shape[1], device=decision.device)
        rank = torch.where(decision, columns, columns + decision.shape[1])
        slots = rank.argsort(dim=1)[:, :width].sort(dim=1).values
        run.real = torch.gather(decision, 1, slots)
        run.origin = torch.gather(run.origin, 1, slots)
        run.origins.append(run.origin)
        shortened = gather_tokens(hidden, slots)
        return (shortened, *output[1:]) if isinstance(output, tuple) else shortened

    def _on_tower_output(self, module: nn.Module, args: tuple, output: Any) -> Any:
        run, self._pass = self._pass, None
        if run is None:
            return None
        final = run.origin  # (B, max keep [+ 1]); fillers end the rows of crops that keep fewer
        states = getattr(output, "hidden_states", None)
        if states is not None:
            # Recent transformers fill only the entries the caller reads; the others are None.
            output.hidden_states = tuple(None if s is None else self._to_final(s, run, final) for s in states)
        self.kept = final[:, 1:] - 1 if self.has_cls else final
        self.kept_real = run.real[:, 1:] if self.has_cls else run.real
        self._visual_per_image = run.origins[0].shape[1] - (1 if self.has_cls else 0)
        return output

    def _to_final(self, state: torch.Tensor, run: _Pass, final: torch.Tensor) -> torch.Tensor:
        """A hidden state of any layer, reduced to the final tokens (token sets only shrink, so the length says which
        set the state holds)."""
        for origin in run.origins:
            if origin.shape[1] == state.shape[1]:
                position = torch.full(
                    (origin.shape[0], int(run.origins[0].shape[1])), -1, dtype=torch.long, device=origin.device
                )
                position.scatter_(1, origin, torch.arange(origin.shape[1], device=origin.device).expand_as(origin))
                return gather_tokens(state, torch.gather(position, 1, final))
        raise RuntimeError(f"a vision hidden state of {state.shape[1]} tokens matches no token set of this pass")

    def _on_projector_output(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        kept, real = self.kept, self.kept_real
        if kept is None or real is None or output.shape[:2] != kept.shape:
            return None
        patches = self._visual_per_image
        full = output.new_zeros(output.shape[0], patches + 1, output.shape[2])  # the last column takes the fillers
        index = kept.masked_fill(~real, patches)[..., None].expand(-1, -1, output.shape[2])
        return full.scatter(1, index, output)[:, :patches]


def _sample_of_image(image_inputs: dict[str, Any], image: int) -> int | None:
    """The sample ``image`` (the tower's order) belongs to, where the call says how many images each sample has
    (OneVision's ``batch_num_images``); None where it does not."""
    counts = image_inputs.get("batch_num_images")
    if counts is None:
        return None
    samples = [sample for sample, count in enumerate(counts.tolist()) for _ in range(int(count))]
    return samples[image] if image < len(samples) else None
