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
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import statistics
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout
from tqdm import tqdm

from vlprune import pruners
from vlprune.adapters import adapter_for
from vlprune.api import Pipeline
from vlprune.engine.plan_check import check_fits
from vlprune.errors import VlpruneError
from vlprune.eval.cell_runner import CellRunner, Reference, fidelity
from vlprune.eval.datasets import VQASample, normalize_answer
from vlprune.eval.files import (
    append_whole,
    cannot_write,
    check_own_file,
    check_writable_folder,
    cut_to,
    write_text_atomically,
)
from vlprune.pruners import parse_budget

RESULTS = "results.jsonl"
SETTINGS = "sweep.json"
LLAVA_RATIOS = (64 / 576, 128 / 576, 192 / 576)
"""LLaVA-1.5's budgets, 64, 128 and 192 of 576 visual tokens, as fractions for models with other token counts."""


@dataclass(frozen=True)
class SweepSettings:
    """What a sweep runs; saved as ``sweep.json`` so that a re-run can check it continues the same sweep."""

    model: str
    dataset: str
    split: str
    limit: int | None
    methods: list[str]
    keeps: list[int | float]
    max_new_tokens: int = 8
    options: dict[str, Any] = field(default_factory=dict)
    positions: list[str] | None = None  # modes to run each pruned cell in; None: each method's reference's numbering
    compile: bool = False  # captured (compiled) generation: its timings are not comparable with eager ones


_DEFAULTED = {"compile": False}  # settings newer than some saved folders, with the value those folders ran


def parse_keeps(text: str) -> list[int | float]:
    """``"64,128,192"`` or ``"0.111,0.222"`` -> budgets; the keyword ``llava`` gives LLaVA-1.5's three ratios.

    Raises:
        VlpruneError: an empty list, or an item that is not a valid budget (see :func:`vlprune.pruners.parse_budget`).
    """
    if text.strip() == "llava":
        return list(LLAVA_RATIOS)
    keeps: list[int | float] = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        try:
            keeps.append(parse_budget(item))
        except VlpruneError as error:
            raise VlpruneError(f"--keep item {item!r}: {error}") from None
    if not keeps:
        raise VlpruneError("--keep needs at least one budget")
    return keeps


def parse_positions(text: str) -> list[str]:
    """``"original"``, ``"reindex"`` or ``"original,reindex"`` -> the RoPE numbering modes a sweep runs each pruned
    cell in.

    Raises:
        VlpruneError: an empty list, an unknown mode, or one named twice.
    """
    from vlprune.engine import POSITION_MODES

    modes = [item.strip() for item in text.split(",") if item.strip()]
    for mode in modes:
        if mode not in POSITION_MODES:
            raise VlpruneError(f"--positions item {mode!r} is not valid; choose from {', '.join(POSITION_MODES)}")
    if not modes or len(set(modes)) != len(modes):
        raise VlpruneError(f"--positions {text!r} must name each of {', '.join(POSITION_MODES)} at most once")
    return modes


Cell = tuple[str, int | float | None, str | None]
"""(method, keep, positions): positions None is the method's reference's numbering."""


def cells(settings: SweepSettings) -> list[Cell]:
    """The (method, keep, positions) cells of a sweep, the unpruned reference first (its numbering is moot)."""
    modes: list[str | None] = list(settings.positions) if settings.positions else [None]
    pruned = [(m, k, p) for m in settings.methods if m != "none" for k in settings.keeps for p in modes]
    return [("none", None, None), *pruned]


def cell_key(sample: str, method: str, keep: int | float | None, positions: str | None = None) -> tuple[str, ...]:
    return (sample, method, json.dumps(keep), positions or "")


def row_key(row: dict[str, Any]) -> tuple[str, ...]:
    """The cell key of a results row (rows written before positions lists have none: the method's numbering)."""
    return cell_key(row["sample"], row["method"], row["keep"], row.get("positions_setting"))


@dataclass(frozen=True)
class JsonLines:
    """What a results file holds, read without changing it."""

    rows: list[dict[str, Any]]
    complete_bytes: int  # the length of its complete lines
    torn_line: int | None  # the number of its last line when a kill cut that line short (it has no newline)


def read_json_lines(path: Path) -> JsonLines:
    """The rows of a results file; a last line without its newline (a write cut short) is left out and numbered.

    Raises:
        VlpruneError: the file cannot be read, or a complete line is not a results row.
    """
    try:
        data = path.read_bytes()
    except OSError as error:
        raise VlpruneError(f"cannot read {str(path)!r}: {error.strerror or error}") from None
    complete = data[: data.rfind(b"\n") + 1]
    lines = complete.split(b"\n")[:-1]
    rows = [_parse_row(path, number, line) for number, line in enumerate(lines, start=1)]
    return JsonLines(rows, len(complete), len(lines) + 1 if len(complete) != len(data) else None)


_ROW_KEYS = ("sample", "method", "keep")


def _parse_row(path: Path, number: int, line: bytes) -> dict[str, Any]:
    try:
        row = json.loads(line)
    except ValueError:  # not JSON, or not UTF-8
        raise VlpruneError(f"{path} line {number} is not JSON; move the file away to start over") from None
    if not isinstance(row, dict) or any(key not in row for key in _ROW_KEYS):
        raise VlpruneError(
            f"{path} line {number} is not a results row (an object with {', '.join(_ROW_KEYS)}); move the file away "
            f"to start over"
        )
    return row


