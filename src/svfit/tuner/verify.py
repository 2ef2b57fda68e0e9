"""Checks that an adapter meets the base weights it was trained on (fingerprints, shapes, dtypes), and that merging
would not change modules that share a weight with an adapted one."""

from __future__ import annotations

from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ..core.fingerprint import Fingerprint, compare
from .guards import BaseWeightMismatchError
from .layer import SVFitLayer


def verify_base_weights(model: nn.Module, config) -> None:
    """Check every base weight an adapter was trained on against ``model``; raise on the first mismatch (in the
    model's module order)."""
    recorded = {key: Fingerprint.from_json(fp) for key, fp in config.base_fingerprints.items()}
    modules = dict(model.named_modules())
    missing = [key for key in recorded if key not in modules]
    if missing:
        raise BaseWeightMismatchError(
            f"This SVFit adapter was trained on a model with a module '{missing[0]}', which this model lacks: it is "
            f"not the adapter's base model{base_hint(config)}."
        )
    for key, module in modules.items():
        if key not in recorded:
            continue
        if isinstance(module, BaseTunerLayer):
            if module.merged:
                raise ValueError(
                    f"module '{key}' has merged adapters {module.merged_adapters}: call unmerge_adapter() before "
                    "adding an SVFit adapter (the SVD must see the pre-trained weight)"
                )
            module = module.get_base_layer()
        weight = getattr(module, "weight", None)
        if weight is None:
            raise BaseWeightMismatchError(f"Module '{key}' of this model has no weight; wrong base model?")
        match, current = compare(recorded[key], weight)
        if match == "different":
            raise BaseWeightMismatchError(
                f"This SVFit adapter was trained on a different base model: module '{key}' does not match "
                f"(adapter: {recorded[key].describe()}; this model: {current.describe()}). SVFit recomputes the "
                f"singular vectors from the base weights, so load it onto the model it was trained on"
                f"{base_hint(config)}. (Creating a new adapter? An SVFitConfig records the weights it was first "
                "applied to: pass a fresh SVFitConfig for another model.)"
            )
        if match == "close" and not config.save_bases:
            raise BaseWeightMismatchError(other_dtype_message(key, recorded[key], current))


def other_dtype_message(key: str, recorded: Fingerprint, current: Fingerprint) -> str:
    return (
        f"This SVFit adapter was trained on the {recorded.dtype} weights of this model, and this copy holds them in "
        f"{current.dtype} (module '{key}'). Its singular vectors, recomputed from the rounded weights, would move the "
        f"trained update by several percent, so it is not loaded. Load the base model in {recorded.dtype} "
        f"(dtype=torch.{recorded.dtype}), load the adapter, then cast the whole model (model.to(torch."
        f"{current.dtype})); or save the adapter with SVFitConfig(save_bases=True): its file then carries U_r and "
        "V_r and loads exactly onto a copy in any dtype."
    )


def tied_target_weights(model: nn.Module) -> dict[str, list[str]]:
    """SVFit-adapted modules whose base weight is the very tensor some other module also uses (tied weights)."""
    users: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for pname, param in module.named_parameters(recurse=False):
            users.setdefault(id(param), []).append(f"{name}.{pname}" if name else pname)
    tied = {}
    for name, module in model.named_modules():
        if isinstance(module, SVFitLayer):
            weight = module.get_base_layer().weight
            own = f"{name}.base_layer.weight"
            others = sorted({u for u in users.get(id(weight), []) if u != own and not u.startswith(f"{name}.")})
            if others:
                tied[name] = others
    return tied


def base_hint(config) -> str:
    name = getattr(config, "base_model_name_or_path", None)
    return f" ('{name}')" if name else ""
