"""Bad model folders and inputs met while loading a model and preparing its inputs, as a user meets them: the CLI
answers with one line and exit status 2, the Python API raises VlpruneError with the same text, a model folder's own
Python code never runs, and what can be refused from a folder's config.json is refused before the model loads (so a
sweep leaves no file behind)."""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_checks import assert_one_line as assert_refused
from cli_checks import cli
from conftest import tiny_model
from PIL import Image
from safetensors.torch import load_file, save_file

import vlprune
import vlprune.api
import vlprune.cli
from vlprune import VlpruneError
from vlprune.testing import make_test_image
from vlprune.testing_anyres import build_tiny_llava_onevision
from vlprune.testing_qwen import build_tiny_qwen2_vl

QUESTION = "What is in the image?"

# Some of these refusals come from a load that started, after transformers' progress bar.
assert_one_line = functools.partial(assert_refused, after_loading=True)


# ------------------------------------------------------------------------------------------------ fixtures and helpers


@pytest.fixture(autouse=True)
def _random_default_model(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vlprune.cli, "DEFAULT_MODEL", "tiny-random")


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("images") / "picture.png"
    make_test_image(0).save(path)
    return path


def save_folder(folder: Path, model: torch.nn.Module, processor: object) -> Path:
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def llava_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random LLaVA-1.5 folder (64 visual tokens, 4 decoder layers)."""
    return save_folder(tmp_path_factory.mktemp("llava"), *tiny_model(private=True))  # saving writes to its config


@pytest.fixture(scope="module")
def qwen_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_folder(tmp_path_factory.mktemp("qwen"), *build_tiny_qwen2_vl())


@pytest.fixture(scope="module")
def onevision_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_folder(tmp_path_factory.mktemp("onevision"), *build_tiny_llava_onevision())


def copied(folder: Path, destination: Path) -> Path:
    shutil.copytree(folder, destination)
    return destination


def edit_config(folder: Path, **text_fields: object) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config["text_config"].update(text_fields)
    path.write_text(json.dumps(config))


def own_code_folder(folder: Path, marker: Path) -> Path:
    """A model folder whose config.json maps the Auto classes to its own Python file, for a model type transformers
    does not know; importing that file writes ``marker``."""
    folder.mkdir()
    auto_map = {name: f"evil.{name}Class" for name in ("AutoConfig", "AutoModelForImageTextToText", "AutoProcessor")}
    (folder / "config.json").write_text(json.dumps({"model_type": "evil-vlm", "auto_map": auto_map}))
    (folder / "evil.py").write_text(f"from pathlib import Path\nPath({str(marker)!r}).write_text('the code ran')\n")
    return folder


def api_error(action, *fragments: str) -> str:
    with pytest.raises(VlpruneError) as info:
        action()
    message = str(info.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


# ------------------------------------------------------------------------------------------------ a folder's own code


def run_with_stdin(argv: list[str], stdin: str) -> tuple[subprocess.Popen[str], int | None]:
    """``python -m vlprune.cli ARGV`` with its standard input a pseudo-terminal ("pty", as on a terminal) or a pipe,
    either already holding "y" answers to any question it would ask; with the terminal's other side, to close once the
    process has ended."""
    if stdin == "pty":
        typed_at, reader = os.openpty()  # the process reads the terminal's side; the answers are typed at the other
    else:
        reader, typed_at = os.pipe()
    process = subprocess.Popen(
        [sys.executable, "-m", "vlprune.cli", *argv],
        stdin=reader,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    os.close(reader)
    os.write(typed_at, b"y\ny\ny\n")
    if stdin == "pipe":
        os.close(typed_at)  # the end of the answers
        return process, None
    return process, typed_at


def test_a_folder_that_needs_its_own_code_never_runs_it_with_a_terminal_or_a_pipe(tmp_path: Path, image: Path) -> None:
    """transformers would ask "Do you wish to run the custom code? [y/N]" and, answered y, import the folder's file:
    vlprune refuses the folder from its config.json and never asks."""
    marker = tmp_path / "marker"
    folder = own_code_folder(tmp_path / "model", marker)
    argv = ["run", "--model", str(folder), "--image", str(image), "--question", QUESTION]
    runs = {stdin: run_with_stdin(argv, stdin) for stdin in ("pty", "pipe")}  # both at once: each starts slowly
    for stdin, (process, terminal) in runs.items():
        out, err = process.communicate(timeout=120)
        if terminal is not None:
            os.close(terminal)
        assert not marker.exists(), f"the folder's code ran with stdin a {stdin}"
        assert "Do you wish to run the custom code" not in out + err
        assert_one_line(process.returncode, out, err, str(folder), "needs its own Python code", "never runs")


def test_no_loader_asks_to_run_a_folders_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Below the config.json check, every transformers loader is told trust_remote_code=False: nothing asks, and so
    nothing runs, even where an answer of y is waiting."""
    marker = tmp_path / "marker"
    folder = own_code_folder(tmp_path / "model", marker)
    questions: list[str] = []

    def answer_yes(prompt: str = "") -> str:
        questions.append(prompt)
        return "y"

    monkeypatch.setattr("builtins.input", answer_yes)
    api_error(lambda: vlprune.load(str(folder)), "needs its own Python code")
    api_error(lambda: vlprune.api.load_model(str(folder)), "needs its own Python code", "never runs")
    assert questions == [] and not marker.exists()


