"""The old name of :mod:`vlprune.testing.qwen` (tiny Qwen2-VL, Qwen2.5-VL and Qwen3-VL builders), kept as a shim that
only re-exports its public names."""

from vlprune.testing import qwen as _qwen
from vlprune.testing.qwen import *  # noqa: F403 (the shim's whole job: the module's __all__, listed once, there)

__all__ = _qwen.__all__
