"""SVFit tuner layers: nn.Linear, transformers' Conv1D, nn.Conv1d/2d/3d and nn.Embedding.

Every layer computes the additive form of SVFit (see ``svfit.core.parametrization``):

    y = base(x) + ((x V_r) * c) U_r^T,    c = adapted singular values - sigma_r,

so the base layer runs untouched, the residual W_e is never formed, disabling an adapter is exact, and several
adapters can live side by side. Only the r-vector behind c trains; U_r, V_r and sigma_r are frozen buffers.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, _get_in_out_features, check_adapters_to_merge
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..core import paths
from ..core.drift import RELOAD_DRIFT_BOUND, columns_to_save, reload_drift
from ..core.fingerprint import Fingerprint
from ..core.parametrization import initial_vector, relative_shift, singular_value_shift
from ..core.spectrum import SVD_DTYPES
from .factorization import Factorization, factorize_modules, shift_unit, skips_svd, weight_matrix
from .guards import check_supported_weight, global_module_hooks, is_dtensor, under_init_empty_weights


@dataclass
class SpectrumInfo:
    """What SVFit chose for one adapted weight (for summaries and for deciding what to save)."""

    shape: tuple[int, int]  # (d_out, d_in) of the matrix that was factored
    n: int  # length of the full spectrum
    r: int  # kept singular values = trainable parameters
    energy_kept: Optional[float]  # share of ||W0||_F^2 held by the kept values
    nuclear_kept: Optional[float]  # share of ||W0||_* (None when the full spectrum was not computed)
    min_gap: float  # smallest gap around the kept block, relative to sigma_1
    fingerprint: Fingerprint
    randomized: bool = False  # bases from a randomized SVD, which another device or BLAS need not reproduce
    spectrum: Optional[torch.Tensor] = None  # the whole spectrum; None when not computed (bases came from a file)
    svd_dtype: torch.dtype = torch.float32

    def reload_drift(self, shift: torch.Tensor) -> float:
        """Estimated relative drift of this module's Delta W if its bases were recomputed elsewhere
        (``svfit.core.drift``); infinite when that cannot be estimated."""
        if self.randomized or self.spectrum is None:
            return float("inf")
        return reload_drift(self.spectrum, shift, self.svd_dtype)

    def needs_bases(self, shift: torch.Tensor) -> bool:
        """Whether a saved adapter must carry (some of) this module's singular vectors to reload within
        ``RELOAD_DRIFT_BOUND``."""
        return not self.reload_drift(shift) <= RELOAD_DRIFT_BOUND  # NaN (no estimate): carry them

    def saved_columns(self, shift: torch.Tensor) -> Optional[torch.Tensor]:
        """Which kept singular vectors a saved adapter carries (``svfit.core.drift.columns_to_save``): None for
        none, all r where the drift cannot be estimated (randomized SVD, bases that came from a file).
        ``columns_to_save``'s first estimate is ``needs_bases``'s, so it is not run first: that would double the cost
        of saving a large model's spectra."""
        if self.randomized or self.spectrum is None:
            return torch.arange(self.r)
        return columns_to_save(self.spectrum, shift, self.svd_dtype)