# ------------------------------------------------------------------------------------------------ Qwen-VL aspect ratios


def test_a_qwen_image_beyond_its_aspect_ratio_limit_is_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, qwen_folder: Path
) -> None:
    thin = tmp_path / "thin.png"
    Image.new("RGB", (1, 250), "white").save(thin)
    argv = ["run", "--model", str(qwen_folder), "--image", str(thin), "--question", QUESTION, "--max-new-tokens", "1"]
    assert_one_line(*cli(capsys, *argv), f"image {str(thin)!r} is 1x250 pixels", "at most 200 to 1")
    pipeline = vlprune.load(tuple(build_tiny_qwen2_vl()))
    batch = [make_test_image(0), Image.new("RGB", (4000, 10), "white")]
    api_error(lambda: pipeline(batch, QUESTION, max_new_tokens=1), "image 2 of the batch is 4000x10 pixels", "400 to 1")
    assert pipeline(Image.new("RGB", (2000, 10), "white"), QUESTION, max_new_tokens=1).token_ids.shape[1] == 1


# ------------------------------------------------------------------------------------------------ damaged folders


def test_a_config_field_of_the_wrong_type_is_one_line_before_loading(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, llava_folder: Path, image: Path, no_model_load: None
) -> None:
    folder = copied(llava_folder, tmp_path / "model")
    edit_config(folder, num_hidden_layers="four")
    shown = (str(folder), "text_config.num_hidden_layers", "expected int, got str", "'four'")
    assert_one_line(*cli(capsys, "run", "--model", str(folder), "--image", str(image), "--question", QUESTION), *shown)
    api_error(lambda: vlprune.load(str(folder)), *shown)


def test_weights_that_do_not_match_the_config_are_one_line_without_the_load_report(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, llava_folder: Path, image: Path
) -> None:
    folder = copied(llava_folder, tmp_path / "model")
    config = json.loads((folder / "config.json").read_text())
    edit_config(folder, hidden_size=2 * config["text_config"]["hidden_size"])
    reports = ReportCatcher()
    with reports:
        code, out, err = cli(capsys, "run", "--model", str(folder), "--image", str(image), "--question", QUESTION)
    assert_one_line(code, out, err, str(folder), "its weights do not match its config.json", "in the weights")
    assert reports.messages == []  # transformers' table of every mismatched weight is not shown


def test_a_load_report_of_a_model_that_loads_is_still_shown(tmp_path: Path, llava_folder: Path) -> None:
    folder = copied(llava_folder, tmp_path / "model")
    weights = load_file(folder / "model.safetensors")
    del weights["multi_modal_projector.linear_2.bias"]  # a missing weight: the model loads, and it is reported
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    reports = ReportCatcher()
    with reports:
        vlprune.api.load_model(str(folder))
    assert any("LOAD REPORT" in message for message in reports.messages)


