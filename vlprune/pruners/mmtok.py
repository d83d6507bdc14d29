"""MMTok: keep the visual tokens that best cover the instruction's words and the image, by greedy maximum coverage.

Reference: Dong et al., "MMTok: Multimodal Coverage Maximization for Efficient Inference of VLMs" (arXiv 2508.18264,
ICLR 2026); official code github.com/Ironieser/MMTok (``mmtok/core/semantic_selector.py``: ``mm_coverage_selection``
and ``greedy_merged_jit_kernel``; ``mmtok/core/mmtok_core.py``: ``apply_selection``,
``_encode_text_with_token_pooling``, ``apply_selection_preprocess_qwen``; ``mmtok/core/text_processor.py``; the
Qwen2.5-VL path in ``mmtok/qwen/qwen2_5_VLmodel_mmtok.py`` and ``mmtok/qwen/modeling_qwen2_5_vl_mmtok.py``).

What the reference does and vlprune reproduces, per sample, on

- ``x`` (n, D): the projected visual tokens (the language model's input embeddings of the image tokens);
- ``x_clip`` (n, F): the vision tower's features: on LLaVA the CLIP features at the feature layer without [CLS] (what
  the projector receives, ``Need.VISION_FEATURES``); on Qwen-VL the last ViT block's output averaged over each
  token's 2 x 2 merge group. vlprune's ``vision_features`` on Qwen-VL is the merger's input per token, the m² patches
  of the group concatenated (m² · 1280 wide, before the merger's own LayerNorm): the reference's mean is the mean of
  those m² slices, which :meth:`MMTok.select` takes;
- ``z`` (m, D): the instruction's words, embedded by the language model's token-embedding table:

1. Unit vectors, as the reference's ``_l2_normalize``: ``v / max(||v||, 1e-8)`` in the inputs' dtype, then float32.
2. ``P = softmax(cos(z, x) / τ_tv, over the n tokens) / m`` (m x n) and ``Q = softmax(cos(x_clip, x_clip) / τ_vv,
   per row) / n`` (n x n); ``C = [P; α·Q]`` ((m + n) x n), α = 0.5, τ_vv = 0.2; τ_tv = 0.02 on LLaVA (``mmtok()``'s
   config) and 0.01 on Qwen-VL (``mmtok_qwen2_5_vl()``'s config; ``MMTokCore``'s own default 0.02 is overridden
   there).
3. Greedy maximum coverage (``greedy_merged_jit_kernel``): ``best = 0`` over the rows; ``keep`` times, ``gain_j =
   Σ_rows max(0, C[row, j] - best[row])`` over the tokens not yet taken (taken ones at -inf), pick the first
   argmax, ``best = max(best, C[:, pick])``. The picks are sorted; the rest are dropped (no merging).

The instruction's words (``mmtok/core/text_processor.py`` and ``_encode_text_with_token_pooling``), from the token ids
of the text after the first visual token (``Need.INSTRUCTION_IDS``), decoded with the bound tokenizer
(``skip_special_tokens=True``). The reference hooks the user's message, before the chat template adds anything after
it; vlprune reads the prompt, so :func:`strip_role_markers` first removes the chat template's assistant turn that
follows the question (a trailing "ASSISTANT:", "assistant" or "[/INST]", repeated, ignoring case), then

- LLaVA (``text="keywords"``, ``extract_keywords_simple``): remove the two lmms-eval suffixes (:data:`PROMPT_SUFFIXES`),
  take the ``\\b\\w+\\b`` words, drop the stop-words (:data:`NON_VISUAL_WORDS`, compared in lower case); when none is
  left, the suffix-stripped text itself, split on white space;
- Qwen-VL (``text="question"``, ``apply_selection_preprocess_qwen``): ``"Question: " + question``, nothing removed
  (the reference's ``clean_text`` switch is never set), split on white space;
- an empty instruction becomes the reference's LLaVA default "What do you see in this image?".

The words are tokenised as the reference does (:func:`word_token_ids`): the tokenizer called on the word list with
``is_split_into_words=True`` (each word on its own), and a leading BOS dropped when more than one id came out.

Deviations, each for a reason:
- ``keep`` is the number of tokens kept per sample, the reference's ``target_vision_tokens`` on LLaVA (64/128/192).
  On Qwen-VL, with no ``keep``, ``floor(0.2 · n)`` tokens (at least one) as the reference's ``retain_ratio``, whose
  value in ``mmtok_qwen2_5_vl()``, its example and its lmms-eval wrapper is 0.2 (the environment's
  ``TOKEN_RETAIN_RATIO`` default 0.1 is read only when no ``retain_ratio`` was set, which its entry points never do);
  ``retain_ratio=`` changes it.
- LLaVA-1.5 padding patches: the reference can exclude the patches that fall entirely inside LLaVA's
  ``expand2square`` padding (from the original image size, LLaVA-1.5 only). vlprune's stage inputs do not carry the
  original image size, and transformers' LLaVA-1.5 processors resize and centre-crop rather than pad, so there is
  no padding to exclude: every token competes.
- LLaVA-NeXT (the reference's ``prepare_inputs_labels_for_multimodal_mmtok``): each crop (the base view and each tile)
  runs its own selection with the full text rows and its own ``Q``, and the ``image_newline`` tokens of a tiled image
  are dropped (``restore_image_features_sorted`` places the kept tile tokens without them). vlprune does the same
  from ``ctx.geometry``'s crops with one per-sample budget shared among the crops in proportion to their tokens (the
  reference gives every crop ``target_vision_tokens``, so its total grows with the grid) and selects among the
  unpadded tile tokens (the reference does not unpad); line breaks are never kept.
- Unlike the reference, whose text rows are shared by the batch (its hook stores one question), each sample uses its
  own instruction; ``select_mmtok`` pads the text rows and places each sample's padding after its ``Q`` rows, so a
  sample's gains are summed over the same rows, in the same order, as alone.
- Qwen-VL's kept tokens keep their multimodal positions (the reference gathers the full sequence's ``position_ids``);
  on LLaVA the shortened prompt is numbered contiguously (the reference rebuilds ``inputs_embeds``; default
  ``positions="reindex"``). Pruning happens at the input of decoder layer 0.

The selection is :func:`select_mmtok`, a function of plain tensors; :func:`coverage_matrix` builds ``C`` and
:func:`greedy_coverage` runs the greedy. The text processing is :func:`instruction_words` (text in, words out) and
:func:`word_token_ids` (words and a tokenizer in, ids out).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from vlprune.errors import VlpruneError
from vlprune.needs import Need
from vlprune.pruners import register
from vlprune.pruners.base import Pruner, Selection, Stage, StageContext, StagePlan, is_probe
from vlprune.pruners.groups import proportional_crop_shares
from vlprune.pruners.options import check_choice

NON_VISUAL_WORDS = frozenset(
    {
        "a", "an", "the",
        "is", "are", "was", "were", "be", "been", "being",
        "have", "has", "had", "do", "does", "did",
        "it", "they", "he", "she", "we", "you", "i",
        "what", "where", "when", "why", "how", "who", "which",
        "and", "or", "but", "so", "if", "then",
        "question", "answer",
        "to", "for", "with", "by", "from", "at", "into", "onto", "upon",
    }
)  # fmt: skip
"""The reference's stop-words (``NON_VISUAL_WORDS`` in ``mmtok/core/text_processor.py``), compared in lower case."""

