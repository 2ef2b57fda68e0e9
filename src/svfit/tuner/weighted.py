"""``add_weighted_adapter`` for SVFit: adapters on one base share U_r and V_r, so the weighted sum of their updates
is exact; everything is checked before the model is touched."""

from __future__ import annotations

import copy

import torch
from torch import nn

from .config import BOUND_NAME, BOUND_TO, RECHOSEN, SVFitConfig
from .guards import check_adapter_name
from .layer import SVFitLayer, put_frozen

_EXACT_COMBINATIONS = ("linear", "cat", "svd")


def add_weighted_adapter(tuner, adapters, weights, new_name, combination_type, refused) -> None:
    if combination_type not in _EXACT_COMBINATIONS:
        raise ValueError(
            f"combination_type {combination_type!r} is not supported by SVFit: its 'linear' combination is already "
            f"the exact weighted sum of the adapters' updates (also accepted as 'cat' and 'svd'); LoRA's pruning "
            "combinations (ties, dare_*, magnitude_prune) are not implemented"
        )
    for key, value in refused.items():
        if value is not None:
            raise ValueError(f"{key}={value!r} is not supported by SVFit's add_weighted_adapter (it is exact at the "
                             "adapters' own ranks; nothing is truncated or pruned)")
    if not adapters:
        raise ValueError("adapters must name at least one adapter")
    if len(weights) != len(adapters):
        raise ValueError(f"got {len(weights)} weights for {len(adapters)} adapters")
    weights = [float(w) for w in weights]
    if not all(torch.isfinite(torch.tensor(w)) for w in weights):
        raise ValueError(f"weights must be finite numbers, got {weights}")
    for name in adapters:
        if name not in tuner.peft_config:
            raise ValueError(f"Adapter {name} does not exist")
        if not isinstance(tuner.peft_config[name], SVFitConfig):
            raise ValueError(f"adapter {name!r} is not an SVFit adapter")
    if len(set(adapters)) != len(adapters):
        raise ValueError(f"adapters must be distinct, got {adapters}")
    if new_name in tuner.peft_config:
        raise ValueError(f"an adapter named {new_name!r} already exists; choose another name or delete it first")
    check_adapter_name(new_name, tuner.prefix)

    # Per module: which adapters live there, whose bases the new adapter takes (the largest rank), and a check that
    # every other adapter's bases are the leading columns of those (up to a sign per singular pair, which cancels in
    # u_k c_k v_k^T). Everything is checked before the model is touched.
    plan = {}
    for key, layer in tuner.model.named_modules():
        if not isinstance(layer, SVFitLayer):
            continue
        present = [a for a in adapters if a in layer.svfit_vector]
        if not present:
            continue
        merged = [a for a in present if a in layer.merged_adapters]
        if merged:
            raise ValueError(f"adapters {merged} are merged into '{key}': call unmerge_adapter() first")
        ref = max(present, key=lambda a: layer.svfit_sigma[a].numel())
        for a in present:
            if a != ref:
                _check_shared_bases(layer, key, ref, a)
        plan[key] = (present, ref)
    if not plan:
        raise ValueError(f"none of the adapters {adapters} is on any SVFit layer")

    configs = [tuner.peft_config[a] for a in adapters]
    first = configs[0]
    fingerprints = {}
    for config in configs:
        for key, fp in config.base_fingerprints.items():
            if key in plan and fingerprints.setdefault(key, fp) != fp:
                raise ValueError(
                    f"cannot combine exactly: the adapters were made on different base weights of '{key}' (their "
                    "recorded fingerprints differ)"
                )
    new_config = copy.deepcopy(first)
    for attr in (BOUND_TO, BOUND_NAME, RECHOSEN):
        new_config.__dict__.pop(attr, None)
    new_config.target_modules = set(plan)  # exactly the modules some combined adapter adapts (full names)
    new_config.exclude_modules = None
    new_config.layers_to_transform = None
    new_config.layers_pattern = None
    new_config.rank_pattern = {}
    new_config.resolved_ranks = {
        key: int(tuner.model.get_submodule(key).svfit_sigma[ref].numel()) for key, (_, ref) in plan.items()
    }
    new_config.base_fingerprints = {k: v for k, v in fingerprints.items() if k in plan}
    new_config.save_bases = any(getattr(c, "save_bases", False) for c in configs)
    new_config.bias = "none"  # trained biases live in the base layer, shared by every adapter
    saved = [list(c.modules_to_save or []) for c in configs]
    new_config.modules_to_save = sorted({m for names in saved for m in names}) or None

    tuner.peft_config[new_name] = new_config
    try:
        tuner.inject_adapter(tuner.model, new_name)
        for key, (present, ref) in plan.items():
            layer = tuner.model.get_submodule(key)
            _set_combined_shift(layer, key, new_name, present, ref, dict(zip(adapters, weights)))
        _combine_modules_to_save(tuner.model, new_name, dict(zip(adapters, weights)))
    except Exception:
        if new_name in tuner.peft_config:
            tuner.delete_adapter(new_name)
        raise


