"""Budgets over groups of visual tokens (crops, regions, views): proportional quotas that never exceed a group's size,
the top tokens of each group, and the usual ways of cutting a token grid into groups. Shared by HoloV (crops), PTP
(regions), FasterVLM (LLaVA-NeXT views) and the methods that select crop by crop on LLaVA-NeXT (CDPruner, MMTok,
VScan)."""

from __future__ import annotations

import math

import torch

from vlprune.errors import VlpruneError


def strip_crops(num_visual: int, crops: int) -> torch.Tensor:
    """(N,) crop index of each token: contiguous raster chunks, the first ``N % crops`` one token longer."""
    size, extra = divmod(num_visual, crops)
    lengths = torch.tensor([size + (1 if c < extra else 0) for c in range(crops)])
    return torch.repeat_interleave(torch.arange(crops), lengths)


def tile_crops(num_visual: int, crops: int) -> torch.Tensor:
    """(N,) crop index of each token of a square grid cut into ``r x (crops / r)`` rectangular tiles."""
    side = math.isqrt(num_visual)
    if side * side != num_visual:
        raise VlpruneError(f"tiles=True needs a square token grid, got {num_visual} visual tokens")
    return grid_tiles(side, side, crops)


def grid_tiles(height: int, width: int, crops: int) -> torch.Tensor:
    """(height * width,) crop index of each token of a ``height`` x ``width`` raster grid cut into
    ``r x (crops / r)`` rectangular tiles (r the largest divisor of ``crops`` up to its square root), the remainders
    as in :func:`strip_crops`."""
    rows = max(d for d in range(1, math.isqrt(crops) + 1) if crops % d == 0)
    columns = crops // rows
    if rows > height or columns > width:
        raise VlpruneError(f"crops={crops} does not fit a {height} x {width} token grid")
    row_of = strip_crops(height, rows)  # which tile row each grid row belongs to, remainder as in strips
    column_of = strip_crops(width, columns)
    return (row_of[:, None] * columns + column_of[None, :]).reshape(-1)


def crop_quotas(weights: torch.Tensor, capacity: torch.Tensor, keep: int) -> torch.Tensor:
    """(B, C) tokens to keep per crop: ``floor(w · keep)``, the remainder to the heaviest crops, and any quota above
    a crop's capacity handed on to the crops with room, in proportion to their weights.

    weights: (B, C) non-negative, summing to 1 per sample; capacity: (C,) tokens per crop.
    """
    capacity = capacity.to(weights.device).expand_as(weights)
    quota = torch.zeros_like(weights, dtype=torch.long)
    remaining = torch.full((weights.shape[0],), keep, dtype=torch.long, device=weights.device)
    for _ in range(weights.shape[1] + 1):  # each pass fills at least one crop or places everything
        room = capacity - quota
        open_weights = torch.where(room > 0, weights, 0.0)
        share = open_weights / open_weights.sum(dim=-1, keepdim=True).clamp(min=torch.finfo(weights.dtype).tiny)
        # Crops with room but zero weight (all-zero attention) still take tokens once weighted crops are full.
        share = torch.where(
            open_weights.sum(dim=-1, keepdim=True) > 0,
            share,
            (room > 0).float() / (room > 0).sum(-1, keepdim=True).clamp(min=1),
        )
        grant = torch.floor(share * remaining[:, None]).long()
        leftover = remaining - grant.sum(dim=-1)
        order = torch.argsort(share, dim=-1, descending=True, stable=True)
        rank = torch.argsort(order, dim=-1)
        grant = grant + (rank < leftover[:, None]).long()
        grant = torch.minimum(grant, room)
        quota = quota + grant
        remaining = remaining - grant.sum(dim=-1)
        # A captured graph cannot read the device: it runs every pass, each one after the last placement a no-op.
        if not torch.compiler.is_compiling() and not bool((remaining > 0).any()):
            break
    return quota


def line_breaks_first(crops: torch.Tensor, keep: int) -> tuple[list[torch.Tensor], int]:
    """One sample's line breaks (``crops`` (N,) is -1 at them), kept whole when ``keep`` exceeds them as the LLaVA-NeXT
    references keep ``image_newline``, and what is left of ``keep`` for the crops (all of it when they are not kept)."""
    line_breaks = (crops < 0).nonzero()[:, 0]
    if keep > len(line_breaks):
        return [line_breaks], keep - len(line_breaks)
    return [], keep


def proportional_crop_shares(crops: torch.Tensor, budget: int) -> list[tuple[torch.Tensor, int]]:
    """One sample's crops (``crops`` (N,): each token's crop, -1 at line breaks), in the order the tower encodes them,
    each as its tokens' indices and its share of ``budget`` in proportion to its tokens (:func:`crop_quotas`)."""
    members = [(crops == crop).nonzero()[:, 0] for crop in torch.unique(crops[crops >= 0]).tolist()]
    capacity = torch.tensor([len(tokens) for tokens in members], device=crops.device)
    quota = crop_quotas((capacity.float() / capacity.sum())[None], capacity, budget)[0].tolist()
    return list(zip(members, quota, strict=True))


def keep_by_quota(
    attention: torch.Tensor, crop_of: torch.Tensor, quota: torch.Tensor, keep: int | None = None
) -> torch.Tensor:
    """(B, keep) indices, ascending: in each crop the ``quota`` tokens with the highest attention. ``keep`` is the
    quotas' sum (read from the device when not given)."""
    order, chosen = _quota_ranked(attention.float(), crop_of, quota)
    kept = torch.where(chosen, order, attention.shape[1]).sort(dim=-1).values
    return kept[:, : int(quota.sum(dim=-1)[0]) if keep is None else keep]


def crop_by_crop_order(
    attention: torch.Tensor, crop_of: torch.Tensor, quota: torch.Tensor, capacity: torch.Tensor, keep: int
) -> torch.Tensor:
    """(B, keep) indices in HoloV's reference order: crop after crop; inside a crop its ``quota`` most attended
    tokens, most attended first, or the whole crop in raster order when its quota covers its ``capacity`` (C,).
    Fixed-width sorts only (no per-crop loop), so that a captured graph holds it."""
    batch, count = attention.shape
    crop_of = crop_of.to(attention.device)
    whole = torch.gather(quota >= capacity.to(quota.device), 1, crop_of.expand(batch, -1))  # (B, N) per token
    index = torch.arange(count, device=attention.device).expand(batch, -1)
    # Sorted descending: a crop taken whole by descending -index, i.e. in raster order.
    key = torch.where(whole, -index.to(torch.float32), attention.float())
    order, chosen = _quota_ranked(key, crop_of, quota)
    positions = torch.where(chosen, index, count).sort(dim=-1).values[:, :keep]  # the chosen, in the sorted order
    return torch.gather(order, 1, positions)


def _quota_ranked(key: torch.Tensor, crop_of: torch.Tensor, quota: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The tokens sorted crop by crop, by descending ``key`` (B, N) inside a crop (ties by index), and which of them
    are among their crop's first ``quota``."""
    crop_of = crop_of.to(key.device)
    order = torch.argsort(key, dim=-1, descending=True, stable=True)
    order = torch.gather(order, 1, torch.argsort(crop_of[order], dim=-1, stable=True))
    sorted_crops = crop_of[order]
    starts = torch.searchsorted(sorted_crops.contiguous(), sorted_crops.contiguous(), right=False)
    rank = torch.arange(key.shape[1], device=key.device).expand_as(key) - starts
    return order, rank < torch.gather(quota, 1, sorted_crops)
