"""Sweep, report and result-file faults as a user meets them (issue 24): a link out of a sweep folder, a report on a
folder with a line cut short or that it cannot write, a full disk during a sweep, a results file that cannot be
written, an output path under /proc, and the error line after a progress bar. Each ends with one line and exit status
2 (``VlpruneError`` in the API) or a correct result, and no file outside the folder changes.
"""

from __future__ import annotations

import errno
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from cli_checks import assert_one_line, cli
from tqdm import tqdm

import vlprune.api
import vlprune.cli
from vlprune.errors import VlpruneError
from vlprune.eval.calibrate import write_config
from vlprune.eval.files import write_text_atomically
from vlprune.eval.report import write_report
from vlprune.eval.sweep import RESULTS, SETTINGS, ResultsFile, load_rows

MODEL = ("--model", "tiny-random")


@pytest.fixture(autouse=True)
def _random_default_model(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vlprune.cli, "DEFAULT_MODEL", "tiny-random")


def sweep_argv(out: Path) -> list[str]:
    return ["sweep", *MODEL, "--methods", "random", "--keep", "16", "--limit", "1", "--max-new-tokens", "1",
            "--out", str(out)]  # fmt: skip


def row(sample: str, method: str = "none", keep: int | None = None) -> dict[str, object]:
    return {
        "sample": sample, "method": method, "keep": keep, "kind": "color", "question": "q", "answer": "red",
        "correct": True, "prediction": "red", "visual_tokens": 64, "equivalent_visual_tokens": 64.0,
        "prefill_flops": 1.0, "flops_ratio": 1.0, "kv_cache_bytes": 1, "prefill_ms": 1.0, "end_to_end_ms": 2.0,
        "decode_tokens_per_s": None, "peak_memory_bytes": None, "same_answer": True, "kl_first_token": 0.0,
        "hidden_cosine": 1.0,
    }  # fmt: skip


