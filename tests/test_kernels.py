"""The reference kernels against plain full-matrix computations written out here.

``attention_rows`` must equal the rows of softmax(q @ repeat_kv(k)^T * scale + mask) averaged over heads, for every
mask style the models hand it, grouped-query layouts, decode-like shapes and half precision. ``gather_tokens`` must
equal explicit Python indexing for every source rank, including a batch-1 source broadcast to the whole batch.
"""

from __future__ import annotations

import pytest
import torch

from vlprune.kernels import attention_rows, gather_tokens

# --------------------------------------------------------------------------------------------- attention_rows


def full_attention_rows(
    query: torch.Tensor,
    key: torch.Tensor,
    rows: torch.Tensor,
    scaling: float,
    attention_mask: torch.Tensor | None,
    causal: bool,
) -> torch.Tensor:
    """The obvious float32 computation: the whole (B, H, Lq, Lk) matrix, then the requested rows."""
    query, key = query.float(), key.float()
    batch, heads, q_len, _ = query.shape
    kv_heads, k_len = key.shape[1], key.shape[2]
    # repeat_kv as in transformers: query head h reads key head h // (H // Hkv).
    key = key.repeat_interleave(heads // kv_heads, dim=1)
    logits = query @ key.transpose(-1, -2) * scaling
    if attention_mask is not None:
        mask = attention_mask.expand(batch, 1, q_len, k_len)
        if mask.dtype == torch.bool:
            mask = torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))
        logits = logits + mask.float()
    elif causal:
        i = torch.arange(q_len)[:, None]
        j = torch.arange(k_len)[None, :]
        logits = logits.masked_fill(j > i + (k_len - q_len), float("-inf"))
    probabilities = torch.softmax(logits, dim=-1).mean(dim=1)  # (B, Lq, Lk)
    return torch.stack([probabilities[b, rows[b]] for b in range(batch)])


def random_qk(
    batch: int, heads: int, kv_heads: int, q_len: int, k_len: int, dtype: torch.dtype, seed: int, head_dim: int = 8
) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    # Scaled up so that attention is far from uniform and a wrong pairing of heads or keys shows.
    query = 3 * torch.randn(batch, heads, q_len, head_dim, generator=generator)
    key = 3 * torch.randn(batch, kv_heads, k_len, head_dim, generator=generator)
    return query.to(dtype), key.to(dtype)


def per_sample_rows(
    batch: int, q_len: int, count: int, seed: int, minimum: tuple[int, ...] | None = None
) -> torch.Tensor:
    """(B, count) random row indices, different for every sample (each >= minimum[b] when given)."""
    generator = torch.Generator().manual_seed(seed)
    lows = minimum or (0,) * batch
    rows = torch.stack([torch.randint(low, q_len, (count,), generator=generator) for low in lows])
    assert batch == 1 or len({tuple(r) for r in rows.tolist()}) == batch, "pick another seed"
    return rows


def left_padded_bool_mask(pads: tuple[int, ...], length: int) -> torch.Tensor:
    """(B, 1, L, L) boolean causal mask with ``pads[b]`` padding keys on the left of sample b; True = attend."""
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    real = torch.stack([torch.arange(length) >= pad for pad in pads])  # (B, L)
    return (causal[None] & real[:, None, :])[:, None]


def to_additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    additive = torch.zeros(mask.shape, dtype=dtype)
    return additive.masked_fill(~mask, torch.finfo(dtype).min)


SHAPES = [
    pytest.param(1, 6, 6, 7, id="b1-mha-L7"),
    pytest.param(3, 6, 6, 13, id="b3-mha-L13"),
    pytest.param(1, 6, 2, 13, id="b1-gqa3-L13"),
    pytest.param(3, 6, 2, 7, id="b3-gqa3-L7"),
]
DTYPES = [pytest.param(torch.float32, 1e-6, id="fp32"), pytest.param(torch.float16, 1e-3, id="fp16")]


def check_rows(result: torch.Tensor, expected: torch.Tensor, atol: float) -> None:
    assert result.dtype == torch.float32
    assert result.shape == expected.shape
    torch.testing.assert_close(result, expected, atol=atol, rtol=0)
    torch.testing.assert_close(result.sum(-1), torch.ones(result.shape[:2]), atol=1e-5, rtol=0)


