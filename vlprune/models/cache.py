"""The folders vlprune assembles in its cache: a manifest that fingerprints every file, atomic publishing, one build
at a time (a file lock), and the checks that tell a damaged folder from an intact one.

A folder is complete when its manifest (written last) is there; it is intact when every file it lists has the size and
sha256 the manifest records and no other file is there. :mod:`vlprune.models.assemble` and
:mod:`vlprune.models.trained` build the folders and :mod:`vlprune.models.heal` heals the damaged ones with these
functions.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from safetensors import SafetensorError

from vlprune.errors import VlpruneError

MANIFEST = "vlprune-tiny.json"
"""Written last into a complete folder: provenance, the size and sha256 of every other file in the folder (under
``"files"``), and what :func:`assemble_base` checks before reusing one."""

_FORMAT = 3
"""Bump when the assembled folder changes incompatibly, so that older caches are rebuilt. 3: the manifest lists file
fingerprints (folders of format 2 have none and are rebuilt)."""


def cache_dir() -> Path:
    """The folder vlprune caches wheels and assembled models in: ``$VLPRUNE_CACHE`` or ``~/.cache/vlprune``."""
    configured = os.environ.get("VLPRUNE_CACHE")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "vlprune"


def _log(message: str) -> None:
    print(f"vlprune-tiny: {message}", file=sys.stderr, flush=True)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _umask() -> int:
    """The process's umask. Reading it means setting it, so it is restored at once; meanwhile it is the strictest
    one, so that a file another thread creates in that instant is not opened wider than intended."""
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def _read_manifest(folder: Path) -> dict[str, Any] | None:
    """The manifest of ``folder``, or None if it is missing or not a JSON object (an unfinished or damaged folder)."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def _is_complete(folder: Path, image_size: int) -> bool:
    """Whether ``folder`` has a manifest of this format for ``image_size``; :func:`_damage` checks its files."""
    manifest = _read_manifest(folder)
    return manifest is not None and manifest.get("format") == _FORMAT and manifest.get("image_size") == image_size


_Signature = tuple[tuple[str, int, int, int, int], ...]

_VERIFIED: dict[str, _Signature] = {}
"""Folders whose files matched their fingerprints in this process, with the files' :func:`_signature` at the time."""


def _folder_files(folder: Path) -> dict[str, Path]:
    """Every file under ``folder`` except its manifest, by its POSIX path relative to ``folder``."""
    files = {}
    for path in sorted(folder.rglob("*")):
        name = path.relative_to(folder).as_posix()
        if name != MANIFEST and path.is_file():
            files[name] = path
    return files


def _fingerprints(folder: Path) -> dict[str, dict[str, Any]]:
    """The size and sha256 of every file in ``folder`` except its manifest: the manifest's ``"files"``."""
    return {
        name: {"size": path.stat().st_size, "sha256": _sha256(path)} for name, path in _folder_files(folder).items()
    }


def _signature(folder: Path, names: list[str]) -> _Signature | None:
    """Inode, size, mtime and ctime of the named files and of the folders holding them: writing or replacing a file
    changes its entry, adding or removing one its folder's. None if one is missing."""
    folders = {Path(name).parent.as_posix() for name in names}  # "." for the folder itself
    entries = []
    for name in sorted({*names, *folders}):
        try:
            stat = (folder / name).stat()
        except OSError:
            return None
        entries.append((name, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns))
    return tuple(entries)


