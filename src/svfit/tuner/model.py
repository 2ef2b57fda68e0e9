"""``SVFitModel``: the PEFT tuner that injects SVFit layers into a model. What its checkpoints hold is in
``checkpoint``, the base-weight checks in ``verify``, ``add_weighted_adapter`` in ``weighted``."""

from __future__ import annotations

import copy
import warnings
import weakref
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

from ..core.fingerprint import Fingerprint
from . import checkpoint, weighted
from .config import BOUND_NAME, BOUND_TO, RECHOSEN, SVFitConfig
from .factorization import factorize_modules, layer_kind, skips_svd
from .guards import BaseWeightMismatchError, check_adapter_name, check_supported_weight, is_dtensor
from .layer import SVFitLayer, dispatch
from .summary import ModuleSummary, summarize
from .verify import tied_target_weights, verify_base_weights


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
        check_adapter_name(adapter_name, self.prefix)
        config = self.peft_config[adapter_name]
        bound = getattr(config, BOUND_TO, None)
        reused = bound is not None and bound() is not model  # (a dead reference counts: applied before, here)
        if reused:
            # One config object applied to several models (normal with a LoraConfig): this model records its ranks
            # and fingerprints on a copy, so that the first model's records (and its saved adapters) stay intact.
            # get_peft_model has already written this model's name into the shared object: give it back.
            original = config
            config = copy.deepcopy(original)
            config.__dict__.pop(RECHOSEN, None)
            original.base_model_name_or_path = getattr(original, BOUND_NAME, original.base_model_name_or_path)
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
                setattr(config, RECHOSEN, True)  # loading trained weights into it is refused (they belong elsewhere)
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
        if reused and not getattr(config, RECHOSEN, False) and _same_records(config, original):
            # nothing this model recorded differs from the first one's: keep sharing the user's object (PEFT
            # expects peft_config[name] to be the very config passed in)
            self.peft_config[adapter_name] = config = original
        # in-process only (never serialized): which model this config's records describe
        setattr(config, BOUND_TO, weakref.ref(model))
        setattr(config, BOUND_NAME, config.base_model_name_or_path)

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
        tied = tied_target_weights(self.model)
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
        return checkpoint.state_to_save(model, config, adapter_name, selected)

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        state_dict, recorded, columns = checkpoint.read_file_records(config, adapter_name, state_dict)
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        return checkpoint.state_to_load(model, config, adapter_name, remapped, recorded, columns)

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
        weighted.add_weighted_adapter(
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


def _inject_adapter_names(target, args, kwargs, adapter_names):
    kwargs["adapter_names"] = adapter_names
    return args, kwargs