@pytest.mark.parametrize(("dtype", "atol"), DTYPES)
@pytest.mark.parametrize(("batch", "heads", "kv_heads", "length"), SHAPES)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_attention_rows_without_mask(
    batch: int, heads: int, kv_heads: int, length: int, causal: bool, dtype: torch.dtype, atol: float
) -> None:
    query, key = random_qk(batch, heads, kv_heads, length, length, dtype, seed=length + batch)
    rows = per_sample_rows(batch, length, count=4, seed=1)
    scaling = query.shape[-1] ** -0.5
    result = attention_rows(query, key, rows, scaling, None, causal=causal)
    expected = full_attention_rows(query, key, rows, scaling, None, causal)
    check_rows(result, expected, atol)
    if causal:
        # Row i attends to nothing after key i.
        for b in range(batch):
            for r, row in enumerate(rows[b].tolist()):
                assert torch.all(result[b, r, row + 1 :] == 0)
    else:
        assert bool((result > 0).all())


@pytest.mark.parametrize(("dtype", "atol"), DTYPES)
@pytest.mark.parametrize(("batch", "heads", "kv_heads", "length"), SHAPES)
@pytest.mark.parametrize("style", ["bool", "additive"])
def test_attention_rows_with_left_padding_mask(
    batch: int, heads: int, kv_heads: int, length: int, style: str, dtype: torch.dtype, atol: float
) -> None:
    pads = tuple((3 * b) % 5 for b in range(batch))  # sample 0 unpadded, the others left-padded
    query, key = random_qk(batch, heads, kv_heads, length, length, dtype, seed=7 * length + batch)
    mask = left_padded_bool_mask(pads, length)
    if style == "additive":
        mask = to_additive(mask, dtype)
    rows = per_sample_rows(batch, length, count=3, seed=2, minimum=pads)  # real query tokens only
    scaling = 0.3
    # causal=True is ignored when a mask is given: the mask alone decides; causal=False must give the same.
    result = attention_rows(query, key, rows, scaling, mask, causal=True)
    expected = full_attention_rows(query, key, rows, scaling, mask, causal=True)
    check_rows(result, expected, atol)
    torch.testing.assert_close(attention_rows(query, key, rows, scaling, mask, causal=False), result, atol=0, rtol=0)
    for b, pad in enumerate(pads):
        assert torch.all(result[b, :, :pad] == 0), "padding keys must get no attention"


@pytest.mark.parametrize("style", ["bool", "additive"])
def test_attention_rows_mask_overrides_causal(style: str) -> None:
    # A non-causal mask (an encoder's key-padding mask) decides alone, even with the default causal=True.
    pads = (0, 3, 5)
    query, key = random_qk(3, 6, 2, 7, 7, torch.float32, seed=19)
    mask = torch.stack([torch.arange(7) >= pad for pad in pads])[:, None, None, :].expand(3, 1, 7, 7)
    if style == "additive":
        mask = to_additive(mask, torch.float32)
    rows = per_sample_rows(3, 7, count=4, seed=4, minimum=pads)
    result = attention_rows(query, key, rows, 0.5, mask)
    check_rows(result, full_attention_rows(query, key, rows, 0.5, mask, causal=False), 1e-6)
    for b, pad in enumerate(pads):
        assert torch.all(result[b, :, :pad] == 0)
        assert bool((result[b, :, pad:] > 0).all()), "keys after the query must be visible under a non-causal mask"


@pytest.mark.parametrize("style", ["bool", "additive"])
def test_attention_rows_broadcasts_a_batch_one_mask(style: str) -> None:
    query, key = random_qk(3, 6, 2, 13, 13, torch.float32, seed=11)
    mask = left_padded_bool_mask((2,), 13)  # (1, 1, L, L)
    if style == "additive":
        mask = to_additive(mask, torch.float32)
    rows = per_sample_rows(3, 13, count=5, seed=3, minimum=(2, 2, 2))
    result = attention_rows(query, key, rows, 0.25, mask)
    check_rows(result, full_attention_rows(query, key, rows, 0.25, mask, causal=True), 1e-6)


@pytest.mark.parametrize(("dtype", "atol"), DTYPES)
@pytest.mark.parametrize(("batch", "kv_heads"), [(1, 6), (3, 2)])
@pytest.mark.parametrize("q_len", [1, 3])
def test_attention_rows_decode_like_query_shorter_than_keys(
    batch: int, kv_heads: int, q_len: int, dtype: torch.dtype, atol: float
) -> None:
    k_len = 13
    query, key = random_qk(batch, 6, kv_heads, q_len, k_len, dtype, seed=q_len)
    rows = torch.stack([torch.arange(q_len).roll(b) for b in range(batch)])  # different order per sample
    result = attention_rows(query, key, rows, 0.35, None, causal=True)
    expected = full_attention_rows(query, key, rows, 0.35, None, causal=True)
    check_rows(result, expected, atol)
    # Query i sits at position i + (Lk - Lq): the last query sees every key, the others stop at their position.
    for b in range(batch):
        for r, row in enumerate(rows[b].tolist()):
            visible = row + k_len - q_len
            assert torch.all(result[b, r, visible + 1 :] == 0)
            assert bool((result[b, r, : visible + 1] > 0).all())


