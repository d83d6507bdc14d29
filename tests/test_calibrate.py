"""Visual-information-flow calibration: the search, its JSON result, and `--config` feeding it back to the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import vlprune
import vlprune.cli
from vlprune.cli import main
from vlprune.errors import VlpruneError
from vlprune.eval.calibrate import calibrate, encode, last_token_states, read_config, write_config
from vlprune.eval.datasets import load_dataset


@pytest.fixture(autouse=True)
def _random_default_model(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vlprune.cli, "DEFAULT_MODEL", "tiny-random")


@pytest.fixture(scope="module")
def samples():
    return load_dataset("shapes", split="validation", limit=4)


def test_calibration_returns_options_that_reproduce_its_score(samples) -> None:
    pipeline = vlprune.load("tiny-random")
    result = calibrate(pipeline, "vflowopt", 0.25, samples, trials=4, seed=0, batch_size=2, progress=False)
    assert result["method"] == "vflowopt" and result["keep"] == 0.25 and result["samples"] == 4
    assert set(result["options"]) == {"ratios", "sensitivity", "cell", "entropy_weight"}
    # The search starts from the default configuration and improves on it within four trials on this model.
    assert result["score"] > result["default_score"]
    batches = encode(pipeline, samples, 2)
    reference = last_token_states(pipeline.model, batches)
    # The default's score is the mean cosine of the default pruner, computed here on its own.
    with vlprune.attach(pipeline.model, vlprune.pruners.create("vflowopt", keep=0.25)):
        default = last_token_states(pipeline.model, batches)
    default_score = float(torch.nn.functional.cosine_similarity(default, reference, dim=-1).mean())
    assert default_score == pytest.approx(result["default_score"], abs=1e-6) and default_score < 1 - 1e-4
    # Running the pruner with the returned options gives the same mean cosine: the search measured what it returns.
    with vlprune.attach(pipeline.model, vlprune.pruners.create("vflowopt", keep=0.25, **result["options"])):
        pruned = last_token_states(pipeline.model, batches)
    score = float(torch.nn.functional.cosine_similarity(pruned, reference, dim=-1).mean())
    assert score == pytest.approx(result["score"], abs=1e-6)
    # The same seed finds the same options.
    again = calibrate(pipeline, "vflowopt", 0.25, samples, trials=4, seed=0, batch_size=2, progress=False)
    assert again["options"] == result["options"]


def test_calibration_rejects_methods_without_a_search_space(samples) -> None:
    with pytest.raises(VlpruneError, match="fastv"):
        calibrate(vlprune.load("tiny-random"), "fastv", 0.25, samples, trials=2)


def test_config_files_are_written_whole_and_read_with_clear_errors(tmp_path: Path) -> None:
    path = write_config({"method": "vflowopt", "keep": 16, "options": {"ratios": [0.3, 0.9]}}, tmp_path / "c.json")
    assert read_config(path)["options"] == {"ratios": [0.3, 0.9]}
    assert [p.name for p in tmp_path.iterdir()] == ["c.json"]  # no temporary file left
    with pytest.raises(VlpruneError, match="does not exist"):
        read_config(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(VlpruneError, match="not valid JSON"):
        read_config(tmp_path / "bad.json")
    (tmp_path / "nomethod.json").write_text('{"keep": 3}')
    with pytest.raises(VlpruneError, match="method"):
        read_config(tmp_path / "nomethod.json")


def test_cli_calibrate_then_run_with_the_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "vflowopt.json"
    code = main(
        ["calibrate", "--keep", "16", "--samples", "2", "--trials", "2", "--batch-size", "2", "--out", str(out)]
    )
    assert code == 0 and out.is_file()
    config = json.loads(out.read_text())
    assert config["method"] == "vflowopt" and config["keep"] == 16 and config["model"] == "tiny-random"
    capsys.readouterr()
    image = Path(vlprune.__file__).parent / "samples" / "scene1.png"
    code = main(["run", "--image", str(image), "--question", "What?", "--config", str(out), "--json"])
    payload = json.loads(capsys.readouterr().out)
    assert code == 0 and payload["method"] == "vflowopt" and payload["keep"] == 16
    assert payload["stats"]["stages"][0]["layer"] == 0
    # A contradicting --method is refused with one clear line.
    code = main(["run", "--image", str(image), "--question", "What?", "--config", str(out), "--method", "fastv"])
    assert code == 2 and "contradicts" in capsys.readouterr().err
