"""Output files: checked before any work, written whole, and only inside the folder a command was given.

A result file is written through a temporary file and an atomic rename, so that a crash or a kill never leaves half
of one behind; a file appended to line by line (a sweep's rows) takes each line in one write and is cut back to its
previous length when the write fails; every failure to create or write an output is one :class:`VlpruneError` that
names the file.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from pathlib import Path

from vlprune.errors import VlpruneError

_NO_FOLLOW = getattr(os, "O_NOFOLLOW", 0)  # a link planted after the checks fails the open instead of being followed


def write_text_atomically(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file in the same folder and an atomic rename.

    Raises:
        VlpruneError: the file or its folder cannot be written (naming the file and the reason).
    """
    return write_bytes_atomically(path, text.encode())


def write_bytes_atomically(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder and an atomic rename (which replaces a
    link at ``path`` instead of writing through it).

    Raises:
        VlpruneError: the file or its folder cannot be written (naming the file and the reason).
    """
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    except OSError as error:
        raise cannot_write(target, error) from None
    try:
        # mkstemp makes the file private (0600); a result file gets the permissions any new file would get.
        os.chmod(temporary, 0o666 & ~_umask())
        with os.fdopen(handle, "wb") as file:
            file.write(data)
        os.replace(temporary, target)
    except BaseException as error:
        Path(temporary).unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise cannot_write(target, error) from None
        raise
    return target


def append_whole(path: Path, data: bytes) -> None:
    """Append ``data`` to ``path`` with one write, flushed to disk. A write that fails part-way (a full disk) is cut
    back to the file's previous length, so that no partial line stays behind.

    Raises:
        OSError: the write or the flush failed (the file then holds what it held before).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | _NO_FOLLOW, 0o666)
    try:
        length = os.fstat(handle).st_size
        try:
            written = 0
            while written < len(data):  # a regular file takes a write whole unless the disk fills up part-way
                written += os.write(handle, data[written:])
            os.fsync(handle)
        except OSError:
            # If even the cut fails, the partial line has no newline and the next run's repair removes it.
            with contextlib.suppress(OSError):
                os.ftruncate(handle, length)
            raise
    finally:
        os.close(handle)


def cut_to(path: Path, length: int) -> None:
    """Truncate ``path`` (never a link: the open refuses one) to ``length`` bytes.

    Raises:
        VlpruneError: the file cannot be written.
    """
    try:
        handle = os.open(path, os.O_WRONLY | _NO_FOLLOW)
        try:
            os.ftruncate(handle, length)
        finally:
            os.close(handle)
    except OSError as error:
        raise cannot_write(path, error) from None


def check_own_file(path: Path, what: str, *, appended: bool = False) -> None:
    """Refuse ``path`` unless it is missing or a regular file of its own folder, before a command reads, repairs
    (truncates) or writes it: through a link, a repair would cut the last line of a file elsewhere. With ``appended``,
    also refuse a file with other names (hard links, which an append would change too) or one that cannot be written.

    Raises:
        VlpruneError: naming ``what``, the path, what is in the way and how to go on.
    """
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as error:
        raise VlpruneError(f"cannot read {what} {str(path)!r}: {_reason(error)}") from None
    if stat.S_ISLNK(info.st_mode):
        raise VlpruneError(
            f"{what} {str(path)!r} is a symbolic link (to {os.readlink(path)!r}); vlprune writes only the files inside "
            f"its folder: put a copy of the file in place of the link, or use another folder"
        )
    if not stat.S_ISREG(info.st_mode):
        raise VlpruneError(f"{what} {str(path)!r} is not a regular file; move it away or use another folder")
    if not appended:
        return
    if info.st_nlink > 1:
        raise VlpruneError(
            f"{what} {str(path)!r} has {info.st_nlink} names (hard links), and appending to it would change it under "
            f"the others too: replace it with a copy of itself (cp, then mv over it), or use another folder"
        )
    reason = _open_fails(path)
    if reason is not None:
        raise VlpruneError(f"{what} {str(path)!r} is not writable ({reason}); make it writable or use another folder")


