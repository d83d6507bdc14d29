"""Bad values and faults as a user meets them: the CLI answers with one line and exit status 2, the Python API raises
VlpruneError with the same text, nothing is computed or written before the check, and the model is left unmodified.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from cli_checks import assert_one_line, cli
from conftest import tiny_model
from filelock import FileLock
from PIL import Image

import vlprune
import vlprune.api
import vlprune.cli
from vlprune import VlpruneError
from vlprune.eval.datasets import load_dataset
from vlprune.eval.sweep import RESULTS, SETTINGS
from vlprune.models import source
from vlprune.pruners import create
from vlprune.testing import make_test_image

QUESTION = "What is in the image?"


@pytest.fixture(autouse=True)
def _random_default_model(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vlprune.cli, "DEFAULT_MODEL", "tiny-random")


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("bad") / "picture.png"
    make_test_image(0).save(path)
    return path


@pytest.fixture(scope="module")
def tiny() -> tuple[torch.nn.Module, object]:
    return tiny_model(private=True)  # its own: model_folder saves it, which writes to its config


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory: pytest.TempPathFactory, tiny: tuple[torch.nn.Module, object]) -> Path:
    """A tiny random LLaVA saved as a local model folder (64 visual tokens, 4 decoder layers)."""
    folder = tmp_path_factory.mktemp("model")
    model, processor = tiny
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def api_error(action, *fragments: str) -> str:
    with pytest.raises(VlpruneError) as info:
        action()
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


# ------------------------------------------------------------------------------------------------ counts at parse time


@pytest.mark.parametrize(
    ("argv", "shown"),
    [
        (["eval", "--batch-size", "-1"], "--batch-size: -1 must be at least 1"),
        (["eval", "--batch-size", "0"], "--batch-size: 0 must be at least 1"),
        (["eval", "--limit", "0"], "--limit: 0 must be at least 1"),
        (["bench", "--method", "random", "--batch", "0"], "--batch: 0 must be at least 1"),
        (["bench", "--method", "random", "--repeats", "0"], "--repeats: 0 must be at least 1"),
        (["bench", "--method", "random", "--warmup", "-1"], "--warmup: -1 must be at least 0"),
        (["calibrate", "--keep", "8", "--out", "x.json", "--trials", "0"], "--trials: 0 must be at least 1"),
        (["calibrate", "--keep", "8", "--out", "x.json", "--samples", "-2"], "--samples: -2 must be at least 1"),
        (["sweep", "--methods", "fastv", "--max-new-tokens", "0"], "--max-new-tokens: 0 must be at least 1"),
        (["eval", "--batch-size", "two"], "--batch-size: 'two' is not a whole number"),
    ],
)
def test_count_arguments_are_checked_when_parsed(
    capsys: pytest.CaptureFixture[str], no_model_load: None, argv: list[str], shown: str
) -> None:
    assert_one_line(*cli(capsys, *argv), shown)


# ------------------------------------------------------------------------------------------------ whole-number floats


@pytest.mark.parametrize("keep", ["1.0", "64.0"])
def test_a_whole_float_budget_is_refused_everywhere(
    capsys: pytest.CaptureFixture[str], image: Path, tmp_path: Path, keep: str
) -> None:
    count = keep.split(".")[0]
    fragments = (f"keep={keep} is ambiguous", f"keep={count} for {count} visual token")
    assert_one_line(*cli(capsys, "run", "--image", str(image), "--question", QUESTION, "--keep", keep), *fragments)
    out = tmp_path / "sweep"
    assert_one_line(*cli(capsys, "sweep", "--methods", "random", "--keep", f"16,{keep}", "--out", str(out)), *fragments)
    assert not out.exists()
    api_error(lambda: vlprune.load("tiny-random", method="random", keep=float(keep)), *fragments)
    # lmms-eval hands model_args over as parsed literals: 1.0 arrives as a float.
    api_error(lambda: create("fastv", keep=float(keep)), *fragments)


# ------------------------------------------------------------------------------------------------ options by type


@pytest.mark.parametrize(
    ("method", "option", "shown"),
    [
        ("random", "seed=abc", "option seed='abc' of method 'random' must be an int"),
        ("random", "seed=1.5", "option seed=1.5 of method 'random' must be an int"),
        ("zoo-prune", "step=fast", "option step='fast' of method 'zoo-prune' must be a number"),
        ("vflowopt", "recycle=maybe", "option recycle='maybe' of method 'vflowopt' must be true or false"),
        ("pyramiddrop", "layers=2,x", "option layers='2,x' of method 'pyramiddrop' must be a list of an int"),
    ],
)
def test_options_are_type_checked_before_the_pruner_is_built(
    capsys: pytest.CaptureFixture[str], image: Path, no_model_load: None, method: str, option: str, shown: str
) -> None:
    argv = ["run", "--image", str(image), "--question", QUESTION, "--method", method, "--keep", "8", "--option", option]
    assert_one_line(*cli(capsys, *argv), shown)
    key, _, text = option.partition("=")
    value = vlprune.cli._option(option)[1]  # the value as --option parsed it (JSON, else text)
    assert vlprune.cli._option(option)[0] == key and str(value) in text
    api_error(lambda: create(method, keep=8, **{key: value}), shown)


def test_options_that_fit_their_type_are_converted() -> None:
    # lmms-eval's model_args and --option values arrive as text or JSON; exact conversions are accepted.
    assert create("random", keep=8, seed="3").seed == 3
    assert create("random", keep=8, seed=3.0).seed == 3
    assert create("zoo-prune", keep=8, step=1).step == 1.0 and isinstance(
        create("zoo-prune", keep=8, step=1).step, float
    )
    assert create("vflowopt", keep=8, recycle="false").recycle is False
    assert create("pyramiddrop", layers="2,8", ratios="[0.5, 0.5]").layers == [2, 8]
    assert create("sparsevlm", recycle="none").recycle is None


# ------------------------------------------------------------------------------------------------ devices and kernels


def test_a_bogus_device_is_one_line(capsys: pytest.CaptureFixture[str], image: Path, no_model_load: None) -> None:
    shown = "device='bogus' is not a torch device"
    assert_one_line(*cli(capsys, "run", "--image", str(image), "--question", QUESTION, "--device", "bogus"), shown)
    api_error(lambda: vlprune.load("tiny-random", device="bogus"), shown)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_is_one_line(capsys: pytest.CaptureFixture[str], image: Path, tiny) -> None:
    shown = "device='cuda': this machine has no usable CUDA GPU; use --device cpu"
    assert_one_line(*cli(capsys, "run", "--image", str(image), "--question", QUESTION, "--device", "cuda"), shown)
    api_error(lambda: vlprune.load(tiny, device="cuda"), shown)


def test_a_bad_kernel_setting_fails_at_start_up(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, image: Path, tiny
) -> None:
    monkeypatch.setenv("VLPRUNE_KERNELS", "bogus")
    shown = "VLPRUNE_KERNELS='bogus' is not valid; choose one of auto, reference"
    assert_one_line(*cli(capsys, "methods"), shown)
    assert_one_line(*cli(capsys, "run", "--image", str(image), "--question", QUESTION), shown)
    api_error(lambda: vlprune.load(tiny), shown)
    api_error(lambda: vlprune.attach(tiny[0], create("random", keep=8)), shown)


# ----------------------------------------------------------------------------------------------- prompts, images, batch


def test_a_question_holding_the_image_token_is_refused(capsys: pytest.CaptureFixture[str], image: Path) -> None:
    question = "What is <image> here?"
    shown = "contains the image token '<image>'"
    assert_one_line(*cli(capsys, "run", "--image", str(image), "--question", question), shown)
    pipeline = vlprune.load("tiny-random")
    api_error(lambda: pipeline(str(image), question), shown)


def test_a_prompt_with_two_image_tokens_for_one_image_is_refused(image: Path) -> None:
    pipeline = vlprune.load("tiny-random")
    prompt = "USER: <image><image>\nWhat is it? ASSISTANT:"
    api_error(lambda: pipeline(str(image), prompt=prompt), "has 2 image tokens '<image>'", "exactly one")


def test_an_empty_batch_is_refused() -> None:
    pipeline = vlprune.load("tiny-random")
    api_error(lambda: pipeline([], QUESTION), "empty batch")
    api_error(lambda: pipeline.model_inputs([], []), "empty batch")


def test_an_image_above_the_decompression_bomb_limit_is_refused(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, image: Path
) -> None:
    # The sample is 32x32 = 1,024 pixels: above a limit of 1,000 PIL only warns, above twice a limit of 400 it refuses.
    for limit in (1_000, 400):
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
        shown = "is too large to open safely"
        assert_one_line(*cli(capsys, "run", "--image", str(image), "--question", QUESTION), shown, str(image))
        api_error(lambda: vlprune.api.load_image(image), shown, f"MAX_IMAGE_PIXELS is {limit}")


def test_an_empty_image_is_refused() -> None:
    pipeline = vlprune.load("tiny-random")
    api_error(lambda: pipeline(Image.new("RGB", (0, 0)), QUESTION), "is 0x0 pixels")
    api_error(lambda: pipeline(Image.new("RGB", (5, 0)), QUESTION), "is 5x0 pixels")


def test_the_callers_padding_side_is_restored(image: Path) -> None:
    model, processor = tiny_model(private=True)  # its own: the test changes its tokenizer
    processor.tokenizer.padding_side = "right"
    pipeline = vlprune.load((model, processor), method="random", keep=8)
    batch = pipeline([str(image), str(image)], ["What?", "How many red objects are on the left?"], max_new_tokens=2)
    alone = pipeline(str(image), "What?", max_new_tokens=2)
    assert processor.tokenizer.padding_side == "right"
    # The batch was still left-padded: its shorter sample answers as it does alone.
    assert torch.equal(batch.token_ids[0], alone.token_ids[0])


# ------------------------------------------------------------------------------------------------ config files


@pytest.mark.parametrize("kind", ["folder", "missing", "corrupt", "not-an-object"])
def test_a_bad_config_file_is_one_line(
    capsys: pytest.CaptureFixture[str], image: Path, tmp_path: Path, no_model_load: None, kind: str
) -> None:
    path = tmp_path / "config.json"
    if kind == "folder":
        path.mkdir()
    elif kind == "corrupt":
        path.write_bytes(b'{"method": "vflowopt", "keep": 6')
    elif kind == "not-an-object":
        path.write_text("[1, 2]")
    shown = {"folder": "is a folder", "missing": "does not exist", "corrupt": "is not valid JSON"}.get(
        kind, 'must be a JSON object with a "method"'
    )
    code, out, err = cli(capsys, "run", "--image", str(image), "--question", QUESTION, "--config", str(path))
    assert_one_line(code, out, err, str(path), shown)


# ------------------------------------------------------------------------------------------------ fast failures


def test_a_bad_budget_or_layer_fails_before_the_model_loads(
    capsys: pytest.CaptureFixture[str], image: Path, model_folder: Path, no_model_load: None
) -> None:
    base = ["run", "--model", str(model_folder), "--image", str(image), "--question", QUESTION]
    assert_one_line(*cli(capsys, *base, "--method", "fastv", "--keep", "65"), "keep=65 is outside [1, 64]")
    assert_one_line(
        *cli(capsys, *base, "--method", "fastv", "--keep", "8", "--layer", "9"), "layer=9", "valid layers are 1..3"
    )
    api_error(lambda: vlprune.load(str(model_folder), method="random", keep=100), "keep=100 is outside [1, 64]")


def test_the_folder_check_agrees_with_the_loaded_model(model_folder: Path, image: Path) -> None:
    # The counterpart: a budget that fits passes the early check and runs on the loaded folder.
    pipeline = vlprune.load(str(model_folder), method="random", keep=64)
    result = pipeline(str(image), QUESTION, max_new_tokens=1)
    assert result.stats is not None and result.stats.visual_tokens_per_layer[0] == 64


def test_an_uncached_hub_id_without_network_fails_fast(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, image: Path
) -> None:
    monkeypatch.setattr(source, "hub_reachable", lambda: False)
    name = "nobody-here/no-such-vlm"
    shown = (f"model {name!r} is not in the local Hugging Face cache", "cannot be reached", "--model PATH")
    assert_one_line(*cli(capsys, "run", "--model", name, "--image", str(image), "--question", QUESTION), *shown)
    api_error(lambda: vlprune.load(name), *shown)


def test_the_hub_probe_honours_offline_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    source.hub_reachable.cache_clear()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    try:
        assert source.hub_reachable() is False
    finally:
        source.hub_reachable.cache_clear()


@pytest.mark.parametrize(
    ("name", "shown"), [("/no/such/model-dir", "model folder '/no/such/model-dir' does not exist"), ("x.png", "file")]
)
def test_a_model_path_that_is_not_a_folder(
    capsys: pytest.CaptureFixture[str], image: Path, name: str, shown: str
) -> None:
    name = str(image) if name == "x.png" else name
    assert_one_line(*cli(capsys, "run", "--model", name, "--image", str(image), "--question", QUESTION), shown)


# ------------------------------------------------------------------------------------------------ datasets


def test_duplicate_ids_in_a_jsonl_dataset_are_refused(tmp_path: Path, image: Path) -> None:
    lines = [
        {"image": str(image), "question": "a?", "answer": "x", "id": "q1"},
        {"image": str(image), "question": "b?", "answer": "y", "id": "q2"},
        {"image": str(image), "question": "c?", "answer": "z", "id": "q1"},
    ]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    api_error(lambda: load_dataset(f"jsonl:{path}"), f"{path}, line 3", "'q1' is already the id of line 1")
    assert [s.id for s in load_dataset(f"jsonl:{path}", limit=2)] == ["q1", "q2"]


# ----------------------------------------------------------------------------------------------- sweeps and calibration


def sweep_argv(out: Path) -> list[str]:
    return ["sweep", "--methods", "random", "--keep", "16", "--limit", "1", "--max-new-tokens", "1", "--out", str(out)]


def test_a_rejected_sweep_writes_nothing_and_its_correction_runs(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    out = tmp_path / "sweep"
    argv = ["sweep", "--methods", "random", "--limit", "1", "--max-new-tokens", "1", "--out", str(out)]
    assert_one_line(*cli(capsys, *argv, "--keep", "300"), "keep=300 is outside [1, 64]")
    assert not (out / SETTINGS).exists()
    code, _, err = cli(capsys, *argv, "--keep", "16")
    assert code == 0, err
    assert len((out / RESULTS).read_text().splitlines()) == 2  # none + random@16


def test_settings_left_by_a_run_without_rows_do_not_block_a_rerun(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    out = tmp_path / "sweep"
    out.mkdir()
    (out / SETTINGS).write_text(json.dumps({"model": "tiny-random", "keeps": [300]}))
    code, _, err = cli(capsys, *sweep_argv(out))
    assert code == 0, err
    assert json.loads((out / SETTINGS).read_text())["keeps"] == [16]


def test_settings_with_rows_still_protect_their_sweep(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    assert cli(capsys, *sweep_argv(out))[0] == 0
    argv = ["sweep", "--methods", "random", "--keep", "8", "--limit", "1", "--max-new-tokens", "1", "--out", str(out)]
    assert_one_line(*cli(capsys, *argv), "holds rows of a sweep with other settings (keeps)")


def test_a_sweep_refuses_a_folder_another_sweep_is_writing(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    out.mkdir()
    held = threading.Event()
    release = threading.Event()

    def other_sweep() -> None:  # holds the folder's lock as a running sweep does
        with FileLock(out / f".{RESULTS}.lock"):
            held.set()
            release.wait(60)

    holder = threading.Thread(target=other_sweep)
    holder.start()
    try:
        held.wait(10)
        assert_one_line(*cli(capsys, *sweep_argv(out)), "another sweep is writing", str(out / RESULTS))
        assert not (out / RESULTS).exists()
    finally:
        release.set()
        holder.join()
    assert cli(capsys, *sweep_argv(out))[0] == 0  # once it is done, the folder is free


def test_two_concurrent_sweep_processes_write_each_row_once(tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    command = [sys.executable, "-m", "vlprune.cli", *sweep_argv(out), "--model", "tiny-random"]
    env = {**os.environ, "TQDM_DISABLE": "1"}
    runs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for _ in "ab"]
    results = [(run.wait(timeout=300), run.stderr.read()) for run in runs]
    for code, err in results:
        assert code == 0 or (code == 2 and "another sweep is writing" in err), err
        assert "Traceback" not in err
    assert any(code == 0 for code, _ in results)
    rows = [json.loads(line) for line in (out / RESULTS).read_text().splitlines()]
    assert sorted((row["method"], row["keep"]) for row in rows) == [("none", None), ("random", 16)]


def test_calibrate_checks_its_output_path_before_any_work(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, no_model_load: None
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    out = blocker / "vflowopt.json"
    assert_one_line(
        *cli(capsys, "calibrate", "--keep", "8", "--out", str(out)), f"--out {str(out)!r} cannot be created"
    )
    assert_one_line(*cli(capsys, "calibrate", "--keep", "8", "--out", str(tmp_path)), "is a folder")
    assert_one_line(*cli(capsys, "calibrate", "--method", "fastv", "--keep", "8", "--out", "x.json"), "search space")


# ------------------------------------------------------------------------------------------------ broken pipe


def test_a_report_piped_into_a_reader_that_stops_early(tmp_path: Path) -> None:
    folder = tmp_path / "sweep"
    folder.mkdir()
    row = {
        "sample": "s0", "method": "none", "keep": None, "kind": "color", "question": "q", "answer": "red",
        "correct": True, "prediction": "red", "visual_tokens": 64, "equivalent_visual_tokens": 64.0,
        "prefill_flops": 1.0, "flops_ratio": 1.0, "kv_cache_bytes": 1, "prefill_ms": 1.0, "end_to_end_ms": 2.0,
        "decode_tokens_per_s": None, "peak_memory_bytes": None, "same_answer": True, "kl_first_token": 0.0,
        "hidden_cosine": 1.0,
    }  # fmt: skip
    (folder / RESULTS).write_text(json.dumps(row) + "\n")
    run = subprocess.Popen(
        [sys.executable, "-m", "vlprune.cli", "report", str(folder)], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    run.stdout.close()  # the reader is gone before the report prints its first line (as `| head -0` would be)
    err = run.stderr.read().decode()
    assert run.wait(timeout=120) == 0, err
    assert "Traceback" not in err and "BrokenPipe" not in err, err
