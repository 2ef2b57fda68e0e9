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
from ..core.fingerprint import from_row as from_fingerprint_row
from ..core.fingerprint import to_row as to_fingerprint_row
from .config import SVFitConfig
from .factorization import factorize_modules, layer_kind, shift_unit, skips_svd
from .guards import BaseWeightMismatchError, check_supported_weight, is_dtensor
from .layer import SVFitLayer, dispatch, put_frozen
from .summary import ModuleSummary, summarize

_BASES_ATTRS = ("basis_U", "basis_V", "svfit_sigma", "svfit_U", "svfit_V")  # in memory; in files: svfit_U/V
_FILE_TO_MODEL = {"svfit_U": "basis_U", "svfit_V": "basis_V"}
COLUMNS = "svfit_columns"  # in files: which kept singular vectors a module's saved svfit_U/V hold
FINGERPRINT_KEY = "svfit_base_fingerprints"  # one uint8 table per adapter file (see _get_adapter_state_dict)


_BOUND_TO = "_svfit_bound_to"  # weakref to the model whose weights the config's records describe
_BOUND_NAME = "_svfit_bound_name"  # that model's base_model_name_or_path
_RECHOSEN = "_svfit_ranks_rechosen"  # a reused config's copy that re-chose its ranks on a different base


class SVFitModel(BaseTuner):
    """Creates an SVFit model from a pre-trained model. Use through ``peft.get_peft_model(model, SVFitConfig(...))``.

    Beyond PEFT's generic tuner API (merge, unload, adapters, ...) it offers ``svfit_summary()``: per adapted module,
    the shape, the chosen r and the share of the spectrum kept.
    """

    prefix: str = "svfit_"
    tuner_layer_cls = SVFitLayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    def __init__(self, model, config, adapter_name, low_cpu_mem_usage: bool = False, state_dict=None) -> None:
        # per adapter: how its SVDs ran (matrices factorised by this rank, workers, device, seconds)
        self.svfit_init_report: dict = {}
        self._svfit_factorized: dict = {}
        super().__init__(model, config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage, state_dict=state_dict)

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
        # every SVD of this adapter in one batch (in parallel, on the accelerator, or shared between ranks); a
        # module the plan misses is factorised by its layer
        self._svfit_factorized, report = self._factorize_targets(model, config, low_cpu_mem_usage, state_dict)
        try:
            super().inject_adapter(
                model,
                adapter_name,
                autocast_adapter_dtype=autocast_adapter_dtype,
                low_cpu_mem_usage=low_cpu_mem_usage,
                state_dict=state_dict,
            )
        finally:
            self._svfit_factorized = {}
        _shard_like_their_bases(model)
        if report is not None:
            self.svfit_init_report[adapter_name] = report
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

        factorization = getattr(self, "_svfit_factorized", {}).pop(current_key, None)
        if isinstance(target, SVFitLayer):
            info = target.update_layer(
                adapter_name, config, rank_spec, recorded_fp, config.inference_mode, factorization=factorization
            )
        else:
            new_module = dispatch(
                target, adapter_name, config, rank_spec, recorded_fp, name=current_key, factorization=factorization
            )
            if adapter_name not in self.active_adapters:
                new_module.requires_grad_(False)  # an added adapter is not trainable until activated
            self._replace_module(parent, target_name, new_module, target)
            info = new_module.svfit_info[adapter_name]
        config.resolved_ranks[current_key] = info.r
        config.base_fingerprints[current_key] = info.fingerprint.to_json()

    def _factorize_targets(self, model, config, low_cpu_mem_usage, state_dict):
        """Factorise every module this injection will adapt, found as PEFT's injection will find them."""
        targets = _planned_targets(self, model, config, state_dict)
        _refuse_adding_to_sharded_layers(targets)
        on_meta = low_cpu_mem_usage
        modules, kinds = {}, {}
        for key, module in targets:
            base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
            kind = layer_kind(base)
            if kind is None or not _factorizable(base):
                continue  # dispatch or update_layer will raise its own clear error for it
            recorded_r = config.resolved_ranks.get(key)
            rank_spec = recorded_r if recorded_r is not None else config.rank_spec_for(key)
            recorded = config.base_fingerprints.get(key)
            recorded = Fingerprint.from_json(recorded) if recorded is not None else None
            if skips_svd(config, rank_spec, recorded, on_meta):
                continue
            modules[key], kinds[key] = (base, rank_spec), kind
        if not modules:
            return {}, None
        return factorize_modules(modules, config, kinds)

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
        save_all = getattr(config, "save_bases", False)
        # By default the file holds the trained vectors only; the bases are recomputed from the base weights at
        # load. Modules whose recomputation could drift by more than the bound (SpectrumInfo.needs_bases: nearly
        # repeated singular values that training moved apart) carry the singular vectors that could move
        # (SpectrumInfo.saved_columns); save_bases=True
        # keeps both bases of every module (a one-basis layer forms the other from W0), which is what makes a load
        # onto a copy of the base in another dtype exact.
        out = {k: v for k, v in selected.items() if _bases_owner(k) is None}
        for name, module in model.named_modules():
            if not isinstance(module, SVFitLayer) or adapter_name not in module.svfit_info:
                continue
            columns = None if save_all else module.saved_columns(adapter_name)
            if not save_all and columns is None:
                continue
            prefix = f"{name}." if name else ""
            bases = dict(zip(("U", "V"), module.dense_bases(adapter_name))) if save_all else {
                side: getattr(module, f"basis_{side}")[adapter_name]
                for side in ("U", "V") if adapter_name in getattr(module, f"basis_{side}")
            }
            stored_dtype = next(iter(p for p in (module.basis_U.get(adapter_name), module.basis_V.get(adapter_name))
                                     if p is not None)).dtype
            # only the singular vectors that a recomputation could move too far (often a few near the rank's cut or
            # a near-repeated pair), unless that is most of them; the load splices them into the recomputed bases
            partial = (columns is not None and columns.numel() < module.svfit_info[adapter_name].r
                       and not any(is_dtensor(t) for t in bases.values()))
            for side, tensor in bases.items():
                tensor = tensor.detach()
                if partial:
                    tensor = tensor[:, columns.to(tensor.device)].contiguous()
                out[f"{prefix}svfit_{side}.{adapter_name}"] = tensor.to(stored_dtype)
            if partial:
                out[f"{prefix}{COLUMNS}.{adapter_name}"] = columns.to(torch.int64).cpu()
            out[f"{prefix}svfit_sigma.{adapter_name}"] = module.svfit_sigma[adapter_name]
        # one table of the base weights' fingerprints, rows in the sorted order of the modules' vector keys, so that
        # every load path checks the base, whatever config object it is handed
        owners = sorted(k.rsplit(f".svfit_vector.{adapter_name}", 1)[0] for k in out
                        if k.endswith(f".svfit_vector.{adapter_name}"))
        modules = dict(model.named_modules())
        rows = [to_fingerprint_row(modules[o].svfit_info[adapter_name].fingerprint) for o in owners if o in modules]
        if rows and len(rows) == len(owners):
            out[FINGERPRINT_KEY] = torch.stack(rows).cpu()
        return out

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        if getattr(config, _RECHOSEN, False):
            raise BaseWeightMismatchError(
                f"refusing to load weights into adapter '{adapter_name}': its config was recorded on another base "
                "model and this model's weights differ, so its ranks were chosen afresh and the saved singular values "
                "would not fit. Load the adapter with its own saved config (omit config=) onto the model it was "
                "trained on."
            )
        # files name the bases svfit_U / svfit_V; in memory they are the frozen parameters basis_U / basis_V
        state_dict = {_model_key(k): v for k, v in state_dict.items()}
        table = state_dict.pop(FINGERPRINT_KEY, None)
        # modules that carry only some singular vectors: {file's module name: column indices}
        columns = {k.rsplit(f".{COLUMNS}", 1)[0] if "." in k else "": state_dict.pop(k)
                   for k in [k for k in state_dict if k == COLUMNS or k.endswith(f".{COLUMNS}")]}
        recorded = {}
        if table is not None:
            owners = sorted(k.rsplit(".svfit_vector", 1)[0] for k in state_dict if k.endswith(".svfit_vector"))
            if table.dim() != 2 or table.shape[0] != len(owners):
                raise ValueError(f"the adapter file's {FINGERPRINT_KEY} table does not match its modules: corrupt file")
            recorded = dict(zip(owners, table))
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        layers = [(name, module) for name, module in model.named_modules()
                  if isinstance(module, SVFitLayer) and adapter_name in module.svfit_sigma]
        carried_by = {name: _row_for(columns, name) for name, _ in layers}  # the carried columns of each module
        # every module's base weight is checked against the one the file was trained on before anything is loaded
        copies = [_check_loaded_fingerprint(name, module, adapter_name, _row_for(recorded, name), remapped, config,
                                            partial=carried_by[name] is not None)
                  for name, module in layers]
        for (name, module), other_dtype in zip(layers, copies):
            prefix = f"{name}." if name else ""
            if other_dtype is not None:
                # a copy of the base in another dtype with both saved bases: use them as saved (exact Delta W)
                module.materialize_bases(adapter_name)
                module.svfit_unit[adapter_name] = shift_unit(config, other_dtype, min(module.svfit_info[adapter_name].shape))
                continue
            sigma = remapped.get(f"{prefix}svfit_sigma.{adapter_name}")
            carried = carried_by[name]
            if module.placeholder_bases(adapter_name) and carried is not None:
                raise ValueError(
                    f"cannot load '{name.removeprefix('base_model.model.')}' without its SVD: the adapter file carries "
                    "only some of its singular vectors (the rest are recomputed from the base weight), but this load "
                    "skipped the SVD (low_cpu_mem_usage=True with a config that has save_bases=True). Load with the "
                    "file's own config (omit config=) or without low_cpu_mem_usage."
                )
            if sigma is not None and module.placeholder_bases(adapter_name):
                # a low_cpu_mem_usage load that skipped the SVD: store the bases the trained layer stored
                module.keep_bases(adapter_name, sigma, config)
            from_file = {attr for attr in ("basis_U", "basis_V") if f"{prefix}{attr}.{adapter_name}" in remapped}
            for attr in ("basis_U", "basis_V", "svfit_sigma"):
                key = f"{prefix}{attr}.{adapter_name}"
                container = getattr(module, attr)
                if adapter_name not in container:
                    remapped.pop(key, None)  # a basis this (one-basis) layer does not store is not needed
                elif key not in remapped and container[adapter_name].device.type != "meta":
                    # recomputed at injection: present it as loaded, so that PEFT reports no missing key
                    remapped[key] = container[adapter_name]
                elif key not in remapped:
                    raise ValueError(f"the adapter file has no {attr.replace('basis_', 'svfit_')} for "
                                     f"'{name.removeprefix('base_model.model.')}', which this load did not compute "
                                     "(low_cpu_mem_usage=True skipped the SVD): incomplete or corrupt file")
                elif carried is not None and attr in from_file:
                    remapped[key] = _splice(container[adapter_name], remapped[key], carried, name)
            if carried is not None and len(from_file) == 1 and module.stored_bases(adapter_name) == "both":
                # the file carries one side (a one-basis layer saved it) and this layer keeps both: the other side's
                # carried vectors follow from W0 and the saved singular values, as a one-basis layer forms them
                _derive_other_side(module, adapter_name, prefix, next(iter(from_file)), carried, remapped, name)
        # saved bases of sides no layer stores (a save_bases checkpoint on one-basis layers)
        remapped = {k: v for k, v in remapped.items() if not k.endswith((".basis_U", ".basis_V"))}
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


