"""A served model's image pruning: its settings, the method, what it reads of the tower, and the per-image counts.

:func:`image_pruning_for` builds one per model instance from the ``vlprune`` entry of its config (None without one:
the model is vLLM's, unchanged). :meth:`ImagePruning.prune` selects each image's tokens with the method's own
:meth:`~vlprune.pruners.Pruner.select` (:func:`vlprune.vllm.image_selection.select_image`) and logs each image's
tokens before and after.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from vlprune.adapters import AdapterTraits
from vlprune.errors import VlpruneError
from vlprune.needs import Need
from vlprune.pruners import Pruner
from vlprune.vllm.image_selection import ImageReads, KeptTokens, select_image
from vlprune.vllm.processing import decode_budget
from vlprune.vllm.settings import PruneSettings, check_family, parse_settings, settings_from_config
from vlprune.vllm.tower_reads import TowerRecorder

_RECENT = 64  # images whose kept tokens are kept for inspection

logger = logging.getLogger("vllm.vlprune")  # under vLLM's logger, so that its handlers print it


@dataclass
class PruningCounts:
    """Visual tokens of the images this process encoded, before and after pruning."""

    images: int = 0
    before: int = 0
    after: int = 0


@dataclass
class ImagePruning:
    """The pruning of one served model.

    Attributes:
        settings: the checked ``vlprune`` entry.
        pruner: the method at the served budget.
        traits: the family's traits for this model (its tower's [CLS] included).
        needs: what the method reads of the vision side on this family.
        tower_name: the vision tower's name in refusals (its config's ``model_type``).
        reindexed: the language model numbers the kept tokens contiguously (LLaVA), so a method's own token order
            is kept; otherwise kept tokens keep their positions, in ascending order (Qwen-VL).
        counts: this process's totals; ``last`` the (before, after) of each image of the last call.
        last_origins, recent_origins: the kept tokens' indices (:attr:`KeptTokens.origin`) of each image of the last
            call, and of the last images this process encoded, oldest first.
    """

    settings: PruneSettings
    pruner: Pruner
    traits: AdapterTraits
    needs: frozenset[Need]
    reindexed: bool
    tower_name: str = "the vision tower"
    counts: PruningCounts = field(default_factory=PruningCounts)
    last: list[tuple[int, int]] = field(default_factory=list)
    last_origins: list[torch.Tensor] = field(default_factory=list)
    recent_origins: deque[torch.Tensor] = field(default_factory=lambda: deque(maxlen=_RECENT))

    def budgets(self, encoded: torch.Tensor | list | None, images: int) -> list[int | float]:
        """Each image's budget, as the processor sent it (``vlprune_keep``), or the served one."""
        if encoded is None:
            return [self.settings.keep] * images
        values = encoded.tolist() if isinstance(encoded, torch.Tensor) else [float(v) for v in encoded]
        values = [float(v[0]) if isinstance(v, list) else float(v) for v in values]
        return [decode_budget(value) for value in values]

    @torch.no_grad()
    def prune(self, reads: list[ImageReads], budgets: list[int | float]) -> list[KeptTokens]:
        """Each image's kept tokens."""
        kept, self.last, self.last_origins = [], [], []
        for image_reads, budget in zip(reads, budgets, strict=True):
            count = image_reads.embeddings.shape[0]
            keep = self.settings.image_budget(count, budget)
            tokens = select_image(self.pruner, self.traits, image_reads, keep, reindexed=self.reindexed)
            kept.append(tokens)
            self.last.append((count, keep))
            self.last_origins.append(tokens.origin)
            self.recent_origins.append(tokens.origin)
            self.counts.images += 1
            self.counts.before += count
            self.counts.after += keep
        logger.info(
            "vlprune %s: %d image(s), visual tokens %s (total this process: %d images, %d -> %d)",
            self.pruner.name,
            len(kept),
            ", ".join(f"{before} -> {after}" for before, after in self.last),
            self.counts.images,
            self.counts.before,
            self.counts.after,
        )
        return kept


def image_pruning_for(
    hf_config: object, traits: AdapterTraits, tower_name: str, reindexed: bool
) -> ImagePruning | None:
    """The pruning a model's config asks for, checked against its family, or None when it asks for none.

    Raises:
        VlpruneError: bad settings, or a method the family cannot serve.
    """
    settings = settings_from_config(hf_config)
    return None if settings is None else build_image_pruning(settings, traits, tower_name, reindexed)


def build_image_pruning(
    settings: PruneSettings, traits: AdapterTraits, tower_name: str, reindexed: bool
) -> ImagePruning:
    """The pruning ``settings`` ask for on a family with ``traits``.

    Raises:
        VlpruneError: a method the family cannot serve.
    """
    pruner = settings.pruner()
    needs = check_family(pruner, traits, tower_name)
    logger.info("vlprune: serving %s with %s at keep=%s per image", traits.family, pruner.name, settings.keep)
    return ImagePruning(
        settings=settings, pruner=pruner, traits=traits, needs=needs, reindexed=reindexed, tower_name=tower_name
    )


class PrunesImages:
    """Mixin of the served model classes: the model's pruning and its tower hooks, and switching the method on a
    live engine (:meth:`vlprune_serve`). A class using it defines ``_vlprune_recorder_for(needs)``."""

    vlprune: ImagePruning | None = None
    vlprune_recorder: TowerRecorder | None = None

    def _vlprune_recorder_for(self, needs: frozenset[Need]) -> TowerRecorder:
        raise NotImplementedError

    def _vlprune_start(self, pruning: ImagePruning | None) -> None:
        self.vlprune = pruning
        self.vlprune_recorder = None if pruning is None else self._vlprune_recorder_for(pruning.needs)

    def vlprune_serve(self, entry: Mapping[str, Any]) -> None:
        """Serve another method (and options) at the same budget from the next image on, for comparisons in one
        engine (tests, benchmarks): ``model.vlprune_serve({"method": "holov", "keep": 64})`` through
        ``LLM.apply_model``. vLLM caches encoded images and prompts' KV by their inputs, not by the method: reset both
        caches after it (``LLM.reset_prefix_cache()``, ``LLM.llm_engine.reset_encoder_cache()``).

        Raises:
            VlpruneError: an engine started without pruning, another budget (the processor gives each image the
                placeholders of the budget it was started with; a request changes its own with ``vlprune_keep``), or
                bad settings.
        """
        current = self.vlprune
        if current is None:
            raise VlpruneError("this engine was started without a vlprune entry in its config; it serves unpruned")
        settings = parse_settings(entry)
        if settings.keep != current.settings.keep:
            raise VlpruneError(
                f"vlprune_serve keeps the engine's budget keep={current.settings.keep!r} (the processor places that "
                f"many tokens per image); got keep={settings.keep!r}: pass a request's own budget as "
                f"mm_processor_kwargs={{'vlprune_keep': ...}}"
            )
        pruning = build_image_pruning(settings, current.traits, current.tower_name, current.reindexed)
        old = self.vlprune_recorder
        self._vlprune_start(pruning)
        if old is not None:
            old.remove()