PROMPT_SUFFIXES = (
    "Answer the question using a single word or phrase.",
    "Answer with the option's letter from the given choices directly.",
)
"""The lmms-eval prompt suffixes the reference removes (``PROMPT_1``, ``PROMPT_2``), wherever they occur."""

DEFAULT_QUESTION = "What do you see in this image?"
"""The reference's question when its hook caught none (``clip_encoder_mmtok.py``)."""

TEXT_MODES = ("keywords", "question")
ALPHA = 0.5
VV_TEMPERATURE = 0.2
TV_TEMPERATURE = {"llava": 0.02, "qwen": 0.01}
RETAIN_RATIO = 0.2
_WORD = re.compile(r"\b\w+\b")
_ROLE_MARKER = re.compile(r"(?:\s*(?:\[/INST\]|\bassistant\b\s*:?))+\s*$", re.IGNORECASE)
_UNIT_EPS = 1e-8  # the reference's _l2_normalize clamp


def strip_role_markers(text: str) -> str:
    """``text`` without the chat template's assistant turn after the question: trailing "ASSISTANT:" (Vicuna),
    "assistant" (ChatML, Qwen-VL) or "[/INST]" (Mistral) markers, ignoring case, and the white space around them."""
    return _ROLE_MARKER.sub("", text).strip()


