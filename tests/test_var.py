"""VAR: the redistribution rule on hand-built rows, sink finding on planted massive activations, and the engine's
exact rewrite of only the text-query rows on top of SDPA, in prefill and in cached decoding."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_inputs, tiny_model

import vlprune
from vlprune.errors import VlpruneError
from vlprune.pruners.var import find_sink_dimensions, image_centric, redistributed, sink_scores


def test_redistribution_moves_sink_mass_to_the_image_in_proportion_and_keeps_rows_summing_to_one() -> None:
    # Keys: 0 = text sink (BOS), 1 = visual sink, 2 and 3 = visual, 4 = text.
    attention = torch.tensor([[[[0.3, 0.2, 0.1, 0.3, 0.1]]]])
    image = torch.tensor([[False, True, True, True, False]])
    sinks = torch.tensor([[True, True, False, False, False]])
    rewritten = redistributed(attention, image, sinks, p=0.6)
    moved = 0.4 * (0.3 + 0.2)  # (1 - p) of all sink attention
    expected = torch.tensor([0.3 * 0.6, 0.2 * 0.6, 0.1 + moved * 0.1 / 0.4, 0.3 + moved * 0.3 / 0.4, 0.1])
    torch.testing.assert_close(rewritten[0, 0, 0], expected)
    torch.testing.assert_close(rewritten.sum(dim=-1), torch.ones(1, 1, 1))
    # p = 1 moves nothing.
    torch.testing.assert_close(redistributed(attention, image, sinks, p=1.0), attention)


def test_image_centric_heads_need_little_sink_share_and_enough_image_attention() -> None:
    image = torch.tensor([[False, True, True, True]])
    visual_sinks = torch.tensor([[False, True, False, False]])
    rows = torch.tensor(
        [
            [0.1, 0.2, 0.4, 0.3],  # image 0.9, sink share 0.22: selected
            [0.1, 0.6, 0.2, 0.1],  # sink share 0.67 > 0.5: not selected
            [0.9, 0.02, 0.04, 0.04],  # image 0.1 < 0.2: not selected
        ]
    )[None, None]  # (1, 1, 3, 4)
    assert image_centric(rows, image, visual_sinks, rho=0.5, summ=0.2).tolist() == [[[True, False, False]]]


def test_sinks_are_found_on_planted_massive_activations() -> None:
    hidden = torch.randn(1, 6, 1024)  # |x_d| / RMS(x) can reach 20 only in a wide enough model (at most sqrt(D))
    hidden[0, 2, 7] = 300.0  # token 2 carries a massive activation in dimension 7
    assert find_sink_dimensions(hidden, tau=20.0) == [7]
    scores = sink_scores(hidden, [7])
    assert int(scores.argmax()) == 2 and scores[0, 2] > 20 > scores[0, [0, 1, 3, 4, 5]].max()


def test_var_with_p_one_changes_nothing() -> None:
    model, processor = tiny_model("clip", 2, layers=6)
    inputs = tiny_inputs(processor, 2)
    vanilla = model(**inputs).logits
    with vlprune.attach(model, vlprune.pruners.create("var", p=1.0, dimensions=[5], tau=2.0)):
        torch.testing.assert_close(model(**inputs).logits, vanilla, atol=1e-5, rtol=1e-5)


def plant_sinks(monkeypatch: pytest.MonkeyPatch, tokens: list[int]) -> None:
    """Make the given token indices the sinks of every layer (a random tiny model has no massive activations)."""
    from vlprune.pruners.var import VAR

    def planted(self, hidden: torch.Tensor, dimensions: list[int]) -> torch.Tensor:
        sinks = torch.zeros(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
        sinks[:, tokens] = True
        return sinks

    monkeypatch.setattr(VAR, "sinks", planted)


def first_visual(model, inputs) -> int:
    return int((inputs["input_ids"][0] == model.config.image_token_id).nonzero()[0, 0])


def test_var_rewrites_only_the_text_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows before the first text query never see a rewritten row (causal attention), so every hidden state there is
    the vanilla one; the text positions change."""
    model, processor = tiny_model("clip", 2, layers=6)
    inputs = tiny_inputs(processor, 1)
    plant_sinks(monkeypatch, [0, first_visual(model, inputs) + 3])  # BOS and one visual token
    vanilla = model(**inputs, output_hidden_states=True).hidden_states[-1]
    with vlprune.attach(model, vlprune.pruners.create("var", dimensions=[5], tau=2.0, rho=1.0, summ=0.0)) as session:
        changed = model(**inputs, output_hidden_states=True).hidden_states[-1]
        first_text = int(session._redistribution._rows[2][0, 0])
    torch.testing.assert_close(changed[:, :first_text], vanilla[:, :first_text], atol=0, rtol=0)
    assert (changed[:, first_text:] - vanilla[:, first_text:]).abs().max() > 1e-3


