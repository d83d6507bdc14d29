"""Sweeps: resuming after kills, metric functions against hand computations, the report on a synthetic results file,
sharding, and bad input."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

import vlprune
import vlprune.cli
from vlprune.cli import main
from vlprune.engine.captured import DEFAULT_BUCKETS, CapturedSession
from vlprune.errors import VlpruneError
from vlprune.eval.datasets import load_dataset
from vlprune.eval.report import accuracy_table, summarise, write_report
from vlprune.eval.sweep import (
    RESULTS,
    Reference,
    ResultsFile,
    SweepSettings,
    cells,
    fidelity,
    load_rows,
    merge_shards,
    parse_keeps,
    parse_positions,
    row_key,
    run_sweep,
    shard_of,
)


@pytest.fixture(autouse=True)
def _random_default_model(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vlprune.cli, "DEFAULT_MODEL", "tiny-random")


@pytest.fixture(scope="module")
def pipeline():
    return vlprune.load("tiny-random")


@pytest.fixture(scope="module")
def samples():
    return load_dataset("shapes", split="test", limit=3)


SETTINGS = SweepSettings(
    model="tiny-random", dataset="shapes", split="test", limit=3, methods=["fastv", "visionzip"], keeps=[16, 32]
)


def keys(rows: list[dict]) -> list[tuple]:
    return sorted((r["sample"], r["method"], json.dumps(r["keep"])) for r in rows)


def test_a_sweep_writes_one_row_per_sample_and_cell(pipeline, samples, tmp_path: Path) -> None:
    run_sweep(pipeline, samples, SETTINGS, tmp_path, progress=False)
    rows = load_rows(tmp_path)
    assert len(rows) == 3 * 5 and len(set(keys(rows))) == 15  # (none + 2 methods x 2 budgets) x 3 samples
    # The unpruned rows hold the pipeline's own answers, computed here independently.
    for sample in samples:
        [row] = [r for r in rows if r["method"] == "none" and r["sample"] == sample.id]
        assert row["prediction"] == pipeline(sample.image, sample.question, max_new_tokens=8).text
    # A pruned row's fidelity is what the unpruned and the pruned model give on its sample, computed here on its own.
    sample = samples[0]
    [row] = [r for r in rows if r["method"] == "fastv" and r["keep"] == 16 and r["sample"] == sample.id]
    inputs = pipeline.model_inputs([sample.image], [pipeline.chat_prompt(sample.question)])
    with torch.no_grad():
        plain = pipeline.model(**inputs, output_hidden_states=True)
        with vlprune.attach(pipeline.model, vlprune.pruners.create("fastv", keep=16)):
            pruned = pipeline.model(**inputs, output_hidden_states=True)
    p_log, q_log = (torch.log_softmax(out.logits[0, -1].float(), -1) for out in (plain, pruned))
    kl = float(torch.sum(p_log.exp() * (p_log - q_log)))
    cosine = float(torch.cosine_similarity(plain.hidden_states[-1][0, -1], pruned.hidden_states[-1][0, -1], dim=0))
    assert row["kl_first_token"] == pytest.approx(kl, abs=1e-5) and kl > 1e-6
    assert row["hidden_cosine"] == pytest.approx(cosine, abs=1e-5) and cosine < 1 - 1e-6
    pruned = [r for r in rows if r["method"] == "fastv" and r["keep"] == 16]
    assert all(r["visual_tokens"] == 64 and r["equivalent_visual_tokens"] < 64 and r["flops_ratio"] < 1 for r in pruned)
    assert all(r["prefill_ms"] > 0 and r["end_to_end_ms"] > 0 and r["kv_cache_bytes"] > 0 for r in rows)


def test_resume_after_kills_between_and_during_writes(pipeline, samples, tmp_path: Path) -> None:
    run_sweep(pipeline, samples, SETTINGS, tmp_path, progress=False)
    path = tmp_path / RESULTS
    complete = path.read_text().splitlines(keepends=True)
    # Killed after 6 rows, in the middle of writing the 7th.
    path.write_text("".join(complete[:6]) + complete[6][: len(complete[6]) // 2])
    run_sweep(pipeline, samples, SETTINGS, tmp_path, progress=False)
    rows = load_rows(tmp_path)
    assert keys(rows) == keys([json.loads(line) for line in complete])
    assert len(path.read_text().splitlines()) == 15  # nothing duplicated, nothing lost
    # A re-run of a finished sweep adds nothing.
    run_sweep(pipeline, samples, SETTINGS, tmp_path, progress=False)
    assert len(path.read_text().splitlines()) == 15


def test_a_folder_holding_another_sweep_is_refused(pipeline, samples, tmp_path: Path) -> None:
    run_sweep(pipeline, samples[:1], SETTINGS, tmp_path, progress=False)
    other = SweepSettings(**{**SETTINGS.__dict__, "keeps": [8]})
    with pytest.raises(VlpruneError, match="keeps"):
        run_sweep(pipeline, samples, other, tmp_path, progress=False)


def test_a_larger_limit_extends_a_sweep_and_a_smaller_one_is_refused(pipeline, samples, tmp_path: Path) -> None:
    two = SweepSettings(**{**SETTINGS.__dict__, "limit": 2})
    run_sweep(pipeline, samples[:2], two, tmp_path, progress=False)
    first = (tmp_path / RESULTS).read_text()
    run_sweep(pipeline, samples, SETTINGS, tmp_path, progress=False)
    extended = (tmp_path / RESULTS).read_text()
    assert extended.startswith(first)  # the first two samples' rows are kept, not measured again
    assert {json.loads(line)["sample"] for line in extended[len(first) :].splitlines()} == {samples[2].id}
    assert json.loads((tmp_path / "sweep.json").read_text())["limit"] == 3
    with pytest.raises(VlpruneError, match="limit"):
        run_sweep(pipeline, samples[:2], two, tmp_path, progress=False)


def test_more_methods_extend_a_sweep_and_fewer_are_refused(pipeline, samples, tmp_path: Path) -> None:
    one = SweepSettings(**{**SETTINGS.__dict__, "methods": SETTINGS.methods[:1]})
    run_sweep(pipeline, samples, one, tmp_path, progress=False)
    first = (tmp_path / RESULTS).read_text()
    run_sweep(pipeline, samples, SETTINGS, tmp_path, progress=False)
    extended = (tmp_path / RESULTS).read_text()
    assert extended.startswith(first)  # the first method's rows (and the unpruned ones) are kept, not measured again
    added = {json.loads(line)["method"] for line in extended[len(first) :].splitlines()}
    assert added == set(SETTINGS.methods[1:])
    assert json.loads((tmp_path / "sweep.json").read_text())["methods"] == SETTINGS.methods
    with pytest.raises(VlpruneError, match="methods"):
        run_sweep(pipeline, samples, one, tmp_path, progress=False)


def test_a_sharded_rerun_skips_the_cells_of_the_merged_results(pipeline, samples, tmp_path: Path) -> None:
    """Extending a sharded sweep whose per-process files are gone: the merged results.jsonl's cells are not rerun."""
    two = SweepSettings(**{**SETTINGS.__dict__, "limit": 2})
    run_sweep(pipeline, samples[:2], two, tmp_path, progress=False)  # one process: results.jsonl
    path = run_sweep(pipeline, samples, SETTINGS, tmp_path, shard=(0, 2), progress=False)  # samples 0 and 2
    assert {json.loads(line)["sample"] for line in path.read_text().splitlines()} == {samples[2].id}