def _row_for(recorded: dict, module_name: str):
    """The fingerprint row of a module, whether or not the model is wrapped in a PeftModel (the file's keys are)."""
    row = recorded.get(module_name)
    return row if row is not None else recorded.get(f"base_model.model.{module_name}")


def _check_loaded_fingerprint(name, module, adapter_name, row, state_dict, config,
                              partial: bool = False) -> Optional[Fingerprint]:
    """Check the base-weight fingerprint a checkpoint carries for one module (files from svfit >= 0.2). Returns the
    recorded fingerprint when this base is a copy of it in another dtype that the checkpoint's saved bases make
    exact; raises BaseWeightMismatchError for another weight, or for another dtype without both whole saved bases
    (``partial``: the file carries only some singular vectors of this module)."""
    prefix = f"{name}." if name else ""
    if row is None:
        return None  # an older file: the config's fingerprints were checked at injection
    recorded = from_fingerprint_row(row, tuple(module.get_base_layer().weight.shape))
    if recorded.hash == module.svfit_info[adapter_name].fingerprint.hash:
        return None
    match, current = compare(recorded, module.get_base_layer().weight)
    key = name.removeprefix("base_model.model.")
    if match == "identical":
        return None
    if match == "different":
        raise BaseWeightMismatchError(
            f"This SVFit adapter was trained on a different base model: module '{key}' does not match (adapter: "
            f"{recorded.describe()}; this model: {current.describe()}). SVFit recomputes the singular vectors from the "
            f"base weights, so load it onto the model it was trained on{_base_hint(config)}."
        )
    saved = {side: next((k for k in (f"{prefix}basis_{side}.{adapter_name}", f"{prefix}basis_{side}")
                         if k in state_dict), None) for side in ("U", "V")}
    if None in saved.values() or partial:
        raise BaseWeightMismatchError(_other_dtype_message(key, recorded, current))
    for side, k in saved.items():  # a basis this layer did not store yet still loads: the layer will store both
        state_dict[f"{prefix}basis_{side}.{adapter_name}"] = state_dict.pop(k)
    return recorded


