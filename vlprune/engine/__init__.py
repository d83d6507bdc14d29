"""The execution engine: hooks, gathering, masks, positions, cache and statistics."""

from vlprune.engine.entry import attach
from vlprune.engine.session import POSITION_MODES, PruningSession
from vlprune.engine.stats import PrefillStats, StageStats

__all__ = ["POSITION_MODES", "PrefillStats", "PruningSession", "StageStats", "attach"]