def test_fidelity_against_hand_computations() -> None:
    p = torch.tensor([0.5, 0.25, 0.25])
    q = torch.tensor([0.25, 0.5, 0.25])
    reference = Reference(log_probs=p.log(), hidden=torch.tensor([1.0, 0.0]), answer="Red.")
    pruned = Reference(log_probs=q.log(), hidden=torch.tensor([1.0, 1.0]), answer="red")
    result = fidelity(reference, pruned)
    expected_kl = 0.5 * math.log(0.5 / 0.25) + 0.25 * math.log(0.25 / 0.5)
    assert result["same_answer"] is True
    assert result["kl_first_token"] == pytest.approx(expected_kl, abs=1e-6)
    assert result["hidden_cosine"] == pytest.approx(1 / math.sqrt(2), abs=1e-6)


def synthetic_rows() -> list[dict]:
    rows = []
    for sample, (base, pruned_64, pruned_128) in enumerate([(1, 0, 1), (1, 1, 1), (0, 0, 1), (1, 1, 0)]):
        for method, keep, correct, tokens, ms in [
            ("none", None, base, 576, 100.0),
            ("fastv", 64, pruned_64, 64, 40.0 + sample),
            ("fastv", 128, pruned_128, 128, 60.0),
        ]:
            rows.append(
                {
                    "sample": f"s{sample}",
                    "method": method,
                    "keep": keep,
                    "correct": bool(correct),
                    "same_answer": bool(correct) == bool(base),
                    "kl_first_token": 0.0 if method == "none" else 0.1,
                    "hidden_cosine": 1.0 if method == "none" else 0.9,
                    "visual_tokens": tokens,
                    "equivalent_visual_tokens": tokens,
                    "flops_ratio": tokens / 576,
                    "kv_cache_bytes": tokens * 10,
                    "prefill_ms": ms,
                    "end_to_end_ms": ms + 10,
                    "decode_tokens_per_s": None,
                    "peak_memory_bytes": None,
                }
            )
    return rows


