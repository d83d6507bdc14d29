"""What a user sees of a bad value on the command line: the CLI run in-process, and its one-line refusal."""

from __future__ import annotations

import pytest

from vlprune.cli import main


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """``vlprune ARGV`` in this process: (exit status, stdout, stderr)."""
    capsys.readouterr()
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line(code: int, out: str, err: str, *fragments: str, after_loading: bool = False) -> str:
    """Exit status 2, nothing on stdout and one ``vlprune: error:`` line holding every fragment, which it returns.
    With ``after_loading``, the line may follow transformers' progress bar of a model that loaded."""
    assert code == 2, err
    assert out == ""
    *before, line = err.removesuffix("\n").split("\n")
    assert err.endswith("\n") and "Traceback" not in err, err
    if after_loading:
        assert all(bar.startswith("\rLoading weights") for bar in before), err
    else:
        assert not before, err
    assert line.startswith("vlprune: error: "), err
    for fragment in fragments:
        assert fragment in line, f"{fragment!r} not in {line!r}"
    return line
