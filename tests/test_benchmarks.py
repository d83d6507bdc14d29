"""The benchmark scripts run on the CPU at CI size (their numbers are not checked: timings belong in the README)."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def run_script(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], name: str, *argv: str) -> str:
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # the scripts import each other as siblings
    monkeypatch.setattr(sys, "argv", [name, *argv])
    runpy.run_path(str(BENCHMARKS / name), run_name="__main__")
    return capsys.readouterr().out


def test_prefill_compile_prints_captured_and_eager_rows(monkeypatch, capsys) -> None:
    out = run_script(
        monkeypatch, capsys, "prefill.py", "--preset", "tiny", "--compile", "--backend", "eager",
        "--methods", "fastv", "--keep", "4", "--repeats", "1", "--answer", "4",
    )  # fmt: skip
    rows = [line for line in out.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [row.split(" | ")[0] for row in rows] == [
        "| eager transformers, unpruned",
        "| captured unpruned",
        "| captured fastv 4",
    ]
    assert rows[-1].split(" | ")[1] == "4"  # visual tokens kept


def test_throughput_prints_rows_and_a_plot(monkeypatch, capsys, tmp_path: Path) -> None:
    plot = tmp_path / "throughput.png"
    out = run_script(
        monkeypatch, capsys, "throughput.py", "--preset", "tiny", "--batches", "2", "--answer", "2",
        "--repeats", "1", "--backend", "eager", "--methods", "fastv", "--keep", "4", "--plot", str(plot),
    )  # fmt: skip
    rows = [line for line in out.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [row.split(" | ")[:3] for row in rows] == [["| none", "all", "2"], ["| fastv", "4", "2"]]
    unpruned_cache, pruned_cache = (float(row.split(" | ")[7]) for row in rows)
    assert all(float(row.split(" | ")[5]) > 0 for row in rows)  # decode tokens per second
    assert 0 < pruned_cache < unpruned_cache
    assert plot.stat().st_size > 0


def test_the_gpu_script_calls_scripts_and_flags_that_exist() -> None:
    # benchmarks/gpu.sh runs only where a GPU is lent, so a renamed script or flag would go unnoticed until then.
    import re
    import subprocess

    script = BENCHMARKS / "gpu.sh"
    assert subprocess.run(["bash", "-n", str(script)], check=False).returncode == 0
    text = script.read_text().replace("\\\n", " ")
    # The prefill steps call the script through a bash array defined once.
    text = text.replace('"${prefill[@]}"', re.search(r"prefill=\((.*)\)", text).group(1))
    called = [line for line in text.splitlines() if line.startswith("step ") and "benchmarks/" in line]
    assert {re.search(r"benchmarks/(\w+\.py)", line).group(1) for line in called} == {
        "kernel_speed.py",
        "prefill.py",
        "throughput.py",
    }
    for line in called:
        name = re.search(r"benchmarks/(\w+\.py)", line).group(1)
        source = (BENCHMARKS / name).read_text()
        flags = set(re.findall(r"(?<![\w-])(--[a-z][a-z-]*)", line.split(name, 1)[1]))
        missing = sorted(flag for flag in flags if f'"{flag}"' not in source)
        assert not missing, f"gpu.sh passes {missing} to {name}, which has no such option"


def test_no_benchmark_script_shadows_an_installed_module() -> None:
    # The scripts run with benchmarks/ first on sys.path: a script named like a package that transformers imports
    # (benchmarks/kernels.py and the `kernels` package lmms-eval installs) broke every benchmark.
    import importlib.machinery

    # The path finder, not importlib.util.find_spec: the other tests here leave the scripts in sys.modules.
    elsewhere = [entry for entry in sys.path if Path(entry or ".").resolve() != BENCHMARKS]
    for script in BENCHMARKS.glob("*.py"):
        found = importlib.machinery.PathFinder.find_spec(script.stem, elsewhere)
        assert found is None, f"benchmarks/{script.name} shadows {found.origin}"
