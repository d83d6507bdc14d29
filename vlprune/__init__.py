"""vlprune: visual-token pruning for Hugging Face vision-language models."""

from vlprune import pruners
from vlprune.engine import PrefillStats, PruningSession, attach
from vlprune.errors import VlpruneError

__version__ = "0.1.0"


def available_pruners() -> list[str]:
    """Names of every method ``vlprune.load(method=...)`` accepts alone: the registered pruners and the attention
    modifier VAR (which also combines with any pruner as ``METHOD+var``)."""
    return pruners.available_methods()


def load(*args, **kwargs):
    from vlprune.api import load as _load

    return _load(*args, **kwargs)


__all__ = ["PrefillStats", "PruningSession", "VlpruneError", "attach", "available_pruners", "load", "pruners"]
