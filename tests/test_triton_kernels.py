"""The Triton kernels against their PyTorch references, on fresh random inputs of several shapes.

On the CPU the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, set in ``conftest.py`` before any kernel
module is imported); with ``VLPRUNE_TEST_DEVICE=cuda`` they compile for the GPU and bfloat16 is checked too. Every
output buffer a kernel must fill is poisoned before the run (NaN, or an impossible integer), so an element the kernel
fails to write makes the comparison fail. The engine's own Triton path is checked end to end against its reference
path on a tiny model.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("triton")

from conftest import tiny_inputs, tiny_model

import vlprune.kernels as kernels
from vlprune import pruners
from vlprune.engine import attach
from vlprune.errors import VlpruneError
from vlprune.kernels import launch, reference, triton_attention, triton_gather, triton_merge

DEVICE = torch.device(os.environ.get("VLPRUNE_TEST_DEVICE", "cpu"))
FLOAT_TYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE.type == "cuda" else [])
POISON_INT = -7777
POISON_BYTE = 0xAB


def poisoned(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if dtype == torch.bool:
        return torch.full(shape, POISON_BYTE, dtype=torch.uint8, device=device).view(torch.bool)
    if dtype.is_floating_point:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.full(shape, POISON_INT, dtype=dtype, device=device)


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(launch, "empty", poisoned)


def same_values(actual: torch.Tensor, expected: torch.Tensor) -> bool:
    """Exact equality, bools compared by their bytes (a poisoned bool is neither 0 nor 1)."""
    if expected.dtype == torch.bool:
        return torch.equal(actual.view(torch.uint8), expected.to(torch.uint8))
    return actual.dtype == expected.dtype and torch.equal(actual, expected)


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------------------------- gather_rows


def per_token_sources(batch: int, length: int, dtype: torch.dtype, seed: int, rows: int = 0) -> list[torch.Tensor]:
    """Hidden states (odd width), RoPE cos and sin (cos shared by the batch), position ids and a boolean mask."""
    g = generator(seed)
    count = rows or length
    return [
        torch.randn(batch, count, 37, generator=g).to(dtype),
        torch.randn(1 if not rows else batch, count, 8, generator=g),
        torch.randn(batch, count, 8, generator=g),
        torch.randint(0, 1000, (batch, count), generator=g),
        torch.rand(batch, count, generator=g) > 0.5,
    ]


@pytest.mark.parametrize("dtype", FLOAT_TYPES)
@pytest.mark.parametrize("batch, length, kept, appended", [(1, 11, 5, 0), (3, 13, 7, 0), (3, 13, 9, 3), (1, 7, 8, 2)])
def test_gather_rows_equals_the_reference(
    batch: int, length: int, kept: int, appended: int, dtype: torch.dtype
) -> None:
    # Without appended rows: five sources, so one full launch of four and a second one; with them: four sources, each
    # with its own appended rows. Every source has its own dtype and width.
    sources = [s.to(DEVICE) for s in per_token_sources(batch, length, dtype, seed=length + kept)]
    extras = None
    if appended:
        sources = sources[:4]
        extras = [s.to(DEVICE) for s in per_token_sources(batch, length, dtype, seed=99, rows=appended)[:4]]
    g = generator(kept)
    index = torch.stack([torch.randperm(length + appended, generator=g)[:kept] for _ in range(batch)]).to(DEVICE)
    actual = triton_gather.gather_rows(index, sources, extras)
    expected = reference.gather_rows(index, sources, extras)
    assert len(actual) == len(sources)
    for got, want in zip(actual, expected, strict=True):
        assert got.shape == want.shape and same_values(got, want)


def test_gather_tokens_dispatch_keeps_shapes_of_every_rank() -> None:
    g = generator(3)
    index = torch.stack([torch.randperm(9, generator=g)[:4] for _ in range(2)]).to(DEVICE)
    for source in (torch.randn(2, 9, generator=g), torch.randn(1, 9, 3, 5, generator=g)):
        source = source.to(DEVICE)
        got = triton_gather.gather_rows(index, [source])[0]
        assert same_values(got, reference.gather_tokens(source, index))


def test_gather_rows_rejects_a_wrong_number_of_extras() -> None:
    sources = per_token_sources(1, 5, torch.float32, seed=0)[:2]
    index = torch.zeros(1, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="got 1 extras for 2 sources"):
        triton_gather.gather_rows(index, sources, [None])


# --------------------------------------------------------------------------------------------- attention_rows


def masks(kind: str, batch: int, q_len: int, k_len: int, dtype: torch.dtype) -> tuple[torch.Tensor | None, bool]:
    """(attention_mask, causal) for: a causal decoder without a mask, a boolean mask with a padding key in sample 0,
    its additive form shared by the batch, and a bidirectional encoder."""
    if kind == "causal":
        return None, True
    if kind == "bidirectional":
        return None, False
    allowed = torch.ones(q_len, k_len, dtype=torch.bool).tril(k_len - q_len)[None, None].repeat(batch, 1, 1, 1)
    allowed[0, :, :, 0] = False
    allowed[0, :, 0, 0] = True  # every row keeps at least one key
    if kind == "bool":
        return allowed, True
    additive = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    return additive[:1], True


ATTENTION_SHAPES = [
    pytest.param(1, 6, 6, 7, 7, 8, id="b1-mha-L7"),
    pytest.param(3, 6, 2, 13, 13, 16, id="b3-gqa3-L13"),
    pytest.param(3, 4, 4, 1, 70, 8, id="b3-decode-K70"),
    pytest.param(1, 6, 2, 9, 131, 12, id="b1-gqa3-K131-d12"),
]


@pytest.mark.parametrize("batch, heads, kv_heads, q_len, k_len, head_dim", ATTENTION_SHAPES)
@pytest.mark.parametrize("mask_kind", ["causal", "bool", "additive", "bidirectional"])
@pytest.mark.parametrize("dtype", FLOAT_TYPES)
@pytest.mark.parametrize("average_heads", [True, False])
def test_attention_rows_equals_the_reference(
    batch: int,
    heads: int,
    kv_heads: int,
    q_len: int,
    k_len: int,
    head_dim: int,
    mask_kind: str,
    dtype: torch.dtype,
    average_heads: bool,
) -> None:
    g = generator(batch * 100 + k_len)
    # Scaled up so that attention is far from uniform and a wrong pairing of heads or keys shows.
    query = (3 * torch.randn(batch, heads, q_len, head_dim, generator=g)).to(dtype).to(DEVICE)
    key = (3 * torch.randn(batch, kv_heads, k_len, head_dim, generator=g)).to(dtype).to(DEVICE)
    rows = torch.stack([torch.randint(0, q_len, (3,), generator=g) for _ in range(batch)]).to(DEVICE)
    mask, causal = masks(mask_kind, batch, q_len, k_len, dtype)
    mask = None if mask is None else mask.to(DEVICE)
    arguments = (query, key, rows, head_dim**-0.5, mask, causal, average_heads)
    actual = triton_attention.attention_rows(*arguments)
    expected = reference.attention_rows(*arguments)
    assert actual.shape == expected.shape and actual.dtype == torch.float32
    torch.testing.assert_close(actual, expected, atol=2e-6, rtol=1e-4)


def test_attention_rows_kernel_rejects_per_head_masks() -> None:
    query, key = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4)
    with pytest.raises(ValueError, match="has 2 heads"):
        triton_attention.attention_rows(query, key, torch.zeros(1, 1, dtype=torch.long), 0.5, torch.zeros(1, 2, 3, 3))


# --------------------------------------------------------------------------------------------- merge_tokens


@pytest.mark.parametrize("dtype", FLOAT_TYPES)
@pytest.mark.parametrize(
    "batch, count, width, groups, weighted",
    [(1, 9, 5, 3, False), (3, 30, 300, 7, True), (3, 17, 33, 6, True), (2, 1, 4, 2, False)],
)
def test_merge_tokens_equals_the_reference(
    batch: int, count: int, width: int, groups: int, weighted: bool, dtype: torch.dtype
) -> None:
    g = generator(count * 10 + groups)
    tokens = torch.randn(batch, count, width, generator=g).to(dtype).to(DEVICE)
    # The last group never gets a member (it must come out as zeros) and -1 leaves tokens out.
    group = torch.randint(-1, groups - 1, (batch, count), generator=g).to(DEVICE)
    weight = torch.rand(batch, count, generator=g).to(DEVICE) if weighted else None
    actual = triton_merge.merge_tokens(tokens, group, groups, weight)
    expected = reference.merge_tokens(tokens, group, groups, weight)
    assert actual.shape == (batch, groups, width) and actual.dtype == torch.float32
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
    assert torch.count_nonzero(actual[:, -1]) == 0


def test_merge_tokens_reference_is_the_weighted_mean_of_each_group() -> None:
    tokens = torch.tensor([[[1.0, 0.0], [3.0, 2.0], [5.0, 4.0], [100.0, 100.0]]])
    group = torch.tensor([[0, 0, 1, -1]])
    weight = torch.tensor([[1.0, 3.0, 2.0, 9.0]])
    merged = reference.merge_tokens(tokens, group, 3, weight)
    expected = torch.tensor([[[2.5, 1.5], [5.0, 4.0], [0.0, 0.0]]])  # (1*1 + 3*3) / 4, (0 + 3*2) / 4
    assert torch.equal(merged, expected)
    assert torch.equal(reference.merge_tokens(tokens, group, 3), torch.tensor([[[2.0, 1.0], [5.0, 4.0], [0.0, 0.0]]]))


# --------------------------------------------------------------------------------------------- GPU compilation

# The interpreter runs kernels as Python and misses what only the compiler rejects (types, constexpr branches), so
# every kernel variant the wrappers launch is also compiled for a Hopper GPU (H100/H200, sm_90) down to a cubin with
# the ptxas that Triton ships, in a process without TRITON_INTERPRET; no GPU is needed for that.
COMPILE_SCRIPT = textwrap.dedent(
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from vlprune.kernels import triton_attention, triton_gather, triton_merge

    def compile_for_hopper(kernel, pointers, constants):
        names = kernel.arg_names
        signature = {n: "constexpr" if n in constants else pointers.get(n, "i32") for n in names}
        constexprs = {(names.index(n),): v for n, v in constants.items()}
        compiled = triton.compile(
            ASTSource(fn=kernel, signature=signature, constexprs=constexprs), target=GPUTarget("cuda", 90, 32)
        )
        assert compiled.asm["cubin"], kernel

    for dtype in ("fp32", "fp16", "bf16"):
        gather = {"index": "*i64"}
        for slot, kind in enumerate((dtype, "fp32", "i64", "u8")):
            gather.update({f"s{slot}": "*" + kind, f"e{slot}": "*" + kind, f"t{slot}": "*" + kind})
        for extra in (True, False):
            flags = {f"EXTRA{slot}": extra for slot in range(4)}
            compile_for_hopper(triton_gather._gather_rows_kernel, gather, {"COUNT": 4, "BLOCK": 1024, **flags})
        for kind in (0, 1, 2):
            attention = {
                "query": "*" + dtype, "key": "*" + dtype, "mask": "*u8" if kind == 1 else "*" + dtype,
                "rows": "*i64", "row_max": "*fp32", "row_sum": "*fp32", "output": "*fp32", "scaling": "fp32",
            }
            shared = {"MASK_KIND": kind, "CAUSAL": kind == 0, "BLOCK_KEYS": 64, "BLOCK_DIM": 128}
            compile_for_hopper(triton_attention._row_statistics_kernel, attention, shared)
            for average in (True, False):
                probabilities = triton_attention._row_probabilities_kernel
                compile_for_hopper(probabilities, attention, {"AVERAGE": average, **shared})
        for weighted in (True, False):
            merge = {"tokens": "*" + dtype, "group": "*i64", "weight": "*fp32" if weighted else "*i64"}
            merge.update({"sums": "*fp32", "totals": "*fp32"})
            compile_for_hopper(triton_merge._scatter_add_kernel, merge, {"HAS_WEIGHT": weighted, "BLOCK": 256})
    compile_for_hopper(triton_merge._normalise_kernel, {"sums": "*fp32", "totals": "*fp32", "output": "*fp32"},
                       {"BLOCK": 256})
    print("compiled")
    """
)


