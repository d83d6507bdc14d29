"""The `vlprune` command line: `vlprune run` answers a question about an image; `vlprune methods` lists pruners."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from vlprune import pruners
from vlprune.api import DEFAULT_MODEL, check_before_loading, load
from vlprune.engine import POSITION_MODES
from vlprune.errors import VlpruneError
from vlprune.kernels import kernel_setting
from vlprune.pruners import parse_budget


class _Parser(argparse.ArgumentParser):
    """argparse, with a bad argument reported like any other bad value: one line, exit status 2 (the usage block is
    one ``--help`` away)."""

    def error(self, message: str) -> NoReturn:
        raise VlpruneError(f"{message} (see {self.prog} --help)")


COMPILE_HELP = "run the prefill and each decode step as captured graphs (torch.compile; greedy)"


def _budget(text: str) -> int | float:
    try:
        return parse_budget(text)
    except VlpruneError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _count(minimum: int) -> Callable[[str], int]:
    """An argparse type: an int of at least ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} must be at least {minimum}")
        return value

    parse.__name__ = "count"  # argparse names the type in its messages
    return parse


_positive = _count(1)
_non_negative = _count(0)


def _positions(text: str) -> list[str]:
    from vlprune.eval.sweep import parse_positions

    try:
        return parse_positions(text)
    except VlpruneError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _option(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"option {text!r} must look like name=value")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="vlprune", description="Visual-token pruning for vision-language models.")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="answer a question about an image with a pruning method")
    run.add_argument(
        "--model", default=DEFAULT_MODEL, help=f"built-in name, local folder or HF id (default {DEFAULT_MODEL})"
    )
    run.add_argument("--image", required=True, help="path of the image")
    run.add_argument("--question", required=True, help="question about the image")
    run.add_argument("--method", default=None, help="pruning method (see `vlprune methods`; default none)")
    run.add_argument("--keep", type=_budget, default=None, help="visual tokens kept: a count, or a fraction in (0, 1)")
    run.add_argument("--layer", type=int, default=None, help="decoder layer where an in-LLM method prunes")
    run.add_argument(
        "--option",
        type=_option,
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="another method option, e.g. --option seed=3 (repeatable)",
    )
    run.add_argument(
        "--positions", choices=POSITION_MODES, default=None, help="RoPE positions after pruning (default: the method's)"
    )
    run.add_argument("--config", default=None, help="JSON with method, keep and options (from `vlprune calibrate`)")
    run.add_argument("--max-new-tokens", type=_positive, default=32)
    run.add_argument("--device", default=None, help="torch device, e.g. cuda:0 (default: where the model loads)")
    run.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    run.add_argument("--device-map", default=None, help="'auto' spreads a large model over the GPUs")
    run.add_argument("--json", action="store_true", help="print the answer and the statistics as JSON")
    run.add_argument("--compile", action="store_true", help=COMPILE_HELP)

    evaluate = commands.add_parser("eval", help="exact-match accuracy on a VQA dataset, overall and per question type")
    evaluate.add_argument(
        "--model", default=DEFAULT_MODEL, help=f"built-in name, folder or HF id (default {DEFAULT_MODEL})"
    )
    evaluate.add_argument("--dataset", default="shapes", help="shapes, easy-vqa or jsonl:PATH")
    evaluate.add_argument("--split", default="test")
    evaluate.add_argument("--limit", type=_positive, default=None, help="first N questions only")
    evaluate.add_argument("--method", default=None, help="pruning method (see `vlprune methods`; default none)")
    evaluate.add_argument("--keep", type=_budget, default=None, help="visual tokens kept: a count, or a fraction")
    evaluate.add_argument("--layer", type=int, default=None, help="decoder layer where an in-LLM method prunes")
    evaluate.add_argument(
        "--option", type=_option, action="append", default=[], metavar="NAME=VALUE", help="another method option"
    )
    evaluate.add_argument("--config", default=None, help="JSON with method, keep and options (from calibrate)")
    evaluate.add_argument("--batch-size", type=_positive, default=8)
    evaluate.add_argument("--compile", action="store_true", help=COMPILE_HELP)
    evaluate.add_argument("--device", default=None)
    evaluate.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])

    calibrate = commands.add_parser(
        "calibrate", help="search a method's hyperparameters for a budget (visual-information-flow calibration)"
    )
    calibrate.add_argument("--method", default="vflowopt", help="method to calibrate (default vflowopt)")
    calibrate.add_argument("--model", default=DEFAULT_MODEL, help=f"built-in name, folder or HF id ({DEFAULT_MODEL})")
    calibrate.add_argument("--keep", type=_budget, required=True, help="budget: a count, or a fraction in (0, 1)")
    calibrate.add_argument("--data", default="shapes", help="unlabelled samples: shapes, easy-vqa or jsonl:PATH")
    calibrate.add_argument("--split", default="validation", help="split of --data (default validation)")
    calibrate.add_argument("--samples", type=_positive, default=30, help="samples to compare on (default 30)")
    calibrate.add_argument("--trials", type=_positive, default=50, help="search iterations (default 50)")
    calibrate.add_argument("--seed", type=int, default=0)
    calibrate.add_argument("--batch-size", type=_positive, default=8)
    calibrate.add_argument("--positions", choices=POSITION_MODES, default=None, help="default: the method's")
    calibrate.add_argument("--device", default=None)
    calibrate.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    calibrate.add_argument("--out", required=True, help="JSON file to write (for --config)")

    sweep = commands.add_parser("sweep", help="every method x budget over a dataset, one JSON line per cell (resumes)")
    sweep.add_argument("--model", default=DEFAULT_MODEL, help=f"built-in name, folder or HF id ({DEFAULT_MODEL})")
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
    sweep.add_argument("--device", default=None)
    sweep.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    sweep.add_argument("--device-map", default=None, help="'auto' spreads a large model over the GPUs")

    report = commands.add_parser("report", help="Markdown table and PNG plots of a sweep folder")
    report.add_argument("folder", help="the sweep's output folder")

    bench = commands.add_parser("bench", help="prefill time pruned vs unpruned, FLOPs ratio and selection time")
    bench.add_argument("--model", default=DEFAULT_MODEL, help=f"built-in name, folder or HF id ({DEFAULT_MODEL})")
    bench.add_argument("--method", required=True)
    bench.add_argument("--keep", type=_budget, default=None, help="visual tokens kept: a count or a fraction")
    bench.add_argument("--option", type=_option, action="append", default=[], metavar="NAME=VALUE")
    bench.add_argument("--image", default=None, help="image (default: a shipped sample)")
    bench.add_argument("--question", default="What color is the circle?")
    bench.add_argument("--batch", type=_positive, default=1)
    bench.add_argument(
        "--compile",
        action="store_true",
        help="compare pruned and unpruned both captured (and plain eager HF): prefill, first token, 32-token answer",
    )
    bench.add_argument("--warmup", type=_non_negative, default=2)
    bench.add_argument("--repeats", type=_positive, default=7)
    bench.add_argument("--device", default=None)
    bench.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])

    commands.add_parser("methods", help="list the pruning methods")
    return parser


