"""The pruner protocol: what a pruner declares, what it receives and what it returns.

A pruner owns scoring and selection only. The engine (``vlprune.engine``) owns hooks, gathering, masks, positions,
cache and statistics, and calls :meth:`Pruner.select` once per stage with a :class:`StageContext`.

Stages are numbered by the decoder layer whose *input* they prune::

    vision tower ─▶ projector ─▶ [stage at layer 0] ─▶ layer 0 ─▶ ... ─▶ [stage at layer K] ─▶ layer K ─▶ ...
                                  "pre-LLM"                               "in-LLM"

so a stage at layer 0 is pre-LLM pruning, and a stage at layer K >= 1 drops tokens after layer K - 1 has run (FastV's
"K = 2" is a stage at layer 2, scored with the attention of layer 1).
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from vlprune.errors import VlpruneError
from vlprune.pruners.contexts import StageContext, VisionLayerContext
from vlprune.pruners.plans import QueryRows, StagePlan

if TYPE_CHECKING:
    from vlprune.adapters import AdapterTraits

__all__ = [  # the protocol's names, wherever they live
    "PROBE_TOKENS",
    "Pruner",
    "QueryRows",
    "RecycledTokens",
    "Selection",
    "Stage",
    "StageContext",
    "StagePlan",
    "VisionLayerContext",
    "check_budget",
    "check_layer",
    "first_true",
    "image_keep_error",
    "is_probe",
    "keep_out_of_range",
    "keep_range_of",
    "parse_budget",
    "resolve_keep",
    "sample_keep_error",
    "top_k_sorted",
]


class Stage(enum.StrEnum):
    """Where a pruner acts, as listed by ``vlprune methods``."""

    NONE = "none"
    VISION = "vision-encoder"
    PRE_LLM = "pre-LLM"
    IN_LLM = "in-LLM"
    ATTENTION = "attention-modifier"


@dataclass
class RecycledTokens:
    """New tokens a pruner builds from pruned ones (merging), entered after the kept visual tokens of each sample.

    Attributes:
        hidden: (B, M, D) hidden states of the new tokens.
        positions: (B, M) RoPE position of each new token, in the original numbering.
    """

    hidden: torch.Tensor
    positions: torch.Tensor


@dataclass
class Selection:
    """A pruner's answer at one stage.

    Attributes:
        keep_index: (B, keep) indices into the stage's N visual tokens; the engine sorts them to keep causal order,
            unless ``ordered``.
        recycled: merged tokens to add after the kept ones, or None.
        kept_hidden: (B, keep, D) new hidden states for the kept tokens, in ``keep_index`` order sorted ascending
            (a pruner that merges pruned tokens into kept ones, in place), or None.
        scores: (B, N) the scores the selection was made from, for statistics and debugging, or None.
        ordered: ``keep_index`` is in the pruner's own order (HoloV's reference concatenates its tokens crop by crop,
            most attended first). When positions are re-indexed the kept tokens enter the sequence in that order,
            numbered contiguously, so the causal order is that order; with original positions the engine sorts them
            as always (a token's position and its place in the causal order must agree). Not with ``kept_hidden``.
    """

    keep_index: torch.Tensor
    recycled: RecycledTokens | None = None
    scores: torch.Tensor | None = None
    kept_hidden: torch.Tensor | None = None
    ordered: bool = False


PROBE_TOKENS = 1 << 30
"""The token count the engine passes to :meth:`Pruner.plan` at attach time, when the real count is not known yet: the
plan's layers and needs must come out right; its token counts are not used."""


def is_probe(num_visual: int) -> bool:
    """Whether :meth:`Pruner.plan` is being asked for its layers only (see :data:`PROBE_TOKENS`)."""
    return num_visual >= PROBE_TOKENS


def check_budget(keep: object) -> int | float:
    """``keep`` if it is a valid budget: an int count of at least 1, or a float fraction in (0, 1).

    A float is always a fraction, so a whole-number float (``1.0``, ``64.0``) is refused rather than read either way:
    ``keep=1.0`` could mean "everything" or "one token".

    Raises:
        VlpruneError: another type, a count below 1, a fraction outside (0, 1), or a whole-number float; the message
            names both readings of the last.
    """
    if isinstance(keep, bool) or not isinstance(keep, int | float):
        raise VlpruneError(f"keep={keep!r} must be an int count or a float fraction in (0, 1)")
    if isinstance(keep, float):
        if keep.is_integer() and keep >= 1:
            raise VlpruneError(
                f"keep={keep!r} is ambiguous: a float is a fraction in (0, 1) and {keep!r} is not one; write "
                f"keep={int(keep)} for {int(keep)} visual token{'s' if keep != 1 else ''}, or a fraction such as 0.25 "
                f"(method none keeps every token)"
            )
        if not 0.0 < keep < 1.0:
            raise VlpruneError(f"keep={keep!r} is a fraction outside (0, 1); pass a fraction in (0, 1) or a count")
        return keep
    if keep < 1:
        raise VlpruneError(f"keep={keep} must be at least 1 visual token (or a fraction in (0, 1))")
    return keep


def parse_budget(text: str) -> int | float:
    """A budget from text (the CLI's ``--keep``, a sweep's list): ``"64"`` a count, ``"0.25"`` a fraction.

    Raises:
        VlpruneError: text that is no number, or a number that is no valid budget (see :func:`check_budget`).
    """
    try:
        value: int | float = int(text)
    except ValueError:
        try:
            value = float(text)
        except ValueError:
            raise VlpruneError(f"keep={text!r} must be a count (64) or a fraction (0.25)") from None
    return check_budget(value)


def resolve_keep(keep: int | float, num_visual: int) -> int:
    """Turn a budget into a token count: an int is a count, a float in (0, 1) a fraction of ``num_visual``.

    Raises:
        VlpruneError: an invalid budget (see :func:`check_budget`) or a count above ``num_visual``.
    """
    keep = check_budget(keep)
    if isinstance(keep, float):
        return max(1, round(keep * num_visual))
    count = keep
    if not 1 <= count <= num_visual:
        raise keep_out_of_range(count, num_visual)
    return count


def keep_out_of_range(keep: int, num_visual: int) -> VlpruneError:
    """The error for a count budget above the ``num_visual`` visual tokens it is resolved against. It stays a plain
    VlpruneError (the one type vlprune raises) and carries both numbers (:func:`keep_range_of`), so that the engine
    can name the sample or the image of a ragged batch whose count it is, where "per sample" would be untrue."""
    error = VlpruneError(
        f"keep={keep} is outside [1, {num_visual}]: the model has {num_visual} visual tokens per sample"
    )
    error.keep_range = (keep, num_visual)
    return error


def keep_range_of(error: BaseException) -> tuple[int, int] | None:
    """(keep, visual tokens) of an error from :func:`keep_out_of_range`, else None."""
    return getattr(error, "keep_range", None)


def sample_keep_error(keep: int, num_visual: int, sample: int, counts: list[int]) -> VlpruneError:
    """A count budget above the tokens of ``sample`` of a ragged batch whose samples have ``counts`` visual tokens."""
    return VlpruneError(
        f"keep={keep} is outside [1, {num_visual}] for sample {sample} of the batch, which has {counts[sample]} "
        f"visual tokens (the samples have {', '.join(map(str, counts))}; a count budget applies to each sample: pass "
        f"at most {min(counts)}, or a fraction such as 0.25)"
    )


def image_keep_error(
    keep: int, num_visual: int, image: int, tokens: int, sample: int | None = None, item: str = "image"
) -> VlpruneError:
    """A count budget above what ``image`` (of ``sample``, when known) of a batch gives inside the vision tower: its
    ``tokens`` visual tokens, or, for an untiled view, the view's ``num_visual`` patches; ``item`` names what the
    tower encoded."""
    of_sample = "" if sample is None else f" (sample {sample})"
    patches = "" if num_visual == tokens else f", {num_visual} patches in its view"
    return VlpruneError(
        f"keep={keep} is outside [1, {num_visual}] for {item} {image} of the batch{of_sample}, which has {tokens} "
        f"visual tokens{patches}; a count budget applies to each {item} in the vision tower: pass at most "
        f"{num_visual}, or a fraction such as 0.25"
    )


def check_layer(layer: int, num_layers: int, *, minimum: int = 0, method: str) -> int:
    """Validate a decoder layer index for a pruner; negative indices count from the end."""
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise VlpruneError(f"layer={layer!r} for {method} must be an int")
    resolved = layer + num_layers if layer < 0 else layer
    if not minimum <= resolved < num_layers:
        raise VlpruneError(
            f"layer={layer} for {method} is out of range: the language model has {num_layers} layers, "
            f"valid layers are {minimum}..{num_layers - 1}"
        )
    return resolved


@dataclass
class Pruner:
    """Base class of every pruner. Subclasses are dataclasses whose fields are the method's options; they set the
    class attributes ``name``, ``stage`` and ``reference`` and implement :meth:`plan` and :meth:`select`.

    Attributes:
        keep: visual tokens that reach the language model (an int), or the fraction kept (a float in (0, 1)).
        modifier: an attention modifier (VAR) the engine runs with this pruner, set by ``create("METHOD+var")``.
        tokenizer: the model's tokenizer, for methods that read the instruction's words (MMTok), bound by
            :meth:`use_tokenizer` (``vlprune.load``, the pipeline, sweeps and benchmarks bind it), or None.
    """

    name: ClassVar[str] = ""
    stage: ClassVar[Stage] = Stage.NONE
    reference: ClassVar[str] = ""
    default_positions: ClassVar[str] = "original"
    """How the method's reference numbers RoPE positions after pruning: "original" (kept tokens keep theirs) or
    "reindex" (the shortened prompt is numbered contiguously). ``vlprune.attach(positions=None)``, the API, the CLI and
    the lmms-eval wrapper default to it; an explicit ``positions=`` overrides it."""
    cls_substitute: ClassVar[str | None] = None
    """What the method's reference reads instead of the [CLS] attention on towers without a [CLS] token (SigLIP, the
    Qwen-VL ViTs): "received" hands stages that ask for ``vision_cls_attention`` the attention each token receives
    (``StageContext.vision_received_attention``) instead; None refuses such towers."""

    keep: int | float | None = None
    modifier: Any = field(default=None, init=False, repr=False, compare=False)
    tokenizer: Any = field(default=None, init=False, repr=False, compare=False)

    def use_tokenizer(self, tokenizer: Any) -> Pruner:
        """Bind the model's tokenizer (a processor is taken for its ``.tokenizer``); returns the pruner."""
        self.tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
        return self

    def reference_positions(self) -> str:
        """The position handling of the reference for this configuration (see :attr:`default_positions`); methods
        whose reference numbers differently per variant override it."""
        return self.default_positions

    def plan(self, num_visual: int, num_layers: int) -> list[StagePlan]:
        """The stages this pruner runs for a model with ``num_visual`` visual tokens and ``num_layers`` layers.

        The stage layers and what each stage asks for may depend on ``num_layers`` but not on ``num_visual``: the
        engine installs its hooks before it knows how many visual tokens a call brings, calling ``plan`` with
        :data:`PROBE_TOKENS` (see :func:`is_probe`); budgets that cannot be resolved then may keep every token.
        """
        raise NotImplementedError

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """A pruner written against family names (overriding :meth:`plan_for_family` or :meth:`vision_budget`, not
        their traits forms) is asked through them: its traits forms call them with the family's name."""
        super().__init_subclass__(**kwargs)
        for by_name, by_traits in _BY_NAME_FORMS.items():
            if by_name in vars(cls) and by_traits not in vars(cls):
                setattr(cls, by_traits, _asking_by_name(by_name))

    def plan_for(self, traits: AdapterTraits, num_visual: int, num_layers: int) -> list[StagePlan]:
        """The stages for a model with ``traits`` (:class:`vlprune.adapters.AdapterTraits`): :meth:`plan`, unless the
        method's reference runs other stages on such a model (FlowCut's anyres path adds a language-model stage)."""
        return self.plan(num_visual, num_layers)

    def plan_for_family(self, family: str, num_visual: int, num_layers: int) -> list[StagePlan]:
        """:meth:`plan_for` the registered family named ``family`` ("llava", "llava-next", ...)."""
        return _traits_form(type(self), "plan_for")(self, _traits_of(family), num_visual, num_layers)

    def select(self, ctx: StageContext) -> Selection:
        """Choose the visual tokens to keep at one stage."""
        raise NotImplementedError

    @classmethod
    def prunes_vision_tower(cls) -> bool:
        """Whether the method prunes inside the vision tower: whether it lists layers there (:meth:`vision_layers`)."""
        return cls.vision_layers is not Pruner.vision_layers

    def vision_layers(self, num_layers: int, feature_layer: int) -> list[int]:
        """Vision encoder layers at which :meth:`select_in_vision` runs (none by default).

        Args:
            num_layers: layers of the vision encoder.
            feature_layer: index of the layer whose output the projector reads.
        """
        return []

    def vision_budget_for(self, traits: AdapterTraits, image_tokens: int, view_patches: int, views: int) -> int:
        """Patches each view (crop) of an image keeps inside the vision tower of a model with ``traits``, for an image
        that gives ``image_tokens`` visual tokens from ``views`` views of ``view_patches`` patches each (on a packed
        tower in merge groups: one per token); by default the budget resolved against one view's patches."""
        return resolve_keep(self._required_keep(view_patches), view_patches)

    def vision_budget(self, family: str, image_tokens: int, view_patches: int, views: int) -> int:
        """:meth:`vision_budget_for` the registered family named ``family``."""
        form = _traits_form(type(self), "vision_budget_for")
        return form(self, _traits_of(family), image_tokens, view_patches, views)

    def select_in_vision(self, ctx: VisionLayerContext) -> torch.Tensor | None:
        """At a vision layer listed by :meth:`vision_layers`: None to keep every token, or a (B, T) bool tensor of the
        tokens that continue after this layer ([CLS] included). Each image keeps as many as it likes, but on the last
        pruning layer before the feature layer every image must keep exactly ``ctx.keep`` patches."""
        raise NotImplementedError

    def _required_keep(self, num_visual: int) -> int:
        if self.keep is None:
            raise VlpruneError(f"method {self.name!r} needs a budget: pass keep=<count> or keep=<fraction in (0, 1)>")
        return resolve_keep(self.keep, num_visual)


def top_k_sorted(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest scores per row, in ascending index order. scores: (B, N) -> (B, k)."""
    if k >= scores.shape[-1]:
        return torch.arange(scores.shape[-1], device=scores.device).expand(scores.shape[0], -1)
    return torch.topk(scores, k, dim=-1).indices.sort(dim=-1).values


def first_true(mask: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, width) the columns of the first ``width`` True entries of each row of ``mask`` (B, L), ascending, and
    (B, width) validity; a row with fewer repeats its last one (column 0 when it has none). The shapes do not
    depend on the data (unlike ``nonzero``), so nothing is read back from the device and a graph can be captured."""
    order = torch.sort((~mask).to(torch.uint8), dim=1, stable=True).indices[:, :width]  # True columns first
    count = mask.sum(dim=1, keepdim=True)
    valid = torch.arange(width, device=mask.device)[None, :] < count
    last = torch.gather(order, 1, (count - 1).clamp(min=0, max=max(width - 1, 0)))
    return torch.where(valid, order, last), valid


_BY_NAME_FORMS = {"plan_for_family": "plan_for", "vision_budget": "vision_budget_for"}
"""The family-name form of each method the engine asks by traits."""


def _asking_by_name(by_name: str) -> Callable[..., Any]:
    """A traits form that asks the family-name form ``by_name`` with the traits' family."""

    def ask(self: Pruner, traits: AdapterTraits, *args: int) -> Any:
        return getattr(self, by_name)(traits.family, *args)

    ask.asks_by_name = True  # type: ignore[attr-defined]
    return ask


def _traits_form(cls: type, name: str) -> Callable[..., Any]:
    """The nearest traits form ``name`` in ``cls``'s MRO written as such (not one asking the family-name form), so
    that an override of the family-name form that calls its parent's reaches the parent's rule, not itself."""
    for klass in cls.__mro__:
        form = vars(klass).get(name)
        if form is not None and not getattr(form, "asks_by_name", False):
            return form
    raise AttributeError(name)


def _traits_of(family: str) -> AdapterTraits:
    """The registered family's traits, imported when asked: the pruners load nothing of the adapters otherwise, so
    that the selections can run without them (:mod:`vlprune.pruners.selection`)."""
    from vlprune.adapters import traits_of

    return traits_of(family)
