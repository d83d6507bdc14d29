"""The pre-LLM methods' selections as functions of plain tensors: no session, hook, adapter or model object.

Each function takes what its method reads (the vision tower's attention scores and keys, the projector's input
features, the projected tokens, a projector callable) and a budget ``keep``, an int count of tokens per sample (a
fraction is resolved by the caller: :func:`resolve_keep` ``(keep, N)``), and returns the kept indices into the
N visual tokens of each sample (with VisionZip also the merged tokens and their centres). The pruners' ``select``
calls them with the values the HF engine hands it (``StageContext``); another engine (a vLLM plugin) calls the same
functions on its own tower's values, so that both run one implementation.

- :func:`select_random`: the token count and a seed -> (B, keep) indices.
- :func:`select_fastervlm`: the [CLS] attention (B, N), and each token's view on tiled inputs -> (B, keep) indices.
- :func:`select_divprune`: the projected tokens (B, N, D) -> indices and each token's isolation.
- :func:`select_holov`: the projected tokens and the attention (B, N), and the line breaks on anyres inputs ->
  (B, keep) indices, crop by crop as the reference orders them (or ascending).
- :func:`select_zoo_prune`: the projector's inputs (B, N, F), the projected tokens and the projector -> indices and
  each token's sensitivity.
- :func:`select_visionzip`: the attention, the keys (B, N, d) and the tokens to merge, and each token's view on tiled
  inputs -> the dominant indices, the merged contextual tokens and their centres.

Which values each family gives: LLaVA-1.5 reads its tower's [CLS] row and keys at the feature layer; LLaVA-NeXT and
OneVision give each token its own view's values (``views`` / ``line_breaks`` describe the tiles and line breaks, from
:class:`vlprune.geometry.VisualGeometry`); towers without [CLS] (SigLIP, the Qwen-VL ViTs) give the attention each
token receives instead, where the method's reference does (HoloV, VisionZip on Qwen-VL). On Qwen-VL, VisionZip merges
the language model's input embeddings and puts the merged tokens in their centres' places
(:meth:`ZippedTokens.in_place`); on LLaVA it merges the projector's input features, which the caller projects.

This module and the modules it imports (``vlprune.pruners`` with its pruner modules, ``vlprune.geometry``,
``vlprune.kernels``, ``vlprune.errors``) load nothing from ``vlprune.engine``, ``vlprune.adapters`` or transformers
(``tests/test_selection_functions.py`` checks it); only the top package's ``vlprune/__init__.py``, which Python runs
first, imports the engine for the session API. :func:`llava_mlp` alone imports transformers, when called, to
recognise transformers' LLaVA projector.
"""

from __future__ import annotations

from vlprune.pruners.base import resolve_keep
from vlprune.pruners.divprune import DiverseTokens, select_divprune
from vlprune.pruners.fastervlm import select_fastervlm
from vlprune.pruners.holov import reference_crop_count, select_holov
from vlprune.pruners.random import select_random
from vlprune.pruners.visionzip import ZippedTokens, select_visionzip, visionzip_split
from vlprune.pruners.zoo_prune import LinearActLinear, SensitiveTokens, llava_mlp, select_zoo_prune

__all__ = [
    "DiverseTokens",
    "LinearActLinear",
    "SensitiveTokens",
    "ZippedTokens",
    "llava_mlp",
    "reference_crop_count",
    "resolve_keep",
    "select_divprune",
    "select_fastervlm",
    "select_holov",
    "select_random",
    "select_visionzip",
    "select_zoo_prune",
    "visionzip_split",
]