def _method_settings(args: argparse.Namespace) -> tuple[str, int | float | None, dict[str, object]]:
    """(method, keep, options) from --config, overridden by --method, --keep and --option."""
    method, keep, options = "none", None, {}
    if args.config is not None:
        from vlprune.eval.calibrate import read_config

        config = read_config(args.config)
        method, keep, options = config["method"], config.get("keep"), dict(config.get("options", {}))
        if args.method is not None and args.method != method:
            raise VlpruneError(f"--method {args.method} contradicts the config's method {method!r}; drop one of them")
    method = args.method or method
    keep = args.keep if args.keep is not None else keep
    options.update(dict(args.option))
    repeated = sorted(set(options) & set(_FLAG_OPTIONS))
    if repeated:
        raise VlpruneError(f"--option {repeated[0]}=... repeats a flag: use --{repeated[0]} instead")
    return method, keep, options


_FLAG_OPTIONS = ("keep", "layer", "positions", "device", "dtype")


def _run(args: argparse.Namespace) -> int:
    method, keep, options = _method_settings(args)
    pipeline = load(
        args.model,
        method=method,
        keep=keep,
        layer=args.layer,
        device=args.device,
        dtype=args.dtype,
        positions=args.positions,
        device_map=args.device_map,
        compile=args.compile,
        **options,
    )
    with pipeline:
        result = pipeline(args.image, args.question, max_new_tokens=args.max_new_tokens)
    if args.json:
        payload = {
            "answer": result.text,
            "model": str(args.model),
            "method": method,
            "keep": keep,
            "stats": None if result.stats is None else result.stats.to_dict(),
        }
        print(json.dumps(payload, indent=2))
    else:
        print(result.text)
    return 0


