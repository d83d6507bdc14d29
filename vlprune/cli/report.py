"""`vlprune report`: the Markdown table and PNG plots of a sweep folder."""

from __future__ import annotations

import argparse


def add_parser(commands: argparse._SubParsersAction, default_model: str) -> None:
    report = commands.add_parser("report", help="Markdown table and PNG plots of a sweep folder")
    report.add_argument("folder", help="the sweep's output folder")


def execute(args: argparse.Namespace) -> int:
    from vlprune.eval.report import write_report

    path = write_report(args.folder)
    print(path.read_text().split("\n\nEvery measurement")[0])
    print(f"\nwrote {path} and its plots")
    return 0
