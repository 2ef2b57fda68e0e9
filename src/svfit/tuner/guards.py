"""What SVFit refuses to adapt, and the situations the layer must recognise: quantized or integer weights
(detected by class, never by dtype), weights not materialised yet, already-sharded weights, hooks a fused compute
path would skip."""

from __future__ import annotations

import torch
from torch import nn


class BaseWeightMismatchError(ValueError):
    """An SVFit adapter is being loaded onto base weights other than those it was trained on."""


# Modules from these packages hold quantized weights that an SVD must not see.
_QUANTIZED_MODULE_PREFIXES = (
    "bitsandbytes",
    "auto_gptq",
    "gptqmodel",
    "awq",
    "hqq",
    "optimum.quanto",
    "quanto",
    "torchao",
    "eetq",
    "fbgemm_gpu",
    "compressed_tensors",
    "aqlm",
    "vptq",
    "transformers.integrations",
)
_QUANTIZED_ATTRIBUTES = ("qweight", "quant_state", "W_q", "weight_scale", "weight_scale_inv", "SCB")


def check_supported_weight(module: nn.Module, name: str = "") -> None:
    """Refuse quantized or integer weights, detected by class rather than by dtype (4-bit float-storage
    parameters look like ordinary float tensors)."""
    where = f"'{name}'" if name else type(module).__name__
    cls = type(module)
    weight = getattr(module, "weight", None)
    reason = None
    if cls.__module__.startswith(_QUANTIZED_MODULE_PREFIXES):
        reason = f"it is a {cls.__module__}.{cls.__name__} layer"
    elif any(hasattr(module, a) for a in _QUANTIZED_ATTRIBUTES):
        reason = f"it carries quantization state ({', '.join(a for a in _QUANTIZED_ATTRIBUTES if hasattr(module, a))})"
    elif weight is not None and type(weight) not in (torch.Tensor, nn.Parameter) and not is_dtensor(weight):
        # (a DTensor is a sharded plain weight: gathered for the SVD, svfit.tuner.factorization.gathered)
        reason = f"its weight is a {type(weight).__module__}.{type(weight).__name__}, not a plain tensor"
    elif weight is not None and not weight.is_floating_point():
        reason = f"its weight is stored as {weight.dtype}"
    if reason is None and weight is not None and weight.device.type == "meta":
        raise ValueError(
            f"SVFit cannot adapt {where}: its weight is on the meta device (not loaded yet, or offloaded by a "
            "device_map). SVFit takes the SVD of the actual weight: load the model with real weights (no "
            "init_empty_weights, no disk/CPU offload in device_map) before applying SVFit."
        )
    if reason:
        raise TypeError(
            f"SVFit cannot adapt {where}: {reason}. SVFit needs the full-precision weight for its SVD. Load the base "
            "model without quantization (drop quantization_config / load_in_4bit / load_in_8bit) or dequantize it "
            "first (e.g. model.dequantize()), then apply SVFit; or exclude this module via exclude_modules."
        )


def global_module_hooks() -> bool:
    from torch.nn.modules import module as m

    return bool(
        m._global_forward_hooks or m._global_forward_pre_hooks or m._global_backward_hooks
        or m._global_backward_pre_hooks
    )


def is_dtensor(t) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return False
    return isinstance(t, DTensor)


def under_init_empty_weights() -> bool:
    """True inside accelerate's init_empty_weights (PEFT's low_cpu_mem_usage), which puts new parameters on meta."""
    probe = nn.Module()
    probe.register_parameter("p", nn.Parameter(torch.empty(0)))
    return probe.p.device.type == "meta"


def check_adapter_name(adapter_name: str, prefix: str) -> None:
    # PEFT strips the adapter name from checkpoint keys by string surgery; a name inside the prefix corrupts them
    if not adapter_name or adapter_name in prefix or adapter_name == "__base__":
        raise ValueError(
            f"Adapter name {adapter_name!r} is not allowed with SVFit (it collides with the parameter prefix "
            f"'{prefix}' or the reserved '__base__'); choose another name."
        )