def _damage(folder: Path, manifest: dict[str, Any]) -> str | None:
    """None if the files in ``folder`` are those its manifest fingerprints, else what is wrong, naming the file.

    Files are hashed in full: a same-size overwrite anywhere (a bad sector, a stray write) must be caught, and sampled
    blocks would miss most small ones. sha256 (hardware-accelerated on x86-64 and ARMv8; faster than blake2b there)
    reads about 1 GB/s, about 0.6 s for vlprune-tiny's 630 MB, and it leaves the file in the page cache for the load
    that follows. It runs once per process per folder: later calls compare only the files' :func:`_signature` with the
    one taken when they were hashed.
    """
    expected = manifest.get("files")
    if not isinstance(expected, dict) or not expected:
        return f"{folder / MANIFEST} lists no file fingerprints"
    key = str(folder.absolute())
    signature = _signature(folder, [MANIFEST, *expected])
    if signature is not None and _VERIFIED.get(key) == signature:
        return None
    found = _folder_files(folder)
    for name, record in expected.items():  # the cheap checks first
        if name not in found:
            return f"{folder / name} is missing"
        size = found[name].stat().st_size
        if not isinstance(record, dict) or size != record.get("size"):
            wanted = record.get("size") if isinstance(record, dict) else None
            return f"{folder / name} is damaged: it has {size} bytes, its manifest says {wanted}"
    # transformers reads optional files when present (an adapter_config.json makes it load a PEFT adapter), so a stray
    # file can change the model. Hidden files (editor or NFS leftovers) are not read and are left alone.
    extra = [name for name in found if name not in expected and not any(p.startswith(".") for p in name.split("/"))]
    if extra:
        return f"{folder / extra[0]} does not belong in the folder (its manifest does not list it)"
    for name, record in expected.items():
        if _sha256(found[name]) != record.get("sha256"):
            return f"{folder / name} is damaged: its content differs from the sha256 in {MANIFEST}"
    if signature is not None:
        _VERIFIED[key] = signature
    return None


def _problem(target: Path, expected: dict[str, Any]) -> str | None:
    """Why the folder ``target`` cannot be reused (naming a damaged file), or None if it can.

    It cannot if its manifest is missing or unreadable, differs from ``expected`` or the current format (a folder
    from an older vlprune, without fingerprints, is rebuilt rather than trusted), or a file fails :func:`_damage`.
    """
    manifest = _read_manifest(target)
    if manifest is None:
        return f"{target / MANIFEST} is missing or unreadable" if target.exists() else "it does not exist"
    for key, value in {"format": _FORMAT, **expected}.items():
        if manifest.get(key) != value:
            return f"its manifest has {key}={manifest.get(key)!r}, this vlprune needs {value!r}"
    return _damage(target, manifest)


