"""Tables and plots of a sweep folder: ``vlprune report DIR`` writes ``DIR/report.md`` and three PNG plots.

A report only reads the sweep's results files: a last line cut short by a kill is left out and named in the report
(the sweep's rerun repairs it), never cut from the file.
"""

from __future__ import annotations

import io
import json
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlprune.errors import VlpruneError
from vlprune.eval.files import check_writable_folder, write_bytes_atomically, write_text_atomically
from vlprune.eval.sweep import SETTINGS, mean, median, read_rows


@dataclass
class CellSummary:
    """The aggregate of one (method, keep) cell over its samples."""

    method: str
    keep: int | float | None
    samples: int
    accuracy: float
    relative_accuracy: float | None  # share of the unpruned accuracy on the same samples
    same_answer: float
    kl_first_token: float | None
    hidden_cosine: float | None
    visual_tokens: float | None
    equivalent_visual_tokens: float | None
    flops_ratio: float | None
    prefill_ms: float | None
    end_to_end_ms: float | None
    decode_tokens_per_s: float | None
    peak_memory_bytes: float | None
    kv_cache_bytes: float | None


def summarise(rows: list[dict[str, Any]]) -> list[CellSummary]:
    """One summary per (method, keep), the unpruned reference first, then methods and budgets in sweep order.

    Raises:
        VlpruneError: no rows, or no unpruned reference rows to compare with.
    """
    if not rows:
        raise VlpruneError("the sweep has no results yet")
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        groups[(method_label(row), json.dumps(row["keep"]))].append(row)
    reference = {r["sample"]: r for r in groups.get(("none", "null"), [])}
    if not reference:
        raise VlpruneError("the sweep has no unpruned reference rows (method none)")
    summaries = []
    for (method, keep_text), members in groups.items():
        accuracy = sum(r["correct"] for r in members) / len(members)
        base = [reference[r["sample"]]["correct"] for r in members if r["sample"] in reference]
        base_accuracy = sum(base) / len(base) if base else None
        summaries.append(
            CellSummary(
                method=method,
                keep=json.loads(keep_text),
                samples=len(members),
                accuracy=accuracy,
                relative_accuracy=accuracy / base_accuracy if base_accuracy else None,
                same_answer=sum(r["same_answer"] for r in members) / len(members),
                kl_first_token=mean(r["kl_first_token"] for r in members),
                hidden_cosine=mean(r["hidden_cosine"] for r in members),
                visual_tokens=mean(r["visual_tokens"] for r in members),
                equivalent_visual_tokens=mean(r["equivalent_visual_tokens"] for r in members),
                flops_ratio=mean(r["flops_ratio"] for r in members),
                prefill_ms=median(r["prefill_ms"] for r in members),
                end_to_end_ms=median(r["end_to_end_ms"] for r in members),
                decode_tokens_per_s=median(r["decode_tokens_per_s"] for r in members),
                peak_memory_bytes=mean(r["peak_memory_bytes"] for r in members),
                kv_cache_bytes=mean(r["kv_cache_bytes"] for r in members),
            )
        )
    return sorted(summaries, key=lambda s: (s.method != "none", s.method, _keep_order(s.keep)))


def method_label(row: dict[str, Any]) -> str:
    """A row's method as the report names it: with the RoPE numbering in brackets when the sweep ran it in a mode
    asked for (``--positions original,reindex``), plain when the method's own numbering ran."""
    setting = row.get("positions_setting")
    return row["method"] if not setting else f"{row['method']} [{setting}]"


def _keep_order(keep: int | float | None) -> float:
    return -1.0 if keep is None else float(keep)


def _keep_label(keep: int | float | None) -> str:
    if keep is None:
        return "all"
    return f"{keep:.1%}" if isinstance(keep, float) and keep < 1 else str(keep)


def _number(value: float | None, digits: int = 1, scale: float = 1.0) -> str:
    return "—" if value is None else f"{value * scale:.{digits}f}"


def accuracy_table(summaries: list[CellSummary]) -> str:
    """Methods x budgets: accuracy (% of the unpruned accuracy) and the visual tokens the layers processed on
    average (what a budget costs: multi-stage methods process more than their label in early layers)."""
    reference = next(s for s in summaries if s.method == "none")
    keeps = sorted({s.keep for s in summaries if s.method != "none"}, key=_keep_order)
    methods = sorted({s.method for s in summaries if s.method != "none"})
    cell = {(s.method, json.dumps(s.keep)): s for s in summaries}
    lines = [
        "| method | " + " | ".join(_keep_label(k) for k in keeps) + " |",
        "|---|" + "---|" * len(keeps),
        f"| none (all tokens) | {reference.accuracy:.1%} (100%) " + "| " * (len(keeps) - 1) + "|",
    ]
    for method in methods:
        entries = []
        for keep in keeps:
            found = cell.get((method, json.dumps(keep)))
            if found is None:
                entries.append("—")
            else:
                entries.append(
                    f"{found.accuracy:.1%} ({_number(found.relative_accuracy, 1, 100)}%), "
                    f"{_number(found.equivalent_visual_tokens)} tok"
                )
        lines.append(f"| {method} | " + " | ".join(entries) + " |")
    return "\n".join(lines)


