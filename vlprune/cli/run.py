"""`vlprune run`: answer a question about an image with a pruning method."""

from __future__ import annotations

import argparse
import json

from vlprune.api import load
from vlprune.cli.options import (
    COMPILE_HELP,
    _method_settings,
    _positive,
    add_device_options,
    add_method_options,
    add_model_option,
)
from vlprune.engine import POSITION_MODES


def add_parser(commands: argparse._SubParsersAction, default_model: str) -> None:
    run = commands.add_parser("run", help="answer a question about an image with a pruning method")
    add_model_option(run, default_model, f"built-in name, local folder or HF id (default {default_model})")
    run.add_argument("--image", required=True, help="path of the image")
    run.add_argument("--question", required=True, help="question about the image")
    add_method_options(
        run,
        keep_help="visual tokens kept: a count, or a fraction in (0, 1)",
        option_help="another method option, e.g. --option seed=3 (repeatable)",
    )
    run.add_argument(
        "--positions", choices=POSITION_MODES, default=None, help="RoPE positions after pruning (default: the method's)"
    )
    run.add_argument("--config", default=None, help="JSON with method, keep and options (from `vlprune calibrate`)")
    run.add_argument("--max-new-tokens", type=_positive, default=32)
    add_device_options(run, "torch device, e.g. cuda:0 (default: where the model loads)")
    run.add_argument("--device-map", default=None, help="'auto' spreads a large model over the GPUs")
    run.add_argument("--json", action="store_true", help="print the answer and the statistics as JSON")
    run.add_argument("--compile", action="store_true", help=COMPILE_HELP)


def execute(args: argparse.Namespace) -> int:
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
