"""A sweep folder's rows read back: merged from the shard files of a sharded run into ``results.jsonl``, read for a
report without changing any file (a line cut short by a kill is left out and named), and their medians and means."""

from __future__ import annotations

import math
import os
import statistics
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlprune.errors import VlpruneError
from vlprune.eval.sweep_files import RESULTS, ResultsFile, check_sweep_files, read_json_lines
from vlprune.eval.sweep_plan import row_key


def _new_rows(paths: Iterable[Path], seen: set[tuple[str, ...]], skipped: list[str]) -> Iterable[dict[str, Any]]:
    """Rows of the existing files among ``paths`` whose cell is not in ``seen`` yet (``seen`` grows as they come),
    read without changing the files; a last line cut short is left out and named in ``skipped``."""
    for path in paths:
        if not path.exists():
            continue
        read = read_json_lines(path)
        if read.torn_line is not None:
            skipped.append(
                f"{path} line {read.torn_line} was cut short (a sweep stopped while writing it) and is left out; "
                f"rerunning the sweep measures that cell again"
            )
        for row in read.rows:
            key = row_key(row)
            if key not in seen:
                seen.add(key)
                yield row


def merge_shards(folder: str | os.PathLike, count: int) -> Path:
    """Merge ``results-<i>.jsonl`` of ``count`` processes into ``results.jsonl`` (rows already there stay; each cell
    once).

    Raises:
        VlpruneError: a results file that is not the folder's own, or one that cannot be read or written.
    """
    folder = Path(folder)
    check_sweep_files(folder)
    merged = ResultsFile(folder / RESULTS)
    shards = (folder / f"results-{i}.jsonl" for i in range(count))
    for row in list(_new_rows(shards, merged.keys(), [])):
        merged.append(row)
    return merged.path


@dataclass(frozen=True)
class SweepRows:
    """The rows of a sweep folder, and the lines left out of them."""

    rows: list[dict[str, Any]]
    skipped: list[str]  # one sentence per line left out (a last line cut short by a kill)


def read_rows(folder: str | os.PathLike) -> SweepRows:
    """The rows of a sweep folder (``results.jsonl`` and any shard files not merged yet), each cell once, read without
    changing any file: a last line cut short by a kill is left out and named in ``skipped`` (the sweep's rerun
    removes it and measures its cell again).

    Raises:
        VlpruneError: the folder holds no results file, or one that cannot be read or holds a line that is no row.
    """
    folder = Path(folder)
    if not folder.is_dir():
        problem = "is not a folder" if folder.exists() else "does not exist"
        raise VlpruneError(f"{str(folder)!r} {problem}; give the --out folder of a `vlprune sweep`")
    if not (folder / RESULTS).exists() and not list(folder.glob("results-*.jsonl")):
        raise VlpruneError(f"{folder} holds no sweep results ({RESULTS})")
    skipped: list[str] = []
    rows = list(_new_rows([folder / RESULTS, *sorted(folder.glob("results-*.jsonl"))], set(), skipped))
    return SweepRows(rows, skipped)


def load_rows(folder: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of :func:`read_rows`; each line left out is named in a warning."""
    read = read_rows(folder)
    for sentence in read.skipped:
        warnings.warn(sentence, stacklevel=2)
    return read.rows


def median(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.median(present) if present else None


def mean(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None and not math.isnan(v)]
    return sum(present) / len(present) if present else None