def _check_shared_bases(layer, key: str, ref: str, other: str) -> None:
    stored = [t for c in (layer.basis_U, layer.basis_V) for a in (ref, other) if a in c for t in [c[a]]]
    if any(t.device.type == "meta" for t in stored):
        raise ValueError(f"the bases of '{key}' are not loaded (meta tensors): cannot combine")
    (U, V), (Uo, Vo) = layer.dense_bases(ref), layer.dense_bases(other)
    r = Uo.shape[1]
    sign = torch.sign((U[:, :r] * Uo).sum(0))
    sign[sign == 0] = 1
    eps = max(torch.finfo(t.dtype).eps for t in stored)
    tol = max(1e-5, 16 * eps)
    du = (U[:, :r] * sign - Uo).abs().max().item() if r else 0.0
    dv = (V[:, :r] * sign - Vo).abs().max().item() if r else 0.0
    if du > tol or dv > tol:
        ranks = f" (r={r} and r={U.shape[1]})" if r != U.shape[1] else ""
        raise ValueError(
            f"cannot combine adapters '{other}' and '{ref}' exactly on '{key}': their singular vectors differ{ranks} "
            f"by up to {max(du, dv):.2e}, so their singular-value shifts live in different bases. Combine adapters "
            "made with the same SVD settings (svd, svd_dtype, bases_dtype; ranks whose bases are nested) on the same "
            "base weights."
        )


def _set_combined_shift(layer, key: str, new: str, present, ref: str, weights: dict) -> None:
    """Give ``new`` the reference adapter's bases and a vector whose shift is Σ w_i c_i (zero-padded to its rank)."""
    r = layer.svfit_sigma[ref].numel()
    for container in (layer.basis_U, layer.basis_V):  # the reference adapter's bases, stored as it stores them
        if ref in container:
            put_frozen(container, new, container[ref].detach().clone())
        elif new in container:
            del container[new]
    layer.svfit_sigma[new] = layer.svfit_sigma[ref].clone()
    if hasattr(layer, "_refresh_one_basis"):
        layer._refresh_one_basis(new)  # sigma changed (by round-off at most): the fast-path guard is derived from it
    with torch.no_grad():
        target = torch.zeros(r, dtype=torch.float64, device=layer.svfit_sigma[ref].device)
        for a in present:
            c = layer.singular_value_shift(a).detach().double()
            target[: c.shape[0]] += weights[a] * c
        vector = _vector_for_shift(layer, new, target)
        shift = layer.singular_value_shift(new).detach().double()
    scale = target.abs() + layer.svfit_sigma[new].double().abs()
    eps = torch.finfo(vector.dtype).eps
    bad = (shift - target).abs() > 64 * eps * scale + 1e-12
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise ValueError(
            f"cannot combine exactly on '{key}': the new adapter's parametrization "
            f"('{layer.svfit_parametrization[new]}', nonneg={layer.svfit_nonneg[new]}) cannot represent the combined "
            f"shift (singular value {i}: wanted {target[i].item():.6g}, representable {shift[i].item():.6g}); with "
            "nonneg=True a combined singular value fell below zero. Use weights that keep the spectrum non-negative, "
            "or combine adapters made with nonneg=False."
        )


def _vector_for_shift(layer, name: str, target: torch.Tensor) -> torch.Tensor:
    """Set ``layer.svfit_vector[name]`` so that ``layer.singular_value_shift(name)`` equals ``target`` wherever the
    map from the vector to the shift is affine (every parametrization away from a nonneg clamp). The map is probed
    through singular_value_shift itself, so a change of parametrization (e.g. a scaling factor) is followed; the
    caller verifies the result."""
    param = layer.svfit_vector[name]
    dtype = param.dtype
    with torch.no_grad():
        param.data = torch.zeros_like(param.data, dtype=dtype)
        at0 = layer.singular_value_shift(name).double()
        param.data = torch.ones_like(param.data, dtype=dtype)
        at1 = layer.singular_value_shift(name).double()
        slope = at1 - at0
        vector = torch.where(slope != 0, (target - at0) / torch.where(slope != 0, slope, 1.0),
                             torch.zeros_like(target))
        param.data = vector.to(dtype)
    return param.data


def _combine_modules_to_save(model: nn.Module, new: str, weights: dict) -> None:
    """modules_to_save copies (e.g. a classification head): W_new = W0 + Σ w_i (W_i - W0), every parameter."""
    from peft.utils.other import ModulesToSaveWrapper

    for module in model.modules():
        if not isinstance(module, ModulesToSaveWrapper) or new not in module.modules_to_save:
            continue
        sources = {a: w for a, w in weights.items() if a in module.modules_to_save}
        original = dict(module.original_module.named_parameters())
        with torch.no_grad():
            for pname, p in module.modules_to_save[new].named_parameters():
                delta = sum(
                    w * (dict(module.modules_to_save[a].named_parameters())[pname].double() - original[pname].double())
                    for a, w in sources.items()
                )
                p.copy_((original[pname].double() + delta).to(p.dtype))
