"""The layering of docs/architecture.md#layers holds: import-linter's contracts in pyproject.toml (each layer imports
only the layers below it; no import cycle between the modules of any package) are kept, so that a cycle or an upward
import fails the suite even outside CI. A copy of the package with one upward lazy import and one cycle planted shows
that the contracts catch both."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _lint_imports(folder: Path) -> subprocess.CompletedProcess[str]:
    """`lint-imports` on ``folder``'s pyproject.toml, for the ``vlprune`` package in ``folder`` (import-linter puts
    the working directory first on the path)."""
    command = "from importlinter.cli import lint_imports_command; lint_imports_command()"
    return subprocess.run(
        [sys.executable, "-c", command, "--no-cache", "--no-logo", str(folder / "pyproject.toml")],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _plant(module: Path, import_line: str) -> None:
    """Append a function to ``module`` that makes ``import_line`` lazily, as code often hides an import."""
    with open(module, "a") as file:
        file.write(f"\n\ndef _planted():\n    {import_line}\n")


def test_the_layering_contracts_are_kept() -> None:
    result = _lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Contracts: 2 kept, 0 broken." in result.stdout, result.stdout


def test_the_contracts_catch_an_upward_lazy_import_and_a_cycle(tmp_path: Path) -> None:
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    shutil.copytree(
        ROOT / "vlprune", tmp_path / "vlprune", ignore=shutil.ignore_patterns("__pycache__", "weights", "samples")
    )
    _plant(tmp_path / "vlprune/adapters/llava.py", "from vlprune.engine.session import PruningSession")  # upward
    _plant(tmp_path / "vlprune/eval/vqa_sample.py", "from vlprune.eval.datasets import load_dataset")  # a cycle

    result = _lint_imports(tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Contracts: 0 kept, 2 broken." in result.stdout, result.stdout
    assert "vlprune.adapters.llava -> vlprune.engine.session" in result.stdout, result.stdout
    assert "No cycles are allowed in vlprune.eval." in result.stdout, result.stdout
