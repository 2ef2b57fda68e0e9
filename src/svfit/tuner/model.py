"""``SVFitModel``: the PEFT tuner that injects SVFit layers into a model."""

from __future__ import annotations

import copy
import weakref
import warnings
from contextlib import contextmanager
from functools import partial
from typing import Optional

import torch
from peft.tuners.lora.model import _get_encoder
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from peft.utils.other import AuxiliaryTrainingWrapper
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..core.fingerprint import Fingerprint, compare
from .config import SVFitConfig
from .layer import SVFitLayer, dispatch
from .summary import ModuleSummary, summarize

_BASES_ATTRS = ("svfit_U", "svfit_V", "svfit_sigma")


_BOUND_TO = "_svfit_bound_to"  # weakref to the model whose weights the config's records describe
_BOUND_NAME = "_svfit_bound_name"  # that model's base_model_name_or_path
_RECHOSEN = "_svfit_ranks_rechosen"  # a reused config's copy that re-chose its ranks on a different base


class BaseWeightMismatchError(ValueError):
    """An SVFit adapter is being loaded onto base weights other than those it was trained on."""


class SVFitModel(BaseTuner):
    """Creates an SVFit model from a pre-trained model. Use through ``peft.get_peft_model(model, SVFitConfig(...))``.

    Beyond PEFT's generic tuner API (merge, unload, adapters, ...) it offers ``svfit_summary()``: per adapted module,
    the shape, the chosen r and the share of the spectrum kept.
    """

    prefix: str = "svfit_"
    tuner_layer_cls = SVFitLayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    # -- injection ---------------------------------------------------------------------------------------------

    def inject_adapter(
        self,
        model: nn.Module,
        adapter_name: str,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        state_dict: Optional[dict[str, torch.Tensor]] = None,
    ) -> None:
        _check_adapter_name(adapter_name, self.prefix)
        config = self.peft_config[adapter_name]
        bound = getattr(config, _BOUND_TO, None)
        reused = bound is not None and bound() is not model  # (a dead reference counts: applied before, here)
        if reused:
            # One config object applied to several models (normal with a LoraConfig): this model records its ranks
            # and fingerprints on a copy, so that the first model's records (and its saved adapters) stay intact.
            # get_peft_model has already written this model's name into the shared object: give it back.
            original = config
            config = copy.deepcopy(original)
            config.__dict__.pop(_RECHOSEN, None)
            original.base_model_name_or_path = getattr(original, _BOUND_NAME, original.base_model_name_or_path)
            self.peft_config[adapter_name] = config
        if config.base_fingerprints:
            # A config that records base weights is bound to them: check before any module is replaced, so that a
            # wrong base model is left exactly as it was.
            try:
                verify_base_weights(model, config)
            except BaseWeightMismatchError:
                if not reused:
                    raise
                warnings.warn(
                    "this SVFitConfig was already applied to another base model; adapting this one with a copy that "
                    f"chooses its ranks afresh (see model.peft_config['{adapter_name}'])",
                    stacklevel=3,
                )
                config.resolved_ranks, config.base_fingerprints = {}, {}
                setattr(config, _RECHOSEN, True)  # loading trained weights into it is refused (they belong elsewhere)
        super().inject_adapter(
            model,
            adapter_name,
            autocast_adapter_dtype=autocast_adapter_dtype,
            low_cpu_mem_usage=low_cpu_mem_usage,
            state_dict=state_dict,
        )
        if reused and not getattr(config, _RECHOSEN, False) and _same_records(config, original):
            # nothing this model recorded differs from the first one's: keep sharing the user's object (PEFT
            # expects peft_config[name] to be the very config passed in)
            self.peft_config[adapter_name] = config = original
        # in-process only (never serialized): which model this config's records describe
        setattr(config, _BOUND_TO, weakref.ref(model))
        setattr(config, _BOUND_NAME, config.base_model_name_or_path)

    def _create_and_replace(
        self,
        config: SVFitConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **kwargs,
    ) -> None:
        if current_key is None:
            raise ValueError("current_key must not be None")
        recorded_r = config.resolved_ranks.get(current_key)
        recorded_fp = config.base_fingerprints.get(current_key)
        recorded_fp = Fingerprint.from_json(recorded_fp) if recorded_fp is not None else None
        rank_spec = recorded_r if recorded_r is not None else config.rank_spec_for(current_key)
        _reconcile_fan_in_fan_out(config, target)

        if isinstance(target, SVFitLayer):
            info = target.update_layer(adapter_name, config, rank_spec, recorded_fp, config.inference_mode)
        else:
            new_module = dispatch(target, adapter_name, config, rank_spec, recorded_fp, name=current_key)
            if adapter_name not in self.active_adapters:
                new_module.requires_grad_(False)  # an added adapter is not trainable until activated
            self._replace_module(parent, target_name, new_module, target)
            info = new_module.svfit_info[adapter_name]
        config.resolved_ranks[current_key] = info.r
        config.base_fingerprints[current_key] = info.fingerprint.to_json()

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        for module in self.model.modules():
            if isinstance(module, SVFitLayer):
                module.set_adapter_dtypes(adapter_name, autocast_adapter_dtype)

    # -- mixed-adapter batches ---------------------------------------------------------------------------------

    @contextmanager
    def _enable_peft_forward_hooks(self, *args, **kwargs):
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is None:
            yield
            return
        if self.training:
            raise ValueError("Cannot pass `adapter_names` when the model is in training mode.")
        if not isinstance(adapter_names, (list, tuple)):
            raise TypeError(f"adapter_names must be a list of str, got {type(adapter_names).__name__}")
        known = set()
        for module in self.modules():
            if isinstance(module, SVFitLayer):
                known |= set(module.svfit_vector.keys())
        unknown = {n for n in adapter_names if n != "__base__"} - known
        if unknown:
            raise ValueError(f"Trying to infer with non-existing adapter(s): {', '.join(sorted(unknown))}")

        # Generation with beam search repeats every input num_beams times, so the names must be repeated too; the
        # encoder of an encoder-decoder model still sees the original batch.
        num_beams = kwargs.get("num_beams")
        expanded = list(adapter_names)
        if isinstance(num_beams, int) and num_beams > 1:
            expanded = [n for n in adapter_names for _ in range(num_beams)]
        handles = []
        try:
            for module in self.modules():
                if isinstance(module, (SVFitLayer, AuxiliaryTrainingWrapper)):
                    hook = partial(_inject_adapter_names, adapter_names=expanded)
                    handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
            encoder = _get_encoder(self.model)
            if encoder is not None and expanded != list(adapter_names):
                for module in encoder.modules():
                    if isinstance(module, (SVFitLayer, AuxiliaryTrainingWrapper)):
                        hook = partial(_inject_adapter_names, adapter_names=list(adapter_names))
                        handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
            yield
        finally:
            for handle in handles:
                handle.remove()

    # -- merging ----------------------------------------------------------------------------------------------

    def _check_merge_allowed(self):
        super()._check_merge_allowed()
        tied = _tied_target_weights(self.model)
        if tied:
            name, others = next(iter(tied.items()))
            raise ValueError(
                f"cannot merge: the weight of '{name}' is shared with {others}, so merging its SVFit update would also "
                "change those modules (the unmerged model does not). Untie the weights first (e.g. load the model with "
                "tie_word_embeddings=False and copy the tied weight), or keep the adapter unmerged."
            )

    # -- checkpoints -------------------------------------------------------------------------------------------

    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        selected = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        if getattr(config, "save_bases", False):
            return selected
        # By default the file holds the trained vectors only; the bases are recomputed from the base weights at
        # load. Modules whose singular vectors are not unique (repeated singular values) keep theirs.
        keep = {
            name
            for name, module in model.named_modules()
            if isinstance(module, SVFitLayer)
            and adapter_name in module.svfit_info
            and module.svfit_info[adapter_name].bases_needed
        }
        return {k: v for k, v in selected.items() if _bases_owner(k) is None or _bases_owner(k) in keep}

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        if getattr(config, _RECHOSEN, False):
            raise BaseWeightMismatchError(
                f"refusing to load weights into adapter '{adapter_name}': its config was recorded on another base "
                "model and this model's weights differ, so its ranks were chosen afresh and the saved singular values "
                "would not fit. Load the adapter with its own saved config (omit config=) onto the model it was "
                "trained on."
            )
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        # Bases absent from the checkpoint were recomputed at injection: present them as loaded, so that PEFT does
        # not report them as missing keys.
        for name, module in model.named_modules():
            if not isinstance(module, SVFitLayer) or adapter_name not in module.svfit_U:
                continue
            for attr in _BASES_ATTRS:
                key = f"{name}.{attr}.{adapter_name}" if name else f"{attr}.{adapter_name}"
                value = getattr(module, attr)[adapter_name]
                if key not in remapped and value.device.type != "meta":
                    remapped[key] = value
        return remapped

    # -- inspection --------------------------------------------------------------------------------------------

    def svfit_summary(self, adapter_name: Optional[str] = None) -> list[ModuleSummary]:
        """Per adapted module: shape, full spectrum length n, chosen r, share of the spectrum kept."""
        name = adapter_name or self.active_adapters[0]
        return summarize(self.model, name)

    # -- combining adapters ------------------------------------------------------------------------------------

    def add_weighted_adapter(
        self,
        adapters: list[str],
        weights: list[float],
        adapter_name: str,
        combination_type: str = "linear",
        svd_rank: Optional[int] = None,
        svd_clamp: Optional[float] = None,
        svd_full_matrices: bool = True,
        svd_driver: Optional[str] = None,
        density: Optional[float] = None,
        majority_sign_method: str = "total",
    ) -> None:
        """Add ``adapter_name`` whose update is exactly the weighted sum of the given adapters' updates.

        Adapters on one base share U_r and V_r (the same SVD of the same weight), so
        ΔW_new = U_r diag(Σ w_i c_i) V_r^T = Σ w_i ΔW_i, with c_i each adapter's singular-value shift: unlike
        LoRA's ``linear``, the combination is exact (to float round-off). ``combination_type`` ``"linear"``
        (default), ``"cat"`` and ``"svd"`` all give this exact sum; LoRA's pruning types (ties, dare_*,
        magnitude_prune) and ``svd_rank``/``svd_clamp``/``density`` are refused. ``modules_to_save`` copies combine
        the same way in weight space (W0 + Σ w_i (W_i - W0)); trained biases are shared by all adapters and are
        not part of an adapter. The new adapter is added inactive (like ``add_adapter``); on each module it has the
        largest rank among the combined adapters.

        Raises ValueError where the sum cannot be exact: adapters whose singular vectors on a module differ (other
        base weights, other SVD settings, ranks whose bases are not nested) or a combined shift the new adapter's
        parametrization cannot represent (e.g. ``nonneg=True`` with a combined singular value below zero).
        """
        _add_weighted_adapter(
            self, list(adapters), list(weights), adapter_name, combination_type,
            dict(svd_rank=svd_rank, svd_clamp=svd_clamp, density=density),
        )