@pytest.mark.parametrize(
    "method,options", [("var", {}), ("random+var", {"keep": 16}), ("random+var", {"keep": 16, "layer": 3})]
)
def test_cached_decoding_with_var_equals_recomputation(method: str, options: dict) -> None:
    """Each decoded token's logits equal a fresh prefill of the prompt plus the tokens before it: the decode step
    rewrites the new token's row with the prefill's sinks and image, as the prefill rewrites text rows. (The
    pruners here select independently of the text, so the fresh prefill keeps the same tokens.)"""
    model, processor = tiny_model("clip", 2, layers=6)
    inputs = tiny_inputs(processor, 1)
    pruner = vlprune.pruners.create(method, dimensions=[5], tau=2.0, rho=1.0, summ=0.0, **options)
    with vlprune.attach(model, pruner):
        out = model.generate(
            **inputs, max_new_tokens=4, do_sample=False, return_dict_in_generate=True, output_logits=True
        )
        for step in range(1, 4):
            prefix = out.sequences[:, : inputs["input_ids"].shape[1] + step]
            again = dict(inputs, input_ids=prefix, attention_mask=torch.ones_like(prefix))
            logits = model(**again).logits[:, -1]
            torch.testing.assert_close(logits, out.logits[step], atol=1e-4, rtol=1e-4)


def test_var_composes_with_a_pruner_and_reaches_the_cli_names() -> None:
    pruner = vlprune.pruners.create("sparsevlm+var", keep=0.3, p=0.5)
    assert pruner.name == "sparsevlm" and pruner.modifier.p == 0.5
    with pytest.raises(VlpruneError, match="unknown attention modifier"):
        vlprune.pruners.create("fastv+nope", keep=4)
    with pytest.raises(VlpruneError, match=r"p=1\.5"):
        vlprune.pruners.create("var", p=1.5)
    # A 64-wide random model has no massive activations (|x_d| / RMS(x) <= 8 < tau): the finder finds no sink
    # dimension and VAR leaves the pruned model exactly as it is.
    model, processor = tiny_model("dinov2", 2, layers=6)
    inputs = tiny_inputs(processor, 2)
    with vlprune.attach(model, vlprune.pruners.create("sparsevlm", keep=0.3)):
        alone = model(**inputs).logits
    with vlprune.attach(model, pruner) as session:
        combined = model(**inputs).logits
    assert session._redistribution.dimensions == []
    torch.testing.assert_close(combined, alone, atol=0, rtol=0)


