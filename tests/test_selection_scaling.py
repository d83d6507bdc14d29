"""benchmarks/selection_scaling.py at tiny sizes: its synthetic contexts carry what each method's plan needs, every
measured method selects from them, and the methods it cannot time are reported with their reason."""

from __future__ import annotations

import json
import sys
from dataclasses import fields
from pathlib import Path

import pytest
import torch

from vlprune.pruners import StageContext, available_methods, available_modifiers
from vlprune.pruners.contexts import provider_of

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def scaling():
    sys.path.insert(0, str(BENCHMARKS))  # the benchmark scripts are not a package
    try:
        import selection_scaling

        yield selection_scaling
    finally:
        sys.path.remove(str(BENCHMARKS))


def tiny_shapes(scaling):
    return scaling.Shapes(
        hidden=32, heads=4, head_dim=8, features=16, vision_key_dim=8, text=5, vocab=512, patches=6, image_size=42,
        batch=2,
    )  # fmt: skip


def missing_fields(ctx: StageContext, stage) -> list[str]:
    """The context fields the stage's plan asks for (by its needs and query rows) that the context lacks."""
    wanted = set(stage.needs) | ({"query_rows"} if stage.query_rows is not None else set())
    return [
        spec.name
        for spec in fields(StageContext)
        if provider_of(spec.name) in wanted and getattr(ctx, spec.name) is None
    ]


@pytest.mark.parametrize("patch_tokens", [36, 180])
def test_every_measured_method_selects_from_its_synthetic_contexts(scaling, patch_tokens: int) -> None:
    shapes = tiny_shapes(scaling)
    layout = scaling.layout_for(patch_tokens, shapes)
    sources = scaling.Sources(layout, shapes, torch.device("cpu"), torch.float32)
    methods = [method for method in available_methods() if method not in available_modifiers()]
    measured = []
    for method in methods:
        pruner = scaling.build_pruner(method, layout, 64 / 576)
        if scaling.not_measured_reason(pruner, layout) is not None:
            continue
        plan = pruner.plan_for_family(layout.family, layout.tokens, scaling.LLAVA_LAYERS)
        contexts = scaling.stage_contexts(pruner, sources)
        assert [ctx.layer for ctx in contexts] == [stage.layer for stage in plan]
        for stage, ctx in zip(plan, contexts, strict=True):
            assert missing_fields(ctx, stage) == [], (method, stage)
            with torch.inference_mode():
                index = pruner.select(ctx).keep_index
            assert index.shape == (shapes.batch, ctx.keep), method
            assert int(index.min()) >= 0 and int(index.max()) < ctx.num_visual, method
        measured.append(method)
    assert {"divprune", "scope", "cdpruner", "vispruner", "fastv", "sparsevlm"} <= set(measured)


def test_the_anyres_layout_is_llava_next_with_its_line_breaks(scaling) -> None:
    shapes = tiny_shapes(scaling)
    with_breaks = scaling.layout_for(180, shapes)
    without = scaling.layout_for(180, shapes, newlines=False)
    assert with_breaks.family == without.family == "llava-next"
    assert (with_breaks.tokens, without.tokens) == (180 + 12, 180)  # one break per row of the stitched 12 x 12 grid
    assert scaling.layout_for(36, shapes).family == "llava"
    with pytest.raises(ValueError, match=r"100 visual tokens.*valid: 36, 108, 144, 180"):
        scaling.layout_for(100, shapes)


def test_tower_pruning_and_refused_methods_are_reported_not_measured(scaling) -> None:
    shapes = tiny_shapes(scaling)
    single, tiled = scaling.layout_for(36, shapes), scaling.layout_for(180, shapes)
    flowcut = scaling.build_pruner("flowcut", single, 64 / 576)
    assert "inside the vision tower" in scaling.not_measured_reason(flowcut, single)
    assert scaling.not_measured_reason(scaling.build_pruner("none", single, 0.1), single) == (
        "no stages: it selects nothing"
    )
    vflowopt = scaling.build_pruner("vflowopt", tiled, 64 / 576)  # the anyres path reads per-crop maps
    assert scaling.not_measured_reason(vflowopt, tiled) is None


def test_main_prints_the_table_and_writes_the_rows(scaling, capsys, tmp_path: Path) -> None:
    out_file = tmp_path / "scaling.json"
    argv = ["--methods", "divprune,fastv,flowcut", "--tokens", "36,180", "--repeats", "1", "--warmup", "0"]
    scaling.main([*argv, "--json", str(out_file)], shapes=tiny_shapes(scaling))
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "---" not in line]
    assert rows[0] == "| method | stage layer(s) | ms at 36 | ms at 180 | ratio |"
    assert [row.split(" | ")[:2] for row in rows[1:]] == [["| divprune", "0"], ["| fastv", "2"]]
    assert "- flowcut at 36: selects inside the vision tower" in out
    report = json.loads(out_file.read_text())
    assert {"date", "torch", "threads", "cpu"} <= set(report)
    assert [(row["method"], row["patch_tokens"]) for row in report["rows"]] == [
        ("divprune", 36), ("divprune", 180), ("fastv", 36), ("fastv", 180),
    ]  # fmt: skip
    assert report["rows"][1]["tokens"] == [192]
