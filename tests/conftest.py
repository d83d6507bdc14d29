"""Shared fixtures: tiny random LLaVA models built offline (vlprune.testing), images and batched inputs."""

from __future__ import annotations

import os

# Triton kernels run in Triton's interpreter on CPU tensors; the variable is read when a kernel module is imported,
# so it is set here, before any vlprune import. With VLPRUNE_TEST_DEVICE=cuda the kernels compile for the GPU instead.
if os.environ.get("VLPRUNE_TEST_DEVICE", "cpu") == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

from vlprune.testing import build_tiny_inputs, build_tiny_llava, make_test_image

# Set VLPRUNE_TEST_DEVICE=cuda to run the model tests on a GPU (the default suite runs on the CPU).
DEVICE = os.environ.get("VLPRUNE_TEST_DEVICE", "cpu")

QUESTIONS = ("What color is the square?", "How many red objects are there on the left?")


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)


def tiny_model(
    vision: str = "clip",
    kv_heads: int = 4,
    attn: str = "sdpa",
    layers: int = 4,
    text: str = "llama",
    vision_layers: int = 3,
):
    """CLIP+Llama, multi-head by default; DINOv2+Llama with grouped-query attention: vision="dinov2", kv_heads=2."""
    model, processor = build_tiny_llava(
        vision=vision,
        text=text,
        num_key_value_heads=kv_heads,
        attn_implementation=attn,
        num_hidden_layers=layers,
        vision_layers=vision_layers,
    )
    return model.to(DEVICE), processor


def tiny_inputs(processor, batch: int):
    """A batch of 1 or 2 prompts; with 2 the questions differ in length, so the first sample is left-padded."""
    images = [make_test_image(seed) for seed in range(batch)]
    return build_tiny_inputs(processor, images, list(QUESTIONS[:batch])).to(DEVICE)


MODEL_KINDS = [("clip", 4), ("dinov2", 2)]