class SVFitLayer(BaseTunerLayer):
    adapter_layer_names: tuple[str, ...] = ("svfit_vector",)
    other_param_names: tuple[str, ...] = (
        "basis_U",
        "basis_V",
        "svfit_sigma",
        "svfit_info",
        "svfit_parametrization",
        "svfit_nonneg",
        "svfit_unit",
        "svfit_bases_dtype",
        "svfit_compute_path",
    )

    def __init__(self, base_layer: nn.Module, **kwargs) -> None:
        self.base_layer = base_layer
        self.svfit_vector = nn.ParameterDict({})
        # Frozen parameters rather than buffers, so that FSDP2 shards them like any frozen weight (each rank holds
        # 1/N); only svfit_vector ever requires grad (adapter_layer_names). A layer stores one basis (that of its
        # smaller side) when the other follows from W0 exactly enough (``stored_bases``). The tuner's state-dict hook
        # keeps them out of adapter checkpoints unless they must be saved.
        self.basis_U = nn.ParameterDict({})
        self.basis_V = nn.ParameterDict({})
        self.svfit_sigma = BufferDict({}, persistent=True)
        self.svfit_info: dict[str, SpectrumInfo] = {}
        self.svfit_parametrization: dict[str, str] = {}
        self.svfit_nonneg: dict[str, bool] = {}
        self.svfit_unit: dict[str, float] = {}  # c = unit * trained vector (delta); see SVFitConfig.scaling
        self.svfit_bases_dtype: dict[str, str] = {}
        self.svfit_compute_path: dict[str, str] = {}
        self._one_basis: dict[str, bool] = {}
        self._placeholders: set[str] = set()  # adapters whose bases await a checkpoint (no SVD was run)
        self.register_load_state_dict_post_hook(_after_state_dict_load)  # sigma may arrive with a checkpoint
        self._disable_adapters = False
        self.merged_adapters = []  # rebind: the class-level list would be shared by every layer
        self.kwargs = kwargs
        self.in_features, self.out_features = _get_in_out_features(self.get_base_layer())

    # -- orientation hooks, specialised per base layer type ------------------------------------------------------

    def _weight_matrix(self) -> torch.Tensor:
        """The base weight as a (d_out, d_in) matrix (a view, never a copy to be written)."""
        return weight_matrix(self.get_base_layer())

    def _to_weight_layout(self, delta: torch.Tensor) -> torch.Tensor:
        """Map a (d_out, d_in) delta to the stored layout of the base weight."""
        raise NotImplementedError

    def _branch(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        raise NotImplementedError

    # -- creation ----------------------------------------------------------------------------------------------

    def update_layer(
        self,
        adapter_name: str,
        config,
        rank_spec,
        recorded_fingerprint: Optional[Fingerprint] = None,
        inference_mode: bool = False,
        factorization: Optional[Factorization] = None,
    ) -> SpectrumInfo:
        """Add an adapter. ``factorization`` is this weight's SVD when the tuner computed it in a batch with the
        others (``svfit.tuner.factorization``); without it the SVD runs here."""
        base = self.get_base_layer()
        check_supported_weight(base)
        if self.merged:
            # the SVD must see the pre-trained weight, not one with another adapter merged into it
            raise ValueError(
                f"cannot add SVFit adapter '{adapter_name}' while adapters {self.merged_adapters} are merged into "
                "the base weights: call unmerge_adapter() first"
            )
        W = weight_matrix(base)
        d_out, d_in = W.shape
        bases_dtype = torch.float32 if config.bases_dtype == "float32" else W.dtype
        randomized = config.svd == "lowrank" and rank_spec != "full"
        if skips_svd(config, rank_spec, recorded_fingerprint, under_init_empty_weights()):
            # low_cpu_mem_usage load of a checkpoint that carries its bases: skip the SVD; the state dict fills
            # these placeholders (zeros, so a missing key shows as "no update" rather than as garbage)
            r = min(rank_spec, d_out, d_in)
            U = torch.zeros(d_out, r, device=W.device, dtype=bases_dtype)
            V = torch.zeros(d_in, r, device=W.device, dtype=bases_dtype)
            S = torch.zeros(r, device=W.device)
            info = SpectrumInfo(
                (d_out, d_in), min(d_out, d_in), r, None, None, float("inf"), recorded_fingerprint, randomized
            )
            self._placeholders.add(adapter_name)
        else:
            if factorization is None:
                done, _ = factorize_modules({"": (base, rank_spec)}, config, {"": type(self).__name__})
                factorization = done[""]
            fp, svd = factorization.fingerprint, factorization.svd
            if svd.r == 0:
                warnings.warn(f"{type(base).__name__} weight {tuple(W.shape)} is all zeros: SVFit keeps r=0 there")
            U, S, V = svd.U.to(bases_dtype), svd.S.float(), svd.V.to(bases_dtype)
            info = SpectrumInfo(
                tuple(W.shape), svd.n, svd.r, svd.energy_kept, svd.nuclear_kept, svd.min_gap, fp, randomized,
                svd.spectrum, SVD_DTYPES[config.svd_dtype],
            )
            keep = self._bases_to_keep(config, S, randomized)
            U, V = (U if keep != "V" else None), (V if keep != "U" else None)
        # the unit of the trained vector (config.scaling): from the fingerprint the adapter records, so that a reload
        # onto a copy of the base in another dtype uses the very same number
        self.svfit_unit[adapter_name] = shift_unit(config, recorded_fingerprint or info.fingerprint, min(d_out, d_in))

        for container, basis in ((self.basis_U, U), (self.basis_V, V)):
            if basis is not None:
                put_frozen(container, adapter_name, basis)
            elif adapter_name in container:
                del container[adapter_name]
        self.svfit_sigma[adapter_name] = S
        vector = initial_vector(
            S, config.parametrization, random=not config.init_weights, unit=self.svfit_unit[adapter_name]
        )
        self.svfit_vector[adapter_name] = nn.Parameter(vector)
        self.svfit_info[adapter_name] = info
        self.svfit_parametrization[adapter_name] = config.parametrization
        self.svfit_nonneg[adapter_name] = bool(config.nonneg)
        self.svfit_bases_dtype[adapter_name] = config.bases_dtype
        self.svfit_compute_path[adapter_name] = getattr(config, "compute_path", "auto")
        self._refresh_one_basis(adapter_name)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)
        return info

    def _bases_to_keep(self, config, sigma: torch.Tensor, randomized: bool) -> str:
        """"U", "V" (one basis: the layer's smaller side) or "both". One basis needs the exact identity
        W0 V_r = U_r diag(sigma_r) (so no randomized SVD), a well-conditioned kept spectrum (the other basis is
        W0 V_r / sigma_r) and W0 at hand in the forward; layers other than Linear / Conv1D keep both."""
        if getattr(config, "bases", "auto") == "both" or randomized or not self._one_basis_storage:
            return "both"
        if is_dtensor(self.get_base_layer().weight):
            return "both"  # already sharded: W0 is whole only inside its own unit's forward (FSDP shards both bases)
        if sigma.numel() == 0 or not paths.one_basis_ok(sigma):
            return "both"
        return "V" if self.in_features <= self.out_features else "U"

    _one_basis_storage = False  # layer types whose paths can run from one stored basis

    def stored_bases(self, adapter_name: str) -> str:
        """Which bases this layer keeps for an adapter: "both", "U" or "V"."""
        has_u, has_v = adapter_name in self.basis_U, adapter_name in self.basis_V
        return "both" if has_u and has_v else ("U" if has_u else "V")

    def needs_saved_bases(self, adapter_name: str) -> bool:
        """Whether a checkpoint of this adapter must carry this module's bases (see ``SpectrumInfo.needs_bases``)."""
        return self.svfit_info[adapter_name].needs_bases(self.singular_value_shift(adapter_name).detach())

    def saved_columns(self, adapter_name: str) -> Optional[torch.Tensor]:
        """The kept singular vectors a checkpoint of this adapter carries (None: none; see
        ``SpectrumInfo.saved_columns``)."""
        return self.svfit_info[adapter_name].saved_columns(self.singular_value_shift(adapter_name).detach())

    def placeholder_bases(self, adapter_name: str) -> bool:
        return adapter_name in self._placeholders

    def keep_bases(self, adapter_name: str, sigma: torch.Tensor, config) -> None:
        """Drop the basis a layer with these singular values would not store (after a load that skipped the SVD)."""
        self._placeholders.discard(adapter_name)
        keep = self._bases_to_keep(config, sigma, self.svfit_info[adapter_name].randomized)
        for side in {"U": ("V",), "V": ("U",)}.get(keep, ()):
            container = getattr(self, f"basis_{side}")
            if adapter_name in container:
                del container[adapter_name]

    def dense_bases(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(U_r, V_r) in float32, the missing one of a one-basis layer formed from the pre-trained weight
        (W0 V_r / sigma_r or W0^T U_r / sigma_r). Only valid while no adapter is merged into the weight (merge
        stores both bases first)."""
        U = self.basis_U[adapter_name].float() if adapter_name in self.basis_U else None
        V = self.basis_V[adapter_name].float() if adapter_name in self.basis_V else None
        if U is not None and V is not None:
            return U, V
        if self.merged:
            raise RuntimeError("internal: one-basis layer with merged adapters (merge materialises both bases)")
        W = self._weight_matrix().detach().float()
        sigma = self.svfit_sigma[adapter_name].float()
        return ((W @ V) / sigma, V) if U is None else (U, (W.T @ U) / sigma)

    def materialize_bases(self, adapter_name: Optional[str] = None) -> None:
        """Store both bases (from the pristine weight), e.g. before merging changes that weight."""
        for name in [adapter_name] if adapter_name else list(self.svfit_vector):
            if self.stored_bases(name) == "both" or name not in self.svfit_sigma:
                continue
            stored = self.basis_U[name] if name in self.basis_U else self.basis_V[name]
            U, V = self.dense_bases(name)
            put_frozen(self.basis_U, name, U.to(stored.dtype))
            put_frozen(self.basis_V, name, V.to(stored.dtype))

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: Optional[torch.device] = None) -> None:
        # PEFT's version also casts every float container to the base dtype, which would round U, V and the fp32
        # trained vector to bf16 before autocast brings them back. SVFit moves devices only; dtypes are set on
        # purpose in set_adapter_dtypes.
        target = device if device is not None else self.get_base_layer().weight.device
        if target.type == "meta":
            return
        for container in (self.basis_U, self.basis_V, self.svfit_sigma):
            t = container[adapter_name] if adapter_name in container else None
            if t is not None and t.device.type != "meta" and t.device != target:
                moved = t.data.to(target)
                if isinstance(t, nn.Parameter):
                    put_frozen(container, adapter_name, moved)
                else:
                    container[adapter_name] = moved
        if adapter_name in self.svfit_vector:
            p = self.svfit_vector[adapter_name]
            if p.device.type != "meta" and p.device != target:
                self.svfit_vector[adapter_name] = nn.Parameter(p.data.to(target), requires_grad=p.requires_grad)

    def set_adapter_dtypes(self, adapter_name: str, autocast: bool) -> None:
        """Trained vector in float32 (autocast, PEFT's default) or the base dtype; U_r, V_r in float32 or the base
        dtype per ``bases_dtype``; sigma_r always float32."""
        if adapter_name not in self.svfit_vector:
            return
        if is_dtensor(self.svfit_vector[adapter_name]):
            return  # sharded by FSDP2 as created (float32 vector, bases in bases_dtype): FSDP owns these parameters
        base_dtype = self.get_base_layer().weight.dtype
        base_dtype = base_dtype if base_dtype.is_floating_point else torch.float32
        p = self.svfit_vector[adapter_name]
        want = torch.float32 if autocast else base_dtype
        if p.dtype != want and p.device.type != "meta":
            self.svfit_vector[adapter_name] = nn.Parameter(p.data.to(want), requires_grad=p.requires_grad)
        bases = torch.float32 if self.svfit_bases_dtype[adapter_name] == "float32" else base_dtype
        for container in (self.basis_U, self.basis_V):
            t = container[adapter_name] if adapter_name in container else None
            if t is not None and t.dtype != bases:
                put_frozen(container, adapter_name, t.data.to(bases))

    # -- the adapted singular values ---------------------------------------------------------------------------

    def singular_value_shift(self, adapter_name: str) -> torch.Tensor:
        """c = adapted - pre-trained singular values, exactly zero at init."""
        return singular_value_shift(
            self.svfit_vector[adapter_name],
            self.svfit_sigma[adapter_name],
            self.svfit_parametrization[adapter_name],
            self.svfit_nonneg[adapter_name],
            self.svfit_unit.get(adapter_name, 1.0),
        )

    def _delta_matrix(self, adapter_name: str) -> torch.Tensor:
        """Delta W = U_r diag(c) V_r^T as a float32 (d_out, d_in) matrix."""
        U, V = self.dense_bases(adapter_name)
        c = self.singular_value_shift(adapter_name).float()
        return (U * c) @ V.T

    def relative_shift(self, adapter_name: str) -> torch.Tensor:
        """c / sigma_r (what one-basis computations scale by)."""
        return relative_shift(
            self.svfit_vector[adapter_name], self.svfit_sigma[adapter_name], self.svfit_parametrization[adapter_name],
            self.svfit_nonneg[adapter_name], self.svfit_unit.get(adapter_name, 1.0),
        )

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """Delta W in the stored layout and dtype of the base weight (transposed for Conv1D, a kernel for convs)."""
        weight = self.get_base_layer().weight
        return self._to_weight_layout(self._delta_matrix(adapter_name)).to(weight.dtype)

    # -- merging -----------------------------------------------------------------------------------------------

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        adapter_names = check_adapters_to_merge(self, adapter_names)
        if not adapter_names:
            return
        weight = self.get_base_layer().weight
        self.materialize_bases()  # one-basis adapters read W0, which merging is about to change
        for name in adapter_names:
            if name not in self.svfit_vector:
                continue
            # add in float32 and round once, so a bf16 merge is as close as the format allows
            merged = weight.data.float() + self._to_weight_layout(self._delta_matrix(name))
            if safe_merge and not torch.isfinite(merged).all():
                # PEFT's wording, which callers and PEFT's own tests match on
                raise ValueError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken")
            weight.data = merged.to(weight.dtype)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        weight = self.get_base_layer().weight
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name in self.svfit_vector:
                restored = weight.data.float() - self._to_weight_layout(self._delta_matrix(name))
                weight.data = restored.to(weight.dtype)

    # -- forward -----------------------------------------------------------------------------------------------

    def _check_forward_args(self, x, *args, **kwargs) -> None:
        adapter_names = kwargs.get("adapter_names", None)
        if adapter_names is None:
            return
        if len(x) != len(adapter_names):
            raise ValueError(
                "Length of `adapter_names` should be the same as the number of inputs, but got "
                f"{len(adapter_names)} and {len(x)} respectively."
            )
        if self.merged:
            raise ValueError(
                "Cannot pass `adapter_names` when there are merged adapters, please call `unmerge_adapter` first."
            )

    def _svfit_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self._check_forward_args(x, *args, **kwargs)
        adapter_names = kwargs.pop("adapter_names", None)
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if adapter_names is not None:
            return self._mixed_batch_forward(x, *args, adapter_names=adapter_names, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        for name in self.active_adapters:
            if name in self.svfit_vector:
                result = result + self._branch(x, name).to(result.dtype)
        return result

    def _mixed_batch_forward(self, x: torch.Tensor, *args: Any, adapter_names: list[str], **kwargs: Any):
        result = self.base_layer(x, *args, **kwargs)
        rows_by_adapter: dict[str, list[int]] = {}
        for i, name in enumerate(adapter_names):
            rows_by_adapter.setdefault(name, []).append(i)
        for name, rows in rows_by_adapter.items():
            if name == "__base__" or name not in self.svfit_vector:
                continue
            idx = torch.tensor(rows, device=result.device)
            result = result.index_add(0, idx, self._branch(x[idx], name).to(result.dtype))
        return result

    # -- fast paths (svfit.core.paths) ---------------------------------------------------------------------------

    def _fast_path_adapter(self, x: torch.Tensor, args, kwargs) -> Optional[str]:
        """The one adapter a fast path may serve in this call, or None. The fast paths serve the common case, one
        active adapter; several adapters, mixed batches, merged or disabled adapters take the reference branch."""
        if args or kwargs.get("adapter_names") is not None or set(kwargs) - {"adapter_names"}:
            return None
        if self.disable_adapters or self.merged:
            return None
        active = [n for n in self.active_adapters if n in self.svfit_vector]
        if len(active) != 1:
            return None
        name = active[0]
        if self.svfit_compute_path.get(name, "auto") == "reference" or self.svfit_info[name].r == 0:
            return None
        return name if x.is_floating_point() else None

    def _plain_base(self, types: tuple) -> bool:
        """The base is exactly one of ``types`` wrapped directly (no other adapter in between), with no hooks a
        fused computation would skip (its own or global ones), and frozen."""
        base = self.get_base_layer()
        return (
            self.base_layer is base
            and type(base) in types
            and not (
                base._forward_hooks or base._forward_pre_hooks or base._backward_hooks or base._backward_pre_hooks
                or hasattr(base, "_hf_hook") or global_module_hooks()
            )
            and not base.weight.requires_grad
        )

    def _refresh_one_basis(self, name: Optional[str] = None) -> None:
        """Whether the one-basis paths may serve an adapter: a well-conditioned kept spectrum (they divide by sigma)
        from an exact SVD (a randomized one satisfies only one of W0 V = U S and U^T W0 = S V^T). Computed here,
        when sigma is set or loaded, so that forward never syncs on it (torch.compile, inference tensors)."""
        for n in [name] if name is not None else list(self.svfit_sigma):
            sigma = self.svfit_sigma[n]
            info = self.svfit_info.get(n)
            self._one_basis[n] = bool(
                sigma.device.type != "meta" and not (info and info.randomized) and paths.one_basis_ok(sigma)
            )

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        return False

    def __repr__(self) -> str:
        return "svfit." + super().__repr__()


class Linear(nn.Module, SVFitLayer):
    """SVFit on nn.Linear, or on transformers' Conv1D (GPT-2), whose weight is stored transposed (d_in, d_out)."""

    def __init__(
        self, base_layer: nn.Module, adapter_name: str, config, rank_spec, recorded_fingerprint=None,
        factorization: Optional[Factorization] = None,
    ):
        super().__init__()
        SVFitLayer.__init__(self, base_layer)
        self.is_conv1d = isinstance(self.get_base_layer(), Conv1D)
        self._active_adapter = adapter_name
        self.update_layer(
            adapter_name, config, rank_spec, recorded_fingerprint, config.inference_mode, factorization=factorization
        )

    def _to_weight_layout(self, delta: torch.Tensor) -> torch.Tensor:
        return delta.T if self.is_conv1d else delta

    _one_basis_storage = True

    def _branch(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        U, V = self.basis_U.get(adapter_name), self.basis_V.get(adapter_name)
        if U is None or V is None:
            basis = U if U is not None else V
            return paths.one_basis_branch(
                self._cast_input_dtype(x, basis.dtype), self.relative_shift(adapter_name),
                self.get_base_layer().weight, U, V, transposed=self.is_conv1d,
            )
        c = self.singular_value_shift(adapter_name)
        return paths.reference_branch(self._cast_input_dtype(x, V.dtype), c, U, V)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        path, name = self.compute_path_for(x, *args, **kwargs)
        if path == "reference":
            return self._svfit_forward(x, *args, **kwargs)
        base = self.get_base_layer()
        U, V = self.basis_U.get(name), self.basis_V.get(name)
        if path == "merged":
            c = self.singular_value_shift(name) if U is not None and V is not None else self.relative_shift(name)
            return paths.merged_linear(x, c, base.weight, base.bias, U, V, transposed=self.is_conv1d)
        s = self.relative_shift(name)
        if path == "input":
            return base(paths.project_input(x, s, V))
        return paths.project_output(base(x), s, U, base.bias)

    def compute_path_for(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[str, Optional[str]]:
        """(path, adapter) this call would take: one of ``svfit.core.paths.COMPUTE_PATHS`` but "auto". Hooks on the
        base layer or a trainable base weight keep the reference branch (a merged matmul would skip them)."""
        name = self._fast_path_adapter(x, args, kwargs)
        if name is None:
            return "reference", None
        base = self.get_base_layer()
        plain = self._plain_base((nn.Linear, Conv1D))
        one_basis = plain and self._one_basis_ok(name)
        stored = self.stored_bases(name)
        available = {"merged": plain, "input": one_basis and stored != "U", "output": one_basis and stored != "V"}
        wanted = self.svfit_compute_path.get(name, "auto")
        if wanted != "auto":
            return (wanted if available.get(wanted) else "reference"), name
        # Chosen from shapes alone (costed as a training step), never from grad mode: the same input then gives the
        # same bits in training, in eval and after a save/load round trip. In half precision a merged weight would
        # round a small update away against W0's own rounding. With half-precision weights the output path loses as
        # much of the update as the reference branch (the output's rounding) and the input path 1.7x that (it also
        # rounds the input plus update); under autocast of float32 weights, the input path would round a float32
        # input plus update to half precision before the matmul, noise far larger than a small update
        # (tests/test_drift.py).
        refused = set()
        if base.weight.dtype not in (torch.float32, torch.float64):
            refused = {"merged"}
        elif _autocast_to_half(x):
            refused = {"merged", "input"}
        path = paths.choose_path(
            x.numel() // self.in_features,
            self.in_features,
            self.out_features,
            self.svfit_info[name].r,
            training=True,
            one_basis=one_basis,
            allowed={k for k, ok in available.items() if ok and k not in refused},
            stored=stored,
        )
        return path, name

    def _one_basis_ok(self, name: str) -> bool:
        return self._one_basis.get(name, False)

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        return True  # Delta W = (U_r diag(c)) V_r^T is already a rank-r factorisation


class Conv(nn.Module, SVFitLayer):
    """SVFit on nn.Conv1d/2d/3d with groups=1: the kernel is factored as a (c_out, c_in * prod(kernel)) matrix.

    The branch is a convolution with the r right singular vectors as kernels (same stride, padding, dilation as the
    base), a per-channel scale by c, and a 1x1 convolution with U_r.
    """

    def __init__(
        self, base_layer: nn.Module, adapter_name: str, config, rank_spec, recorded_fingerprint=None,
        factorization: Optional[Factorization] = None,
    ):
        super().__init__()
        SVFitLayer.__init__(self, base_layer)
        base = self.get_base_layer()
        if base.groups != 1:
            raise ValueError(
                f"SVFit supports only groups=1 convolutions, got groups={base.groups} (a depthwise or grouped conv): "
                "exclude it (exclude_modules) or target the dense convolutions only"
            )
        self._conv_nd = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[base.weight.dim() - 2]
        self._active_adapter = adapter_name
        self.update_layer(
            adapter_name, config, rank_spec, recorded_fingerprint, config.inference_mode, factorization=factorization
        )

    def _to_weight_layout(self, delta: torch.Tensor) -> torch.Tensor:
        return delta.reshape(self.get_base_layer().weight.shape)

    def _branch(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        base = self.get_base_layer()
        U, V = self.basis_U[adapter_name], self.basis_V[adapter_name]
        c = self.singular_value_shift(adapter_name)
        kernel = V.T.reshape(V.shape[1], *base.weight.shape[1:])  # (r, c_in, *k)
        # base._conv_forward applies the base's stride, padding (and padding_mode), dilation
        h = base._conv_forward(self._cast_input_dtype(x, V.dtype), kernel, None)  # (B, r, *spatial)
        h = h * c.reshape(1, -1, *([1] * (h.dim() - 2)))
        return self._conv_nd(h.to(U.dtype), U.reshape(*U.shape, *([1] * (h.dim() - 2))))

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        path, name = self.compute_path_for(x, *args, **kwargs)
        if path != "merged":
            return self._svfit_forward(x, *args, **kwargs)
        base = self.get_base_layer()
        return paths.merged_conv(
            x, self.singular_value_shift(name), base.weight, base.bias, self.basis_U[name], self.basis_V[name],
            stride=base.stride, padding=base.padding, dilation=base.dilation,
        )

    def compute_path_for(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[str, Optional[str]]:
        """"merged" or "reference" (the one-basis paths are not offered for convolutions). Merging needs a batched
        input and numeric zero padding (no padding_mode or string padding in the functional conv's arguments)."""
        name = self._fast_path_adapter(x, args, kwargs)
        if name is None:
            return "reference", None
        base = self.get_base_layer()
        ok = (
            self._plain_base((nn.Conv1d, nn.Conv2d, nn.Conv3d))
            and base.padding_mode == "zeros"
            and not isinstance(base.padding, str)
            and x.dim() == base.weight.dim()
        )
        wanted = self.svfit_compute_path.get(name, "auto")
        if not ok or wanted in ("input", "output"):
            return "reference", name
        if wanted == "merged":
            return "merged", name
        if base.weight.dtype not in (torch.float32, torch.float64):
            return "reference", name
        out_positions = x.shape[0]
        for size, k, s, p, d in zip(x.shape[2:], base.kernel_size, base.stride, base.padding, base.dilation):
            out_positions *= max((size + 2 * p - d * (k - 1) - 1) // s + 1, 0)
        costs = paths.conv_path_costs(
            out_positions, self.basis_V[name].shape[0], base.out_channels, self.svfit_info[name].r
        )
        return min(costs, key=costs.get), name


class Embedding(nn.Module, SVFitLayer):
    """SVFit on nn.Embedding: the (num_embeddings, dim) table is factored; the branch looks up rows of U_r."""

    def __init__(
        self, base_layer: nn.Module, adapter_name: str, config, rank_spec, recorded_fingerprint=None,
        factorization: Optional[Factorization] = None,
    ):
        super().__init__()
        SVFitLayer.__init__(self, base_layer)
        self._active_adapter = adapter_name
        self.update_layer(
            adapter_name, config, rank_spec, recorded_fingerprint, config.inference_mode, factorization=factorization
        )

    def _to_weight_layout(self, delta: torch.Tensor) -> torch.Tensor:
        return delta

    def _branch(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        U, V = self.basis_U[adapter_name], self.basis_V[adapter_name]
        c = self.singular_value_shift(adapter_name)
        out = ((F.embedding(x, U) * c).to(V.dtype)) @ V.T
        embed_scale = self._get_embed_scale()  # e.g. Gemma scales its embeddings inside forward
        return out * embed_scale.to(out.dtype) if embed_scale is not None else out

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self._svfit_forward(x, *args, **kwargs)


def put_frozen(container: nn.ParameterDict, key: str, tensor: torch.Tensor) -> None:
    """Store a frozen basis. Bases are data, not weights to initialise: under accelerate's init_empty_weights (PEFT's
    low_cpu_mem_usage) a new parameter is moved to the meta device, so the real tensor is put back."""
    param = nn.Parameter(tensor, requires_grad=False)
    container[key] = param
    if container[key].device != tensor.device:
        container._parameters[key] = param


def _autocast_to_half(x: torch.Tensor) -> bool:
    """Whether an autocast region would run this layer's matmul in a half-precision dtype."""
    device = x.device.type
    try:
        if not torch.is_autocast_enabled(device):
            return False
        return torch.get_autocast_dtype(device) in (torch.float16, torch.bfloat16)
    except (RuntimeError, TypeError):  # a device type autocast does not know
        return False


def _after_state_dict_load(module: "SVFitLayer", incompatible_keys) -> None:
    module._refresh_one_basis()


def dispatch(
    target: nn.Module, adapter_name: str, config, rank_spec, recorded_fingerprint=None, name: str = "",
    factorization: Optional[Factorization] = None,
):
    """Wrap ``target`` in the SVFit layer for its type, or raise a clear error."""
    base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    check_supported_weight(base, name)
    if isinstance(base, (nn.Linear, Conv1D)):
        if config.fan_in_fan_out and isinstance(base, nn.Linear):
            warnings.warn(f"fan_in_fan_out=True is ignored for nn.Linear '{name}' (its weight is (out, in))")
        return Linear(target, adapter_name, config, rank_spec, recorded_fingerprint, factorization)
    if isinstance(base, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return Conv(target, adapter_name, config, rank_spec, recorded_fingerprint, factorization)
    if isinstance(base, nn.Embedding):
        return Embedding(target, adapter_name, config, rank_spec, recorded_fingerprint, factorization)
    raise TypeError(
        f"SVFit cannot adapt '{name}' of type {type(base).__name__}: supported are nn.Linear, transformers Conv1D, "
        "nn.Conv1d/2d/3d (groups=1) and nn.Embedding. Adjust target_modules."
    )