def _eval(args: argparse.Namespace) -> int:
    from vlprune.eval.datasets import load_dataset
    from vlprune.eval.evaluate import evaluate

    samples = load_dataset(args.dataset, split=args.split, limit=args.limit)
    method, keep, options = _method_settings(args)
    pipeline = load(
        args.model,
        method=method,
        keep=keep,
        layer=args.layer,
        device=args.device,
        dtype=args.dtype,
        compile=args.compile,
        **options,
    )
    with pipeline:
        result = evaluate(pipeline, samples, batch_size=args.batch_size)
    print(f"{args.model} on {args.dataset} {args.split}, method {method}, keep {keep or 'all'}")
    print(result.table())
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    from vlprune.eval.calibrate import SEARCH_SPACES, calibrate, write_config
    from vlprune.eval.datasets import load_dataset
    from vlprune.eval.files import check_writable_file

    # Everything that can fail is checked before the model loads and the search runs.
    if args.method not in SEARCH_SPACES:
        raise VlpruneError(
            f"no calibration search space for {args.method!r}; methods with one: {', '.join(SEARCH_SPACES)}"
        )
    check_writable_file(args.out, "--out")
    check_before_loading(
        args.model, [pruners.create(args.method, keep=args.keep)], device=args.device, positions=args.positions
    )
    samples = load_dataset(args.data, split=args.split, limit=args.samples)
    pipeline = load(args.model, device=args.device, dtype=args.dtype, positions=args.positions)
    config = calibrate(
        pipeline, args.method, args.keep, samples, trials=args.trials, seed=args.seed, batch_size=args.batch_size
    )
    config.update(model=str(args.model), data=args.data, split=args.split, positions=args.positions)
    path = write_config(config, args.out)
    print(f"best mean cosine {config['score']:.4f} over {len(samples)} samples; wrote {path}")
    return 0


def _sweep(args: argparse.Namespace) -> int:
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


def _report(args: argparse.Namespace) -> int:
    from vlprune.eval.report import write_report

    path = write_report(args.folder)
    print(path.read_text().split("\n\nEvery measurement")[0])
    print(f"\nwrote {path} and its plots")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from pathlib import Path

    import vlprune
    from vlprune.eval.bench import TABLE_HEADER, bench
    from vlprune.eval.bench_captured import CAPTURED_HEADER, bench_captured

    image = args.image or str(Path(vlprune.__file__).parent / "samples" / "scene1.png")
    pruner = pruners.create(args.method, keep=args.keep, **dict(args.option))
    check_before_loading(args.model, [pruner], device=args.device, compile=args.compile)
    pipeline = load(args.model, device=args.device, dtype=args.dtype)
    if args.compile:
        captured = bench_captured(
            pipeline, args.method, args.keep, image, args.question, batch=args.batch, repeats=args.repeats,
            **dict(args.option),
        )  # fmt: skip
        print(f"{args.model}: batch {args.batch}, median of {args.repeats}, captured graphs ({captured.backend})")
        print(CAPTURED_HEADER)
        print("\n".join(captured.table_rows()))
        return 0
    result = bench(
        pipeline,
        args.method,
        args.keep,
        image,
        args.question,
        batch=args.batch,
        warmup=args.warmup,
        repeats=args.repeats,
        **dict(args.option),
    )
    print(f"{args.model}: {result.visual_tokens} visual tokens, batch {args.batch}, median of {args.repeats}")
    print(TABLE_HEADER)
    print(result.table_row())
    return 0


def _methods() -> int:
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


def _close_progress_bars() -> None:
    """Close the progress bars a failed command left open (its own bars close themselves; a library's may not), so
    that the error line starts on a line of its own instead of after a bar's last state: a closed bar ends its line."""
    std = sys.modules.get("tqdm.std")
    if std is None:  # no bar was ever made
        return
    for bar in list(std.tqdm._instances):  # tqdm's registry of the bars not closed yet (its subclasses' too)
        with contextlib.suppress(ValueError, OSError):  # a bar whose stream is gone must not hide the error
            bar.close()


def main(argv: Sequence[str] | None = None) -> int:
    commands = {
        "run": _run,
        "eval": _eval,
        "calibrate": _calibrate,
        "sweep": _sweep,
        "report": _report,
        "bench": _bench,
        "methods": lambda _: _methods(),
    }
    try:
        args = build_parser().parse_args(argv)
        kernel_setting()  # a bad VLPRUNE_KERNELS fails here, not inside the first generation
        status = commands[args.command](args)
        sys.stdout.flush()
        return status
    except VlpruneError as error:
        _close_progress_bars()
        print(f"vlprune: error: {error}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader stopped early (`vlprune report DIR | head`): what it read is all it wanted. Point stdout at
        # /dev/null so that the interpreter's final flush does not fail a second time.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