def test_report_summarises_a_synthetic_results_file(tmp_path: Path) -> None:
    summaries = {(s.method, s.keep): s for s in summarise(synthetic_rows())}
    assert summaries[("none", None)].accuracy == 0.75
    assert summaries[("fastv", 64)].accuracy == 0.5 and summaries[("fastv", 64)].relative_accuracy == pytest.approx(
        2 / 3
    )
    assert summaries[("fastv", 128)].same_answer == 0.5  # s0 and s1 agree with the reference, s2 and s3 do not
    assert summaries[("fastv", 64)].prefill_ms == 41.5  # median of 40, 41, 42, 43
    table = accuracy_table(list(summaries.values()))
    assert "| fastv | 50.0% (66.7%), 64.0 tok | 75.0% (100.0%), 128.0 tok |" in table
    (tmp_path / RESULTS).write_text("".join(json.dumps(r) + "\n" for r in synthetic_rows()))
    report = write_report(tmp_path)
    text = report.read_text()
    assert "| fastv | 50.0% (66.7%), 64.0 tok | 75.0% (100.0%), 128.0 tok |" in text
    for name in ("accuracy_vs_tokens.png", "prefill_vs_tokens.png", "accuracy_vs_flops.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"


def test_shards_cover_every_sample_exactly_once(samples) -> None:
    parts = [shard_of(list(range(11)), index, 3) for index in range(3)]
    assert sorted(item for part in parts for item in part) == list(range(11)) and all(parts)
    with pytest.raises(VlpruneError, match="shard 3"):
        shard_of(list(range(4)), 3, 3)


def test_merging_shards_keeps_each_cell_once(tmp_path: Path) -> None:
    rows = synthetic_rows()
    for index in range(2):
        part = ResultsFile(tmp_path / f"results-{index}.jsonl")
        for row in rows[index::2]:
            part.append(row)
    ResultsFile(tmp_path / RESULTS).append(rows[0])  # already merged earlier
    merge_shards(tmp_path, 2)
    assert keys(ResultsFile(tmp_path / RESULTS).rows) == keys(rows)


@pytest.mark.slow
def test_two_processes_under_accelerate_launch(tmp_path: Path) -> None:
    """Two CPU processes take alternate samples and the main one merges their rows into results.jsonl. (accelerate's
    torchrun launcher is the one behind ``--multi_gpu``; the sweep initialises gloo itself when there is no GPU.)"""
    out = tmp_path / "sweep"
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "-m", "vlprune.cli", "sweep", "--model", "tiny-random",
        "--methods", "fastv", "--keep", "16", "--limit", "3", "--out", str(out),
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = ResultsFile(out / RESULTS).rows
    assert len(rows) == 6
    samples = load_dataset("shapes", split="test", limit=3)
    assert keys(rows) == sorted((s.id, m, json.dumps(k)) for s in samples for m, k in [("none", None), ("fastv", 16)])
    assert (out / "results-0.jsonl").exists() and (out / "results-1.jsonl").exists()


@pytest.mark.parametrize(
    "arguments,message",
    [
        (["--methods", "nope"], "unknown method 'nope'"),
        (["--methods", "fastv", "--keep", "16,abc"], "'abc'"),
        (["--methods", "fastv", "--keep", "-3"], "keep=-3 must be at least 1"),
        (["--methods", "fastv", "--keep", "1.0"], "keep=1.0 is ambiguous"),
        (["--methods", "fastv", "--dataset", "mnist"], "mnist"),
    ],
)
def test_bad_sweep_input_exits_2_with_one_clear_line(
    arguments: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["sweep", "--limit", "1", "--out", str(tmp_path / "s"), *arguments])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_an_unwritable_output_folder_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    code = main(["sweep", "--methods", "fastv", "--keep", "16", "--limit", "1", "--out", str(blocker / "sub")])
    assert code == 2 and f"--out {str(blocker / 'sub')!r} cannot be created" in capsys.readouterr().err


def test_parse_keeps() -> None:
    assert parse_keeps("64,128,192") == [64, 128, 192]
    assert parse_keeps("0.25, 0.5") == [0.25, 0.5]
    assert parse_keeps("llava") == pytest.approx([64 / 576, 128 / 576, 192 / 576])
    assert cells(SETTINGS)[0] == ("none", None, None) and len(cells(SETTINGS)) == 5
    both = SweepSettings(**{**SETTINGS.__dict__, "positions": parse_positions("original, reindex")})
    assert cells(both)[:3] == [("none", None, None), ("fastv", 16, "original"), ("fastv", 16, "reindex")]
    assert len(cells(both)) == 9
    for bad, shown in (("shifted", "'shifted' is not valid"), ("original,original", "at most once"), ("", "at most")):
        with pytest.raises(VlpruneError, match=shown):
            parse_positions(bad)


def test_bench_reports_both_times_and_the_selection_cost(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["bench", "--method", "fastv", "--keep", "16", "--repeats", "2", "--warmup", "1"])
    out = capsys.readouterr().out
    assert code == 0 and "| fastv | 16 |" in out and "FLOPs speed-up" in out and "LLM speed-up" in out


def test_language_model_clock_times_each_language_model_call_and_removes_its_hooks() -> None:
    from vlprune.adapters import adapter_for
    from vlprune.eval.bench import language_model_clock, prefill_seconds
    from vlprune.testing import build_tiny_llava, make_test_image

    model, processor = build_tiny_llava()
    inputs = dict(processor(images=[make_test_image(0)], text=["<image> What is it?"], return_tensors="pt"))
    language_model = adapter_for(model).language_model
    with language_model_clock(model, torch.device("cpu")) as spent, torch.inference_mode():
        model(**inputs)
        model(**inputs)
    assert len(spent) == 2 and all(s > 0 for s in spent)
    assert not language_model._forward_hooks and not language_model._forward_pre_hooks
    total, language_model_part = prefill_seconds(model, inputs, torch.device("cpu"))
    assert 0 < language_model_part < total


def test_device_map_loads_a_saved_model_for_pruning(tmp_path: Path) -> None:
    from vlprune.testing import build_tiny_llava, make_test_image

    model, processor = build_tiny_llava()
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    pipeline = vlprune.load(str(tmp_path), method="fastv", keep=16, device_map="auto")
    result = pipeline(make_test_image(0), "What is it?", max_new_tokens=2)
    assert result.stats.stages[0].visual_out == 16
    with pytest.raises(VlpruneError, match="device or device_map"):
        vlprune.load(str(tmp_path), device="cpu", device_map="auto")
    with pytest.raises(VlpruneError, match="not to 'tiny-random'"):
        vlprune.load("tiny-random", device_map="auto")


def test_atomically_written_files_get_the_usual_permissions(tmp_path: Path) -> None:
    from vlprune.eval.files import write_text_atomically

    path = write_text_atomically(tmp_path / "report.md", "# report\n")
    umask = os.umask(0)
    os.umask(umask)
    assert path.read_text() == "# report\n" and (path.stat().st_mode & 0o777) == 0o666 & ~umask
    assert [p.name for p in tmp_path.iterdir()] == ["report.md"]


def test_a_sweep_over_both_numberings_measures_each_and_reports_them_apart(pipeline, samples, tmp_path: Path) -> None:
    settings = SweepSettings(
        model="tiny-random",
        dataset="shapes",
        split="test",
        limit=2,
        methods=["fastervlm"],
        keeps=[16],
        max_new_tokens=2,
        positions=["original", "reindex"],
    )
    run_sweep(pipeline, samples[:2], settings, tmp_path, progress=False)
    rows = load_rows(tmp_path)
    pruned = [r for r in rows if r["method"] == "fastervlm"]
    assert sorted((r["sample"], r["positions_setting"], r["positions"]) for r in pruned) == sorted(
        (s.id, mode, mode) for s in samples[:2] for mode in ("original", "reindex")
    )
    # The two numberings are different computations on the same kept tokens.
    by_mode = {(r["sample"], r["positions"]): r["kl_first_token"] for r in pruned}
    assert any(by_mode[(s.id, "original")] != by_mode[(s.id, "reindex")] for s in samples[:2])
    labels = {s.method for s in summarise(rows)}
    assert {"fastervlm [original]", "fastervlm [reindex]"} <= labels
    run_sweep(pipeline, samples[:2], settings, tmp_path, progress=False)  # a rerun resumes: nothing left to do
    assert len(load_rows(tmp_path)) == len(rows)


def test_a_compiled_sweep_equals_the_eager_one_and_reuses_each_cells_graphs(
    pipeline, samples, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``compile=True`` runs cell by cell, each cell's captured session attached over all samples: the rows hold
    the eager sweep's answers, statistics and fidelity, and each cell compiles its prefill and decode step once."""
    monkeypatch.setenv("VLPRUNE_COMPILE_BACKEND", "eager")  # the captured graphs as traced, no code generation
    compiled_per_session = []
    detach = CapturedSession.detach

    def recording_detach(session: CapturedSession) -> None:
        compiled_per_session.append(session.compilations)
        detach(session)

    monkeypatch.setattr(CapturedSession, "detach", recording_detach)
    settings = SweepSettings(
        model="tiny-random", dataset="shapes", split="test", limit=3, methods=["fastv"], keeps=[16], max_new_tokens=3
    )
    compiled = SweepSettings(**{**asdict(settings), "compile": True})
    run_sweep(pipeline, samples, settings, tmp_path / "eager", progress=False)
    run_sweep(pipeline, samples, compiled, tmp_path / "compiled", progress=False)
    eager_rows = {row_key(r): r for r in load_rows(tmp_path / "eager")}
    compiled_rows = {row_key(r): r for r in load_rows(tmp_path / "compiled")}
    assert eager_rows.keys() == compiled_rows.keys() and len(compiled_rows) == 6
    for key, row in compiled_rows.items():
        expected = eager_rows[key]
        assert row["captured"] and not expected["captured"]
        for field in ("prediction", "visual_tokens", "equivalent_visual_tokens", "prefill_flops", "same_answer"):
            assert row[field] == expected[field], (key, field)
        assert row["kl_first_token"] == pytest.approx(expected["kl_first_token"], abs=1e-5)
        assert row["hidden_cosine"] == pytest.approx(expected["hidden_cosine"], abs=1e-5)
    lengths = {
        len(pipeline.model_inputs([s.image], [pipeline.chat_prompt(s.question)])["input_ids"][0]) for s in samples
    }
    buckets = {next(b for b in DEFAULT_BUCKETS if n <= b) for n in lengths}
    assert compiled_per_session == [2 * len(buckets)] * 2  # the unpruned cell and fastv-16, over all three samples
    # A folder written before the setting existed continues as an eager sweep, and is no compiled sweep.
    saved = json.loads((tmp_path / "eager" / "sweep.json").read_text())
    del saved["compile"]
    (tmp_path / "eager" / "sweep.json").write_text(json.dumps(saved))
    run_sweep(pipeline, samples, settings, tmp_path / "eager", progress=False)
    assert len(load_rows(tmp_path / "eager")) == 6
    with pytest.raises(VlpruneError, match="compile"):
        run_sweep(pipeline, samples, compiled, tmp_path / "eager", progress=False)
