"""FlowCut inside the vision tower: against a plain re-implementation of the reference's loop, and its invariants."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_inputs, tiny_model

import vlprune
from vlprune.errors import VlpruneError
from vlprune.pruners.flowcut import adaptive_keep, normalised_entropy

VISION_LAYERS = 8  # feature layer -2 -> index 6: pruning after layers 1, 3, 5 (2, 1 and 0 stages left)


def reference_flowcut(tower, pixel_values: torch.Tensor, keep: int) -> tuple[list[int], torch.Tensor]:
    """The reference's loop for one CLIP image: eager attention maps, physical pruning, [CLS] kept at index 0.

    Returns the kept patch indices, the (keep, hidden) features LLaVA reads (layer -2 output, [CLS] dropped) and the
    number of patches kept at each pruning layer.
    """
    layers = tower.encoder.layers
    feature = len(layers) - 2
    x = tower.pre_layrnorm(tower.embeddings(pixel_values))
    ids = torch.arange(x.shape[1] - 1)
    accumulated, features, counts = None, None, []
    for index, layer in enumerate(layers):
        attention_module = layer.self_attn
        heads = attention_module.num_heads
        normed = layer.layer_norm1(x)

        def split(t: torch.Tensor, h: int = heads) -> torch.Tensor:
            return t.view(t.shape[0], t.shape[1], h, -1).transpose(1, 2)

        q, k, v = (
            split(p(normed)) for p in (attention_module.q_proj, attention_module.k_proj, attention_module.v_proj)
        )
        attention = torch.softmax(q @ k.transpose(-1, -2) * attention_module.scale, dim=-1)
        x = layer(x, None)
        if index == feature:
            features = x[0, 1:]
        tokens = x.shape[1]
        layers_left = feature - index - 1
        if tokens - 1 <= keep or layers_left < 0:
            continue
        cls_attention = attention[0, :, 0, 1:].mean(dim=0)
        semantic = torch.softmax(v[0, :, :1] @ v[0].transpose(-1, -2), dim=-1).mean(dim=0)[0, 1:]
        information = v[0].mean(dim=0)[1:].abs().sum(dim=-1)
        score = (cls_attention / cls_attention.sum() + semantic / semantic.sum()) * information
        accumulated = score if accumulated is None else 0.5 * accumulated + 0.5 * score
        if layers_left % 2:
            continue
        if layers_left == 0:
            kept = keep
        else:
            p = cls_attention / cls_attention.sum()
            flatness = float(-(p * p.log()).sum() / math.log(tokens - 1))
            dropped = round((tokens - 1 - keep) / math.sqrt(layers_left) * (1 - flatness**2))
            kept = max(tokens - 1 - dropped, keep)
        chosen = torch.topk(accumulated, kept).indices.sort().values
        x = torch.cat([x[:, :1], x[:, 1:][:, chosen]], dim=1)
        accumulated, ids = accumulated[chosen], ids[chosen]
        counts.append(kept)
    return ids.tolist(), features, counts


def flowcut_model(attn: str = "eager", vision: str = "clip"):
    """A tiny model whose vision attention is peaky (random weights give a nearly flat [CLS] row, and FlowCut's
    adaptive stages then prune nothing), so every stage prunes, by different amounts for different images."""
    model, processor = tiny_model(vision, 4, attn=attn, vision_layers=VISION_LAYERS, private=True)  # weights change
    with torch.no_grad():
        for module in model.model.vision_tower.modules():
            for name in ("q_proj", "k_proj", "query", "key"):
                linear = getattr(module, name, None)
                if isinstance(linear, torch.nn.Linear):
                    linear.weight.mul_(6.0)
    return model, processor


@pytest.mark.parametrize("positions", ["original", "reindex"])
def test_flowcut_matches_the_reference_loop(positions: str) -> None:
    """The kept patches, the adaptive counts and the language model's output equal those of the reference's loop
    run by hand, with the features of the pruned tower projected and placed at the kept tokens' positions."""
    model, processor = flowcut_model()
    inputs = tiny_inputs(processor, 1)
    keep = 10
    with torch.no_grad():
        expected, features, counts = reference_flowcut(model.model.vision_tower, inputs["pixel_values"], keep)
    assert counts[0] < 64 and len(set(counts)) == 3, counts  # every stage prunes, by different amounts
    with vlprune.attach(model, vlprune.pruners.create("flowcut", keep=keep), positions=positions) as session:
        logits = model(**inputs).logits
    assert session.stats.stages[0].kept_indices == [expected]
    assert session.stats.stages[0].visual_out == keep

    embeds = model.get_input_embeddings()(inputs["input_ids"])[0]
    visual = (inputs["input_ids"][0] == model.config.image_token_id).nonzero()[:, 0]
    first, last = int(visual[0]), int(visual[-1])
    sequence = torch.cat([embeds[:first], model.model.multi_modal_projector(features), embeds[last + 1 :]])
    original = [*range(first), *(first + i for i in expected), *range(last + 1, embeds.shape[0])]
    position_ids = torch.tensor([original if positions == "original" else list(range(len(original)))])
    reference = model(inputs_embeds=sequence[None], position_ids=position_ids).logits
    torch.testing.assert_close(logits, reference, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("vision", ["clip", "siglip", "dinov2"])
def test_flowcut_batch_of_two_equals_images_alone(vision: str) -> None:
    """The images of a batch prune different numbers of tokens at the adaptive stages (fillers keep the batch
    rectangular), yet each gets what it gets alone."""
    model, processor = flowcut_model("sdpa", vision)
    batch = tiny_inputs(processor, 2)
    with torch.no_grad():
        counts = (
            [reference_flowcut(model.model.vision_tower, batch["pixel_values"][i : i + 1], 10)[2] for i in range(2)]
            if vision == "clip"
            else None
        )
    if counts is not None:
        assert counts[0] != counts[1], counts
    with vlprune.attach(model, vlprune.pruners.create("flowcut", keep=10)) as session:
        logits = model(**batch).logits
        kept = session.stats.stages[0].kept_indices
        for index in range(2):
            alone = {key: value[index : index + 1] for key, value in batch.items()}
            real = alone["attention_mask"][0].bool()
            alone["input_ids"], alone["attention_mask"] = alone["input_ids"][:, real], alone["attention_mask"][:, real]
            single = model(**alone).logits
            assert session.stats.stages[0].kept_indices[0] == kept[index]
            torch.testing.assert_close(single[0], logits[index, -single.shape[1] :], atol=1e-4, rtol=1e-4)


def test_flowcut_runs_the_later_vision_layers_on_fewer_tokens() -> None:
    model, processor = flowcut_model("sdpa")
    inputs = tiny_inputs(processor, 2)
    lengths = []
    hooks = [
        layer.register_forward_pre_hook(lambda module, args: lengths.append(args[0].shape[1]))
        for layer in model.model.vision_tower.encoder.layers
    ]
    try:
        with vlprune.attach(model, vlprune.pruners.create("flowcut", keep=10)):
            model(**inputs)
    finally:
        for hook in hooks:
            hook.remove()
    assert lengths[:2] == [65, 65] and lengths[6:] == [11, 11]
    assert lengths[2] < 65 and lengths[2] >= lengths[4] > 11  # after layers 1 and 3 (adaptive), then exactly 10 + 1


def test_adaptive_count_follows_the_attention_entropy() -> None:
    real = torch.ones(2, 8, dtype=torch.bool)
    flat = torch.full((1, 8), 1 / 8)
    peaked = torch.tensor([[1.0, 0, 0, 0, 0, 0, 0, 0]])
    attention = torch.cat([flat, peaked])
    torch.testing.assert_close(normalised_entropy(attention, real), torch.tensor([1.0, 0.0]))
    # Flat attention prunes nothing; one-hot attention prunes (8 - 2) / sqrt(4) = 3 of 8.
    assert adaptive_keep(attention, real, keep=torch.tensor([2, 2]), layers_left=4).tolist() == [8, 5]


def test_flowcut_prunes_every_other_layer_before_the_feature_layer() -> None:
    pruner = vlprune.pruners.create("flowcut", keep=4)
    assert pruner.vision_layers(VISION_LAYERS, 6) == list(range(6))  # scores accumulate at every layer
    with pytest.raises(VlpruneError, match="every=0"):
        vlprune.pruners.create("flowcut", keep=4, every=0)


def test_flowcut_refuses_several_images_per_sample() -> None:
    model, processor = tiny_model("clip", vision_layers=4)
    from vlprune.testing import make_test_image

    prompt = "<image><image> Compare them."
    inputs = processor(images=[make_test_image(0), make_test_image(1)], text=[prompt], return_tensors="pt")
    with (
        vlprune.attach(model, vlprune.pruners.create("flowcut", keep=4)),
        pytest.raises(VlpruneError, match="one image"),
    ):
        model(**inputs)


def test_detaching_flowcut_restores_the_tower() -> None:
    model, processor = flowcut_model("sdpa")
    inputs = tiny_inputs(processor, 2)
    before = model(**inputs).logits
    modules = [model.model.vision_tower, model.model.multi_modal_projector, *model.model.vision_tower.encoder.layers]

    def hooks() -> list[list]:
        return [[*m._forward_hooks, *m._forward_pre_hooks] for m in modules]

    installed = hooks()  # transformers registers some hooks of its own
    with vlprune.attach(model, vlprune.pruners.create("flowcut", keep=10)):
        pruned = model(**inputs).logits
    assert pruned.shape[1] < before.shape[1]
    torch.testing.assert_close(model(**inputs).logits, before, atol=0, rtol=0)
    assert hooks() == installed
