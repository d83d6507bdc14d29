"""Each method's selection time alone (its ``Pruner.select`` calls, not the model) at 576 and 2,880 visual tokens, on
synthetic stage contexts with LLaVA-1.5-7B's sizes, so that greedy selections (SCOPE's coverage, CDPruner's DPP,
VisPruner's de-duplication, DivPrune's max-min, TOPS and MMTok) are measured where their cost grows (issue 27).

    python benchmarks/selection_scaling.py                                      # CPU, 576 and 2,880 tokens
    python benchmarks/selection_scaling.py --methods divprune,scope --repeats 3 --warmup 1
    python benchmarks/selection_scaling.py --modules my_pruners --json scaling.json  # your own methods too
    python benchmarks/selection_scaling.py --device cuda --dtype bfloat16

The contexts carry what each stage's plan asks for (``pruner.plan_for_family(family, N, 32)``), with random values of
the real shapes: the language model's width D = 4096, 32 layers, 32 heads of 128; CLIP-L's features F = 1024 through a
LLaVA projector (Linear 1024 -> 4096, GELU, Linear 4096 -> 4096, random weights); the tower's head-mean keys d = 64
(CLIP-L: 16 heads of 64); R = 32 text rows after the image, 35 prompt tokens before it; attention rows and maps are
softmaxes of random logits over everything they are normalised over.

Geometry: 576 tokens are LLaVA-1.5's single 24 x 24 view (family "llava"); 2,880 patch tokens are LLaVA-NeXT's base
view and 2 x 2 tiles of a square 672 x 672 image (family "llava-next"), with the 48 ``image_newline`` line breaks
LLaVA-NeXT puts at the end of each row of the stitched grid, so that the stage sees 2,928 tokens (``--no-newlines``
drops them). Other counts: 576 x (1 + tiles) for the 1 x 2, 1 x 3 and 2 x 2 tile grids. The budget is 11.1% of the
patch tokens (64 of 576, 320 of 2,880; ``--keep``).

Multi-stage methods are timed stage by stage and reported summed, with their layers listed: a later stage sees the
tokens the earlier stage kept (its selection on its own context, outside the timing; merged tokens it adds are not
carried over). Methods that select inside the vision tower, that need an input this script cannot make, or that the
family refuses are listed as not measured, with the reason.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import math
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlprune.geometry import NEWLINE, ImageTokens, VisualGeometry, batch_geometry, single_view, tiled_view
from vlprune.needs import Need
from vlprune.pruners import (
    Pruner,
    StageContext,
    StagePlan,
    available_methods,
    available_modifiers,
    create,
    get,
    unsupported_reason,
)
from vlprune.pruners.plans import QueryRows

LLAVA_LAYERS = 32
TILE_GRIDS = {2: (1, 2), 3: (1, 3), 4: (2, 2)}
"""Tiles of LLaVA-NeXT's ``image_grid_pinpoints`` grids (336 x 672, 336 x 1008, 672 x 672) by count."""

QUESTION = (
    "Describe this image in detail: what objects are on the table, what colour is the car parked by the house, "
    "and where is the person with the red umbrella standing?"
)


@dataclass(frozen=True)
class Shapes:
    """The model's sizes (LLaVA-1.5-7B with CLIP-L/14 at 336 px by default); small ones make a fast test."""

    hidden: int = 4096  # D, the language model's width
    heads: int = 32
    head_dim: int = 128
    features: int = 1024  # F, the tower's width: the projector's input
    vision_key_dim: int = 64  # d, the tower's head dimension (keys are averaged over its heads)
    text: int = 32  # R, text tokens after the image
    prefix: int = 35  # prompt tokens before the image
    vocab: int = 32000
    patches: int = 24  # per side of one view
    image_size: int = 336
    batch: int = 1


@dataclass(frozen=True)
class Layout:
    """The visual tokens of one measurement: the family whose plan and refusals apply, the image's tokens, and the
    patch tokens the budget is a share of."""

    family: str
    image: ImageTokens
    patch_tokens: int

    @property
    def tokens(self) -> int:
        return len(self.image)


