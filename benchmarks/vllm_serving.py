"""Serving through vLLM, unpruned and pruned, in one run: time to first token, requests per second and output tokens
per second, next to the language model's prefill FLOPs ratio (docs/vllm.md#benchmark).

Runs in the vLLM venv (``.ci/vllm_venv.sh``)::

    .venv-vllm/bin/python benchmarks/vllm_serving.py --out benchmarks/results/vllm_serving_cpu.json

The model is a Qwen2.5-VL at a small real shape with random weights (``load_format="dummy"``): Qwen2.5-0.5B's
language model (24 layers, 896 wide, 14 heads of 64, 2 key/value heads) behind a 4-block Qwen2.5-VL tower (1280 wide,
14-pixel patches, 2 x 2 merging, the last block attending over the whole image), written as a config by this script;
448 x 448 images give 256 visual tokens each. Random weights answer nonsense, so every request generates exactly
``--max-tokens`` tokens (``ignore_eos``). The unpruned rows come from vLLM without the plugin's entry; the pruned rows
from one engine with the plugin (``--method``), each budget a request's own ``vlprune_keep``. On a GPU pass
``--images 64 --max-tokens 64`` or more, and ``--model`` for a real checkpoint.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

FRACTIONS = (1 / 9, 2 / 9, 3 / 9)  # 11.1%, 22.2%, 33.3% of each image's tokens
SIDE = 448
TOKENS_PER_IMAGE = (SIDE // 28) ** 2  # 14-pixel patches merged 2 x 2

LANGUAGE_MODEL = {  # Qwen2.5-0.5B's shape
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "vocab_size": 151936,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-6,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [8, 12, 12]},
    "tie_word_embeddings": True,
}
VISION_TOWER = {  # Qwen2.5-VL's tower, 4 blocks deep
    "depth": 4,
    "hidden_size": 1280,
    "intermediate_size": 3420,
    "num_heads": 16,
    "out_hidden_size": 896,
    "patch_size": 14,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
    "window_size": 112,
    "fullatt_block_indexes": [3],
    "tokens_per_second": 2,
}


def write_model(folder: Path) -> Path:
    """The benchmark model's config and processor (no weights: vLLM draws them), in ``folder``."""
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLProcessor,
        Qwen2_5_VLTextConfig,
        Qwen2_5_VLVisionConfig,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    from vlprune.testing.qwen import QWEN_CHAT_TEMPLATE, _token_ids, _tokenizer

    tokenizer = _tokenizer()
    geometry = {
        "patch_size": 14,
        "merge_size": 2,
        "temporal_patch_size": 2,
        "size": {"shortest_edge": 56 * 56, "longest_edge": SIDE * SIDE},
    }
    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(**geometry),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(**geometry),
        chat_template=QWEN_CHAT_TEMPLATE,
    )
    text = Qwen2_5_VLTextConfig(**LANGUAGE_MODEL, pad_token_id=tokenizer.pad_token_id)
    config = Qwen2_5_VLConfig(
        vision_config=Qwen2_5_VLVisionConfig(**VISION_TOWER), text_config=text, **_token_ids(tokenizer)
    )
    config.architectures = ["Qwen2_5_VLForConditionalGeneration"]
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def requests(count: int, budget: float | None) -> list[dict]:
    from vlprune.testing.images import make_test_image

    prompt = "USER: <|vision_start|><|image_pad|><|vision_end|>Describe the picture. ASSISTANT:"
    made = []
    for index in range(count):
        request = {"prompt": prompt, "multi_modal_data": {"image": make_test_image(index, 64).resize((SIDE, SIDE))}}
        if budget is not None:
            request["mm_processor_kwargs"] = {"vlprune_keep": budget}
        made.append(request)
    return made