class ResultsFile:
    """An append-only JSON Lines file of a sweep's own folder that survives being killed in the middle of a write."""

    def __init__(self, path: Path) -> None:
        self.path = path
        check_own_file(path, "the sweep's results file", appended=True)  # before the repair can cut anything
        self.rows = self._read_and_repair()

    def _read_and_repair(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        read = read_json_lines(self.path)
        if read.torn_line is not None:  # a kill mid-write leaves a last line without its newline
            cut_to(self.path, read.complete_bytes)
        return read.rows

    def keys(self) -> set[tuple[str, ...]]:
        return {row_key(r) for r in self.rows}

    def append(self, row: dict[str, Any]) -> None:
        """Write ``row`` as one line, flushed to disk.

        Raises:
            VlpruneError: the line could not be written (the file then holds the rows written before).
        """
        try:
            append_whole(self.path, (json.dumps(row) + "\n").encode())
        except OSError as error:
            raise VlpruneError(
                f"{cannot_write(self.path, error)}; the rows written before are kept: once that is fixed, rerun the "
                f"same command to resume the sweep"
            ) from None
        self.rows.append(row)


def shard_of(samples: Sequence[VQASample], index: int, count: int) -> list[VQASample]:
    """The samples process ``index`` of ``count`` takes: every ``count``-th one from ``index``."""
    if not 0 <= index < count:
        raise VlpruneError(f"shard {index} is outside 0..{count - 1}")
    return list(samples[index::count])


def cell_pruners(settings: SweepSettings) -> list[pruners.Pruner]:
    """The pruner of every cell, built now so that an unknown method or a bad budget or option fails before any work.

    Raises:
        VlpruneError: naming the bad method, budget or option.
    """
    return [
        pruners.create(method, keep=keep, **settings.options.get(method, {})) for method, keep, _ in cells(settings)
    ]


def check_folder(folder: str | os.PathLike, settings: SweepSettings) -> None:
    """Check, without writing anything, that ``folder`` can take this sweep: it is (or can become) a writable folder,
    its sweep files are its own writable files (not links to files elsewhere), and it holds no rows of a sweep with
    other settings.

    Raises:
        VlpruneError: the folder or one of its sweep files cannot be written, or the folder holds another sweep's rows.
    """
    folder = check_writable_folder(folder, "--out")
    check_sweep_files(folder)
    _check_saved_settings(folder, settings)


def check_sweep_files(folder: Path) -> None:
    """Refuse a sweep file of ``folder`` that is not a plain file of the folder itself, or a results file that cannot
    be appended to, before any of them is read, repaired or written.

    Raises:
        VlpruneError: naming the file and what is in the way.
    """
    for path in sorted(folder.glob("*")):
        name = path.name
        if name == RESULTS or (name.startswith("results-") and name.endswith(".jsonl")):
            check_own_file(path, "the sweep's results file", appended=True)
        elif name == SETTINGS or (name.startswith(".results") and name.endswith(".lock")):
            check_own_file(path, "the sweep's file")


def _check_saved_settings(folder: Path, settings: SweepSettings) -> bool:
    """Whether ``folder`` already holds these settings; raises if it holds other settings and rows measured under
    them. Settings saved by a run that produced no row (it failed before its first cell) are no sweep to protect."""
    path = folder / SETTINGS
    if not path.exists():
        return False
    wanted = json.loads(json.dumps(asdict(settings)))
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        saved = None
    if isinstance(saved, dict):  # a setting added since the folder was written has its default there
        saved = {**_DEFAULTED, **saved}
    if saved == wanted:
        return True
    if not _has_rows(folder) or _extends(saved, wanted):
        return False
    changed = sorted(k for k in wanted if not isinstance(saved, dict) or saved.get(k) != wanted[k])
    raise VlpruneError(
        f"{folder} holds rows of a sweep with other settings ({', '.join(changed) or SETTINGS + ' unreadable'}); "
        f"use another --out folder"
    )


def _extends(saved: Any, wanted: dict[str, Any]) -> bool:
    """Whether ``wanted`` is the saved sweep over more samples: a dataset's first N samples are a prefix of its first
    M > N, so every saved row stays valid and a rerun with the larger ``--limit`` only runs the new samples."""
    if not isinstance(saved, dict) or {**saved, "limit": wanted["limit"]} != wanted:
        return False
    old, new = saved.get("limit"), wanted["limit"]
    return old is not None and (new is None or new > old)


def _has_rows(folder: Path) -> bool:
    return any(path.stat().st_size > 0 for path in [folder / RESULTS, *folder.glob("results-*.jsonl")] if path.exists())


def check_settings(folder: Path, settings: SweepSettings) -> None:
    """Save the settings in a new folder (or over settings that produced no row), or check that an existing folder's
    sweep is the same one."""
    if _check_saved_settings(folder, settings):
        return
    write_text_atomically(folder / SETTINGS, json.dumps(asdict(settings), indent=2) + "\n")


@contextlib.contextmanager
def _exclusive(folder: Path, results_name: str) -> Iterator[None]:
    """Hold the lock of one results file of ``folder`` for a whole sweep: two sweeps appending to one file would
    both run every cell and write every row twice."""
    lock_path = folder / f".{results_name}.lock"
    lock = FileLock(lock_path, timeout=0)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        lock.acquire()
    except Timeout:
        raise VlpruneError(
            f"another sweep is writing {folder / results_name} right now; wait for it to finish (a rerun then resumes "
            f"it) or use another --out folder"
        ) from None
    except OSError as error:
        raise cannot_write(lock_path, error) from None
    try:
        yield
    finally:
        lock.release()


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


def _pruner(settings: SweepSettings, method: str, keep: int | float | None) -> pruners.Pruner:
    return pruners.create(method, keep=keep, **settings.options.get(method, {}))


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