def _refuse_adding_to_sharded_layers(targets) -> None:
    """FSDP2 manages a fixed set of parameters per unit: an SVFit layer already sharded cannot take a second
    adapter's parameters."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return
    for key, module in targets:
        if isinstance(module, SVFitLayer) and isinstance(module, FSDPModule):
            raise ValueError(
                f"cannot add another SVFit adapter to '{key}': it is already sharded by FSDP2, which manages a fixed "
                "set of parameters. Add every adapter before sharding (get_peft_model / add_adapter, then "
                "fully_shard), or load them into a fresh model."
            )


def _shard_like_their_bases(model: nn.Module) -> None:
    """An SVFit layer whose base weight FSDP2 already shards becomes an FSDP2 unit of its own on the same mesh, so
    that its singular values and bases are sharded too and their gradients reduced across ranks (the base's
    parameters stay with the unit that owns them)."""
    for module in model.modules():
        if not isinstance(module, SVFitLayer):
            continue
        base = module.get_base_layer()
        if not is_dtensor(base.weight):
            continue
        from torch.distributed.fsdp import FSDPModule, fully_shard

        if not isinstance(module, FSDPModule):
            fully_shard(module, mesh=base.weight.device_mesh, ignored_params=set(base.parameters()))


def _planned_targets(tuner: BaseTuner, model: nn.Module, config: SVFitConfig, state_dict) -> list:
    """(name, module) of every module ``BaseTuner.inject_adapter`` is about to adapt, matched by PEFT's own
    functions on a copy of the config. A planning failure returns nothing: injection then reports it."""
    from peft.tuners.tuners_utils import _ExcludedModule, _maybe_include_all_linear_layers

    try:
        cfg = copy.deepcopy(config)
        cfg = tuner._prepare_adapter_config(cfg, tuner.get_model_config(model))
        cfg = _maybe_include_all_linear_layers(cfg, model)
        named = list(model.named_modules())
        existing = [key + "." for key, module in named if isinstance(module, BaseTunerLayer)]
        wanted = None
        if state_dict is not None:
            wanted = {k.rsplit("." + tuner.prefix, 1)[0].removeprefix("_orig_mod.") for k in state_dict}
        targets = []
        for key, module in named:
            if not key or any(key.startswith(p) for p in existing):
                continue
            if wanted is not None:
                hit = key.removeprefix("_orig_mod.") in wanted
            else:
                found = tuner._check_target_module_exists(cfg, key)
                hit = bool(found) and not isinstance(found, _ExcludedModule)
            if hit:
                targets.append((key, module))
        return targets
    except Exception:  # noqa: BLE001 - the injection itself raises the user-facing error
        return []


def _factorizable(base: nn.Module) -> bool:
    try:
        check_supported_weight(base)
    except (TypeError, ValueError):
        return False
    return not (isinstance(base, BaseTunerLayer) and base.merged)


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
        if match == "close" and not config.save_bases:
            raise BaseWeightMismatchError(_other_dtype_message(key, recorded[key], current))


def _other_dtype_message(key: str, recorded: Fingerprint, current: Fingerprint) -> str:
    return (
        f"This SVFit adapter was trained on the {recorded.dtype} weights of this model, and this copy holds them in "
        f"{current.dtype} (module '{key}'). Its singular vectors, recomputed from the rounded weights, would move the "
        f"trained update by several percent, so it is not loaded. Load the base model in {recorded.dtype} "
        f"(dtype=torch.{recorded.dtype}), load the adapter, then cast the whole model (model.to(torch."
        f"{current.dtype})); or save the adapter with SVFitConfig(save_bases=True): its file then carries U_r and "
        "V_r and loads exactly onto a copy in any dtype."
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


def _derive_other_side(module, adapter_name: str, prefix: str, side_in_file: str, columns, remapped: dict,
                       name: str) -> None:
    """u_j = W0 v_j / sigma_j (or v_j = W0^T u_j / sigma_j) for the carried columns, spliced into the other basis."""
    other = "basis_V" if side_in_file == "basis_U" else "basis_U"
    key, sigma_key = f"{prefix}{other}.{adapter_name}", f"{prefix}svfit_sigma.{adapter_name}"
    idx = columns.to(torch.int64)
    W = module._weight_matrix().detach().float()
    carried = remapped[f"{prefix}{side_in_file}.{adapter_name}"][:, idx.to(W.device)].float()
    sigma = remapped[sigma_key].float().to(W.device)[idx.to(W.device)]
    derived = (W.T @ carried if other == "basis_V" else W @ carried) / sigma
    remapped[key] = _splice(remapped[key], derived, idx, name)


def _splice(recomputed: torch.Tensor, saved: torch.Tensor, columns: torch.Tensor, module: str) -> torch.Tensor:
    """The recomputed basis with the checkpoint's carried singular vectors in their columns."""
    columns = columns.to(torch.int64)
    r = recomputed.shape[1]
    if (saved.dim() != 2 or saved.shape[0] != recomputed.shape[0] or saved.shape[1] != columns.numel()
            or columns.dim() != 1 or (columns.numel() and (int(columns.min()) < 0 or int(columns.max()) >= r))):
        raise ValueError(f"the adapter file's carried singular vectors of '{module}' do not fit its bases "
                         f"({tuple(saved.shape)} for columns of a {tuple(recomputed.shape)} basis): corrupt file")
    full = recomputed.detach().clone()
    full[:, columns.to(full.device)] = saved.to(full.device, full.dtype)
    return full


def _model_key(file_key: str) -> str:
    """'a.b.svfit_U' (a checkpoint's name of a basis) -> 'a.b.basis_U' (the frozen parameter's)."""
    head, _, last = file_key.rpartition(".")
    return f"{head}.{_FILE_TO_MODEL[last]}" if head and last in _FILE_TO_MODEL else file_key


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
    for attr in (_BOUND_TO, _BOUND_NAME, _RECHOSEN):
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