def test_attention_rows_decode_step_with_padding_mask() -> None:
    # One new token over a left-padded cache of 9 keys, the way a decode step's (B, 1, 1, Lk) mask looks.
    query, key = random_qk(3, 6, 2, 1, 9, torch.float32, seed=5)
    pads = (0, 2, 4)
    mask = torch.stack([torch.arange(9) >= pad for pad in pads])[:, None, None, :]
    rows = torch.zeros(3, 1, dtype=torch.long)
    for style_mask in (mask, to_additive(mask, torch.float32)):
        result = attention_rows(query, key, rows, 0.35, style_mask)
        check_rows(result, full_attention_rows(query, key, rows, 0.35, style_mask, causal=True), 1e-6)
        for b, pad in enumerate(pads):
            assert torch.all(result[b, 0, :pad] == 0)


def test_attention_rows_grouping_matches_repeat_kv_not_another_head_order() -> None:
    # With H=6, Hkv=2 the kernel must pair query head h with key head h // 3 (repeat_kv), not h % 2.
    query, key = random_qk(1, 6, 2, 7, 7, torch.float32, seed=13)
    rows = torch.tensor([[6, 3]])
    result = attention_rows(query, key, rows, 1.0, None, causal=False)
    wrong_key = key[:, torch.arange(6) % 2]  # (1, 6, L, d): the h % Hkv pairing
    wrong = full_attention_rows(query, wrong_key, rows, 1.0, None, causal=False)
    assert not torch.allclose(result, wrong, atol=1e-3)
    check_rows(result, full_attention_rows(query, key, rows, 1.0, None, causal=False), 1e-6)


def test_attention_rows_uses_the_given_scaling() -> None:
    query, key = random_qk(1, 6, 6, 7, 7, torch.float32, seed=17)
    rows = torch.tensor([[6]])
    sharp = attention_rows(query, key, rows, 1.0, None, causal=False)
    soft = attention_rows(query, key, rows, 0.01, None, causal=False)
    check_rows(sharp, full_attention_rows(query, key, rows, 1.0, None, causal=False), 1e-6)
    check_rows(soft, full_attention_rows(query, key, rows, 0.01, None, causal=False), 1e-6)
    assert sharp.max() > soft.max()


# ---------------------------------------------------------------------------------------------- gather_tokens


def python_gather(source: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    batch = index.shape[0]
    return torch.stack(
        [torch.stack([source[0 if source.shape[0] == 1 else b, j] for j in index[b].tolist()]) for b in range(batch)]
    )


INDEX = torch.tensor([[4, 0, 2, 2], [1, 3, 4, 0], [0, 1, 2, 3]])  # out of order, repeated, differs per sample


@pytest.mark.parametrize(
    "trailing",
    [pytest.param((), id="2d"), pytest.param((5,), id="3d"), pytest.param((2, 3), id="4d")],
)
@pytest.mark.parametrize("source_batch", [3, 1], ids=["per-sample", "broadcast"])
def test_gather_tokens_matches_python_indexing(trailing: tuple[int, ...], source_batch: int) -> None:
    generator = torch.Generator().manual_seed(len(trailing) + source_batch)
    source = torch.randn(source_batch, 5, *trailing, generator=generator)
    result = gather_tokens(source, INDEX)
    assert result.shape == (3, 4, *trailing)
    assert result.dtype == source.dtype
    torch.testing.assert_close(result, python_gather(source, INDEX), atol=0, rtol=0)
    if source_batch == 1:
        # Every sample reads the single source row.
        for b in range(3):
            for j, i in enumerate(INDEX[b].tolist()):
                assert torch.equal(result[b, j], source[0, i])


def test_gather_tokens_integer_and_bool_sources() -> None:
    positions = torch.arange(10).reshape(2, 5) * 10
    index = torch.tensor([[4, 1], [0, 0]])
    assert gather_tokens(positions, index).tolist() == [[40, 10], [50, 50]]
    flags = torch.tensor([[True, False, True, False, True]])
    assert gather_tokens(flags, index).tolist() == [[True, False], [True, True]]


def test_gather_tokens_batch_one_index() -> None:
    source = torch.randn(1, 6, 4)
    index = torch.tensor([[5, 0, 3]])
    torch.testing.assert_close(gather_tokens(source, index), source[:, [5, 0, 3]], atol=0, rtol=0)
