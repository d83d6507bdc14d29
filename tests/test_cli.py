"""The ``vlprune`` command line, run in-process through ``vlprune.cli.main`` (plus one run of the installed script)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

import vlprune
import vlprune.cli
from vlprune.cli import main
from vlprune.pruners import Pruner, Selection, Stage, StageContext, StagePlan, register
from vlprune.testing import make_test_image

QUESTION = "What is in the image?"


@pytest.fixture(autouse=True)
def _random_default_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests exercise the command line, not a model: the random built-in stands in for the default model."""
    monkeypatch.setattr(vlprune.cli, "DEFAULT_MODEL", "tiny-random")


def test_the_real_default_model_is_vlprune_tiny() -> None:
    from vlprune import api

    assert api.DEFAULT_MODEL == "vlprune-tiny" and "vlprune-tiny" in api.BUILTIN_MODELS


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cli") / "picture.png"
    make_test_image(0).save(path)
    return path


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()  # drop anything printed before
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def run_json(capsys: pytest.CaptureFixture[str], image: Path, *options: str) -> dict[str, Any]:
    code, out, err = run_cli(
        capsys, "run", "--image", str(image), "--question", QUESTION, "--max-new-tokens", "2", "--json", *options
    )
    assert code == 0, err
    assert err == ""
    return json.loads(out)


def random_choice(seed: int, num_visual: int, keep: int) -> list[int]:
    """What the random pruner documents: a seeded uniform draw per token, the ``keep`` highest, in order."""
    draw = torch.rand(num_visual, generator=torch.Generator().manual_seed(seed))
    return sorted(torch.topk(draw, keep).indices.tolist())


# ---------------------------------------------------------------------------------------------------- methods


def parse_table(out: str) -> dict[str, tuple[str, str]]:
    lines = out.splitlines()
    assert re.split(r"\s{2,}", lines[0]) == ["name", "stage", "positions", "families", "reference"]
    rows = {}
    for line in lines[1:]:
        name, stage, positions, families, reference = re.split(r"\s{2,}", line, maxsplit=4)
        rows[name] = (stage, reference)
        POSITIONS_COLUMN[name] = positions
        FAMILIES_COLUMN[name] = families
    return rows


POSITIONS_COLUMN: dict[str, str] = {}
FAMILIES_COLUMN: dict[str, str] = {}


def assert_aligned(table: str) -> None:
    lines = table.splitlines()
    for pattern in (r"\S+ +", r"\S+ +\S+ +", r"\S+ +\S+ +\S+ +", r"\S+ +\S+ +\S+ +\S+ +"):
        starts = {re.match(pattern, line).end() for line in lines}  # type: ignore[union-attr]
        assert len(starts) == 1, table


