"""The pruner registry (create / register / available), user-registered pruners, and ``resolve_keep``."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import torch
from conftest import tiny_inputs, tiny_model

import vlprune
from vlprune import VlpruneError
from vlprune.pruners import (
    Pruner,
    Selection,
    Stage,
    StageContext,
    StagePlan,
    create,
    register,
    resolve_keep,
)
from vlprune.pruners.fastervlm import FasterVLM
from vlprune.pruners.fastv import FastV
from vlprune.pruners.none import KeepAll
from vlprune.pruners.random import RandomPruner
from vlprune.testing import make_test_image

BUILT_IN = {"none": KeepAll, "random": RandomPruner, "fastv": FastV, "fastervlm": FasterVLM}


@pytest.fixture
def isolated_registry(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, type[Pruner]]]:
    """A copy of the registry for the test; the real one is restored afterwards, whatever the test registered."""
    registry = dict(vlprune.pruners._REGISTRY)
    monkeypatch.setattr(vlprune.pruners, "_REGISTRY", registry)
    yield registry


# ---------------------------------------------------------------------------------------------- listing / create


def test_available_pruners_lists_the_built_ins_sorted() -> None:
    names = vlprune.available_pruners()
    assert set(BUILT_IN) <= set(names)
    assert names == sorted(names)
    assert names == sorted([*vlprune.pruners.available(), "var"]) == vlprune.pruners.available_methods()
    for name, cls in BUILT_IN.items():
        assert vlprune.pruners.get(name) is cls
        assert cls.name == name


def test_built_in_stages() -> None:
    assert KeepAll.stage is Stage.NONE
    assert RandomPruner.stage is Stage.PRE_LLM
    assert FastV.stage is Stage.IN_LLM
    assert FasterVLM.stage is Stage.PRE_LLM
    for cls in BUILT_IN.values():
        assert cls.reference


def test_create_builds_each_built_in_with_its_options() -> None:
    none = create("none")
    assert type(none) is KeepAll and none.keep is None

    rand = create("random", keep=0.5, layer=1, seed=7)
    assert type(rand) is RandomPruner
    assert (rand.keep, rand.layer, rand.seed) == (0.5, 1, 7)

    fastv = create("fastv", keep=16, layer=3)
    assert type(fastv) is FastV
    assert (fastv.keep, fastv.layer) == (16, 3)

    fastervlm = create("fastervlm", keep=8)
    assert type(fastervlm) is FasterVLM and fastervlm.keep == 8

    # Each instance is new: options never leak between pruners.
    assert create("fastv", keep=4).layer == 2


def test_create_ignores_options_set_to_none() -> None:
    pruner = create("fastv", keep=8, layer=None)
    assert pruner.layer == 2  # the default, as if layer were not passed
    assert create("random", keep=8, seed=None).seed == 0


def test_created_pruners_plan_their_documented_stages() -> None:
    assert create("none").plan(64, 4) == []
    assert create("random", keep=0.25).plan(64, 4) == [StagePlan(layer=0, keep=16)]
    assert create("random", keep=10, layer=-1).plan(64, 4) == [StagePlan(layer=3, keep=10)]
    [fastv] = create("fastv", keep=16).plan(64, 4)
    assert (fastv.layer, fastv.keep, fastv.query_rows, fastv.vision_cls_attention) == (2, 16, "last", False)
    [faster] = create("fastervlm", keep=0.5).plan(64, 4)
    assert (faster.layer, faster.keep, faster.query_rows, faster.vision_cls_attention) == (0, 32, None, True)


def test_unknown_method_names_it_lists_available_and_suggests() -> None:
    with pytest.raises(VlpruneError) as info:
        create("fastvv", keep=8)
    message = str(info.value)
    assert "'fastvv'" in message
    assert "did you mean 'fastv'?" in message
    for name in vlprune.available_pruners():
        assert name in message


def test_unknown_method_without_a_close_match_has_no_suggestion() -> None:
    with pytest.raises(VlpruneError) as info:
        create("zzzzzz")
    message = str(info.value)
    assert "'zzzzzz'" in message
    assert "did you mean" not in message
    assert ", ".join(vlprune.available_pruners()) in message


def test_unknown_option_names_it_and_the_valid_ones() -> None:
    with pytest.raises(VlpruneError) as info:
        create("fastv", keep=8, seed=3)
    message = str(info.value)
    assert "seed" in message and "'fastv'" in message
    assert "keep, layer" in message


def test_unknown_option_set_to_none_is_ignored() -> None:
    # None means "not given" (CLI pass-through), so even a name the method lacks is accepted.
    assert type(create("fastervlm", keep=8, layer=None)) is FasterVLM


def test_method_without_budget_fails_when_planned() -> None:
    with pytest.raises(VlpruneError, match="needs a budget"):
        create("fastv").plan(64, 4)


# ---------------------------------------------------------------------------------------------- register


def test_register_rejects_nameless_and_non_pruner_classes(isolated_registry: dict[str, type[Pruner]]) -> None:
    before = dict(isolated_registry)

    @dataclass
    class Nameless(Pruner):
        pass

    with pytest.raises(TypeError, match="Nameless"):
        register(Nameless)

    class NamelessPlain(Pruner):
        pass

    with pytest.raises(TypeError, match="NamelessPlain"):
        register(NamelessPlain)

    @dataclass
    class NotAPruner:
        name = "not-a-pruner"

    with pytest.raises(TypeError, match="Pruner subclass"):
        register(NotAPruner)  # type: ignore[arg-type]

    with pytest.raises(TypeError, match="Pruner subclass"):
        register(create("fastv"))  # type: ignore[arg-type]  # an instance, not a class

    assert isolated_registry == before


def test_register_rejects_a_subclass_without_dataclass(isolated_registry: dict[str, type[Pruner]]) -> None:
    class NotADataclass(Pruner):
        name = "not-a-dataclass"
        stride: int = 2

    with pytest.raises(TypeError, match="NotADataclass"):
        register(NotADataclass)
    assert "not-a-dataclass" not in isolated_registry


def test_reregistering_a_name_replaces_it(isolated_registry: dict[str, type[Pruner]]) -> None:
    @register
    @dataclass
    class First(Pruner):
        name = "dup-test"

    @register
    @dataclass
    class Second(Pruner):
        name = "dup-test"

    assert vlprune.pruners.get("dup-test") is Second
    assert vlprune.available_pruners().count("dup-test") == 1


@dataclass
class EveryOtherFromTheEnd(Pruner):
    """Keeps ``keep`` visual tokens: the last one, then every ``stride``-th going backwards (returned unsorted)."""

    name = "every-other-test"
    stage = Stage.PRE_LLM
    reference = "test pruner"

    stride: int = 2

    def plan(self, num_visual: int, num_layers: int) -> list[StagePlan]:
        return [StagePlan(layer=0, keep=self._required_keep(num_visual))]

    def select(self, ctx: StageContext) -> Selection:
        self.seen = ctx
        chosen = torch.arange(ctx.num_visual - 1, -1, -self.stride)[: ctx.keep]  # descending order on purpose
        return Selection(keep_index=chosen.expand(ctx.batch_size, -1))


def expected_every_other(num_visual: int, keep: int, stride: int) -> list[int]:
    return sorted(range(num_visual - 1, -1, -stride))[-keep:]


def test_user_pruner_is_listed_creatable_and_runs(isolated_registry: dict[str, type[Pruner]]) -> None:
    registered = register(EveryOtherFromTheEnd)
    assert registered is EveryOtherFromTheEnd
    assert "every-other-test" in vlprune.available_pruners()

    pruner = create("every-other-test", keep=8, stride=3)
    assert type(pruner) is EveryOtherFromTheEnd and pruner.stride == 3
    with pytest.raises(VlpruneError, match="no option step"):
        create("every-other-test", keep=8, step=3)

    model, processor = tiny_model()
    inputs = tiny_inputs(processor, 2)
    with vlprune.attach(model, pruner) as session:
        output = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert output.shape[1] == inputs["input_ids"].shape[1] + 3

    stats = session.stats
    assert stats is not None and stats.visual_tokens == 64
    [stage] = stats.stages
    expected = expected_every_other(64, 8, 3)
    assert expected == [i for i in range(64) if (63 - i) % 3 == 0][-8:]
    assert stage.layer == 0 and stage.visual_in == 64 and stage.visual_out == 8
    assert stage.kept_indices == [expected, expected]
    assert stats.visual_tokens_per_layer == [8, 8, 8, 8]
    length = inputs["input_ids"].shape[1]
    assert stats.kv_cache_lengths == [length - 56] * 4

    # What the engine handed to select.
    ctx = pruner.seen
    assert ctx.layer == 0 and ctx.keep == 8 and ctx.stage_index == 0 and ctx.num_layers == 4
    assert ctx.visual_hidden.shape == (2, 64, 64)
    assert ctx.visual_origin.tolist() == [list(range(64))] * 2
    assert ctx.query_attention is None and ctx.vision_cls_attention is None


def test_user_pruner_runs_through_the_pipeline(isolated_registry: dict[str, type[Pruner]]) -> None:
    register(EveryOtherFromTheEnd)
    model, processor = tiny_model()
    pipeline = vlprune.load((model, processor), method="every-other-test", keep=0.25)
    assert type(pipeline.pruner) is EveryOtherFromTheEnd and pipeline.pruner.stride == 2
    result = pipeline(make_test_image(0), "What is this?", max_new_tokens=2)
    assert result.stats is not None
    assert result.stats.stages[0].kept_indices == [expected_every_other(64, 16, 2)]


# ---------------------------------------------------------------------------------------------- resolve_keep


@pytest.mark.parametrize(("keep", "expected"), [(1, 1), (16, 16), (64, 64)])
def test_resolve_keep_int_is_a_count(keep: int, expected: int) -> None:
    assert resolve_keep(keep, 64) == expected


@pytest.mark.parametrize(
    ("keep", "expected"),
    [(0.25, 16), (0.5, 32), (0.1, 6), (0.99, 63), (0.001, 1), (1e-9, 1), (0.3, 3)],
)
def test_resolve_keep_float_in_unit_interval_is_a_fraction(keep: float, expected: int) -> None:
    num_visual = 10 if keep == 0.3 else 64
    assert resolve_keep(keep, num_visual) == expected


@pytest.mark.parametrize(("keep", "count"), [(1.0, 1), (2.0, 2), (64.0, 64)])
def test_a_whole_float_budget_is_refused_naming_both_readings(keep: float, count: int) -> None:
    # A float is a fraction, and 1.0 could mean "everything" or "one token": neither reading is guessed.
    for check in (lambda: resolve_keep(keep, 64), lambda: vlprune.pruners.create("random", keep=keep)):
        with pytest.raises(VlpruneError, match=rf"keep={keep} is ambiguous.*write keep={count} for {count} visual"):
            check()


@pytest.mark.parametrize(
    ("keep", "shown"),
    [
        (0, "keep=0"),
        (-1, "keep=-1"),
        (65, "keep=65"),
        (0.0, "keep=0.0"),
        (65.0, "keep=65.0"),
        (1.5, "keep=1.5"),
        (-0.5, "keep=-0.5"),
        (float("nan"), "keep=nan"),
        ("x", "keep='x'"),
        ("16", "keep='16'"),
        (True, "keep=True"),
        (None, "keep=None"),
    ],
)
def test_resolve_keep_rejects_bad_values(keep: object, shown: str) -> None:
    with pytest.raises(VlpruneError) as info:
        resolve_keep(keep, 64)  # type: ignore[arg-type]
    assert shown in str(info.value)


def test_resolve_keep_out_of_range_names_the_limit() -> None:
    with pytest.raises(VlpruneError, match=r"outside \[1, 64\]"):
        resolve_keep(65, 64)
    with pytest.raises(VlpruneError, match=r"outside \(0, 1\)"):
        resolve_keep(1.5, 64)


@pytest.mark.parametrize("method", ["random", "fastv", "fastervlm"])
def test_bad_budget_reaches_the_user_through_plan(method: str) -> None:
    with pytest.raises(VlpruneError, match="keep=65"):
        create(method, keep=65).plan(64, 4)


def test_none_accepts_only_no_budget_or_all_tokens() -> None:
    assert create("none", keep=64).plan(64, 4) == []
    assert create("none").plan(64, 4) == []
    for keep in (8, 1.0, 0.5):  # 1.0 is a count of one token everywhere else, so it is not "all" here either
        with pytest.raises(VlpruneError, match=f"keep={keep}"):
            create("none", keep=keep).plan(64, 4)


@pytest.mark.parametrize("keep", [1, True])
def test_none_rejects_a_budget_of_one_token(keep: object) -> None:
    with pytest.raises(VlpruneError):
        create("none", keep=keep).plan(64, 4)


def test_the_readme_method_table_names_the_stages_the_code_runs() -> None:
    # `vlprune methods` derives each stage column from the method's own default plan; the full method table in
    # docs/methods.md must agree with it (the README's short table is checked by tests/test_docs.py).
    import re
    from pathlib import Path

    methods = (Path(__file__).parents[1] / "docs" / "methods.md").read_text()
    rows = dict(re.findall(r"^\| `([\w-]+)` \| ([^|]+) \|", methods, flags=re.MULTILINE))
    for name in vlprune.pruners.available():
        assert name in rows, f"{name} is missing from the method table of docs/methods.md"
        stages = vlprune.pruners.stages_of(name)
        assert rows[name].startswith(stages), f"docs say {rows[name]!r} for {name}, the code runs {stages!r}"
    assert vlprune.pruners.stages_of("vflowopt") == "pre-LLM+in-LLM"
    assert vlprune.pruners.stages_of("var") == "attention-modifier"  # a modifier, not a registered pruner


def test_the_readme_family_table_matches_vlprune_methods() -> None:
    # The full family table lives in docs/families.md (the README's short one is checked by tests/test_docs.py).
    import re
    from pathlib import Path

    families = (Path(__file__).parents[1] / "docs" / "families.md").read_text()
    rows = re.findall(r"^\| `((?:llava|qwen)[\w.-]*)` \| `\w+` \| [^|]+ \| ([^|]+) \|", families, flags=re.MULTILINE)
    assert [family for family, _ in rows] == list(vlprune.pruners.FAMILY_NAMES)
    said_by: dict[str, set[str]] = {}
    for family, listed in rows:
        runs = {n for n in [*vlprune.pruners.available(), "var"] if family in vlprune.pruners.families_of(n)} - {"none"}
        if listed.strip() == "every method":
            said = runs
        elif listed.strip().startswith("as "):  # "as Qwen2-VL": the row above's family
            said = said_by[rows[[f for f, _ in rows].index(family) - 1][0]]
        else:
            said = set(re.findall(r"`([\w-]+)`", listed))
        said_by[family] = said
        assert said == runs, family