def _open_fails(path: Path) -> str | None:
    """Why ``path`` cannot be opened for appending (nothing is written); None when it can. ``os.access`` answers for
    other users than root; the open answers for root too (a read-only file system, an immutable file)."""
    if not os.access(path, os.W_OK):
        return "permission denied"
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_APPEND | _NO_FOLLOW))
    except OSError as error:
        return _reason(error)
    return None


def cannot_write(path: str | os.PathLike, error: OSError) -> VlpruneError:
    """The one-line error of a failed write of ``path``."""
    return VlpruneError(f"cannot write {str(path)!r}: {_reason(error)}")


def _reason(error: OSError) -> str:
    return error.strerror or str(error)


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def check_writable_file(path: str | os.PathLike, what: str) -> Path:
    """``path`` if a file can be written there: it is not a folder or a device, and a file can really be created in
    its folder (or the missing folders in its nearest existing parent). Checked before any work, so that hours of
    computing never end in "cannot write".

    Raises:
        VlpruneError: naming ``what`` (e.g. "--out"), the path, and what is in the way.
    """
    target = Path(path)
    if target.is_dir():
        raise VlpruneError(f"{what} {str(target)!r} is a folder; give a file path")
    if target.exists() and not target.is_file():
        raise VlpruneError(
            f"{what} {str(target)!r} is not a regular file (a device, a pipe or a socket); give a file path"
        )
    if target.parent.is_dir():
        reason = _creation_fails(target.parent, folder=False)
        if reason is not None:
            raise VlpruneError(f"{what} {str(target)!r} cannot be created: the folder {str(target.parent)!r} {reason}")
        return target
    _check_creatable(target, what)
    return target


def check_writable_folder(path: str | os.PathLike, what: str, why: str = "") -> Path:
    """``path`` if it is a folder files can really be created in, or one can be created there (tried with a temporary
    file or folder that is removed at once: a permission check alone passes as root on /proc).

    Args:
        why: what the command writes there, added to the message of a refusal.

    Raises:
        VlpruneError: naming ``what``, the path, and what is in the way.
    """
    target = Path(path)
    if not target.exists():
        _check_creatable(target, what)
        return target
    if not target.is_dir():
        raise VlpruneError(f"{what} {str(target)!r} is a file, not a folder; give a folder path")
    reason = _creation_fails(target, folder=False)
    if reason is not None:
        raise VlpruneError(f"{what} {str(target)!r} {reason}" + (f"; {why}" if why else ""))
    return target


def _check_creatable(target: Path, what: str) -> None:
    """Refuse ``target``, which does not exist, unless its nearest existing parent takes a new folder."""
    ancestor = target
    while not ancestor.exists():
        if os.path.lexists(ancestor):
            raise VlpruneError(
                f"{what} {str(target)!r} cannot be created: {str(ancestor)!r} is a link to "
                f"{os.readlink(ancestor)!r}, which does not exist"
            )
        if ancestor.parent == ancestor:
            break
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise VlpruneError(f"{what} {str(target)!r} cannot be created: {str(ancestor)!r} is a file, not a folder")
    reason = _creation_fails(ancestor, folder=True)
    if reason is not None:
        raise VlpruneError(f"{what} {str(target)!r} cannot be created: the folder {str(ancestor)!r} {reason}")


def _creation_fails(parent: Path, *, folder: bool) -> str | None:
    """Why a file (or, with ``folder``, a folder) cannot be created in ``parent``, found by creating a temporary one
    and removing it at once; None when it can."""
    if not os.access(parent, os.W_OK | os.X_OK):
        return "is not writable"
    try:
        if folder:
            os.rmdir(tempfile.mkdtemp(prefix=".vlprune-check-", dir=parent))
        else:
            handle, probe = tempfile.mkstemp(prefix=".vlprune-check-", dir=parent)
            os.close(handle)
            os.unlink(probe)
    except OSError as error:
        return f"is not writable ({_reason(error)})"
    return None
