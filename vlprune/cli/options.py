"""What the commands share: the parser that reports a bad argument in one line, the argparse types of budgets, counts,
positions and method options, the --model, --device and --dtype options, and the method settings read from --config,
--method, --keep and --option."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import NoReturn

from vlprune.errors import VlpruneError
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


DTYPES = ["float32", "float16", "bfloat16"]


def add_model_option(parser: argparse.ArgumentParser, default: str, help: str) -> None:
    """--model: a built-in name, a local folder or a Hugging Face id (each command words its help its own way)."""
    parser.add_argument("--model", default=default, help=help)


def add_method_options(parser: argparse.ArgumentParser, keep_help: str, option_help: str) -> None:
    """--method, --keep, --layer and --option: the method and its settings, as `run` and `eval` take them."""
    parser.add_argument("--method", default=None, help="pruning method (see `vlprune methods`; default none)")
    parser.add_argument("--keep", type=_budget, default=None, help=keep_help)
    parser.add_argument("--layer", type=int, default=None, help="decoder layer where an in-LLM method prunes")
    parser.add_argument("--option", type=_option, action="append", default=[], metavar="NAME=VALUE", help=option_help)


def add_device_options(parser: argparse.ArgumentParser, device_help: str | None = None) -> None:
    """--device and --dtype: where the model runs, and in which dtype."""
    parser.add_argument("--device", default=None, help=device_help)
    parser.add_argument("--dtype", default=None, choices=DTYPES)


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
