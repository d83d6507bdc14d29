"""The `vlprune` command line: `vlprune run` answers a question about an image; `vlprune methods` lists pruners."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from vlprune import pruners
from vlprune.api import DEFAULT_MODEL, load
from vlprune.engine import POSITION_MODES
from vlprune.errors import VlpruneError


def _budget(text: str) -> int | float:
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"keep={text!r} must be a count (64) or a fraction (0.25)") from None


def _option(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"option {text!r} must look like name=value")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlprune", description="Visual-token pruning for vision-language models.")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="answer a question about an image with a pruning method")
    run.add_argument(
        "--model", default=DEFAULT_MODEL, help=f"built-in name, local folder or HF id (default {DEFAULT_MODEL})"
    )
    run.add_argument("--image", required=True, help="path of the image")
    run.add_argument("--question", required=True, help="question about the image")
    run.add_argument("--method", default="none", help="pruning method (see `vlprune methods`)")
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
    run.add_argument("--positions", choices=POSITION_MODES, default="original", help="RoPE positions after pruning")
    run.add_argument("--max-new-tokens", type=int, default=32)
    run.add_argument("--device", default=None, help="torch device, e.g. cuda:0 (default: where the model loads)")
    run.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    run.add_argument("--json", action="store_true", help="print the answer and the statistics as JSON")

    evaluate = commands.add_parser("eval", help="exact-match accuracy on a VQA dataset, overall and per question type")
    evaluate.add_argument(
        "--model", default=DEFAULT_MODEL, help=f"built-in name, folder or HF id (default {DEFAULT_MODEL})"
    )
    evaluate.add_argument("--dataset", default="shapes", help="shapes, easy-vqa or jsonl:PATH")
    evaluate.add_argument("--split", default="test")
    evaluate.add_argument("--limit", type=int, default=None, help="first N questions only")
    evaluate.add_argument("--method", default="none", help="pruning method (see `vlprune methods`)")
    evaluate.add_argument("--keep", type=_budget, default=None, help="visual tokens kept: a count, or a fraction")
    evaluate.add_argument("--layer", type=int, default=None, help="decoder layer where an in-LLM method prunes")
    evaluate.add_argument("--batch-size", type=int, default=8)
    evaluate.add_argument("--device", default=None)
    evaluate.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])

    commands.add_parser("methods", help="list the pruning methods")
    return parser


_FLAG_OPTIONS = ("keep", "layer", "positions", "device", "dtype")


def _run(args: argparse.Namespace) -> int:
    options = dict(args.option)
    repeated = sorted(set(options) & set(_FLAG_OPTIONS))
    if repeated:
        raise VlpruneError(f"--option {repeated[0]}=... repeats a flag: use --{repeated[0]} instead")
    pipeline = load(
        args.model,
        method=args.method,
        keep=args.keep,
        layer=args.layer,
        device=args.device,
        dtype=args.dtype,
        positions=args.positions,
        **options,
    )
    result = pipeline(args.image, args.question, max_new_tokens=args.max_new_tokens)
    if args.json:
        payload = {
            "answer": result.text,
            "model": str(args.model),
            "method": args.method,
            "keep": args.keep,
            "stats": None if result.stats is None else result.stats.to_dict(),
        }
        print(json.dumps(payload, indent=2))
    else:
        print(result.text)
    return 0


def _eval(args: argparse.Namespace) -> int:
    from vlprune.eval.datasets import load_dataset
    from vlprune.eval.evaluate import evaluate

    if args.limit is not None and args.limit < 1:
        raise VlpruneError(f"--limit {args.limit} must be at least 1")
    samples = load_dataset(args.dataset, split=args.split, limit=args.limit)
    pipeline = load(
        args.model, method=args.method, keep=args.keep, layer=args.layer, device=args.device, dtype=args.dtype
    )
    result = evaluate(pipeline, samples, batch_size=args.batch_size)
    print(f"{args.model} on {args.dataset} {args.split}, method {args.method}, keep {args.keep or 'all'}")
    print(result.table())
    return 0


def _methods() -> int:
    rows = [(name, cls.stage.value, cls.reference) for name, cls in ((n, pruners.get(n)) for n in pruners.available())]
    widths = [max(len(row[i]) for row in [("name", "stage", "reference"), *rows]) for i in range(2)]
    print(f"{'name':<{widths[0]}}  {'stage':<{widths[1]}}  reference")
    for name, stage, reference in rows:
        print(f"{name:<{widths[0]}}  {stage:<{widths[1]}}  {reference}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        commands = {"run": _run, "eval": _eval, "methods": lambda _: _methods()}
        return commands[args.command](args)
    except VlpruneError as error:
        print(f"vlprune: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
