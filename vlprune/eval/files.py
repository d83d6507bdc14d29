"""Writing result files so that a crash or a kill never leaves half of one behind."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from vlprune.errors import VlpruneError


def write_text_atomically(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file in the same folder and an atomic rename."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        # mkstemp makes the file private (0600); a result file gets the permissions any new file would get.
        os.chmod(temporary, 0o666 & ~_umask())
        with os.fdopen(handle, "w") as file:
            file.write(text)
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return target


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def check_writable_file(path: str | os.PathLike, what: str) -> Path:
    """``path`` if a file can be written there: it is not a folder, and its nearest existing parent is a writable
    folder (missing folders are created at write time). Checked before any work, so that hours of computing never
    end in "cannot write".

    Raises:
        VlpruneError: naming ``what`` (e.g. "--out"), the path, and what is in the way.
    """
    target = Path(path)
    if target.is_dir():
        raise VlpruneError(f"{what} {str(target)!r} is a folder; give a file path")
    _check_writable_parent(target.parent, what, target)
    return target


def check_writable_folder(path: str | os.PathLike, what: str) -> Path:
    """``path`` if it is a writable folder, or one can be created there.

    Raises:
        VlpruneError: naming ``what``, the path, and what is in the way.
    """
    target = Path(path)
    if target.exists():
        if not target.is_dir():
            raise VlpruneError(f"{what} {str(target)!r} is a file, not a folder; give a folder path")
        if not os.access(target, os.W_OK | os.X_OK):
            raise VlpruneError(f"{what} {str(target)!r} is not writable")
        return target
    _check_writable_parent(target.parent, what, target)
    return target


def _check_writable_parent(parent: Path, what: str, target: Path) -> None:
    ancestor = parent
    while not ancestor.exists():
        if ancestor.parent == ancestor:
            break
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise VlpruneError(f"{what} {str(target)!r} cannot be created: {str(ancestor)!r} is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise VlpruneError(f"{what} {str(target)!r} cannot be created: the folder {str(ancestor)!r} is not writable")