class ReportCatcher(logging.Handler):
    """Collects what transformers logs about loading weights, while used as a context manager."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []
        self.logger = logging.getLogger("transformers.modeling_utils")

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def __enter__(self) -> ReportCatcher:
        self.logger.addHandler(self)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.logger.removeHandler(self)


def test_a_pickle_checkpoint_is_refused_with_the_way_to_convert_it(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, llava_folder: Path, image: Path
) -> None:
    folder = copied(llava_folder, tmp_path / "model")
    weights = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save({**weights, "training_args": argparse.Namespace(lr=1e-4)}, folder / "pytorch_model.bin")
    argv = ["run", "--model", str(folder), "--image", str(image), "--question", QUESTION]
    err = assert_one_line(
        *cli(capsys, *argv),
        str(folder),
        "holds a pickle checkpoint (pytorch_model.bin)",
        "will not load",
        "safetensors",
    )
    assert "weights_only" not in err


# ----------------------------------------------------------------------------------------------- refused before loading


def sweep_argv(model: Path, out: Path, *more: str) -> list[str]:
    return ["sweep", "--model", str(model), "--limit", "1", "--max-new-tokens", "1", "--out", str(out), *more]


@pytest.mark.parametrize("family", ["onevision", "qwen"])
def test_a_method_the_family_refuses_is_refused_before_loading(
    family: str,
    request: pytest.FixtureRequest,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    image: Path,
    no_model_load: None,
) -> None:
    folder: Path = request.getfixturevalue(f"{family}_folder")
    shown = ("method 'fastervlm' does not run on the", str(folder), "it runs on llava, llava-next")
    out = tmp_path / "sweep"
    assert_one_line(*cli(capsys, *sweep_argv(folder, out, "--methods", "fastv,fastervlm", "--keep", "8")), *shown)
    assert not out.exists()  # no sweep.json, no lock
    run = ["run", "--model", str(folder), "--image", str(image), "--question", QUESTION]
    assert_one_line(*cli(capsys, *run, "--method", "fastervlm", "--keep", "8"), *shown)
    bench = ["bench", "--model", str(folder), "--method", "fastervlm", "--keep", "8"]
    assert_one_line(*cli(capsys, *bench), *shown)
    api_error(lambda: vlprune.load(str(folder), method="fastervlm", keep=8), *shown)


def test_reindexed_positions_on_qwen_are_refused_before_loading(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, qwen_folder: Path, image: Path, no_model_load: None
) -> None:
    shown = ("positions='reindex' is not supported on qwen2-vl", "use one of ('original',)")
    out = tmp_path / "sweep"
    argv = sweep_argv(qwen_folder, out, "--methods", "fastv", "--keep", "8", "--positions", "original,reindex")
    assert_one_line(*cli(capsys, *argv), *shown)
    assert not out.exists()
    run = ["run", "--model", str(qwen_folder), "--image", str(image), "--question", QUESTION, "--positions", "reindex"]
    assert_one_line(*cli(capsys, *run), *shown)
    calibrate = ["calibrate", "--model", str(qwen_folder), "--keep", "8", "--positions", "reindex"]
    assert_one_line(*cli(capsys, *calibrate, "--out", str(tmp_path / "config.json")), *shown)
    api_error(lambda: vlprune.load(str(qwen_folder), method="fastv", keep=8, positions="reindex"), *shown)


def test_an_unknown_compile_backend_is_refused_before_loading(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    llava_folder: Path,
    no_model_load: None,
) -> None:
    monkeypatch.setenv("VLPRUNE_COMPILE_BACKEND", "bogus")
    shown = ("compile backend 'bogus' (from VLPRUNE_COMPILE_BACKEND)", "inductor")
    out = tmp_path / "sweep"
    assert_one_line(
        *cli(capsys, *sweep_argv(llava_folder, out, "--methods", "fastv", "--keep", "8", "--compile")), *shown
    )
    assert not out.exists()
    bench = ["bench", "--model", str(llava_folder), "--method", "fastv", "--keep", "8", "--compile"]
    assert_one_line(*cli(capsys, *bench), *shown)
    assert_one_line(*cli(capsys, "eval", "--model", str(llava_folder), "--limit", "1", "--compile"), *shown)
    api_error(lambda: vlprune.load(str(llava_folder), compile=True), *shown)


def test_the_lmms_eval_wrapper_refuses_before_loading(onevision_folder: Path, no_model_load: None) -> None:
    pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (pip install 'vlprune[lmms]')")
    from vlprune.eval.lmms_model import VLPruneLMMS

    api_error(lambda: VLPruneLMMS(pretrained=str(onevision_folder), method="fastervlm", keep=8), "does not run on")
