"""What a sweep runs: its settings (saved as ``sweep.json``), the budgets and RoPE numberings parsed from the command
line, its (method, keep, positions) cells and their keys, each cell's pruner, and the samples of one process."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from vlprune import pruners
from vlprune.errors import VlpruneError
from vlprune.eval.datasets import VQASample
from vlprune.pruners import parse_budget

LLAVA_RATIOS = (64 / 576, 128 / 576, 192 / 576)
"""LLaVA-1.5's budgets, 64, 128 and 192 of 576 visual tokens, as fractions for models with other token counts."""


@dataclass(frozen=True)
class SweepSettings:
    """What a sweep runs; saved as ``sweep.json`` so that a re-run can check it continues the same sweep."""

    model: str
    dataset: str
    split: str
    limit: int | None
    methods: list[str]
    keeps: list[int | float]
    max_new_tokens: int = 8
    options: dict[str, Any] = field(default_factory=dict)
    positions: list[str] | None = None  # modes to run each pruned cell in; None: each method's reference's numbering
    compile: bool = False  # captured (compiled) generation: its timings are not comparable with eager ones


_DEFAULTED = {"compile": False}  # settings newer than some saved folders, with the value those folders ran


def parse_keeps(text: str) -> list[int | float]:
    """``"64,128,192"`` or ``"0.111,0.222"`` -> budgets; the keyword ``llava`` gives LLaVA-1.5's three ratios.

    Raises:
        VlpruneError: an empty list, or an item that is not a valid budget (see :func:`vlprune.pruners.parse_budget`).
    """
    if text.strip() == "llava":
        return list(LLAVA_RATIOS)
    keeps: list[int | float] = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        try:
            keeps.append(parse_budget(item))
        except VlpruneError as error:
            raise VlpruneError(f"--keep item {item!r}: {error}") from None
    if not keeps:
        raise VlpruneError("--keep needs at least one budget")
    return keeps


def parse_positions(text: str) -> list[str]:
    """``"original"``, ``"reindex"`` or ``"original,reindex"`` -> the RoPE numbering modes a sweep runs each pruned
    cell in.

    Raises:
        VlpruneError: an empty list, an unknown mode, or one named twice.
    """
    from vlprune.engine import POSITION_MODES

    modes = [item.strip() for item in text.split(",") if item.strip()]
    for mode in modes:
        if mode not in POSITION_MODES:
            raise VlpruneError(f"--positions item {mode!r} is not valid; choose from {', '.join(POSITION_MODES)}")
    if not modes or len(set(modes)) != len(modes):
        raise VlpruneError(f"--positions {text!r} must name each of {', '.join(POSITION_MODES)} at most once")
    return modes


Cell = tuple[str, int | float | None, str | None]
"""(method, keep, positions): positions None is the method's reference's numbering."""


def cells(settings: SweepSettings) -> list[Cell]:
    """The (method, keep, positions) cells of a sweep, the unpruned reference first (its numbering is moot)."""
    modes: list[str | None] = list(settings.positions) if settings.positions else [None]
    pruned = [(m, k, p) for m in settings.methods if m != "none" for k in settings.keeps for p in modes]
    return [("none", None, None), *pruned]


def cell_key(sample: str, method: str, keep: int | float | None, positions: str | None = None) -> tuple[str, ...]:
    return (sample, method, json.dumps(keep), positions or "")


def row_key(row: dict[str, Any]) -> tuple[str, ...]:
    """The cell key of a results row (rows written before positions lists have none: the method's numbering)."""
    return cell_key(row["sample"], row["method"], row["keep"], row.get("positions_setting"))


def shard_of(samples: Sequence[VQASample], index: int, count: int) -> list[VQASample]:
    """The samples process ``index`` of ``count`` takes: every ``count``-th one from ``index``."""
    if not 0 <= index < count:
        raise VlpruneError(f"shard {index} is outside 0..{count - 1}")
    return list(samples[index::count])


def cell_pruners(settings: SweepSettings) -> list[pruners.Pruner]:
    """The pruner of every cell, built now so that an unknown method or a bad budget or option fails before any work.

    Raises:
        VlpruneError: naming the bad method, budget or option.
    """
    return [
        pruners.create(method, keep=keep, **settings.options.get(method, {})) for method, keep, _ in cells(settings)
    ]


def _pruner(settings: SweepSettings, method: str, keep: int | float | None) -> pruners.Pruner:
    return pruners.create(method, keep=keep, **settings.options.get(method, {}))