def _install(built: Path, target: Path) -> bool:
    """Move the complete folder ``built`` to ``target``, replacing an older one; False if another process's copy
    took its place in between (a vlprune without the build lock)."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.rename(target, old)
    installed = True
    try:
        os.rename(built, target)
    except OSError:
        # Another process installed its copy between our two renames; theirs is as good as ours.
        if not target.is_dir():
            if old is not None:
                os.rename(old, target)
            raise
        installed = False
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return installed


def _open_permissions(folder: Path) -> None:
    """Give ``folder`` and everything in it the permissions ``mkdir`` and ``open`` would give under the umask.

    mkdtemp makes the folder owner-only and transformers writes the weights owner-only; the cache is shared like any
    download, as far as the user's umask allows.
    """
    mask = _umask()
    folder.chmod(0o777 & ~mask)
    for path in folder.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def _publish(built: Path, target: Path, manifest: dict[str, Any]) -> None:
    """Fingerprint the files of ``built``, write the manifest last (it marks the folder complete), open the
    permissions and move ``built`` to ``target``."""
    manifest = {**manifest, "files": _fingerprints(built)}
    (built / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    _open_permissions(built)
    if not _install(built, target):
        return
    # Just hashed, and nothing else writes here while the build lock is held: the first check in this process need not
    # read the files again. (Taken after the chmod and the rename, which change ctimes.)
    signature = _signature(target, [MANIFEST, *manifest["files"]])
    if signature is not None:
        _VERIFIED[str(target.absolute())] = signature


LOCK_FILE = ".vlprune-tiny.lock"
"""The file in the cache that :func:`_build_lock` locks."""

_LOCK_TIMEOUT_S = 3600.0
"""How long to wait for another process's build: a first build takes about a minute, plus pip's downloads."""

_LOCKS: dict[str, Any] = {}
_LOCKS_GUARD = threading.Lock()


def _acquire(cache: Path) -> Any:
    """The acquired build lock of ``cache`` (a ``filelock.FileLock``), or None if the cache cannot be locked.

    Raises:
        VlpruneError: another process held the lock for longer than :data:`_LOCK_TIMEOUT_S`.
    """
    from filelock import FileLock, Timeout

    path = cache / LOCK_FILE
    try:
        cache.mkdir(parents=True, exist_ok=True)
        # One FileLock per file and process: it counts re-acquisitions per thread, whereas a second FileLock on the
        # same file would wait for the first forever.
        with _LOCKS_GUARD:
            key = str(path.resolve())
            lock = _LOCKS.get(key)
            if lock is None:
                lock = _LOCKS[key] = FileLock(path)
        try:
            lock.acquire(timeout=0)
            return lock
        except Timeout:
            pass
        _log(f"waiting for another process to finish building in {cache} (it holds {path})...")
        start = time.perf_counter()
        try:
            lock.acquire(timeout=_LOCK_TIMEOUT_S)
        except Timeout:
            raise VlpruneError(
                f"another process has held the lock {path} for {_LOCK_TIMEOUT_S:.0f} s: stop it if it hangs "
                f"(if no vlprune process is running, delete {path}) and run again"
            ) from None
        _log(f"the other process released the lock after {time.perf_counter() - start:.1f} s")
        return lock
    except OSError as error:  # filelock's Timeout is an OSError too, but both are handled above
        # A read-only cache (prepared by an administrator, say) is still usable as long as nothing needs building.
        _log(f"cannot lock {path} ({error}); checking the cache without the lock")
        return None


@contextmanager
def _build_lock(cache: Path) -> Iterator[None]:
    """Hold the build lock of ``cache``: one process (or thread) at a time checks and builds the folders in it.

    The lock is an ``flock`` on ``cache/.vlprune-tiny.lock``, which the system releases if its holder dies. It is
    reentrant within a thread: building vlprune-tiny assembles the base folder under the same lock. The first process
    builds; the others log that they wait, then find its folder complete and reuse it.
    """
    lock = _acquire(cache)
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


# What loading a damaged folder raises: safetensors' SafetensorError (a truncated header), OSError (transformers' "not
# a valid JSON file", a missing file), json.JSONDecodeError (a ValueError: a truncated tokenizer.json), RuntimeError
# (torch: a tensor of the wrong size).
_LOAD_ERRORS: tuple[type[BaseException], ...] = (OSError, ValueError, RuntimeError, EOFError, SafetensorError)


class _RebuildError(VlpruneError):
    """A damaged folder that could not be rebuilt; its message already names the folder to delete."""


def _describe(error: BaseException) -> str:
    """``error`` on one line, with its type unless it is a VlpruneError (whose message says enough)."""
    text = " ".join(str(error).split())
    return text if isinstance(error, VlpruneError) else f"{type(error).__name__}: {text}"


def _ensure(target: Path, problem: str | None, build: Callable[[], None]) -> Path:
    """``target``, first built with ``build`` if there is a ``problem`` with it. The caller holds the build lock.

    Raises:
        VlpruneError: the build failed; if ``target`` existed (it is being rebuilt), the message names the problem
            and the folder to delete.
    """
    if problem is None:
        return target
    existed = target.exists()
    if existed:
        _log(f"rebuilding {target}: {problem}")
    try:
        build()
    except (VlpruneError, *_LOAD_ERRORS) as error:
        if isinstance(error, _RebuildError):
            raise  # a folder it depends on could not be rebuilt; that error names it
        if existed:
            raise _RebuildError(
                f"cannot rebuild {target} ({problem}): {_describe(error)}; delete the folder {target} and run again"
            ) from None
        if isinstance(error, VlpruneError):
            raise
        raise VlpruneError(f"cannot build {target}: {_describe(error)}") from None
    return target