def test_var_output_rows_equal_the_redistributed_eager_attention_times_values() -> None:
    """Oracle at layer 2 of an eager model: eager attention weights and the layer's values give every head's output;
    VAR's must equal the redistributed weights times the values in the selected (head, text row) pairs, and the
    plain ones everywhere else."""
    from vlprune.pruners.var import image_centric, redistributed, sink_scores

    model, processor = tiny_model("clip", 4, attn="eager", layers=6)
    inputs = tiny_inputs(processor, 1)
    layer = model.model.language_model.layers[2]
    captured = []
    hook = layer.self_attn.o_proj.register_forward_pre_hook(lambda module, args: captured.append(args[0]))
    try:
        out = model(**inputs, output_attentions=True, output_hidden_states=True)
        options = {"dimensions": [5], "tau": 2.0, "rho": 0.9, "summ": 0.1}
        with vlprune.attach(model, vlprune.pruners.create("var", **options)) as session:
            model(**inputs)
    finally:
        hook.remove()
    weights = out.attentions[2][0]  # (H, L, L)
    heads, length = weights.shape[0], weights.shape[1]
    hidden = out.hidden_states[2]
    values = layer.self_attn.v_proj(layer.input_layernorm(hidden))[0].view(length, heads, -1).transpose(0, 1)
    image = (inputs["input_ids"] == model.config.image_token_id)[0]
    sinks = sink_scores(hidden, [5])[0] >= 2.0
    rows = session._redistribution._rows[2][0]
    rewritten = redistributed(weights[None, :, rows], image[None], sinks[None], p=0.6)[0]
    selected = image_centric(weights[None, :, rows], image[None], (sinks & image)[None], 0.9, 0.1)[0]  # (H, R)
    assert selected.any() and not selected.all()  # some heads and rows change, others must not
    expected = (weights @ values).transpose(0, 1).clone()  # (L, H, d)
    expected[rows] = torch.where(selected.T[..., None], (rewritten @ values).transpose(0, 1), expected[rows])
    torch.testing.assert_close(captured[1][0].view(length, heads, -1), expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(
        captured[0][0].view(length, heads, -1), (weights @ values).transpose(0, 1), atol=1e-5, rtol=1e-4
    )


def _attention_output(model, inputs, layer: int, pruner=None) -> torch.Tensor:
    """The input of layer ``layer``'s output projection (every head's attention output) in one prefill."""
    captured = []
    module = model.model.language_model.layers[layer].self_attn.o_proj
    hook = module.register_forward_pre_hook(lambda _, args: captured.append(args[0].detach().clone()))
    try:
        if pruner is None:
            model(**inputs)
        else:
            with vlprune.attach(model, pruner):
                model(**inputs)
    finally:
        hook.remove()
    return captured[0]


def test_var_rewrites_the_last_layer_as_the_reference_does(monkeypatch: pytest.MonkeyPatch) -> None:
    """The reference's except_last_layer never takes effect, so the last layer is redistributed too; skip_last=1
    gives what its config meant."""
    model, processor = tiny_model("clip", 4, layers=6)
    inputs = tiny_inputs(processor, 1)
    plant_sinks(monkeypatch, [0, first_visual(model, inputs) + 3])
    options = {"dimensions": [5], "tau": 2.0, "rho": 1.0, "summ": 0.0}
    assert vlprune.pruners.create("var").modifier.layers(6) == [2, 3, 4, 5]
    assert vlprune.pruners.create("var", skip_last=1).modifier.layers(6) == [2, 3, 4]

    def outputs(skip_last: int) -> list[torch.Tensor]:
        pruner = lambda: vlprune.pruners.create("var", skip_last=skip_last, **options)  # noqa: E731
        return [_attention_output(model, inputs, layer, pruner()) for layer in (4, 5)]

    (default_4, default_5), (skipped_4, skipped_5) = outputs(0), outputs(1)
    torch.testing.assert_close(default_4, skipped_4, atol=0, rtol=0)  # both rewrite layers 2..4 alike
    assert (default_5 - skipped_5).abs().max() > 1e-4  # only the default rewrites the last layer


def test_a_layer_whose_image_has_no_visual_sink_is_left_as_sdpa_computed_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only a text token (the first, as BOS is) is a sink: the reference forks no head, so nothing moves, although the
    rows would pass the image-centric test (no visual sink holds any share of the image's attention)."""
    model, processor = tiny_model("clip", 4, layers=6)
    inputs = tiny_inputs(processor, 2)
    options = {"dimensions": [5], "tau": 2.0, "rho": 1.0, "summ": 0.0}
    vanilla = [_attention_output(model, inputs, layer) for layer in (2, 5)]
    plant_sinks(monkeypatch, [0])
    with_var = [_attention_output(model, inputs, layer, vlprune.pruners.create("var", **options)) for layer in (2, 5)]
    for before, after in zip(vanilla, with_var, strict=True):
        torch.testing.assert_close(after, before, atol=0, rtol=0)


def test_rewrite_selects_nothing_for_a_sample_without_visual_sinks() -> None:
    from vlprune.pruners.var import VAR

    attention = torch.softmax(torch.randn(2, 3, 2, 6), dim=-1)
    image = torch.tensor([[False, True, True, True, True, False]] * 2)
    sinks = torch.tensor([[True, False, False, False, False, False], [True, False, True, False, False, False]])
    _, selected = VAR(rho=1.0, summ=0.0).rewrite(attention, image, sinks)
    assert not selected[0].any()  # only the text sink: left alone
    assert selected[1].all()  # a visual sink: every row passes with rho=1, summ=0