def _reconcile_fan_in_fan_out(config: SVFitConfig, target: nn.Module) -> None:
    """LoRA's semantics for ``fan_in_fan_out``: it states the base layer's weight layout, (in, out) as in
    transformers' Conv1D. SVFit reads the layout from the layer class; where the flag contradicts it, warn with
    LoRA's message and correct the config as LoRA does (so a LoraConfig recipe switched to SVFitConfig behaves the
    same, and the saved config states the layout that was used). Convolutions and embeddings ignore it, as in LoRA.
    None (SVFit's default) takes the layout from each layer silently."""
    if config.fan_in_fan_out is None:
        return
    base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    if isinstance(base, Conv1D) and not config.fan_in_fan_out:
        warnings.warn(
            "fan_in_fan_out is set to False but the target module is `Conv1D`. Setting fan_in_fan_out to True.",
            stacklevel=4,
        )
        config.fan_in_fan_out = True
    elif isinstance(base, nn.Linear) and config.fan_in_fan_out:
        warnings.warn(
            "fan_in_fan_out is set to True but the target module is `torch.nn.Linear`. Setting fan_in_fan_out to "
            "False.",
            stacklevel=4,
        )
        config.fan_in_fan_out = False


def _same_records(a: SVFitConfig, b: SVFitConfig) -> bool:
    return a.resolved_ranks == b.resolved_ranks and a.base_fingerprints == b.base_fingerprints