def test_every_kernel_compiles_for_a_hopper_gpu() -> None:
    pytest.importorskip("triton.backends.nvidia")
    environment = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-c", COMPILE_SCRIPT], env=environment, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0 and "compiled" in result.stdout, result.stderr[-3000:]


# --------------------------------------------------------------------------------------------- dispatch


def test_the_cpu_and_the_forcing_variable_take_the_references(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.zeros(1)
    assert kernels.backend(cpu) == "reference"
    monkeypatch.setenv(kernels.FORCE_VARIABLE, "reference")
    assert kernels.backend(cpu) == "reference"
    monkeypatch.setenv(kernels.FORCE_VARIABLE, "fast")
    with pytest.raises(VlpruneError, match="VLPRUNE_KERNELS='fast' is not valid; choose one of auto, reference"):
        kernels.backend(cpu)


@pytest.mark.skipif(DEVICE.type != "cuda", reason="needs a GPU")
def test_cuda_tensors_take_the_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    assert kernels.backend(torch.zeros(1, device=DEVICE)) == "triton"
    monkeypatch.setenv(kernels.FORCE_VARIABLE, "reference")
    assert kernels.backend(torch.zeros(1, device=DEVICE)) == "reference"


# The interpreter's time grows with every kernel instance: SparseVLM and VisionZip, with the most launches, run one
# sample (FastV covers a batch; the kernels' own tests cover batches of up to three, and the weighted merge that
# VFlowOpt's recycling uses).
ENGINE_CASES = [
    ("fastv", {"keep": 12}, 2),  # attention rows of the last token, then the fused gather
    ("sparsevlm", {"keep": 0.3}, 1),  # text-rater rows, recycled tokens appended by the gather, the merge kernel
    ("visionzip", {"keep": 16}, 1),  # merge of contextual tokens, recycled before the LLM
]


@pytest.mark.parametrize("method, options, batch", ENGINE_CASES)
def test_the_engine_on_the_kernels_equals_the_engine_on_the_references(
    monkeypatch: pytest.MonkeyPatch, method: str, options: dict, batch: int
) -> None:
    model, processor = tiny_model()
    inputs = tiny_inputs(processor, batch=batch)

    def run() -> tuple[torch.Tensor, list[list[list[int]]]]:
        with torch.inference_mode(), attach(model, pruners.create(method, **options)) as session:
            logits = model(**inputs).logits
        return logits, [stage.kept_indices for stage in session.stats.stages]

    expected_logits, expected_kept = run()
    monkeypatch.setattr(kernels, "backend", lambda *tensors: "triton")  # the kernels, in the interpreter on the CPU
    logits, kept = run()
    assert kept == expected_kept
    torch.testing.assert_close(logits, expected_logits, atol=1e-5, rtol=1e-5)
