"""What an SVFit adapter file holds, and how a load turns it back into the trained adapter.

A file holds each module's trained singular-value vector and one table of the base weights' fingerprints; the
frozen bases are recomputed from the base weights at load, except the singular vectors a recomputation could move
too far (``SpectrumInfo.saved_columns``), which the file carries and the load splices into the recomputed bases
(``save_bases=True`` carries both bases whole). Every module's base weight is checked against the file's
fingerprint before anything is loaded. ``SVFitModel`` calls these from PEFT's two checkpoint hooks."""

from __future__ import annotations

from typing import Optional

import torch

from ..core.fingerprint import Fingerprint, compare
from ..core.fingerprint import from_row as from_fingerprint_row
from ..core.fingerprint import to_row as to_fingerprint_row
from .config import RECHOSEN
from .factorization import shift_unit
from .guards import BaseWeightMismatchError, is_dtensor
from .layer import SVFitLayer
from .verify import base_hint, other_dtype_message

_BASES_ATTRS = ("basis_U", "basis_V", "svfit_sigma", "svfit_U", "svfit_V")  # in memory; in files: svfit_U/V
_FILE_TO_MODEL = {"svfit_U": "basis_U", "svfit_V": "basis_V"}
COLUMNS = "svfit_columns"  # in files: which kept singular vectors a module's saved svfit_U/V hold
FINGERPRINT_KEY = "svfit_base_fingerprints"  # one uint8 table per adapter file (see state_to_save)


def state_to_save(model, config, adapter_name: str, selected: dict) -> dict:
    """The file's tensors, from what PEFT selected for ``adapter_name``: the trained vectors, the singular vectors a
    recomputation could move (or both whole bases with ``save_bases=True``) and the fingerprint table."""
    save_all = getattr(config, "save_bases", False)
    # By default the file holds the trained vectors only; the bases are recomputed from the base weights at
    # load. Modules whose recomputation could drift by more than the bound (SpectrumInfo.needs_bases: nearly
    # repeated singular values that training moved apart) carry the singular vectors that could move
    # (SpectrumInfo.saved_columns); save_bases=True keeps both bases of every module (a one-basis layer forms the
    # other from W0), which is what makes a load onto a copy of the base in another dtype exact.
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


def read_file_records(config, adapter_name: str, state_dict: dict) -> tuple[dict, dict, dict]:
    """Before PEFT's own remapping: the file's keys in the model's names, less the records it carries; returns
    (state_dict, {module: fingerprint row}, {module: carried column indices})."""
    if getattr(config, RECHOSEN, False):
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
    return state_dict, recorded, columns


def state_to_load(model, config, adapter_name: str, remapped: dict, recorded: dict, columns: dict) -> dict:
    """After PEFT's remapping: check every module's base weight against the file, then give each module the bases it
    stores (recomputed, spliced with the carried singular vectors, or as saved) beside its loaded vector."""
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
            f"base weights, so load it onto the model it was trained on{base_hint(config)}."
        )
    saved = {side: next((k for k in (f"{prefix}basis_{side}.{adapter_name}", f"{prefix}basis_{side}")
                         if k in state_dict), None) for side in ("U", "V")}
    if None in saved.values() or partial:
        raise BaseWeightMismatchError(other_dtype_message(key, recorded, current))
    for side, k in saved.items():  # a basis this layer did not store yet still loads: the layer will store both
        state_dict[f"{prefix}basis_{side}.{adapter_name}"] = state_dict.pop(k)
    return recorded


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
