"""Decode throughput under batching: generated tokens per second and peak memory, unpruned against pruned.

Pruning 576 visual tokens to 64 cuts the KV cache that every decode step reads by about 4.7x (LLaVA-1.5's ~651-token
prompt), which should raise the tokens a batch generates per second. Each (method, budget, batch) runs captured
generation (``vlprune.attach(..., compile=True)``) for a fixed answer length (the end of sequence is ignored, so
every row decodes the same steps) on the random-weight models of ``benchmarks/prefill.py``; the first call compiles
and is not timed. Each row gives the tokens per second of whole answers (prefill included) and of the decode steps
alone (the answer's time after its first token, ``session.first_token_seconds``). A method that runs out of memory at
one batch size is not run at the larger ones.

    python benchmarks/throughput.py --preset small --batches 1,4 --answer 8              # CPU, a few minutes
    python benchmarks/throughput.py --preset llava-1.5-7b --device cuda --dtype bfloat16   # batches 1, 8, 32, 64
    python benchmarks/throughput.py --plot throughput.png

Peak memory is ``torch.cuda.max_memory_allocated`` on a GPU; on the CPU it is not measured. The KV cache column is
what the prefill left in the cache (``session.stats.kv_cache_bytes``: every layer's pruned length), on either device.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass

import torch
from prefill import PRESETS, build_inputs, build_model, sync

import vlprune

METHODS = "none,fastv,fastervlm,visionzip,sparsevlm"


@dataclass
class Measured:
    """One (method, budget, batch) row: medians over the timed answers."""

    rate: float  # generated tokens per second, prefill included
    decode_rate: float  # tokens per second of the decode steps alone (after the first token)
    cache_mib: float  # the prefill's KV cache
    peak_gib: float | None  # peak GPU memory; None on the CPU


def measure(session, inputs: dict, answer: int, repeats: int, device: str) -> Measured:
    """Generated tokens per second over ``repeats`` answers of ``answer`` tokens (after one untimed call that
    compiles and captures), whole and without the time to the first token."""
    session.generate(**inputs, max_new_tokens=answer, eos_token_id=[])
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    rates, decode_rates = [], []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        output = session.generate(**inputs, max_new_tokens=answer, eos_token_id=[])
        sync(device)
        elapsed = time.perf_counter() - start
        batch, generated = output.shape[0], output.shape[1] - inputs["input_ids"].shape[1]
        rates.append(batch * generated / elapsed)
        decode_rates.append(batch * (generated - 1) / (elapsed - session.first_token_seconds))
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None
    return Measured(
        statistics.median(rates), statistics.median(decode_rates), session.stats.kv_cache_bytes / 2**20, peak
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    parser.add_argument("--methods", default=METHODS)
    parser.add_argument("--keep", default="64,192", help="visual tokens kept (counts or fractions)")
    parser.add_argument("--batches", default="1,8,32,64")
    parser.add_argument("--answer", type=int, default=32, help="tokens generated per sample (at least 2)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backend", default=None, help="torch.compile backend (default inductor)")
    parser.add_argument("--plot", default=None, help="write a PNG of tokens per second against the batch size")
    args = parser.parse_args()
    if args.answer < 2:
        parser.error(f"--answer {args.answer}: the decode rate needs at least 2 generated tokens")

    preset, dtype = PRESETS[args.preset], getattr(torch, args.dtype)
    model = build_model(preset, args.device, dtype)
    budgets = [float(k) if "." in k else int(k) for k in args.keep.split(",")]
    cases = [("none", None)] + [(m, k) for m in args.methods.split(",") if m != "none" for k in budgets]
    options = {} if args.backend is None else {"backend": args.backend}
    results: dict[tuple[str, int | float | None], dict[int, Measured]] = {}
    out_of_memory: set[tuple[str, int | float | None]] = set()
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(f"preset {args.preset}, {device_name}, {args.dtype}, {args.answer}-token answers, median of {args.repeats}")
    columns = "method | keep | batch | tokens/s | vs unpruned | decode tokens/s | vs unpruned | KV cache MiB | peak GiB"
    print(f"| {columns} |")
    print("|---|---|---|---|---|---|---|---|---|")
    for batch in [int(b) for b in args.batches.split(",")]:
        if len(out_of_memory) == len(cases):
            break
        inputs = build_inputs(preset, batch, args.device, dtype, model)
        for case in cases:
            if case in out_of_memory:  # a larger batch would not fit either
                continue
            method, keep = case
            try:
                pruner = vlprune.pruners.create(method, keep=keep)
                with vlprune.attach(model, pruner, compile=True, **options) as session:
                    row = measure(session, inputs, args.answer, args.repeats, args.device)
            except torch.OutOfMemoryError:
                out_of_memory.add(case)
                torch.cuda.empty_cache()
                print(f"| {method} | {keep or 'all'} | {batch} | out of memory | | | | | |", flush=True)
                continue
            results.setdefault(case, {})[batch] = row
            print(format_row(method, keep, batch, row, results.get(("none", None), {}).get(batch)), flush=True)
    if args.plot:
        plot(results, args.plot, f"{args.preset} on {device_name}, {args.answer}-token answers")


def format_row(method: str, keep: int | float | None, batch: int, row: Measured, unpruned: Measured | None) -> str:
    ratio = "—" if unpruned is None else f"{row.rate / unpruned.rate:.2f}x"
    decode_ratio = "—" if unpruned is None else f"{row.decode_rate / unpruned.decode_rate:.2f}x"
    peak = "—" if row.peak_gib is None else f"{row.peak_gib:.1f}"
    return (
        f"| {method} | {keep or 'all'} | {batch} | {row.rate:.1f} | {ratio} | {row.decode_rate:.1f} | {decode_ratio} "
        f"| {row.cache_mib:.2f} | {peak} |"
    )


def plot(results: dict, path: str, title: str) -> None:
    """Tokens per second against the batch size, whole answers on the left and decode steps alone on the right."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(1, 2, figsize=(11, 4.5))
    for (method, keep), rows in results.items():
        label = "unpruned" if method == "none" else f"{method} {keep}"
        batches = sorted(rows)
        axes[0].plot(batches, [rows[b].rate for b in batches], marker="o", label=label)
        axes[1].plot(batches, [rows[b].decode_rate for b in batches], marker="o", label=label)
    for axis, what in zip(axes, ["generated tokens per second", "decode tokens per second"], strict=True):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("batch size")
        axis.set_ylabel(what)
        axis.legend(fontsize=8)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
