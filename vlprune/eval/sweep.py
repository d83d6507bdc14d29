"""Pruning-ratio sweeps: every method x budget (and the unpruned model) over a dataset, one JSON line per
(sample, method, budget), resumable.

Layout of an output folder::

    sweep.json          the sweep's settings; a re-run with other settings into the same folder is refused
    results.jsonl       one line per (sample, method, keep); the unpruned model is method "none", keep null
    results-<rank>.jsonl  per-process files of a sharded run (``accelerate launch``), merged into results.jsonl

Each line is written whole, with one write, and flushed to disk before the next cell starts; a write that fails (a
full disk) is cut back, and the sweep stops with one line. On a re-run, finished cells are skipped; a line cut short by
a kill in the middle of a write is removed before appending, so no row is lost or duplicated. A sweep reads, repairs
and writes only the files inside its folder (a link there to a file elsewhere is refused before anything is read),
and a report only reads them: it skips a line cut short and names it.

This module runs the cells; :mod:`~vlprune.eval.sweep_plan` says what a sweep runs, :mod:`~vlprune.eval.sweep_files`
keeps its folder's files and :mod:`~vlprune.eval.sweep_rows` reads its rows back. Their names are importable from
here as before.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from vlprune.adapters import adapter_for
from vlprune.api import Pipeline
from vlprune.engine.plan_check import check_fits
from vlprune.errors import VlpruneError
from vlprune.eval.cell_runner import CellRunner, Reference, fidelity
from vlprune.eval.datasets import VQASample, normalize_answer
from vlprune.eval.sweep_files import (
    RESULTS,
    SETTINGS,
    JsonLines,
    ResultsFile,
    _exclusive,
    check_folder,
    check_settings,
    check_sweep_files,
    read_json_lines,
)
from vlprune.eval.sweep_plan import (
    LLAVA_RATIOS,
    Cell,
    SweepSettings,
    _pruner,
    cell_key,
    cell_pruners,
    cells,
    parse_keeps,
    parse_positions,
    row_key,
    shard_of,
)
from vlprune.eval.sweep_rows import SweepRows, load_rows, mean, median, merge_shards, read_rows

__all__ = [
    "LLAVA_RATIOS",
    "RESULTS",
    "SETTINGS",
    "Cell",
    "JsonLines",
    "Reference",
    "ResultsFile",
    "SweepRows",
    "SweepSettings",
    "cell_key",
    "cell_pruners",
    "cells",
    "check_folder",
    "check_settings",
    "check_sweep_files",
    "fidelity",
    "load_rows",
    "mean",
    "median",
    "merge_shards",
    "parse_keeps",
    "parse_positions",
    "read_json_lines",
    "read_rows",
    "row_key",
    "run_sweep",
    "shard_of",
]


def run_sweep(
    pipeline: Pipeline,
    samples: Sequence[VQASample],
    settings: SweepSettings,
    folder: str | os.PathLike,
    *,
    shard: tuple[int, int] = (0, 1),
    progress: bool = True,
) -> Path:
    """Run (or resume) a sweep, writing rows as they are measured; returns this process's results file.

    Raises:
        VlpruneError: an unknown method or a bad budget, a folder holding a different sweep, or a sweep file that is
            not the folder's own writable file (all checked before anything is read or runs); a row that cannot be
            written (a full disk: the rows before it are kept, and a rerun resumes).
    """
    folder = Path(folder)
    index, count = shard
    mine = shard_of(samples, index, count)
    if settings.max_new_tokens < 1:
        raise VlpruneError(f"max_new_tokens={settings.max_new_tokens} must be at least 1")
    check_folder(folder, settings)
    runner = CellRunner(pipeline, settings.max_new_tokens)
    if samples:
        # Every budget against this model's token count, before the settings are saved or a cell runs.
        inputs = runner.inputs(samples[0])
        num_visual = int((inputs["input_ids"][0] == pipeline.model.config.image_token_id).sum())
        num_layers = adapter_for(pipeline.model).language_model_shape().num_layers
        for pruner in cell_pruners(settings):
            check_fits(pruner, num_visual, num_layers)
    results_name = RESULTS if count == 1 else f"results-{index}.jsonl"
    with _exclusive(folder, results_name):
        check_settings(folder, settings)
        results = ResultsFile(folder / results_name)
        # A sharded rerun (an extended --limit) skips the cells the merged results.jsonl already holds (read only:
        # every process reads it, and only the main one writes it, when it merges).
        merged: set[tuple[str, ...]] = set()
        if count > 1 and (folder / RESULTS).exists():
            merged = {row_key(row) for row in read_json_lines(folder / RESULTS).rows}
        _run_cells(runner, mine, settings, results, progress, merged)
    return results.path


def _run_cells(
    runner: CellRunner,
    mine: Sequence[VQASample],
    settings: SweepSettings,
    results: ResultsFile,
    progress: bool,
    elsewhere: set[tuple[str, ...]] = frozenset(),
) -> None:
    done = results.keys() | elsewhere
    todo = [(s, c) for s in mine for c in cells(settings) if cell_key(s.id, *c) not in done]
    unfinished = {sample.id for sample, _ in todo}
    pending = [s for s in mine if s.id in unfinished]
    # The bar is closed on failure too, so that the error is printed on a line of its own.
    with tqdm(total=len(todo), desc="sweep", disable=not progress) as bar:

        def write(row: dict[str, Any]) -> None:
            results.append(row)
            bar.update(1)

        (_run_captured_cells if settings.compile else _run_eager_cells)(runner, pending, settings, done, write)


def _run_eager_cells(
    runner: CellRunner,
    samples: Sequence[VQASample],
    settings: SweepSettings,
    done: set[tuple[str, ...]],
    write: Callable[[dict[str, Any]], None],
) -> None:
    """Sample by sample: each cell attaches its pruner for its one call."""
    warmed = False
    for sample in samples:
        inputs = runner.inputs(sample)
        if not warmed:  # the first calls pay for lazy initialisation; keep them out of the timings
            for method, keep, positions in cells(settings):
                runner.run(inputs, _pruner(settings, method, keep), positions)
            warmed = True
        reference_row, reference = runner.run(inputs, None)
        for method, keep, positions in cells(settings):
            if cell_key(sample.id, method, keep, positions) in done:
                continue
            if method == "none":
                row, outputs = reference_row, reference
            else:
                row, outputs = runner.run(inputs, _pruner(settings, method, keep), positions)
            write(_row(sample, (method, keep, positions), row, reference, outputs))


def _run_captured_cells(
    runner: CellRunner,
    samples: Sequence[VQASample],
    settings: SweepSettings,
    done: set[tuple[str, ...]],
    write: Callable[[dict[str, Any]], None],
) -> None:
    """Cell by cell: each cell's captured session stays attached over all samples, so its graphs are reused (a
    session's graphs live with it, and one session is attached at a time). The unpruned cell runs first and its
    outputs are kept, in host memory, for the other cells' fidelity."""
    if not samples:
        return
    num_visual = runner.num_visual(runner.inputs(samples[0]))
    references: dict[str, Reference] = {}
    with runner.captured_session(None, None, num_visual) as session:
        for sample in samples:
            row, reference = runner.run_captured(runner.inputs(sample), session)
            references[sample.id] = reference.on_host()
            if cell_key(sample.id, "none", None, None) not in done:
                write(_row(sample, ("none", None, None), row, reference, reference))
    for method, keep, positions in cells(settings)[1:]:
        pending = [s for s in samples if cell_key(s.id, method, keep, positions) not in done]
        if not pending:
            continue
        with runner.captured_session(_pruner(settings, method, keep), positions, num_visual) as session:
            for sample in pending:
                row, outputs = runner.run_captured(runner.inputs(sample), session)
                write(_row(sample, (method, keep, positions), row, references[sample.id], outputs))


def _row(
    sample: VQASample, cell: Cell, measured: dict[str, Any], reference: Reference, outputs: Reference
) -> dict[str, Any]:
    method, keep, positions = cell
    return {
        "sample": sample.id,
        "method": method,
        "keep": keep,
        "positions_setting": positions,
        "kind": sample.kind,
        "question": sample.question,
        "answer": sample.answer,
        "correct": normalize_answer(measured["prediction"]) == normalize_answer(sample.answer),
        **measured,
        **fidelity(reference, outputs),
    }
