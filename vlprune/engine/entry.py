"""The engine's entry point: :func:`attach` gives the eager :class:`~vlprune.engine.session.PruningSession` or the
captured :class:`~vlprune.engine.captured.CapturedSession`, which holds an eager one.

It sits above both, so that the eager session never imports the captured one that is built on it.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from vlprune.engine.captured import CapturedSession
from vlprune.engine.session import PruningSession
from vlprune.errors import VlpruneError
from vlprune.pruners.base import Pruner


def attach(
    model: nn.Module,
    pruner: Pruner,
    *,
    positions: str | None = None,
    num_visual: int | None = None,
    compile: bool = False,
    **compile_options: Any,
) -> PruningSession | CapturedSession:
    """Attach ``pruner`` to ``model`` and return the session (a context manager that detaches on exit).
    ``positions=None`` follows the method's reference ("original" or "reindex"; see :class:`PruningSession`).

    ``compile=True`` gives a :class:`~vlprune.engine.captured.CapturedSession`, whose ``generate`` runs the pruned
    prefill and each decode step as captured graphs (``compile_options``: its ``buckets``, ``backend``,
    ``cuda_graphs``); ``model.generate`` still runs the eager engine under it."""
    if compile:
        return CapturedSession(model, pruner, positions=positions, num_visual=num_visual, **compile_options)
    if compile_options:
        raise VlpruneError(f"{sorted(compile_options)} are options of compile=True")
    return PruningSession(model, pruner, positions=positions, num_visual=num_visual)