def instruction_words(text: str, mode: str = "keywords") -> list[str]:
    """The words MMTok embeds for an instruction ``text`` (the decoded text after the image).

    ``mode="keywords"``: the reference's LLaVA path (``extract_keywords_simple``): suffixes removed, stop-words
    dropped, the suffix-stripped text split on white space when no word is left. ``mode="question"``: its Qwen-VL path,
    ``"Question: " + text`` split on white space. Both first strip the chat template's role markers; an empty
    instruction is :data:`DEFAULT_QUESTION`."""
    check_choice("text", mode, TEXT_MODES)
    question = strip_role_markers(text) or DEFAULT_QUESTION
    if mode == "question":
        return f"Question: {question}".split()
    for suffix in PROMPT_SUFFIXES:
        question = question.replace(suffix, "")
    words = [word for word in _WORD.findall(question) if word.lower() not in NON_VISUAL_WORDS]
    return words if words else question.split()


def word_token_ids(words: list[str], tokenizer: Any) -> list[int]:
    """The token ids of ``words`` as the reference's ``_encode_text_with_token_pooling`` makes them: each word
    tokenised on its own (``is_split_into_words=True``, truncated to the tokenizer's maximum), and a leading BOS
    dropped when more than one id came out."""
    ids = list(tokenizer(words, is_split_into_words=True, truncation=True)["input_ids"])
    if len(ids) > 1 and ids[0] == tokenizer.bos_token_id:
        ids = ids[1:]
    return ids


def check_positive(option: str, value: object, *, below_one: bool = False) -> float | None:
    """``value`` as a float if it is None or a positive finite number (below 1 with ``below_one``); else an error."""
    if value is None:
        return None
    number = float(value) if isinstance(value, int | float) and not isinstance(value, bool) else math.nan
    if not math.isfinite(number) or number <= 0 or (below_one and number >= 1):
        valid = "a number in (0, 1)" if below_one else "a positive number"
        raise VlpruneError(f"{option}={value!r} must be {valid}")
    return number


class CoveringTokens(NamedTuple):
    """What :func:`select_mmtok` returns."""

    index: torch.Tensor
    """(B, keep) long indices of the kept tokens, ascending."""
    gain: torch.Tensor
    """(B, N) float32 each token's coverage gain at the first step (its own row sums: 1/m of P's mass, α/n of Q's);
    0 at line breaks."""


def _unit(values: torch.Tensor) -> torch.Tensor:
    """The reference's ``_l2_normalize(v).float()``: normalised in the values' own dtype, then float32."""
    return (values / values.norm(dim=-1, keepdim=True).clamp(min=_UNIT_EPS)).float()