def measure(engine: object, batch: list[dict], max_tokens: int) -> dict[str, float]:
    """One timed pass over ``batch`` (after a warm-up pass over its first request)."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    engine.generate(batch[:1], params, use_tqdm=False)
    engine.reset_prefix_cache()
    engine.llm_engine.reset_encoder_cache()
    start = time.perf_counter()
    outputs = engine.generate(batch, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    first = [out.metrics.first_token_latency for out in outputs if getattr(out, "metrics", None) is not None]
    generated = sum(len(out.outputs[0].token_ids) for out in outputs)
    prompt = statistics.mean(len(out.prompt_token_ids) for out in outputs)
    return {
        "seconds": seconds,
        "requests_per_second": len(batch) / seconds,
        "output_tokens_per_second": generated / seconds,
        "ttft_mean_seconds": statistics.mean(first) if first else float("nan"),
        "ttft_median_seconds": statistics.median(first) if first else float("nan"),
        "prompt_tokens": prompt,
    }


def flops_ratio(prompt_tokens: float, unpruned_tokens: float) -> float:
    """The language model's prefill FLOPs at ``prompt_tokens`` over those at ``unpruned_tokens`` (vlprune's count)."""
    from vlprune.adapters import LanguageModelShape
    from vlprune.engine.stats import layer_flops

    shape = LanguageModelShape(
        num_layers=LANGUAGE_MODEL["num_hidden_layers"],
        hidden_size=LANGUAGE_MODEL["hidden_size"],
        num_heads=LANGUAGE_MODEL["num_attention_heads"],
        num_kv_heads=LANGUAGE_MODEL["num_key_value_heads"],
        head_dim=LANGUAGE_MODEL["hidden_size"] // LANGUAGE_MODEL["num_attention_heads"],
        intermediate_size=LANGUAGE_MODEL["intermediate_size"],
        gated_mlp=True,
    )
    return layer_flops(round(prompt_tokens), shape) / layer_flops(round(unpruned_tokens), shape)


def engine_for(folder: Path, args: argparse.Namespace, pruned: bool) -> object:
    from vllm import LLM

    options = {
        "model": str(folder),
        "load_format": "dummy",
        "dtype": args.dtype,
        "enforce_eager": args.enforce_eager,
        "max_model_len": 2048,
        "max_num_seqs": args.images,
        "seed": 0,
        "disable_log_stats": False,
    }
    if args.kv_cache_bytes:
        options["kv_cache_memory_bytes"] = args.kv_cache_bytes
    if pruned:
        options["hf_overrides"] = {"vlprune": {"method": args.method, "keep": FRACTIONS[0]}}
    return LLM(**options)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=8, help="requests per setting, one image each")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--method", default="divprune")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--kv-cache-bytes", type=int, default=1 << 30, help="0: vLLM's default reservation")
    parser.add_argument("--out", type=Path, default=None, help="write the rows as JSON")
    args = parser.parse_args(argv)

    scratch = Path(tempfile.mkdtemp(prefix="vlprune-vllm-bench-"))
    os.environ.setdefault("VLLM_CACHE_ROOT", str(scratch / "cache"))
    folder = write_model(scratch / "model")
    rows = []
    for pruned in (False, True):
        engine = engine_for(folder, args, pruned)
        budgets = [None] if not pruned else list(FRACTIONS)
        for budget in budgets:
            result = measure(engine, requests(args.images, budget), args.max_tokens)
            rows.append({"setting": "unpruned" if budget is None else f"{args.method} {budget:.1%}", **result})
        del engine
        gc.collect()
    base = rows[0]
    for row in rows:
        row["flops_ratio"] = flops_ratio(row["prompt_tokens"], base["prompt_tokens"])
        row["ttft_speedup"] = base["ttft_mean_seconds"] / row["ttft_mean_seconds"]
        row["throughput_speedup"] = row["requests_per_second"] / base["requests_per_second"]
    report = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "model": "Qwen2.5-VL shape: Qwen2.5-0.5B language model, 4-block tower, random weights",
        "images": args.images,
        "image_tokens": TOKENS_PER_IMAGE,
        "max_tokens": args.max_tokens,
        "rows": rows,
    }
    print(f"{'setting':<18} {'prompt':>7} {'FLOPs':>6} {'TTFT s':>8} {'req/s':>7} {'out tok/s':>10} {'TTFT x':>7}")
    for row in rows:
        print(
            f"{row['setting']:<18} {row['prompt_tokens']:>7.0f} {row['flops_ratio']:>6.3f} "
            f"{row['ttft_mean_seconds']:>8.3f} {row['requests_per_second']:>7.3f} "
            f"{row['output_tokens_per_second']:>10.2f} {row['ttft_speedup']:>7.2f}"
        )
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        partial = args.out.with_suffix(".partial")
        partial.write_text(json.dumps(report, indent=2) + "\n")
        partial.replace(args.out)  # never a half-written results file
    return 0


if __name__ == "__main__":
    sys.exit(main())
