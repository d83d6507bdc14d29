"""Per-stage token counts from a reference's budget table, for budgets the table does not list."""

from __future__ import annotations


def interpolated_schedule(table: dict[int, tuple[int, ...]], budget: float, total: int) -> tuple[float, ...]:
    """Tokens kept per stage for a layer-averaged ``budget`` of ``total`` tokens, from ``table`` (budget -> counts).

    Between two rows each count is linear in the budget; below the smallest row that row is scaled by
    ``budget / smallest``; above the largest each count moves linearly towards ``total`` (no pruning) at
    ``budget = total``. A budget the table lists gives its row exactly.
    """
    known = sorted(table)
    if budget <= known[0]:
        return tuple(count * budget / known[0] for count in table[known[0]])
    if budget >= known[-1]:
        share = (budget - known[-1]) / (total - known[-1])
        return tuple(count + share * (total - count) for count in table[known[-1]])
    upper = next(key for key in known if key >= budget)
    lower = known[known.index(upper) - 1] if upper != budget else upper
    share = 0.0 if upper == lower else (budget - lower) / (upper - lower)
    return tuple(a + share * (b - a) for a, b in zip(table[lower], table[upper], strict=True))