def detail_table(summaries: list[CellSummary]) -> str:
    """Every measured quantity per cell."""
    header = (
        "| method | keep | samples | accuracy | % of unpruned | same answer | KL first token | hidden cosine | "
        "visual tokens in | equivalent tokens | FLOPs ratio | prefill ms | end-to-end ms | decode tok/s | "
        "peak memory MB | KV cache MB |"
    )
    lines = [header, "|" + "---|" * 16]
    for s in summaries:
        lines.append(
            f"| {s.method} | {_keep_label(s.keep)} | {s.samples} | {s.accuracy:.1%} | "
            f"{_number(s.relative_accuracy, 1, 100)} | {s.same_answer:.1%} | {_number(s.kl_first_token, 4)} | "
            f"{_number(s.hidden_cosine, 4)} | {_number(s.visual_tokens)} | {_number(s.equivalent_visual_tokens)} | "
            f"{_number(s.flops_ratio, 3)} | {_number(s.prefill_ms)} | {_number(s.end_to_end_ms)} | "
            f"{_number(s.decode_tokens_per_s)} | {_number(s.peak_memory_bytes, 1, 1e-6)} | "
            f"{_number(s.kv_cache_bytes, 2, 1e-6)} |"
        )
    return "\n".join(lines)


PLOTS = ("accuracy_vs_tokens.png", "prefill_vs_tokens.png", "accuracy_vs_flops.png")


def plot(summaries: list[CellSummary], folder: Path) -> list[Path]:
    """The three plots as PNG files in ``folder``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    reference = next(s for s in summaries if s.method == "none")
    methods = sorted({s.method for s in summaries if s.method != "none"})
    specs = [
        (PLOTS[0], "equivalent_visual_tokens", "accuracy", "visual tokens per layer (equivalent)", "accuracy"),
        (PLOTS[1], "equivalent_visual_tokens", "prefill_ms", "visual tokens per layer (equivalent)", "prefill ms"),
        (PLOTS[2], "flops_ratio", "accuracy", "LLM prefill FLOPs / unpruned", "accuracy"),
    ]
    written = []
    for name, x_field, y_field, x_label, y_label in specs:
        figure, axes = plt.subplots(figsize=(6.4, 4.4))
        colors = plt.get_cmap("tab20").colors
        markers = "osD^vP*Xh<>p"
        for index, method in enumerate(methods):
            points = sorted(
                (getattr(s, x_field), getattr(s, y_field))
                for s in summaries
                if s.method == method and getattr(s, x_field) is not None and getattr(s, y_field) is not None
            )
            if points:
                style = {"color": colors[index % len(colors)], "marker": markers[index % len(markers)]}
                axes.plot([p[0] for p in points], [p[1] for p in points], label=method, **style)
        reference_y = getattr(reference, y_field)
        if reference_y is not None:
            axes.axhline(reference_y, color="black", linestyle="--", linewidth=1, label="unpruned")
        axes.set_xlabel(x_label)
        axes.set_ylabel(y_label)
        axes.grid(alpha=0.3)
        axes.legend(fontsize=7, ncol=2)
        figure.tight_layout()
        image = io.BytesIO()
        figure.savefig(image, format="png", dpi=120)
        plt.close(figure)
        # Written whole and in place of whatever is there: a link to a file elsewhere is replaced, not written through.
        written.append(write_bytes_atomically(folder / name, image.getvalue()))
    return written


def write_report(folder: str | os.PathLike) -> Path:
    """Write ``report.md`` and the plots for the sweep in ``folder``; returns the report's path. The results files
    are only read: a last line cut short is left out and named at the top of the report.

    Raises:
        VlpruneError: the folder holds no rows, or cannot take the report's files.
    """
    folder = Path(folder)
    read = read_rows(folder)
    summaries = summarise(read.rows)
    check_writable_folder(folder, "the sweep folder", why="the report writes report.md and its plots there")
    settings = _saved_settings(folder)
    plots = plot(summaries, folder)
    title = f"# Sweep: {settings.get('model', '?')} on {settings.get('dataset', '?')} {settings.get('split', '')}"
    body = [
        title.rstrip(),
        "",
        *[f"Skipped: {sentence}.\n" for sentence in read.skipped],
        "Exact-match accuracy, its share of the unpruned model's accuracy on the same samples, and the visual tokens "
        "the decoder layers processed on average (layer-averaged, recycled tokens included):",
        "",
        accuracy_table(summaries),
        "",
        "Every measurement (means; times are medians over samples):",
        "",
        detail_table(summaries),
        "",
        *[f"![{p.stem}]({p.name})" for p in plots],
        "",
    ]
    return write_text_atomically(folder / "report.md", "\n".join(body))


def _saved_settings(folder: Path) -> dict[str, Any]:
    """The sweep's saved settings, for the report's title; an unreadable ``sweep.json`` only loses the title's names."""
    try:
        settings = json.loads((folder / SETTINGS).read_text())
    except (OSError, ValueError):
        return {}
    return settings if isinstance(settings, dict) else {}
