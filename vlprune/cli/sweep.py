"""`vlprune sweep`: every method x budget over a dataset, one JSON line per cell, resumable and shardable."""

from __future__ import annotations

import argparse

from vlprune.api import check_before_loading, load
from vlprune.cli.options import COMPILE_HELP, _positions, _positive, add_device_options, add_model_option
from vlprune.errors import VlpruneError


def add_parser(commands: argparse._SubParsersAction, default_model: str) -> None:
    sweep = commands.add_parser("sweep", help="every method x budget over a dataset, one JSON line per cell (resumes)")
    add_model_option(sweep, default_model, f"built-in name, folder or HF id ({default_model})")
    sweep.add_argument("--dataset", default="shapes", help="shapes, easy-vqa or jsonl:PATH")
    sweep.add_argument("--split", default="test")
    sweep.add_argument("--methods", required=True, help="comma-separated methods, e.g. fastv,sparsevlm,visionzip")
    sweep.add_argument("--keep", default="llava", help="budgets: 64,128,192 or fractions, or llava (11.1/22.2/33.3%%)")
    sweep.add_argument("--limit", type=_positive, default=None, help="first N samples only")
    sweep.add_argument("--out", default="sweep", help="output folder (default ./sweep)")
    sweep.add_argument("--max-new-tokens", type=_positive, default=8)
    sweep.add_argument(
        "--positions",
        type=_positions,
        default=None,
        help="RoPE numbering per pruned cell: original, reindex or original,reindex (default: each method's)",
    )
    sweep.add_argument(
        "--compile", action="store_true", help=COMPILE_HELP + "; each cell's graphs are reused over all its samples"
    )
    add_device_options(sweep)
    sweep.add_argument("--device-map", default=None, help="'auto' spreads a large model over the GPUs")


def execute(args: argparse.Namespace) -> int:
    from accelerate import PartialState

    from vlprune.eval.datasets import load_dataset
    from vlprune.eval.sweep import SweepSettings, cell_pruners, check_folder, merge_shards, parse_keeps, run_sweep

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods:
        raise VlpruneError("--methods needs at least one method")
    settings = SweepSettings(
        model=str(args.model),
        dataset=args.dataset,
        split=args.split,
        limit=args.limit,
        methods=methods,
        keeps=parse_keeps(args.keep),
        max_new_tokens=args.max_new_tokens,
        positions=args.positions,
        compile=args.compile,
    )
    # Every setting, the output folder and the budgets against the model's configuration are checked before the
    # model loads and before anything is written, so that a corrected rerun is never refused.
    check_folder(args.out, settings)
    check_before_loading(
        args.model,
        cell_pruners(settings),
        device=args.device,
        device_map=args.device_map,
        positions=args.positions,
        compile=args.compile,
    )
    samples = load_dataset(args.dataset, split=args.split, limit=args.limit)
    import torch

    # One process, or one of several under `accelerate launch`; without a GPU the processes talk over gloo.
    state = PartialState(cpu=args.device == "cpu" or not torch.cuda.is_available())
    device = args.device or (str(state.device) if state.num_processes > 1 else None)
    if args.device_map is not None and state.num_processes > 1:
        raise VlpruneError("--device-map spreads one model over the GPUs; run it in one process, not sharded")
    pipeline = load(
        args.model, device=None if args.device_map else device, dtype=args.dtype, device_map=args.device_map
    )
    path = run_sweep(
        pipeline,
        samples,
        settings,
        args.out,
        shard=(state.process_index, state.num_processes),
        progress=state.is_local_main_process,
    )
    if state.num_processes > 1:
        state.wait_for_everyone()
        if state.is_main_process:
            path = merge_shards(args.out, state.num_processes)
    if state.is_main_process:
        print(f"results in {path}; `vlprune report {args.out}` writes the table and plots")
    return 0