def verify_base_weights(model: nn.Module, config: SVFitConfig) -> None:
    """Check every base weight an adapter was trained on against ``model``; raise on the first mismatch (in the
    model's module order)."""
    recorded = {key: Fingerprint.from_json(fp) for key, fp in config.base_fingerprints.items()}
    modules = dict(model.named_modules())
    missing = [key for key in recorded if key not in modules]
    if missing:
        raise BaseWeightMismatchError(
            f"This SVFit adapter was trained on a model with a module '{missing[0]}', which this model lacks: it is "
            f"not the adapter's base model{_base_hint(config)}."
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
                f"{_base_hint(config)}. (Creating a new adapter? An SVFitConfig records the weights it was first "
                "applied to: pass a fresh SVFitConfig for another model.)"
            )
        if match == "close":
            warnings.warn(
                f"Base weight '{key}' is not byte-identical to the one the adapter was trained on, but matches it up "
                f"to {current.dtype}/{recorded[key].dtype} rounding; outputs will match only approximately.",
                stacklevel=3,
            )


def _tied_target_weights(model: nn.Module) -> dict[str, list[str]]:
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


def _base_hint(config) -> str:
    name = getattr(config, "base_model_name_or_path", None)
    return f" ('{name}')" if name else ""


def _check_adapter_name(adapter_name: str, prefix: str) -> None:
    # PEFT strips the adapter name from checkpoint keys by string surgery; a name inside the prefix corrupts them
    if not adapter_name or adapter_name in prefix or adapter_name == "__base__":
        raise ValueError(
            f"Adapter name {adapter_name!r} is not allowed with SVFit (it collides with the parameter prefix "
            f"'{prefix}' or the reserved '__base__'); choose another name."
        )