def coverage_matrix(
    visual: torch.Tensor,
    vision: torch.Tensor,
    words: torch.Tensor,
    alpha: float = ALPHA,
    tv_temperature: float = TV_TEMPERATURE["llava"],
    vv_temperature: float = VV_TEMPERATURE,
) -> torch.Tensor:
    """One sample's ``C = [P; α·Q]``, ((m + n), n) float32, from its visual tokens (n, D), vision features (n, F) and
    word embeddings (m, D)."""
    unit_visual, unit_vision, unit_words = _unit(visual), _unit(vision), _unit(words)
    count, rows = unit_visual.shape[0], unit_words.shape[0]
    text = torch.softmax((unit_words @ unit_visual.T) * (1.0 / tv_temperature), dim=1) / max(rows, 1)
    image = torch.softmax((unit_vision @ unit_vision.T) * (1.0 / vv_temperature), dim=1) / count
    return torch.cat([text, image * alpha], dim=0)


def greedy_coverage(combined: torch.Tensor, keep: int, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Greedy maximum coverage, batched: (B, R, N) coverage matrices -> (B, keep) picks in the order taken.

    ``rows`` (B, R) marks the real rows (None: all); unreal rows must be zero, so they add nothing to a gain. Each
    step's gain is ``Σ_rows max(0, C[row, j] - best[row])`` over the untaken tokens; ties go to the lowest index."""
    if rows is not None:
        combined = combined * rows[..., None].to(combined.dtype)
    batch, _, count = combined.shape
    best = combined.new_zeros(combined.shape[:2])
    taken = torch.zeros(batch, count, dtype=torch.bool, device=combined.device)
    picks = torch.empty(batch, keep, dtype=torch.long, device=combined.device)
    for step in range(keep):
        gain = (combined - best[..., None]).clamp_min(0).sum(dim=1).masked_fill(taken, float("-inf"))
        pick = gain.argmax(dim=-1)
        picks[:, step] = pick
        taken.scatter_(1, pick[:, None], True)
        column = torch.gather(combined, 2, pick[:, None, None].expand(-1, combined.shape[1], 1))[..., 0]
        best = torch.maximum(best, column)
    return picks


def select_mmtok(
    visual: torch.Tensor,
    vision: torch.Tensor,
    words: torch.Tensor,
    words_mask: torch.Tensor | None,
    keep: int,
    *,
    alpha: float = ALPHA,
    tv_temperature: float = TV_TEMPERATURE["llava"],
    vv_temperature: float = VV_TEMPERATURE,
    crops: torch.Tensor | None = None,
) -> CoveringTokens:
    """MMTok's kept tokens: greedy maximum coverage of ``[P; α·Q]``.

    Args:
        visual: (B, N, D) the visual tokens as they enter the language model.
        vision: (B, N, F) the vision tower's features of the same tokens (``x_clip``).
        words: (B, M, D) the instruction words' input embeddings, padded.
        words_mask: (B, M) which of them are real, or None for all.
        keep: tokens kept per sample (a count in [1, N], or in [1, tokens outside line breaks] with ``crops``).
        alpha, tv_temperature, vv_temperature: the weight of ``Q`` and the two softmax temperatures.
        crops: (B, N) each token's crop (vision-tower input, any ids) with -1 at line breaks, when some token comes
            from a tile (LLaVA-NeXT, OneVision), else None. With crops each crop runs its own selection on its share
            of the budget (in proportion to its tokens) and line breaks are never kept.

    Returns:
        the kept indices, ascending, and each token's first-step gain (:class:`CoveringTokens`).

    Raises:
        VlpruneError: ``keep`` out of range, or a bad ``alpha`` or temperature.
    """
    alpha = check_positive("alpha", alpha)
    tv_temperature = check_positive("tv_temperature", tv_temperature)
    vv_temperature = check_positive("vv_temperature", vv_temperature)
    batch, count = visual.shape[:2]
    if words_mask is None:
        words_mask = torch.ones(words.shape[:2], dtype=torch.bool, device=words.device)
    real = [words[b][words_mask[b]] for b in range(batch)]
    options = {"alpha": alpha, "tv_temperature": tv_temperature, "vv_temperature": vv_temperature}
    if crops is None:
        if isinstance(keep, bool) or not isinstance(keep, int) or not 1 <= keep <= count:
            raise VlpruneError(f"keep={keep!r} must be an int count in [1, {count}] (the visual tokens per sample)")
        matrices = [coverage_matrix(visual[b], vision[b], real[b], **options) for b in range(batch)]
        combined, rows = _stack_rows(matrices)
        gain = (combined.clamp_min(0) * rows[..., None]).sum(dim=1)
        return CoveringTokens(greedy_coverage(combined, keep, rows).sort(dim=-1).values, gain)
    per_sample = [_select_per_crop(visual[b], vision[b], real[b], crops[b], keep, options) for b in range(batch)]
    return CoveringTokens(torch.stack([pick for pick, _ in per_sample]), torch.stack([gain for _, gain in per_sample]))


def _stack_rows(matrices: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The samples' coverage matrices as one (B, R, N) batch, each padded with zero rows at its end (after its Q
    rows, so that its real rows are summed in the order they are alone), and (B, R) which rows are real."""
    height = max(matrix.shape[0] for matrix in matrices)
    combined = torch.stack([torch.nn.functional.pad(matrix, (0, 0, 0, height - len(matrix))) for matrix in matrices])
    rows = (
        torch.arange(height, device=combined.device)[None]
        < torch.tensor([len(matrix) for matrix in matrices], device=combined.device)[:, None]
    )
    return combined, rows


def _select_per_crop(
    visual: torch.Tensor, vision: torch.Tensor, words: torch.Tensor, crops: torch.Tensor, keep: int, options: dict
) -> tuple[torch.Tensor, torch.Tensor]:
    """(keep,) ascending indices and (N,) first-step gains for one tiled sample: each crop's share of ``keep``
    picked by the crop's own greedy; line breaks never kept."""
    patches = int((crops >= 0).sum())
    if isinstance(keep, bool) or not isinstance(keep, int) or not 1 <= keep <= patches:
        raise VlpruneError(
            f"keep={keep!r} must be an int count in [1, {patches}] (the visual tokens of a sample "
            "outside its line breaks, which MMTok never keeps on tiled images)"
        )
    kept = []
    gains = torch.zeros(len(crops), dtype=torch.float32, device=visual.device)
    for tokens, share in proportional_crop_shares(crops, keep):
        combined = coverage_matrix(visual[tokens], vision[tokens], words, **options)
        gains[tokens] = combined.clamp_min(0).sum(dim=0)
        if share:
            kept.append(tokens[greedy_coverage(combined[None], share)[0]])
    return torch.cat(kept).sort().values, gains


def pooled_vision_features(features: torch.Tensor, projector: Any) -> torch.Tensor:
    """(B, N, F) ``x_clip`` from ``ctx.vision_features``: on a merged tower (Qwen-VL, whose token projector takes the
    m² patches of a token concatenated, ``projector.patches``) the mean over those m² patches, as the reference's
    ``img_features.reshape(-1, 4, D).mean(dim=1)``; otherwise the features as they are."""
    patches = getattr(projector, "patches", 1)
    if patches == 1:
        return features
    return features.unflatten(-1, (patches, features.shape[-1] // patches)).mean(dim=-2)


@register
@dataclass
class MMTok(Pruner):
    """Options: ``alpha`` (the weight of the image coverage Q, 0.5), ``tv_temperature`` (the word-token softmax
    temperature; None: 0.02 on LLaVA, 0.01 on Qwen-VL, as the reference's entry points), ``vv_temperature`` (0.2),
    ``text`` ("keywords": the reference's LLaVA word filter; "question": its Qwen-VL "Question: ..." text; None: the
    family's), ``retain_ratio`` (the share kept on Qwen-VL when ``keep`` is not given, 0.2)."""

    name = "mmtok"
    stage = Stage.PRE_LLM
    reference = "MMTok, ICLR 2026 (Ironieser/MMTok)"
    default_positions = "reindex"  # the LLaVA reference shortens inputs_embeds; Qwen-VL keeps its multimodal positions

    alpha: float = ALPHA
    tv_temperature: float | None = None
    vv_temperature: float = VV_TEMPERATURE
    text: str | None = None
    retain_ratio: float = RETAIN_RATIO

    def __post_init__(self) -> None:
        self.alpha = check_positive("alpha", self.alpha)
        self.tv_temperature = check_positive("tv_temperature", self.tv_temperature)
        self.vv_temperature = check_positive("vv_temperature", self.vv_temperature)
        self.retain_ratio = check_positive("retain_ratio", self.retain_ratio, below_one=True)
        if self.text is not None:
            check_choice("text", self.text, TEXT_MODES)

    def plan(self, num_visual: int, num_layers: int) -> list[StagePlan]:
        return [StagePlan(layer=0, keep=self._required_keep(num_visual), needs=self._needs())]

    def plan_for(self, traits: Any, num_visual: int, num_layers: int) -> list[StagePlan]:
        if not traits.packed_tower or self.keep is not None:
            return self.plan(num_visual, num_layers)
        keep = 1 if is_probe(num_visual) else max(1, int(self.retain_ratio * num_visual))
        return [StagePlan(layer=0, keep=keep, needs=self._needs())]

    @staticmethod
    def _needs() -> frozenset[Need]:
        return frozenset({Need.INSTRUCTION_IDS, Need.VISION_FEATURES})

    @torch.no_grad()
    def select(self, ctx: StageContext) -> Selection:
        tokenizer = self.tokenizer
        if tokenizer is None:
            raise VlpruneError(
                "mmtok needs the tokenizer to read the instruction's words: vlprune.load and Pipeline bind the "
                "processor's automatically; with vlprune.attach, call pruner.use_tokenizer(processor.tokenizer) first"
            )
        assert ctx.instruction_ids is not None and ctx.input_embeddings is not None and ctx.vision_features is not None
        # A merged tower (Qwen-VL: the token projector takes m² patches) runs the reference's Qwen-VL settings.
        merged = getattr(ctx.projector, "patches", 1) > 1
        mode = self.text or ("question" if merged else "keywords")
        temperature = self.tv_temperature or TV_TEMPERATURE["qwen" if merged else "llava"]
        words, mask = self.word_embeddings(ctx, tokenizer, mode)
        geometry = ctx.geometry
        # Whether any token comes from a tile is known on the host; only then does the per-crop path run.
        crops = geometry.crop if geometry is not None and geometry.has_tiles else None
        kept = select_mmtok(
            ctx.visual_hidden,
            pooled_vision_features(ctx.vision_features, ctx.projector),
            words,
            mask,
            ctx.keep,
            alpha=self.alpha,
            tv_temperature=temperature,
            vv_temperature=self.vv_temperature,
            crops=crops,
        )
        return Selection(keep_index=kept.index, scores=kept.gain)

    @staticmethod
    def word_embeddings(ctx: StageContext, tokenizer: Any, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, M, D) the input embeddings of each sample's instruction words, padded, and (B, M) which are real."""
        ids = []
        for row, real in zip(ctx.instruction_ids, ctx.instruction_mask, strict=True):
            text = tokenizer.decode(row[real].tolist(), skip_special_tokens=True)
            ids.append(word_token_ids(instruction_words(text, mode), tokenizer))
        width = max(1, max(len(row) for row in ids))
        device = ctx.instruction_ids.device
        padded = torch.tensor([row + [0] * (width - len(row)) for row in ids], dtype=torch.long, device=device)
        mask = (
            torch.arange(width, device=device)[None] < torch.tensor([len(row) for row in ids], device=device)[:, None]
        )
        return ctx.input_embeddings(padded), mask


__all__ = [
    "DEFAULT_QUESTION",
    "NON_VISUAL_WORDS",
    "PROMPT_SUFFIXES",
    "CoveringTokens",
    "MMTok",
    "coverage_matrix",
    "greedy_coverage",
    "instruction_words",
    "pooled_vision_features",
    "select_mmtok",
    "strip_role_markers",
    "word_token_ids",
]
