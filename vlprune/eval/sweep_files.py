"""A sweep folder's own files: the results file that survives being killed in the middle of a write, the saved
settings a rerun must continue, the checks that refuse a file that is not the folder's own before anything is read,
repaired or written, and the lock that keeps two sweeps from appending to one file."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from vlprune.errors import VlpruneError
from vlprune.eval.files import (
    append_whole,
    cannot_write,
    check_own_file,
    check_writable_folder,
    cut_to,
    write_text_atomically,
)
from vlprune.eval.sweep_plan import _DEFAULTED, SweepSettings, row_key

RESULTS = "results.jsonl"
SETTINGS = "sweep.json"


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
    """Whether ``wanted`` is the saved sweep over more samples or more methods: a dataset's first N samples are a
    prefix of its first M > N, and a method's cells do not depend on the others', so every saved row stays valid and a
    rerun runs only the new samples' and the new methods' cells."""
    if not isinstance(saved, dict):
        return False
    old_limit, new_limit = saved.get("limit"), wanted["limit"]
    old_methods, new_methods = list(saved.get("methods", [])), list(wanted["methods"])
    if {**saved, "limit": new_limit, "methods": new_methods} != wanted:
        return False
    more_samples = old_limit is not None and (new_limit is None or new_limit > old_limit)
    more_methods = set(old_methods) < set(new_methods)
    same_samples = old_limit == new_limit
    return set(old_methods) <= set(new_methods) and (more_samples or (more_methods and same_samples))


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