def _bases_owner(key: str) -> Optional[str]:
    """Module name of a bases buffer key ('a.b.svfit_U.default' -> 'a.b'), or None for other keys."""
    for attr in _BASES_ATTRS:
        marker = f".{attr}."
        if marker in key:
            return key.rsplit(marker, 1)[0]
        if key.startswith(f"{attr}."):
            return ""
    return None


def _inject_adapter_names(target, args, kwargs, adapter_names):
    kwargs["adapter_names"] = adapter_names
    return args, kwargs


# -- add_weighted_adapter ----------------------------------------------------------------------------------------

_EXACT_COMBINATIONS = ("linear", "cat", "svd")


def _add_weighted_adapter(tuner, adapters, weights, new_name, combination_type, refused) -> None:
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
    _check_adapter_name(new_name, tuner.prefix)

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
        ref = max(present, key=lambda a: layer.svfit_U[a].shape[1])
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
    for attr in (_BOUND_TO, _BOUND_NAME, _RECHOSEN):
        new_config.__dict__.pop(attr, None)
    new_config.target_modules = set(plan)  # exactly the modules some combined adapter adapts (full names)
    new_config.exclude_modules = None
    new_config.layers_to_transform = None
    new_config.layers_pattern = None
    new_config.rank_pattern = {}
    new_config.resolved_ranks = {
        key: int(tuner.model.get_submodule(key).svfit_U[ref].shape[1]) for key, (_, ref) in plan.items()
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
    U, V = layer.svfit_U[ref].float(), layer.svfit_V[ref].float()
    Uo, Vo = layer.svfit_U[other].float(), layer.svfit_V[other].float()
    r = Uo.shape[1]
    if U.device.type == "meta" or Uo.device.type == "meta":
        raise ValueError(f"the bases of '{key}' are not loaded (meta tensors): cannot combine")
    sign = torch.sign((U[:, :r] * Uo).sum(0))
    sign[sign == 0] = 1
    eps = max(torch.finfo(t.dtype).eps for t in (layer.svfit_U[ref], layer.svfit_U[other]))
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
    r = layer.svfit_U[ref].shape[1]
    layer.svfit_U[new] = layer.svfit_U[ref].clone()
    layer.svfit_V[new] = layer.svfit_V[ref].clone()
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