def rows_with_a_torn_last_line() -> bytes:
    """Two whole rows and the first half of a third, as a kill in the middle of a write leaves them."""
    lines = [json.dumps(row(f"s{i}")) + "\n" for i in range(3)]
    return ("".join(lines[:2]) + lines[2][: len(lines[2]) // 2]).encode()


def listing(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() if p.is_file() and not p.is_symlink() else b"" for p in folder.iterdir()}


# ---------------------------------------------------------------------------------------------- links out of the folder


@pytest.mark.parametrize("name", [RESULTS, "results-0.jsonl", SETTINGS, f".{RESULTS}.lock"])
def test_a_sweep_refuses_a_link_to_a_file_outside_before_touching_it(
    name: str, capsys: pytest.CaptureFixture[str], tmp_path: Path, no_model_load: None
) -> None:
    outside = tmp_path / "precious.jsonl"
    outside.write_bytes(rows_with_a_torn_last_line())
    before = outside.read_bytes()
    out = tmp_path / "sweep"
    out.mkdir()
    (out / name).symlink_to(outside)
    assert_one_line(*cli(capsys, *sweep_argv(out)), f"{str(out / name)!r} is a symbolic link", "inside its folder")
    assert outside.read_bytes() == before
    assert sorted(os.listdir(out)) == [name]  # nothing written: no settings, no lock


def test_the_api_refuses_a_results_link_before_repairing_it(tmp_path: Path) -> None:
    outside = tmp_path / "precious.jsonl"
    outside.write_bytes(rows_with_a_torn_last_line())
    before = outside.read_bytes()
    (tmp_path / "sweep").mkdir()
    (tmp_path / "sweep" / RESULTS).symlink_to(outside)
    with pytest.raises(VlpruneError, match="is a symbolic link"):
        ResultsFile(tmp_path / "sweep" / RESULTS)
    assert outside.read_bytes() == before


def test_a_sweep_refuses_a_results_file_with_another_name(tmp_path: Path) -> None:
    """A hard link is the same file under two names: an append or a repair would change the other one too."""
    outside = tmp_path / "precious.jsonl"
    outside.write_bytes(rows_with_a_torn_last_line())
    before = outside.read_bytes()
    (tmp_path / "sweep").mkdir()
    os.link(outside, tmp_path / "sweep" / RESULTS)
    with pytest.raises(VlpruneError, match="has 2 names"):
        ResultsFile(tmp_path / "sweep" / RESULTS)
    assert outside.read_bytes() == before


# ------------------------------------------------------------------------------------------------ report: read only


def test_a_report_skips_a_torn_last_line_and_names_it_without_changing_the_file(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    (tmp_path / RESULTS).write_bytes(rows_with_a_torn_last_line())
    before = (tmp_path / RESULTS).read_bytes()
    code, out, err = cli(capsys, "report", str(tmp_path))
    assert code == 0, err
    assert f"{tmp_path / RESULTS} line 3 was cut short" in out
    assert (tmp_path / RESULTS).read_bytes() == before
    assert "| none (all tokens) | 100.0% (100%) |" in (tmp_path / "report.md").read_text()
    with pytest.warns(UserWarning, match="line 3 was cut short"):
        assert len(load_rows(tmp_path)) == 2


def test_a_report_through_a_results_link_leaves_the_file_outside_unchanged(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    outside = tmp_path / "precious.jsonl"
    outside.write_bytes(rows_with_a_torn_last_line())
    before = outside.read_bytes()
    folder = tmp_path / "sweep"
    folder.mkdir()
    (folder / RESULTS).symlink_to(outside)
    code, out, err = cli(capsys, "report", str(folder))
    assert code == 0, err
    assert "line 3 was cut short" in out
    assert outside.read_bytes() == before
    assert (folder / RESULTS).is_symlink()


@pytest.fixture
def refuse_writes(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[Path, int]]:
    """Paths to refuse writes to with an errno, for root too: a folder maps to a read-only file system (EROFS: no
    file in it can be created or opened for writing), a file to an immutable one (EPERM). ``os.open`` and
    ``os.mkdir`` are what tempfile and vlprune's writes go through."""
    refused: dict[Path, int] = {}
    real_open, real_mkdir = os.open, os.mkdir
    writing = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def refusal(path: object) -> int | None:
        path = Path(os.fsdecode(path))
        return refused.get(path, refused.get(path.parent))

    def fail(code: int, path: object) -> OSError:
        return OSError(code, os.strerror(code), os.fsdecode(path))

    def open_(path: object, flags: int, *args: object, **kwargs: object) -> int:
        if flags & writing and (code := refusal(path)) is not None:
            raise fail(code, path)
        return real_open(path, flags, *args, **kwargs)

    def mkdir(path: object, *args: object, **kwargs: object) -> None:
        if (code := refusal(path)) is not None:
            raise fail(code, path)
        real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", open_)
    monkeypatch.setattr(os, "mkdir", mkdir)
    yield refused


def test_a_report_on_a_read_only_folder_is_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, refuse_writes: dict[Path, int]
) -> None:
    (tmp_path / RESULTS).write_bytes(rows_with_a_torn_last_line())
    before = listing(tmp_path)
    refuse_writes[tmp_path] = errno.EROFS
    assert_one_line(
        *cli(capsys, "report", str(tmp_path)),
        f"the sweep folder {str(tmp_path)!r} is not writable (Read-only file system)",
        "the report writes report.md and its plots there",
    )
    assert listing(tmp_path) == before


# ------------------------------------------------------------------------------------------------ full disk


class FullDisk:
    """``os.write`` that fills the disk in the middle of the ``row``-th results row: half of it is written, and the
    rest fails with ENOSPC, as a real full disk does."""

    def __init__(self, row: int) -> None:
        self.row, self.rows, self.torn = row, 0, None
        self.real = os.write

    def __call__(self, handle: int, data: bytes) -> int:
        if handle == self.torn:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        if bytes(data[:10]) == b'{"sample":':
            self.rows += 1
            if self.rows == self.row:
                self.torn = handle
                return self.real(handle, data[: len(data) // 2])
        return self.real(handle, data)


def test_a_full_disk_during_a_sweep_is_one_line_and_leaves_no_torn_row(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "sweep"
    full = FullDisk(row=2)
    monkeypatch.setattr(os, "write", full)
    code, stdout, err = cli(capsys, *sweep_argv(out))
    monkeypatch.setattr(os, "write", full.real)
    assert code == 2 and stdout == "" and "Traceback" not in err
    # The progress bar's line is ended first: the error is the last line, on a line of its own.
    *_, last, after = err.split("\n")
    assert after == "" and last.startswith("vlprune: error: "), err
    assert f"cannot write {str(out / RESULTS)!r}: No space left on device" in last
    assert "rerun the same command to resume the sweep" in last
    text = (out / RESULTS).read_text()
    assert text.endswith("\n") and len(text.splitlines()) == 1  # the first row whole, nothing of the second
    code, _, err = cli(capsys, *sweep_argv(out))
    assert code == 0, err
    rows = [json.loads(line) for line in (out / RESULTS).read_text().splitlines()]
    assert sorted((r["method"], r["keep"]) for r in rows) == [("none", None), ("random", 16)]


def test_the_api_cuts_a_row_the_full_disk_tore_back_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    results = ResultsFile(tmp_path / RESULTS)
    results.append(row("s0"))
    before = (tmp_path / RESULTS).read_bytes()
    monkeypatch.setattr(os, "write", FullDisk(row=1))
    with pytest.raises(VlpruneError, match="No space left on device; the rows written before are kept"):
        results.append(row("s1"))
    assert (tmp_path / RESULTS).read_bytes() == before and len(results.rows) == 1


# ------------------------------------------------------------------------------------------------ unwritable results


def test_a_results_file_the_user_cannot_write_is_refused_before_loading(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_model_load: None
) -> None:
    out = tmp_path / "sweep"
    out.mkdir()
    results = out / RESULTS
    results.write_text(json.dumps(row("s0")) + "\n")
    results.chmod(0o444)
    before = listing(out)
    real_access = os.access
    # The tests run as root, whom a 0444 file does not stop: os.access answers as it would for its owner.
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: Path(path) != results and real_access(path, mode, **kw))
    assert_one_line(*cli(capsys, *sweep_argv(out)), f"{str(results)!r} is not writable (permission denied)")
    assert listing(out) == before


def test_a_read_only_sweep_folder_is_refused_before_loading(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, refuse_writes: dict[Path, int], no_model_load: None
) -> None:
    out = tmp_path / "sweep"
    out.mkdir()
    (out / RESULTS).write_text(json.dumps(row("s0")) + "\n")
    before = listing(out)
    refuse_writes[out] = errno.EROFS
    assert_one_line(*cli(capsys, *sweep_argv(out)), f"--out {str(out)!r} is not writable (Read-only file system)")
    assert listing(out) == before


def test_an_immutable_results_file_is_refused_before_loading(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, refuse_writes: dict[Path, int], no_model_load: None
) -> None:
    out = tmp_path / "sweep"
    out.mkdir()
    (out / RESULTS).write_text(json.dumps(row("s0")) + "\n")
    before = listing(out)
    refuse_writes[out / RESULTS] = errno.EPERM  # as `chattr +i` makes it, which stops root too
    assert_one_line(*cli(capsys, *sweep_argv(out)), f"{str(out / RESULTS)!r} is not writable (Operation not permitted)")
    assert listing(out) == before


# ------------------------------------------------------------------------------------------------ --out under /proc


needs_proc = pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")


@needs_proc
@pytest.mark.parametrize(
    "argv",
    [
        ["sweep", *MODEL, "--methods", "random", "--keep", "16", "--limit", "1", "--out", "/proc/x"],
        ["calibrate", *MODEL, "--keep", "8", "--out", "/proc/x.json"],
        ["calibrate", *MODEL, "--keep", "8", "--out", "/proc/x/vflowopt.json"],
    ],
)
def test_an_output_path_under_proc_is_refused_before_loading(
    argv: list[str], capsys: pytest.CaptureFixture[str], no_model_load: None
) -> None:
    out = argv[-1]
    assert_one_line(*cli(capsys, *argv), f"--out {out!r} cannot be created: the folder '/proc' is not writable")


def test_a_device_as_output_file_is_refused(capsys: pytest.CaptureFixture[str], no_model_load: None) -> None:
    argv = ["calibrate", *MODEL, "--keep", "8", "--out", os.devnull]
    assert_one_line(*cli(capsys, *argv), f"--out {os.devnull!r} is not a regular file")


@needs_proc
def test_a_failed_write_after_the_checks_is_one_error() -> None:
    with pytest.raises(VlpruneError, match=re.escape("cannot write '/proc/x/report.md': ")):
        write_text_atomically("/proc/x/report.md", "text")
    with pytest.raises(VlpruneError, match=re.escape("cannot write '/proc/vflowopt.json': ")):
        write_config({"method": "vflowopt"}, "/proc/vflowopt.json")


def test_a_report_replaces_a_plot_link_instead_of_writing_through_it(tmp_path: Path) -> None:
    outside = tmp_path / "precious.png"
    outside.write_bytes(b"not a plot")
    folder = tmp_path / "sweep"
    folder.mkdir()
    (folder / RESULTS).write_text(json.dumps(row("s0")) + "\n")
    (folder / "accuracy_vs_tokens.png").symlink_to(outside)
    write_report(folder)
    assert outside.read_bytes() == b"not a plot"
    assert (folder / "accuracy_vs_tokens.png").read_bytes()[:4] == b"\x89PNG"


# ------------------------------------------------------------------------------------------------ error after a bar


def test_the_error_line_starts_on_a_line_of_its_own_after_a_bar_left_open(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    bars = []

    def fails_mid_bar() -> int:  # a library's bar that its failure leaves open
        bars.append(tqdm(total=4, desc="loading"))
        bars[0].update(1)
        raise VlpruneError("the third shard is missing")

    monkeypatch.setattr(vlprune.cli, "_methods", fails_mid_bar)
    code, _, err = cli(capsys, "methods")
    assert code == 2
    assert err.endswith("\nvlprune: error: the third shard is missing\n") and "loading" in err, err
