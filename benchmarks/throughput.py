"""Decode throughput under batching: generated tokens per second and peak memory, unpruned against pruned.

Pruning 576 visual tokens to 64 cuts the KV cache that every decode step reads by about 4.7x (LLaVA-1.5's ~651-token
prompt), which should raise the tokens a batch generates per second. Each (method, budget, batch) runs captured
generation (``vlprune.attach(..., compile=True)``) for a fixed answer length (the end of sequence is ignored, so
every row decodes the same steps) on the random-weight models of ``benchmarks/prefill.py``; the first call compiles
and is not timed. Batches stop growing at the first one that runs out of memory.

    python benchmarks/throughput.py --preset small --batches 1,4 --answer 8              # CPU, a few minutes
    python benchmarks/throughput.py --preset llava-1.5-7b --device cuda --dtype bfloat16   # batches 1, 8, 32, 64
    python benchmarks/throughput.py --plot throughput.png

Peak memory is ``torch.cuda.max_memory_allocated`` on a GPU; on the CPU it is not measured.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from prefill import PRESETS, build_inputs, build_model, sync

import vlprune

METHODS = "none,fastv,fastervlm,visionzip,sparsevlm"


def tokens_per_second(session, inputs: dict, answer: int, repeats: int, device: str) -> tuple[float, float | None]:
    """Median generated tokens per second over ``repeats`` answers (after one untimed call), and peak memory (GiB)."""
    session.generate(**inputs, max_new_tokens=answer, eos_token_id=[])  # compiles and captures
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    rates = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        output = session.generate(**inputs, max_new_tokens=answer, eos_token_id=[])
        sync(device)
        generated = output.shape[0] * (output.shape[1] - inputs["input_ids"].shape[1])
        rates.append(generated / (time.perf_counter() - start))
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None
    return statistics.median(rates), peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    parser.add_argument("--methods", default=METHODS)
    parser.add_argument("--keep", default="64,192", help="visual tokens kept (counts or fractions)")
    parser.add_argument("--batches", default="1,8,32,64")
    parser.add_argument("--answer", type=int, default=32, help="tokens generated per sample")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backend", default=None, help="torch.compile backend (default inductor)")
    parser.add_argument("--plot", default=None, help="write a PNG of tokens per second against the batch size")
    args = parser.parse_args()

    preset, dtype = PRESETS[args.preset], getattr(torch, args.dtype)
    model = build_model(preset, args.device, dtype)
    budgets = [float(k) if "." in k else int(k) for k in args.keep.split(",")]
    cases = [("none", None)] + [(m, k) for m in args.methods.split(",") if m != "none" for k in budgets]
    options = {} if args.backend is None else {"backend": args.backend}
    results: dict[tuple[str, int | float | None], list[tuple[int, float, float | None]]] = {}
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(f"preset {args.preset}, {device_name}, {args.dtype}, {args.answer}-token answers, median of {args.repeats}")
    print("| method | keep | batch | tokens/s | vs unpruned | peak memory GiB |")
    print("|---|---|---|---|---|---|")
    for batch in [int(b) for b in args.batches.split(",")]:
        inputs = build_inputs(preset, batch, args.device, dtype, model)
        for method, keep in cases:
            pruner = vlprune.pruners.create(method, keep=keep)
            try:
                with vlprune.attach(model, pruner, compile=True, **options) as session:
                    rate, peak = tokens_per_second(session, inputs, args.answer, args.repeats, args.device)
            except torch.OutOfMemoryError:
                print(f"| {method} | {keep or 'all'} | {batch} | out of memory | | |")
                continue
            results.setdefault((method, keep), []).append((batch, rate, peak))
            base = dict((b, r) for b, r, _ in results.get(("none", None), []))
            ratio = f"{rate / base[batch]:.2f}x" if batch in base else "—"
            memory = "—" if peak is None else f"{peak:.1f}"
            print(f"| {method} | {keep or 'all'} | {batch} | {rate:.1f} | {ratio} | {memory} |", flush=True)
    if args.plot:
        plot(results, args.plot, f"{args.preset} on {device_name}")


def plot(results: dict, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axis = pyplot.subplots(figsize=(7, 4.5))
    for (method, keep), rows in results.items():
        batches, rates = [b for b, _, _ in rows], [r for _, r, _ in rows]
        axis.plot(batches, rates, marker="o", label="unpruned" if method == "none" else f"{method} {keep}")
    axis.set_xscale("log", base=2)
    axis.set_xlabel("batch size")
    axis.set_ylabel("generated tokens per second")
    axis.set_title(title)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