def layout_for(patch_tokens: int, shapes: Shapes, newlines: bool = True) -> Layout:
    """LLaVA-1.5's single view for one view's patches, LLaVA-NeXT's base view and tiles for 1 + 2..4 views' worth.

    Raises:
        ValueError: a count that is neither (the message lists the valid ones).
    """
    view = shapes.patches * shapes.patches
    if patch_tokens == view:
        return Layout("llava", single_view(shapes.patches, shapes.patches), patch_tokens)
    grid = TILE_GRIDS.get(patch_tokens // view - 1) if patch_tokens % view == 0 else None
    if grid is None:
        valid = ", ".join(str(view * (1 + tiles)) for tiles in (0, *TILE_GRIDS))
        raise ValueError(f"{patch_tokens} visual tokens match no LLaVA layout of {view}-patch views; valid: {valid}")
    rows, cols = grid
    image = tiled_view(shapes.patches, grid, torch.arange(rows * shapes.patches), torch.arange(cols * shapes.patches))
    if not newlines:
        kept = image.view != NEWLINE
        image = ImageTokens(**{name: getattr(image, name)[kept] for name in _IMAGE_FIELDS}, num_crops=image.num_crops)
    return Layout("llava-next", image, patch_tokens)


_IMAGE_FIELDS = ("view", "tile_row", "tile_col", "row", "col", "full_row", "full_col", "crop", "crop_token", "frame")


def llava_projector(shapes: Shapes) -> nn.Module:
    """LLaVA-1.5's mlp2x_gelu projector with random weights."""
    return nn.Sequential(nn.Linear(shapes.features, shapes.hidden), nn.GELU(), nn.Linear(shapes.hidden, shapes.hidden))


def llama_rotary(head_dim: int, base: float = 10000.0) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """Llama's rotary embedding: (B, K) positions -> (cos, sin), each (B, K, head_dim)."""

    def at(positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inverse = 1.0 / base ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim)
        angles = positions.float()[..., None] * inverse
        angles = torch.cat([angles, angles], dim=-1)
        return angles.cos(), angles.sin()

    return at


@dataclass
class Sources:
    """The random inputs of one layout, made once and shared by every method (each when first asked for): the
    vision side per crop, placed on the tokens as the engine places it, and the language model's modules."""

    layout: Layout
    shapes: Shapes
    device: torch.device
    dtype: torch.dtype
    seed: int = 0
    _generator: torch.Generator = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._generator = torch.Generator().manual_seed(self.seed)

    def randn(self, *size: int) -> torch.Tensor:
        return torch.randn(*size, generator=self._generator).to(self.device, self.dtype)

    def softmax(self, *size: int) -> torch.Tensor:
        """Softmax of random normal logits over the last dimension, in float32 as attention is, then cast."""
        return torch.randn(*size, generator=self._generator).softmax(dim=-1).to(self.device, self.dtype)

    @cached_property
    def geometry(self) -> VisualGeometry:
        return batch_geometry([self.layout.image] * self.shapes.batch, [self.layout.tokens] * self.shapes.batch, "cpu")

    @property
    def crops(self) -> int:
        return self.geometry.num_crops

    @property
    def view_patches(self) -> int:
        return self.shapes.patches**2

    def on_tokens(self, per_crop: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """(B, N0, ...) per-crop values (crops, P, ...) placed on the original visual tokens (``fill`` at line
        breaks), as the engine's vision bridge places them."""
        return self.geometry.to(per_crop.device).crop_values(per_crop, fill)

    @cached_property
    def crop_maps(self) -> torch.Tensor:
        """(crops, 1 + P, 1 + P) head-mean attention of each crop's [CLS] and patches (rows: queries)."""
        side = 1 + self.view_patches
        return self.softmax(self.crops, side, side)

    @cached_property
    def cls_attention(self) -> torch.Tensor:
        return self.on_tokens(self.crop_maps[:, 0, 1:])

    @cached_property
    def early_attention(self) -> torch.Tensor:
        return self.on_tokens(self.softmax(self.crops, 1 + self.view_patches)[:, 1:])

    @cached_property
    def received_attention(self) -> torch.Tensor:
        # Averaged over the crop's patch queries ([CLS] excluded, as LLaVA drops it).
        return self.on_tokens(self.crop_maps[:, 1:, 1:].mean(dim=1))

    @cached_property
    def vision_keys(self) -> torch.Tensor:
        return self.on_tokens(self.randn(self.crops, self.view_patches, self.shapes.vision_key_dim))

    @cached_property
    def vision_features(self) -> torch.Tensor:
        return self.on_tokens(self.randn(self.crops, self.view_patches, self.shapes.features))

    @cached_property
    def pixels(self) -> torch.Tensor:
        return self.randn(self.crops, 3, self.shapes.image_size, self.shapes.image_size)

    @cached_property
    def projector(self) -> nn.Module:
        torch.manual_seed(self.seed)
        return llava_projector(self.shapes).to(self.device, self.dtype).eval()

    @cached_property
    def final_norm(self) -> nn.Module:
        return nn.RMSNorm(self.shapes.hidden, eps=1e-5).to(self.device, self.dtype)

    @cached_property
    def input_embeddings(self) -> nn.Module:
        torch.manual_seed(self.seed)
        return nn.Embedding(self.shapes.vocab, self.shapes.hidden).to(self.device, self.dtype)

    @cached_property
    def tokenizer(self) -> Any:
        # LLaVA's Llama tokenizer is not available offline; vlprune's tiny byte-level BPE stands in for it.
        from vlprune.testing import build_tiny_tokenizer

        return build_tiny_tokenizer()

    @cached_property
    def instruction_ids(self) -> torch.Tensor:
        ids = torch.tensor(self.tokenizer(QUESTION, add_special_tokens=False)["input_ids"]) % self.shapes.vocab
        return ids.expand(self.shapes.batch, -1).to(self.device)

    @cached_property
    def initial_visual(self) -> torch.Tensor:
        return self.randn(self.shapes.batch, self.layout.tokens, self.shapes.hidden)

    @cached_property
    def initial_text(self) -> torch.Tensor:
        return self.randn(self.shapes.batch, self.shapes.text, self.shapes.hidden)


SYNTHESISED = frozenset(
    {
        Need.OWN_LAYER_ATTENTION,
        Need.PER_HEAD_ATTENTION,
        Need.QUERY_ROW_ATTENTION,
        Need.VALUE_STATES,
        Need.KEY_STATES,
        Need.FINAL_NORM,
        Need.TEXT_TOKENS,
        Need.INITIAL_EMBEDDINGS,
        Need.INSTRUCTION_IDS,
        Need.CLS_ATTENTION,
        Need.VISION_FEATURES,
        Need.VISION_KEYS,
        Need.VISION_MAP,
        Need.RECEIVED_ATTENTION,
        Need.CROP_MAPS,
        Need.EARLY_ATTENTION,
    }
)
"""The needs this script makes inputs for; a need added to vlprune later is reported, not guessed."""


def missing_inputs(plan: list[StagePlan]) -> list[str]:
    """The needs of ``plan`` this script cannot synthesise (a need added to vlprune after it)."""
    return sorted(need.value for stage in plan for need in stage.needs if need not in SYNTHESISED)


def stage_context(
    sources: Sources, stage: StagePlan, origin: torch.Tensor, stage_index: int, num_layers: int = LLAVA_LAYERS
) -> StageContext:
    """A context for ``stage`` over the original visual tokens ``origin`` (B, N), carrying what its plan needs."""
    shapes, batch, count = sources.shapes, sources.shapes.batch, origin.shape[1]
    needs = stage.needs
    total = sources.layout.tokens
    fields: dict[str, Any] = {}

    def take(values: torch.Tensor) -> torch.Tensor:
        index = origin.to(values.device)
        return torch.gather(
            values, 1, index.view(*index.shape, *[1] * (values.dim() - 2)).expand(-1, -1, *values.shape[2:])
        )

    if stage.query_rows is not None:
        rows = 1 if stage.query_rows == QueryRows.LAST else shapes.text
        length = shapes.prefix + count + shapes.text  # the rows attend to the prompt, the image and the text
        heads = torch.randn(batch, shapes.heads, rows, length, generator=sources._generator)
        own_start = length - rows
        causal = torch.ones(rows, rows, dtype=torch.bool).tril()
        heads[..., own_start:] = heads[..., own_start:].masked_fill(~causal, -math.inf)
        probs = heads.softmax(dim=-1)
        if Need.PER_HEAD_ATTENTION not in needs:
            probs = probs.mean(dim=1)
        probs = probs.to(sources.device, sources.dtype)
        fields["query_attention"] = probs[..., shapes.prefix : shapes.prefix + count]
        fields["query_mask"] = torch.ones(batch, rows, dtype=torch.bool, device=sources.device)
        start = shapes.prefix + total + shapes.text - rows
        fields["query_positions"] = (start + torch.arange(rows, device=sources.device)).expand(batch, -1)
        fields["rotary"] = llama_rotary(shapes.head_dim)
        if Need.QUERY_ROW_ATTENTION in needs:
            fields["query_row_attention"] = probs[..., own_start:]
        if Need.VALUE_STATES in needs:
            fields["visual_values"] = sources.randn(batch, shapes.heads, count, shapes.head_dim)
            fields["query_values"] = sources.randn(batch, shapes.heads, rows, shapes.head_dim)
        if Need.KEY_STATES in needs:
            fields["visual_keys"] = sources.randn(batch, shapes.heads, count, shapes.head_dim)
            fields["query_keys"] = sources.randn(batch, shapes.heads, rows, shapes.head_dim)
    text_mask = torch.ones(batch, shapes.text, dtype=torch.bool, device=sources.device)
    if Need.FINAL_NORM in needs:
        fields["final_norm"] = sources.final_norm
    if Need.TEXT_TOKENS in needs:
        fields["text_hidden"], fields["text_mask"] = sources.randn(batch, shapes.text, shapes.hidden), text_mask
    if Need.INITIAL_EMBEDDINGS in needs:
        fields["initial_visual_hidden"] = sources.initial_visual
        fields["initial_text_hidden"], fields["initial_text_mask"] = sources.initial_text, text_mask
    if Need.INSTRUCTION_IDS in needs:
        ids = sources.instruction_ids
        fields["instruction_ids"], fields["instruction_mask"] = ids, torch.ones_like(ids, dtype=torch.bool)
        fields["input_embeddings"] = sources.input_embeddings
    if Need.CLS_ATTENTION in needs:
        fields["vision_cls_attention"] = take(sources.cls_attention)
    if Need.EARLY_ATTENTION in needs:
        fields["vision_early_attention"] = take(sources.early_attention)
    if Need.RECEIVED_ATTENTION in needs:
        fields["vision_received_attention"] = take(sources.received_attention)
    if Need.VISION_FEATURES in needs:
        fields["vision_features"], fields["projector"] = take(sources.vision_features), sources.projector
    if Need.VISION_KEYS in needs:
        fields["vision_keys"] = take(sources.vision_keys)
    if Need.VISION_MAP in needs:  # one square map per sample: single-view layouts only (anyres families refuse it)
        fields["vision_attention"], fields["pixel_values"] = sources.crop_maps[:, 1:, 1:], sources.pixels
    if Need.CROP_MAPS in needs:
        geometry = sources.geometry.to(sources.device)
        fields["vision_crop_attention"] = sources.crop_maps[:, 1:, 1:]
        fields["vision_crop_pixels"] = sources.pixels
        fields["pack_crop_values"] = geometry.crop_values
    positions = shapes.prefix + origin
    return StageContext(
        layer=stage.layer,
        keep=count if stage.keep is None else min(stage.keep, count),
        visual_hidden=sources.randn(batch, count, shapes.hidden),
        visual_positions=positions.to(sources.device),
        visual_origin=origin.to(sources.device),
        geometry=sources.geometry.take(origin).to(sources.device),
        stage_index=stage_index,
        num_layers=num_layers,
        **fields,
    )


@dataclass
class Measured:
    """One method at one layout: its stages' layers, token counts and median milliseconds."""

    layers: list[int]
    tokens: list[int]
    keeps: list[int]
    ms: list[float]

    @property
    def total_ms(self) -> float:
        return sum(self.ms)


def build_pruner(method: str, layout: Layout, keep: float) -> Pruner:
    """The method with its defaults and a count budget of ``keep`` of the layout's patch tokens."""
    count = max(1, round(keep * layout.patch_tokens))
    return create(method) if get(method).name == "none" else create(method, keep=count)


def not_measured_reason(pruner: Pruner, layout: Layout) -> str | None:
    """Why ``pruner`` is not timed at ``layout``, or None."""
    from vlprune.adapters import traits_of

    if pruner.prunes_vision_tower():
        return "selects inside the vision tower (select_in_vision on the tower's queries and keys), not in select"
    refusal = unsupported_reason(pruner, traits_of(layout.family))
    if refusal is not None:
        return f"refused on {layout.family}: {refusal}"
    plan = pruner.plan_for_family(layout.family, layout.tokens, LLAVA_LAYERS)
    if not plan:
        return "no stages: it selects nothing"
    missing = missing_inputs(plan)
    if missing:
        return f"needs {', '.join(missing)}, which this benchmark does not synthesise"
    return None


def stage_contexts(pruner: Pruner, sources: Sources) -> list[StageContext]:
    """One context per stage of the pruner's plan; each later stage over the tokens the one before kept."""
    layout, batch = sources.layout, sources.shapes.batch
    plan = pruner.plan_for_family(layout.family, layout.tokens, LLAVA_LAYERS)
    if any(Need.INSTRUCTION_IDS in stage.needs for stage in plan) and pruner.tokenizer is None:
        pruner.use_tokenizer(sources.tokenizer)
    origin = torch.arange(layout.tokens).expand(batch, -1)
    contexts = []
    for index, stage in enumerate(plan):
        ctx = stage_context(sources, stage, origin, index)
        contexts.append(ctx)
        if index + 1 < len(plan):
            with torch.inference_mode():
                kept = pruner.select(ctx).keep_index.sort(dim=-1).values.cpu()
            origin = torch.gather(origin, 1, kept)
    return contexts


def median_ms(run: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> float:
    """Median wall time of ``run`` in milliseconds, after ``warmup`` calls."""

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        run()
        sync()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def measure(pruner: Pruner, sources: Sources, warmup: int, repeats: int) -> Measured:
    """Each stage's ``select`` timed on its own context."""
    contexts = stage_contexts(pruner, sources)
    with torch.inference_mode():
        ms = [median_ms(lambda ctx=ctx: pruner.select(ctx), sources.device, warmup, repeats) for ctx in contexts]
    return Measured(
        layers=[ctx.layer for ctx in contexts],
        tokens=[ctx.num_visual for ctx in contexts],
        keeps=[ctx.keep for ctx in contexts],
        ms=ms,
    )


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default=None, help="comma-separated; default: every registered method")
    parser.add_argument("--modules", default="", help="your own methods' modules to import first, comma-separated")
    parser.add_argument("--tokens", default="576,2880", help="patch tokens per image, comma-separated")
    parser.add_argument("--keep", type=float, default=64 / 576, help="share of the patch tokens kept")
    parser.add_argument("--no-newlines", action="store_true", help="anyres layouts without line-break tokens")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None, help="write the rows here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None, shapes: Shapes | None = None) -> None:
    """The benchmark; ``shapes`` replaces LLaVA-7B's sizes (a fast test passes small ones)."""
    args = parse_args(argv)
    for module in filter(None, args.modules.split(",")):
        importlib.import_module(module)
    modifiers = set(available_modifiers())
    methods = args.methods.split(",") if args.methods else [m for m in available_methods() if m not in modifiers]
    shapes = shapes or Shapes()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    layouts = [layout_for(int(n), shapes, newlines=not args.no_newlines) for n in args.tokens.split(",")]
    sources = {layout.patch_tokens: Sources(layout, shapes, device, dtype) for layout in layouts}
    threads = torch.get_num_threads()
    print(f"selection time alone, {device} ({cpu_model()}), {threads} threads, {dtype}, torch {torch.__version__}")
    print(f"median of {args.repeats} runs after {args.warmup} warm-up runs; keep {args.keep:.3f} of the patch tokens")
    for layout in layouts:
        print(f"- {layout.patch_tokens} patch tokens: {layout.family}, {layout.tokens} tokens at the first stage")
    print()
    header = " | ".join(f"ms at {layout.patch_tokens:,}" for layout in layouts)
    ratio = len(layouts) == 2
    print(f"| method | stage layer(s) | {header} |" + (" ratio |" if ratio else ""))
    print("|---|---|" + "---:|" * (len(layouts) + ratio))
    rows, skipped = [], []
    for method in methods:
        results: dict[int, Measured] = {}
        for layout in layouts:
            pruner = build_pruner(method, layout, args.keep)
            reason = not_measured_reason(pruner, layout)
            if reason is not None:
                skipped.append((method, layout.patch_tokens, reason))
                continue
            results[layout.patch_tokens] = measure(pruner, sources[layout.patch_tokens], args.warmup, args.repeats)
        if not results:
            continue
        layers = sorted({"+".join(map(str, result.layers)) for result in results.values()})
        cells = [f"{results[n].total_ms:.2f}" if n in results else "-" for n in sources]
        line = f"| {method} | {' / '.join(layers)} | {' | '.join(cells)} |"
        if ratio:
            small, large = (results.get(layout.patch_tokens) for layout in layouts)
            line += f" {large.total_ms / small.total_ms:.1f}x |" if small and large else " - |"
        print(line, flush=True)
        for n, result in results.items():
            rows.append({"method": method, "patch_tokens": n, "total_ms": result.total_ms, **vars(result)})
    if skipped:
        print("\nNot measured here:")
        for method, n, reason in skipped:
            print(f"- {method} at {n:,}: {reason}")
    if args.json is not None:
        report = {
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "torch": torch.__version__,
            "threads": threads,
            "cpu": cpu_model(),
            "device": str(device),
            "dtype": args.dtype,
            "warmup": args.warmup,
            "repeats": args.repeats,
            "keep": args.keep,
            "newlines": not args.no_newlines,
            "layouts": {layout.patch_tokens: {"family": layout.family, "tokens": layout.tokens} for layout in layouts},
            "rows": rows,
            "not_measured": [{"method": m, "patch_tokens": n, "reason": r} for m, n, r in skipped],
        }
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
