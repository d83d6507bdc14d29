"""Prefill time of each pruning method against the unpruned model, next to the theoretical FLOPs ratio.

The model is a LLaVA with random weights at the shapes of a real checkpoint (``--preset llava-1.5-7b``: CLIP ViT-L/14
at 336 px = 576 visual tokens, Vicuna-7B = 32 layers of 4096) or a small CPU-sized one (``--preset small``), or a
LLaVA-NeXT (``--preset llava-next-7b``: the same towers, a 672 x 672 image = base view + 2 x 2 tiles = 2,928 visual
tokens with the line breaks; ``--preset small-next``: 1,312 at 224 px views), or a Qwen2.5-VL (``--preset
qwen2.5-vl-7b``: its 32-block windowed vision encoder, a 672 x 672 image = 48 x 48 patches merged into 576 tokens,
Qwen2-7B = 28 layers of 3584 with 4 key-value heads; ``--preset small-qwen``: the same image, a 12-block 384-wide
encoder and a 12-layer 768-wide language model). Random weights change nothing about the time of a forward pass,
and need no download.

    python benchmarks/prefill.py --preset small                          # CPU, a minute
    python benchmarks/prefill.py --preset llava-1.5-7b --device cuda --dtype bfloat16
    python benchmarks/prefill.py --preset small-next --keep 0.222,0.111,0.056 --methods fastv,fastervlm,divprune
    python benchmarks/prefill.py --preset small-qwen --methods fastv,divprune,holov

Each row: the median prefill time over ``--repeats`` runs after ``--warmup`` runs (CUDA synchronised), the speed-up
over ``none`` measured in the same run (interleaved, so both see the same machine state), and the speed-up the
theoretical language-model FLOPs predict. The vision tower and projector run in every row, so the measured
speed-up stays below the FLOPs one.

``--compile`` instead compares captured generation (``vlprune.attach(..., compile=True)``: static shapes, compiled
graphs, CUDA graphs on a GPU) pruned and unpruned, with plain eager transformers for reference: the first call
(compilation and capture) apart, the language model's prefill, the time to the first token and a 32-token answer.

    python benchmarks/prefill.py --preset small --compile --methods fastv,fastervlm --keep 64
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass

import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLTextConfig,
    Qwen2_5_VLVisionConfig,
)

import vlprune
from vlprune.adapters import adapter_for


@dataclass(frozen=True)
class Preset:
    image_size: int
    patch_size: int
    vision_hidden: int
    vision_layers: int
    vision_heads: int
    text_hidden: int
    text_layers: int
    text_heads: int
    text_ffn: int
    prompt_before: int  # text tokens before the image (LLaVA-1.5's system prompt is about 35)
    prompt_after: int
    tile_grid: tuple[int, int] | None = None  # LLaVA-NeXT: the image covers this many tiles (rows, columns)
    qwen: bool = False  # Qwen2.5-VL: image_size is the image's side, patch_size its patches' (merged 2 x 2)
    kv_heads: int | None = None


PRESETS = {
    "llava-1.5-7b": Preset(336, 14, 1024, 24, 16, 4096, 32, 32, 11008, 35, 40),
    "small": Preset(224, 14, 384, 12, 6, 768, 12, 12, 2048, 35, 40),
    "tiny": Preset(56, 14, 64, 2, 2, 64, 4, 2, 128, 4, 4),  # 16 visual tokens: the scripts' own tests
    "llava-next-7b": Preset(336, 14, 1024, 24, 16, 4096, 32, 32, 11008, 35, 40, tile_grid=(2, 2)),
    "small-next": Preset(224, 14, 384, 12, 6, 768, 12, 12, 2048, 35, 40, tile_grid=(2, 2)),
    "qwen2.5-vl-7b": Preset(672, 14, 1280, 32, 16, 3584, 28, 28, 18944, 14, 40, qwen=True, kv_heads=4),
    "small-qwen": Preset(672, 14, 384, 12, 6, 768, 12, 12, 2048, 14, 40, qwen=True, kv_heads=2),
}
IMAGE_TOKEN, VIDEO_TOKEN, VISION_START, VISION_END = 32000, 32001, 32002, 32003


def grid_pinpoints(preset: Preset) -> list[list[int]]:
    """LLaVA-NeXT's pinpoints (1 x 2, 2 x 1, 2 x 2, 1 x 3, 3 x 1 views) at the preset's view size."""
    side = preset.image_size
    return [[side * rows, side * columns] for rows, columns in [(1, 2), (2, 1), (2, 2), (1, 3), (3, 1)]]


def qwen_config(preset: Preset) -> Qwen2_5_VLConfig:
    """A Qwen2.5-VL config at the preset's shapes: windows of 112 px, a full-attention block every eighth (the last
    one included, as in the released models), M-RoPE sections in the released proportions."""
    head_dim = preset.text_hidden // preset.text_heads
    eighth, sixteenth = head_dim // 8, head_dim // 16  # [16, 24, 24] for Qwen2-7B's 128: half the head dim
    return Qwen2_5_VLConfig(
        vision_config=Qwen2_5_VLVisionConfig(
            depth=preset.vision_layers,
            hidden_size=preset.vision_hidden,
            intermediate_size=4 * preset.vision_hidden,
            out_hidden_size=preset.text_hidden,
            num_heads=preset.vision_heads,
            patch_size=preset.patch_size,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=112,
            fullatt_block_indexes=list(
                range(preset.vision_layers // 4 - 1, preset.vision_layers, preset.vision_layers // 4)
            ),
        ),
        text_config=Qwen2_5_VLTextConfig(
            vocab_size=32064,
            hidden_size=preset.text_hidden,
            intermediate_size=preset.text_ffn,
            num_hidden_layers=preset.text_layers,
            num_attention_heads=preset.text_heads,
            num_key_value_heads=preset.kv_heads,
            max_position_embeddings=8192,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 1e6,
                "mrope_section": [eighth, 3 * sixteenth, 3 * sixteenth],
            },
        ),
        image_token_id=IMAGE_TOKEN,
        video_token_id=VIDEO_TOKEN,
        vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END,
        attn_implementation="sdpa",
    )


def build_model(preset: Preset, device: str, dtype: torch.dtype) -> torch.nn.Module:
    if preset.qwen:
        return _instantiate(Qwen2_5_VLForConditionalGeneration, qwen_config(preset), device, dtype)
    vision = CLIPVisionConfig(
        hidden_size=preset.vision_hidden,
        intermediate_size=4 * preset.vision_hidden,
        num_hidden_layers=preset.vision_layers,
        num_attention_heads=preset.vision_heads,
        image_size=preset.image_size,
        patch_size=preset.patch_size,
    )
    text = LlamaConfig(
        vocab_size=32064,
        hidden_size=preset.text_hidden,
        intermediate_size=preset.text_ffn,
        num_hidden_layers=preset.text_layers,
        num_attention_heads=preset.text_heads,
        max_position_embeddings=4096,
    )
    if preset.tile_grid is None:
        config = LlavaConfig(
            vision_config=vision, text_config=text, image_token_index=32000, attn_implementation="sdpa"
        )
        family = LlavaForConditionalGeneration
    else:
        config = LlavaNextConfig(
            vision_config=vision,
            text_config=text,
            image_token_index=32000,
            image_grid_pinpoints=grid_pinpoints(preset),
            attn_implementation="sdpa",
        )
        family = LlavaNextForConditionalGeneration
    return _instantiate(family, config, device, dtype)


def _instantiate(family: type, config: object, device: str, dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = family(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def build_qwen_inputs(preset: Preset, batch: int, device: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """One square image per sample, ``<|vision_start|>`` + its merged tokens + ``<|vision_end|>`` in the prompt."""
    side = preset.image_size // preset.patch_size
    visual = (side // 2) ** 2
    generator = torch.Generator().manual_seed(0)
    before = torch.randint(1, 32000, (batch, preset.prompt_before), generator=generator)
    after = torch.randint(1, 32000, (batch, preset.prompt_after), generator=generator)
    image = torch.cat(
        [
            torch.full((batch, 1), VISION_START),
            torch.full((batch, visual), IMAGE_TOKEN),
            torch.full((batch, 1), VISION_END),
        ],
        dim=1,
    )
    input_ids = torch.cat([before, image, after], dim=1)
    pixels = torch.randn(batch * side * side, 3 * 2 * preset.patch_size**2, generator=generator)
    return {
        "input_ids": input_ids.to(device),
        "attention_mask": torch.ones_like(input_ids, device=device),
        "mm_token_type_ids": (input_ids == IMAGE_TOKEN).int().to(device),
        "pixel_values": pixels.to(device=device, dtype=dtype),
        "image_grid_thw": torch.tensor([[1, side, side]] * batch, device=device),
    }


def build_inputs(
    preset: Preset, batch: int, device: str, dtype: torch.dtype, model: torch.nn.Module
) -> dict[str, torch.Tensor]:
    if preset.qwen:
        return build_qwen_inputs(preset, batch, device, dtype)
    visual = (preset.image_size // preset.patch_size) ** 2
    extra: dict[str, torch.Tensor] = {}
    pixel_shape: tuple[int, ...] = (batch, 3, preset.image_size, preset.image_size)
    if preset.tile_grid is not None:
        rows, columns = preset.tile_grid
        size = (rows * preset.image_size, columns * preset.image_size)
        visual = len(adapter_for(model).image_tokens(size))  # base view, tiles and line breaks
        extra["image_sizes"] = torch.tensor([size] * batch, device=device)
        pixel_shape = (batch, 1 + rows * columns, 3, preset.image_size, preset.image_size)
    generator = torch.Generator().manual_seed(0)
    before = torch.randint(1, 32000, (batch, preset.prompt_before), generator=generator)
    after = torch.randint(1, 32000, (batch, preset.prompt_after), generator=generator)
    image = torch.full((batch, visual), 32000)
    input_ids = torch.cat([before, image, after], dim=1).to(device)
    pixels = torch.randn(*pixel_shape, generator=generator)
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "pixel_values": pixels.to(device=device, dtype=dtype),
        **extra,
    }


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@torch.inference_mode()
def time_prefill(model, inputs, device: str) -> float:
    sync(device)
    start = time.perf_counter()
    model(**inputs, use_cache=True)
    sync(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--methods", default="fastv,fastervlm,random")
    parser.add_argument(
        "--keep",
        default="0.111,0.222,0.333",
        help="counts or fractions; the default is LLaVA-1.5's 64, 128 and 192 of 576",
    )
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="captured generation, pruned against unpruned")
    parser.add_argument("--backend", default=None, help="torch.compile backend with --compile (default inductor)")
    parser.add_argument("--answer", type=int, default=32, help="answer tokens with --compile")
    args = parser.parse_args()

    preset, dtype = PRESETS[args.preset], getattr(torch, args.dtype)
    model = build_model(preset, args.device, dtype)
    inputs = build_inputs(preset, args.batch, args.device, dtype, model)
    budgets = [float(k) if "." in k else int(k) for k in args.keep.split(",")]
    cases = [(m, k) for m in args.methods.split(",") for k in budgets]
    pruners = {case: vlprune.pruners.create(case[0], keep=case[1]) for case in cases}
    if args.compile:
        print_captured(args, model, inputs, pruners)
        return

    times: dict[tuple[str, int | float] | None, list[float]] = {case: [] for case in [None, *cases]}
    flops_ratio: dict[tuple[str, int | float], float] = {}
    kept: dict[tuple[str, int | float], int] = {}
    for round_index in range(args.warmup + args.repeats):
        for case in [None, *cases]:
            if case is None:
                seconds = time_prefill(model, inputs, args.device)
            else:
                with vlprune.attach(model, pruners[case]) as session:
                    seconds = time_prefill(model, inputs, args.device)
                flops_ratio[case] = session.stats.flops_ratio
                kept[case] = session.stats.stages[-1].visual_out
            if round_index >= args.warmup:
                times[case].append(seconds)

    base = statistics.median(times[None])
    visual = int((inputs["input_ids"] == IMAGE_TOKEN).sum(1)[0])
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(
        f"preset {args.preset}, {device_name}, {args.dtype}, batch {args.batch}, "
        f"{inputs['input_ids'].shape[1]} prompt tokens of which {visual} visual, median of {args.repeats}"
    )
    print("| method | keep | prefill ms | speed-up | FLOPs speed-up |")
    print("|---|---|---|---|---|")
    print(f"| none | all | {base * 1e3:.1f} | 1.00x | 1.00x |")
    for case in cases:
        median = statistics.median(times[case])
        speedups = f"{base / median:.2f}x | {1 / flops_ratio[case]:.2f}x"
        print(f"| {case[0]} | {kept[case]} | {median * 1e3:.1f} | {speedups} |")


def print_captured(args: argparse.Namespace, model, inputs, pruners: dict) -> None:
    from vlprune.eval.bench_captured import CAPTURED_HEADER, captured_rows

    variants = [(f"captured {name} {keep}", pruner) for (name, keep), pruner in pruners.items()]
    rows = captured_rows(model, inputs, variants, args.repeats, answer_tokens=args.answer, backend=args.backend)
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(
        f"preset {args.preset}, {device_name}, {args.dtype}, batch {args.batch}, {inputs['input_ids'].shape[1]} "
        f"prompt tokens, median of {args.repeats}, backend {args.backend or 'inductor'}"
    )
    print(CAPTURED_HEADER)
    baseline = rows[1]
    for row in rows:
        print(row.table_row(baseline))


if __name__ == "__main__":
    main()
