"""Each fused kernel against the plain PyTorch sequence it replaces, at LLaVA-1.5-7B shapes (hidden 4096, 32 heads of
128, 576 visual tokens in a 640-token prompt), batch 1 and 16.

    python benchmarks/kernel_speed.py                       # on a GPU: Triton kernels vs PyTorch
    python benchmarks/kernel_speed.py --device cpu          # the reference path only (the CPU never runs the kernels)

For every operation it prints the median time of the kernel and of the PyTorch sequence, the kernel's effective
bandwidth (bytes it must read and write / time), and that bandwidth as a share of a device-to-device copy of the same
number of bytes measured in the same run.

Targets on an H200 (issue 7): the gather at >= 80% of the copy bandwidth; attention-row scoring faster than PyTorch at
every shape.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from vlprune.kernels import reference

HIDDEN, HEADS, HEAD_DIM, VISUAL, PROMPT, KEPT = 4096, 32, 128, 576, 640, 64


def median_ms(run: Callable[[], object], device: torch.device, repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            run()
            times.append((time.perf_counter() - begin) * 1e3)
    return statistics.median(times)


@dataclass
class Case:
    name: str
    batch: int
    kernel: Callable[[], object] | None
    pytorch: Callable[[], object]
    moved_bytes: int  # what the operation must read and write at the least


def gather_case(batch: int, dtype: torch.dtype, device: torch.device, kernels: bool) -> Case:
    """A stage's compaction: hidden states, cos, sin and position ids of the kept tokens (64 of 576 visual kept, the
    text around them), 8 recycled tokens appended."""
    generator = torch.Generator(device="cpu").manual_seed(0)
    recycled = 8
    hidden = torch.randn(batch, PROMPT, HIDDEN, dtype=dtype, device=device)
    cos, sin = (torch.randn(batch, PROMPT, HEAD_DIM, dtype=dtype, device=device) for _ in range(2))
    positions = torch.arange(PROMPT, device=device).expand(batch, -1).contiguous()
    extras = [
        torch.randn(batch, recycled, HIDDEN, dtype=dtype, device=device),
        torch.randn(batch, recycled, HEAD_DIM, dtype=dtype, device=device),
        torch.randn(batch, recycled, HEAD_DIM, dtype=dtype, device=device),
        torch.arange(recycled, device=device).expand(batch, -1).contiguous(),
    ]
    text = PROMPT - VISUAL
    rows = []
    for _ in range(batch):
        visual = torch.randperm(VISUAL, generator=generator)[:KEPT].sort().values + 5
        rows.append(
            torch.cat(
                [torch.arange(5), visual, torch.arange(PROMPT, PROMPT + recycled), 5 + VISUAL + torch.arange(text - 5)]
            )
        )
    index = torch.stack(rows).to(device)
    sources = [hidden, cos, sin, positions]
    out_rows = index.shape[1]
    moved = 2 * batch * out_rows * (HIDDEN * hidden.element_size() + 2 * HEAD_DIM * cos.element_size() + 8)
    kernel = None
    if kernels:
        from vlprune.kernels import triton_gather

        kernel = lambda: triton_gather.gather_rows(index, sources, extras)  # noqa: E731
    return Case("gather + compaction", batch, kernel, lambda: reference.gather_rows(index, sources, extras), moved)


def attention_case(batch: int, rows: int, dtype: torch.dtype, device: torch.device, kernels: bool) -> Case:
    """Head-averaged attention of ``rows`` query rows (1: FastV's last token; 32: SparseVLM's text raters)."""
    query = torch.randn(batch, HEADS, PROMPT, HEAD_DIM, dtype=dtype, device=device)
    key = torch.randn(batch, HEADS, PROMPT, HEAD_DIM, dtype=dtype, device=device)
    picked = torch.arange(PROMPT - rows, PROMPT, device=device).expand(batch, -1).contiguous()
    scale = HEAD_DIM**-0.5
    element = query.element_size()
    moved = batch * (HEADS * rows * HEAD_DIM * element + HEADS * PROMPT * HEAD_DIM * element + rows * PROMPT * 4)
    kernel = None
    if kernels:
        from vlprune.kernels import triton_attention

        kernel = lambda: triton_attention.attention_rows(query, key, picked, scale)  # noqa: E731
    name = f"attention rows (R={rows})"
    return Case(name, batch, kernel, lambda: reference.attention_rows(query, key, picked, scale), moved)


def merge_case(batch: int, groups: int, dtype: torch.dtype, device: torch.device, kernels: bool) -> Case:
    """The 512 pruned visual tokens merged, weighted, into ``groups`` clusters or grid cells."""
    pruned = VISUAL - KEPT
    tokens = torch.randn(batch, pruned, HIDDEN, dtype=dtype, device=device)
    group = torch.randint(0, groups, (batch, pruned), device=device)
    weight = torch.rand(batch, pruned, device=device)
    moved = batch * (pruned * HIDDEN * tokens.element_size() + groups * HIDDEN * 4)
    kernel = None
    if kernels:
        from vlprune.kernels import triton_merge

        kernel = lambda: triton_merge.merge_tokens(tokens, group, groups, weight)  # noqa: E731
    name = f"recycling merge (G={groups})"
    return Case(name, batch, kernel, lambda: reference.merge_tokens(tokens, group, groups, weight), moved)


def copy_ms(moved_bytes: int, device: torch.device, repeats: int) -> float:
    """A device-to-device copy of ``moved_bytes`` bytes in all (half read, half written)."""
    source = torch.empty(moved_bytes // 2, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    return median_ms(lambda: target.copy_(source), device, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    kernels = device.type == "cuda"
    name = torch.cuda.get_device_name(device) if kernels else f"CPU ({torch.get_num_threads()} threads), reference only"
    print(f"{name}, {dtype}, median of {args.repeats}")
    print("| operation | batch | kernel ms | PyTorch ms | speed-up | kernel GB/s | copy GB/s | share of copy |")
    print("|---|---|---|---|---|---|---|---|")
    for batch in (int(b) for b in args.batches.split(",")):
        cases = [
            gather_case(batch, dtype, device, kernels),
            attention_case(batch, 1, dtype, device, kernels),
            attention_case(batch, 32, dtype, device, kernels),
            merge_case(batch, 8, dtype, device, kernels),
            merge_case(batch, 81, dtype, device, kernels),
        ]
        for case in cases:
            pytorch = median_ms(case.pytorch, device, args.repeats)
            copy = copy_ms(case.moved_bytes, device, args.repeats)
            copy_rate = case.moved_bytes / copy / 1e6
            if case.kernel is None:
                print(f"| {case.name} | {batch} | - | {pytorch:.3f} | - | - | {copy_rate:.0f} | - |", flush=True)
                continue
            kernel = median_ms(case.kernel, device, args.repeats)
            rate = case.moved_bytes / kernel / 1e6
            print(
                f"| {case.name} | {batch} | {kernel:.3f} | {pytorch:.3f} | {pytorch / kernel:.2f}x | {rate:.0f} | "
                f"{copy_rate:.0f} | {rate / copy_rate:.0%} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
