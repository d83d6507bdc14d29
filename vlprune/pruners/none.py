"""``none``: keep every visual token. The unpruned reference every method is compared against.

The plan is empty, so the engine attaches no stage and the model computes exactly what it computes unwrapped.
``create("var")`` is this pruner with the attention modifier VAR, which then rewrites attention and prunes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

from vlprune.errors import VlpruneError
from vlprune.pruners import register
from vlprune.pruners.base import Pruner, Selection, Stage, StageContext, StagePlan


@register
@dataclass
class KeepAll(Pruner):
    name = "none"
    stage = Stage.NONE
    reference = "unpruned model"

    def plan(self, num_visual: int, num_layers: int) -> list[StagePlan]:
        keeps_all = type(self.keep) is int and self.keep == num_visual
        if self.keep is not None and not keeps_all:
            # A budget with `none` is almost certainly a mistake on the command line: say so instead of ignoring it.
            if self.modifier is not None:
                raise VlpruneError(self._modifier_alone_message())
            raise VlpruneError(
                f"method 'none' keeps all {num_visual} visual tokens; keep={self.keep} is not valid with it"
            )
        return []

    def _modifier_alone_message(self) -> str:
        """Why a budget does not apply to an attention modifier run alone (``create("var")`` is ``none`` + VAR)."""
        name = self.modifier.name
        return (
            f"method '{name}' modifies attention and prunes nothing, so keep={self.keep} does not apply to it: "
            f"'{name}' alone runs the unpruned model with {name.upper()}'s attention redistribution; to prune as well, "
            f"compose it with a pruner as METHOD+{name} (for example 'fastv+{name}' with keep={self.keep})"
        )

    def select(self, ctx: StageContext) -> Selection:
        raise AssertionError("the 'none' pruner has no stage, so the engine never calls select")
