"""The inputs a pruning stage can ask for beyond its core (the visual tokens' hidden states, positions and origins).

A stage plan names what it needs as a set (``StagePlan(layer, keep, needs=frozenset({Need.CLS_ATTENTION}))``), each
model adapter declares which of them its family can provide (``AdapterTraits.provides``), and which methods run on
which family follows from the two (``vlprune.pruners.families_of``). The module sits below the adapters and the
pruners so that both can name the same inputs.

Each need's value is the name of the ``StagePlan`` flag and ``StageContext`` field it used to be, so that the old
keyword spelling (``StagePlan(..., vision_keys=True)``) maps onto the set.
"""

from __future__ import annotations

import enum


class Need(enum.StrEnum):
    """One input a stage may ask for."""

    # How the attention rows of a stage's query tokens are computed (with ``StagePlan.query_rows``).
    OWN_LAYER_ATTENTION = "own_layer_attention"  # from the stage layer's own queries and keys (PyramidDrop)
    PER_HEAD_ATTENTION = "per_head_attention"  # per head, not averaged over heads
    QUERY_ROW_ATTENTION = "query_row_attention"  # also the rows' attention to the query rows' own tokens
    VALUE_STATES = "value_states"  # the value vectors of the visual tokens and of the query rows
    KEY_STATES = "key_states"  # the post-RoPE key vectors of the visual tokens and of the query rows
    FINAL_NORM = "final_norm"  # the language model's final norm (the one before the LM head)
    # The language model's side.
    TEXT_TOKENS = "text_tokens"  # hidden states of the text after the image (the instruction) at the stage layer
    INITIAL_EMBEDDINGS = "initial_embeddings"  # layer 0's input for the visual tokens and the text after them
    INSTRUCTION_IDS = "instruction_ids"  # the token ids of the text after the image, and the token-embedding table
    # The vision tower's side, read at its feature layer.
    CLS_ATTENTION = "vision_cls_attention"  # the [CLS] query's attention to each visual token
    VISION_FEATURES = "vision_features"  # the projector's input per visual token, and the projector
    VISION_KEYS = "vision_keys"  # head-mean keys per visual token
    VISION_MAP = "vision_attention"  # one square attention map per image, and the pixels
    RECEIVED_ATTENTION = "vision_received_attention"  # the attention each visual token receives in its crop
    CROP_MAPS = "vision_crop_attention"  # each crop's attention map, its pixels and the packing of per-crop values
    # The vision tower's side, read at a second, earlier layer (``StagePlan.early_vision_depth`` names it).
    EARLY_ATTENTION = "vision_early_attention"  # [CLS] attention there, or the received attention without [CLS]


VISION_READS: dict[Need, str] = {
    Need.CLS_ATTENTION: "cls",
    Need.VISION_KEYS: "keys",
    Need.VISION_MAP: "map",
    Need.RECEIVED_ATTENTION: "received",
    Need.VISION_FEATURES: "features",
    Need.CROP_MAPS: "crop_map",
    Need.EARLY_ATTENTION: "early_attention",
}
"""The needs read from the vision side, with the short names refusals give them, in the order refusals list them."""

LANGUAGE_MODEL_NEEDS = frozenset(need for need in Need if need not in VISION_READS)
"""What the engine provides from the language model itself, on every family."""


def needs_from_flags(flags: dict[str, bool]) -> frozenset[Need]:
    """The needs named by the old keyword flags (``vision_keys=True``, ...) set to True.

    Raises:
        TypeError: a keyword that names no need (the message lists the valid ones).
    """
    valid = {need.value for need in Need}
    unknown = sorted(set(flags) - valid)
    if unknown:
        raise TypeError(f"unexpected stage input flag(s) {', '.join(unknown)}; valid: {', '.join(sorted(valid))}")
    return frozenset(Need(name) for name, wanted in flags.items() if wanted)