def test_methods_lists_every_method_with_its_stage(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(capsys, "methods")
    assert code == 0 and err == ""
    rows = parse_table(out)
    assert list(rows) == [*vlprune.pruners.available(), *vlprune.pruners.available_modifiers()]
    assert sorted(rows) == vlprune.available_pruners()  # "var" is a method name of its own too
    assert {"none", "random", "fastv", "fastervlm"} <= set(rows)
    expected_stage = {"none": "none", "random": "pre-LLM", "fastv": "in-LLM", "fastervlm": "pre-LLM"}
    for name, stage in expected_stage.items():
        assert rows[name][0] == stage
    assert rows["var"][0] == "attention-modifier" and "fastv+var" not in rows and "METHOD+var" in rows["var"][1]
    for name, (stage, reference) in rows.items():
        if name == "var":
            continue
        cls = vlprune.pruners.get(name)
        assert stage == vlprune.pruners.stages_of(name) and stage.startswith(cls.stage.value)
        assert reference == cls.reference
        assert POSITIONS_COLUMN[name] == vlprune.pruners.create(name).reference_positions()
        assert FAMILIES_COLUMN[name] == ",".join(vlprune.pruners.families_of(name))
    assert "llava-onevision" in FAMILIES_COLUMN["flowcut"] and "llava-onevision" not in FAMILIES_COLUMN["visionzip"]
    # Columns line up: the stage and the reference columns start at the same offset on every line.
    assert_aligned(out)


@pytest.fixture
def user_method(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A user pruner registered for one test only (the registry is restored afterwards)."""
    monkeypatch.setattr(vlprune.pruners, "_REGISTRY", dict(vlprune.pruners._REGISTRY))

    @register
    @dataclass
    class KeepFirst(Pruner):
        name = "a-very-long-user-method-name"
        stage = Stage.ATTENTION
        reference = "a test"

        def plan(self, num_visual: int, num_layers: int) -> list[StagePlan]:
            return [StagePlan(layer=0, keep=self._required_keep(num_visual))]

        def select(self, ctx: StageContext) -> Selection:
            return Selection(keep_index=torch.arange(ctx.keep).expand(ctx.batch_size, -1))

    yield KeepFirst.name


def test_methods_lists_user_registered_methods(capsys: pytest.CaptureFixture[str], user_method: str) -> None:
    code, out, _ = run_cli(capsys, "methods")
    assert code == 0
    rows = parse_table(out)
    assert rows[user_method] == ("attention-modifier", "a test")
    assert rows["fastv"][0] == "in-LLM"
    assert_aligned(out)  # the name column widened for the long name


def test_run_user_registered_method(capsys: pytest.CaptureFixture[str], image: Path, user_method: str) -> None:
    payload = run_json(capsys, image, "--method", user_method, "--keep", "5")
    assert payload["stats"]["stages"][0]["kept_indices"] == [[0, 1, 2, 3, 4]]


# -------------------------------------------------------------------------------------------------------- run


def test_run_default_model_prints_the_answer(capsys: pytest.CaptureFixture[str], image: Path) -> None:
    code, out, err = run_cli(capsys, "run", "--image", str(image), "--question", QUESTION, "--max-new-tokens", "4")
    assert code == 0
    assert err == ""
    # The built-in default is the random-weight tiny model: the CLI prints what the Python API answers.
    expected = vlprune.load("tiny-random")(image, QUESTION, max_new_tokens=4).text
    assert isinstance(expected, str) and expected
    assert out == expected + "\n"


def test_run_json_fastv(capsys: pytest.CaptureFixture[str], image: Path) -> None:
    payload = run_json(capsys, image, "--method", "fastv", "--keep", "16")
    assert {"answer", "method", "keep", "stats"} <= set(payload)
    assert payload["method"] == "fastv"
    assert payload["keep"] == 16
    assert payload["model"] == "tiny-random"
    expected = vlprune.load("tiny-random", method="fastv", keep=16)(image, QUESTION, max_new_tokens=2)
    assert payload["answer"] == expected.text

    stats = payload["stats"]
    assert stats["batch_size"] == 1
    assert stats["visual_tokens"] == 64
    [stage] = stats["stages"]
    assert (stage["layer"], stage["visual_in"], stage["visual_out"], stage["recycled"]) == (2, 64, 16, 0)
    kept = stage["kept_indices"][0]
    assert len(kept) == 16 and kept == sorted(set(kept)) and kept[0] >= 0 and kept[-1] < 64
    assert stats["visual_tokens_per_layer"] == [64, 64, 16, 16]
    lengths = stats["kv_cache_lengths"]
    assert len(lengths) == 4
    assert lengths[0] == lengths[1] > 64
    assert lengths[2] == lengths[3] == lengths[0] - 48
    assert 0 < stats["flops_ratio"] < 1


@pytest.mark.parametrize(
    "method,recycled", [("divprune", 0), ("zoo-prune", 0), ("holov", 0), ("visionzip", 2), ("flowcut", 0)]
)
def test_run_json_vision_side_methods(
    capsys: pytest.CaptureFixture[str], image: Path, method: str, recycled: int
) -> None:
    payload = run_json(capsys, image, "--method", method, "--keep", "16")
    [stage] = payload["stats"]["stages"]
    assert (stage["layer"], stage["visual_in"], stage["visual_out"], stage["recycled"]) == (0, 64, 16, recycled)
    assert len(stage["kept_indices"][0]) == 16 - recycled
    expected = vlprune.load("tiny-random", method=method, keep=16)(image, QUESTION, max_new_tokens=2)
    assert payload["answer"] == expected.text


@pytest.mark.parametrize("method", ["sparsevlm", "pyramiddrop", "vflowopt", "ptp", "fastv+var", "sparsevlm+var"])
def test_run_json_in_llm_methods(capsys: pytest.CaptureFixture[str], image: Path, method: str) -> None:
    extra = ["--option", "tau=2.0"] if "var" in method else []  # a threshold a 64-wide random model reaches
    payload = run_json(capsys, image, "--method", method, "--keep", "16", *extra)
    stats = payload["stats"]
    assert payload["method"] == method and stats["stages"]
    assert stats["equivalent_visual_tokens"] < 64
    expected = vlprune.load("tiny-random", method=method, keep=16, **({"tau": 2.0} if "var" in method else {}))
    assert payload["answer"] == expected(image, QUESTION, max_new_tokens=2).text


def test_run_json_without_pruning(capsys: pytest.CaptureFixture[str], image: Path) -> None:
    payload = run_json(capsys, image)
    assert payload["method"] == "none" and payload["keep"] is None
    stats = payload["stats"]
    assert stats["visual_tokens"] == 64 and stats["stages"] == []
    assert stats["visual_tokens_per_layer"] == [64] * 4
    assert len(set(stats["kv_cache_lengths"])) == 1 and stats["flops_ratio"] == 1.0


def test_run_keep_fraction(capsys: pytest.CaptureFixture[str], image: Path) -> None:
    payload = run_json(capsys, image, "--method", "fastv", "--keep", "0.25", "--layer", "1")
    assert payload["keep"] == 0.25
    [stage] = payload["stats"]["stages"]
    assert (stage["layer"], stage["visual_out"]) == (1, 16)
    assert payload["stats"]["visual_tokens_per_layer"] == [64, 16, 16, 16]


def test_run_option_reaches_the_pruner(capsys: pytest.CaptureFixture[str], image: Path) -> None:
    default = run_json(capsys, image, "--method", "random", "--keep", "16")
    seeded = run_json(capsys, image, "--method", "random", "--keep", "16", "--option", "seed=3")
    default_kept = default["stats"]["stages"][0]["kept_indices"]
    seeded_kept = seeded["stats"]["stages"][0]["kept_indices"]
    assert default_kept == [random_choice(0, 64, 16)]
    assert seeded_kept == [random_choice(3, 64, 16)]
    assert seeded_kept != default_kept


def test_run_options_repeat_and_layer(capsys: pytest.CaptureFixture[str], image: Path) -> None:
    payload = run_json(capsys, image, "--method", "random", "--keep", "8", "--layer", "2", "--option", "seed=5")
    [stage] = payload["stats"]["stages"]
    assert stage["layer"] == 2 and stage["kept_indices"] == [random_choice(5, 64, 8)]
    assert payload["stats"]["visual_tokens_per_layer"] == [64, 64, 8, 8]


@pytest.mark.parametrize(
    ("options", "shown"),
    [
        pytest.param(["--method", "fastvv"], "'fastvv'", id="unknown-method"),
        pytest.param(["--method", "fastv", "--keep", "0"], "keep=0", id="keep-0"),
        pytest.param(["--method", "fastv", "--keep", "65"], "keep=65", id="keep-65"),
        pytest.param(["--method", "random", "--keep", "-3"], "keep=-3", id="keep-negative"),
        pytest.param(["--method", "random", "--keep", "1.5"], "keep=1.5", id="keep-fraction-above-1"),
        pytest.param(["--method", "fastv", "--keep", "16", "--layer", "9"], "layer=9", id="layer-9"),
        pytest.param(["--method", "random", "--keep", "16", "--layer", "4"], "layer=4", id="random-layer-4"),
        pytest.param(["--method", "fastv"], "keep=", id="missing-keep"),
        pytest.param(["--method", "none", "--keep", "8"], "keep=8", id="keep-with-none"),
        pytest.param(["--method", "fastv", "--keep", "8", "--option", "seed=3"], "seed", id="unknown-option"),
        pytest.param(
            ["--method", "fastv", "--keep", "8", "--max-new-tokens", "0"], "--max-new-tokens: 0", id="zero-tokens"
        ),
        pytest.param(["--model", "/no/such/model-dir"], "/no/such/model-dir", id="unknown-model"),
    ],
)
def test_bad_input_exits_2_with_one_error_line(
    capsys: pytest.CaptureFixture[str], image: Path, options: list[str], shown: str
) -> None:
    code, out, err = run_cli(capsys, "run", "--image", str(image), "--question", QUESTION, *options)
    assert_clean_error(code, out, err, shown)


def assert_clean_error(code: int, out: str, err: str, shown: str) -> None:
    assert code == 2
    assert out == ""
    assert err.startswith("vlprune: error: ")
    assert shown in err
    assert "Traceback" not in err
    assert err.count("\n") == 1, err


def test_missing_image_exits_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    missing = tmp_path / "missing.png"
    code, out, err = run_cli(capsys, "run", "--image", str(missing), "--question", QUESTION)
    assert_clean_error(code, out, err, str(missing))


def test_text_file_as_image_exits_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    code, out, err = run_cli(
        capsys, "run", "--image", str(text), "--question", QUESTION, "--method", "fastv", "--keep", "16"
    )
    assert_clean_error(code, out, err, str(text))


@pytest.mark.parametrize(
    ("options", "shown"),
    [
        (["--keep", "lots"], "keep='lots'"),
        (["--option", "seed"], "option 'seed'"),
        (["--positions", "shifted"], "shifted"),
    ],
)
def test_malformed_arguments_exit_2_with_one_line(
    capsys: pytest.CaptureFixture[str], image: Path, options: list[str], shown: str
) -> None:
    code, out, err = run_cli(capsys, "run", "--image", str(image), "--question", QUESTION, *options)
    assert_clean_error(code, out, err, shown)
    assert "(see vlprune run --help)" in err


@pytest.mark.parametrize("option", ["keep=8", "layer=1"])
def test_option_that_duplicates_a_flag_is_a_clean_error(
    capsys: pytest.CaptureFixture[str], image: Path, option: str
) -> None:
    code, out, err = run_cli(
        capsys, "run", "--image", str(image), "--question", QUESTION, "--method", "fastv", "--option", option
    )
    # Either the option is honoured or refused cleanly; never a crash.
    if code == 0:
        assert err == "" and out
    else:
        assert_clean_error(code, out, err, option.split("=")[0])


# ----------------------------------------------------------------------------------------------- console script


def test_installed_console_script_lists_methods() -> None:
    script = Path(sys.executable).with_name("vlprune")
    command = str(script) if script.exists() else shutil.which("vlprune")
    assert command is not None, "the vlprune console script is not installed"
    completed = subprocess.run([command, "methods"], capture_output=True, text=True, timeout=120, check=False)
    assert completed.returncode == 0, completed.stderr
    rows = parse_table(completed.stdout)
    assert {"none", "random", "fastv", "fastervlm"} <= set(rows)
    assert rows["fastv"][0] == "in-LLM"


def test_run_and_load_with_compile_give_the_eager_answer(
    capsys: pytest.CaptureFixture[str], image: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--compile`` / ``load(compile=True)``: the captured session answers as the eager engine, and a pipeline keeps
    its session (and graphs) from one call to the next. The "eager" backend runs the captured graphs uncompiled."""
    monkeypatch.setenv("VLPRUNE_COMPILE_BACKEND", "eager")
    expected = vlprune.load("tiny-random", method="fastv", keep=16)(image, QUESTION, max_new_tokens=3)
    with vlprune.load("tiny-random", method="fastv", keep=16, compile=True) as pipeline:
        first = pipeline(image, QUESTION, max_new_tokens=3)
        second = pipeline(image, QUESTION, max_new_tokens=3)
        assert pipeline.captured_session().compilations == 2
    assert first.text == second.text == expected.text and torch.equal(first.token_ids, expected.token_ids)
    assert first.stats.stages[0].kept_indices == expected.stats.stages[0].kept_indices
    payload = run_json(capsys, image, "--method", "fastv", "--keep", "16", "--compile")
    assert (
        payload["answer"]
        == vlprune.load("tiny-random", method="fastv", keep=16)(image, QUESTION, max_new_tokens=2).text
    )


def test_bench_compile_compares_captured_pruned_and_unpruned(monkeypatch: pytest.MonkeyPatch, image: Path) -> None:
    from vlprune.eval.bench_captured import bench_captured

    pipeline = vlprune.load("tiny-random")
    result = bench_captured(pipeline, "fastv", 16, image, QUESTION, repeats=1, backend="eager", answer_tokens=4)
    variants = [row.variant for row in result.rows]
    assert variants == ["eager transformers, unpruned", "captured unpruned", "captured fastv"]
    assert [row.kept_tokens for row in result.rows] == [64, 64, 16]
    assert all(row.first_token_ms > 0 and row.answer_ms > 0 for row in result.rows)
    assert len(result.table_rows()) == 3 and all(line.count("|") == 9 for line in result.table_rows())
