"""`vlprune methods`: the pruning methods, with their stage, RoPE positions, families and reference."""

from __future__ import annotations

import argparse

from vlprune import pruners


def add_parser(commands: argparse._SubParsersAction, default_model: str) -> None:
    commands.add_parser("methods", help="list the pruning methods")


def list_methods() -> int:
    from vlprune.pruners.var import VAR

    rows = [
        (
            name,
            pruners.stages_of(name),
            pruners.create(name).reference_positions(),
            ",".join(pruners.families_of(name)),
            pruners.get(name).reference,
        )
        for name in pruners.available()
    ]
    families = ",".join(pruners.families_of(VAR.name))
    rows.append(
        (VAR.name, pruners.stages_of(VAR.name), "-", families, f"{VAR.reference}; combine as METHOD+{VAR.name}")
    )
    header = ("name", "stage", "positions", "families", "reference")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(4)]
    for row in [header, *rows]:
        print("  ".join(f"{cell:<{width}}" for cell, width in zip(row[:4], widths, strict=True)) + f"  {row[4]}")
    return 0
