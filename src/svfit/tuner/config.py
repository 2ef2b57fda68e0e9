"""``SVFitConfig``: the PEFT config of the SVFit method."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from packaging.version import Version
from peft.config import PeftConfig

from .._version import __version__
from ..core.parametrization import PARAMETRIZATIONS
from ..core.paths import COMPUTE_PATHS
from ..core.spectrum import INFORMATION_MEASURES, SVD_DTYPES
from .peft_type import SVFIT_PEFT_TYPE

BIAS_OPTIONS = ("none", "all", "svfit_only")
DEFAULT_SCALING = 500.0  # chosen by measurement: BENCHMARKS.md, "Drop-in learning rates"
SCALING_SINCE = Version("0.2.0")  # adapters written by older versions trained the raw shift
# set on a config object in-process (never serialized), by SVFitModel.inject_adapter
BOUND_TO = "_svfit_bound_to"  # weakref to the model whose weights the config's records describe
BOUND_NAME = "_svfit_bound_name"  # that model's base_model_name_or_path
RECHOSEN = "_svfit_ranks_rechosen"  # a reused config's copy that re-chose its ranks on a different base


@dataclass
class SVFitConfig(PeftConfig):
    """Configuration of an SVFit adapter (singular-value fine-tuning, arXiv 2409.05926).

    For each targeted weight W0 = U diag(sigma) V^T, SVFit keeps the top-r singular triplets, freezes U_r, V_r and
    the residual, and trains only the r singular values. The adapted model equals the base model at init.

    Rank selection (per module):
        r: ``None`` (default) picks the smallest r whose singular values hold at least ``threshold`` of the
            spectrum; an ``int`` fixes r (clipped to min(d_out, d_in)); ``"full"`` keeps the whole spectrum
            (SVFT-Plain).
        threshold: share of the spectrum to keep when ``r`` is None (default 0.99, the paper's "99% of the
            information").
        information: how the share is measured: ``"energy"`` (sum of sigma^2, i.e. explained variance; default) or
            ``"nuclear"`` (sum of sigma).
        rank_pattern: per-module overrides, ``{regex_or_suffix: spec}`` where spec is an int, ``"full"`` or a
            threshold float in (0, 1]. Keys are matched like LoRA's ``rank_pattern``.

    Training:
        scaling: what a unit of the trained ``delta`` vector moves a singular value by, as a multiple of the
            matrix's rms singular value (||W0||_F / sqrt(n)); the ``lora_alpha`` of SVFit. The default
            (``DEFAULT_SCALING``) makes the learning rates of LoRA recipes (1e-4 to 3e-4, and Trainer's 5e-5) work
            unchanged, and the same learning rate mean the same relative step on every model whatever its weight
            scale. ``None`` trains the raw shift (c = delta, svfit < 0.2's behaviour): learning rates then live in
            singular-value units, around 5e-2 to 2e-1 (SVFT's priors). Applies to ``delta`` only.
        parametrization: ``"delta"`` (default; trains a shift of the singular values, init 0), ``"sigma"`` (trains
            the singular values themselves, init sigma) or ``"scale"`` (trains a multiplicative factor, init 1).
            See ``svfit.core.parametrization`` for why delta is the default.
        nonneg: clamp the adapted singular values at zero (SVDiff's ReLU).
        init_weights: ``True`` starts at the identity (the base model); ``False`` draws a random non-identity
            perturbation (for tests).
        bias: ``"none"``, ``"all"`` or ``"svfit_only"`` (train the biases of adapted layers), as LoRA's ``bias``.

    SVD:
        svd: ``"full"`` (``torch.linalg.svd``; default) or ``"lowrank"`` (seeded randomized SVD; only worth it when
            r is much smaller than min(d_out, d_in)).
        svd_dtype: ``"float32"`` (default) or ``"float64"``; the SVD never runs in the model's half precision.
        svd_niter, svd_oversample, svd_seed: power iterations, oversampling and seed of the randomized SVD.
        svd_device: ``"auto"`` (an accelerator when one is present, else where the weight lives), ``"cpu"``, or
            a device such as ``"cuda"`` / ``"cuda:1"``: a CPU-resident weight is factorised there one matrix at a
            time and its bases come back to the weight's device.
        svd_split: under ``torch.distributed`` (DDP/FSDP via torchrun or accelerate), share the SVDs between the
            ranks and broadcast the results (default ``True``): every rank must then create the adapter (or load
            it) at the same time, as for any collective; one that does so alone waits
            ``SVFIT_SVD_SPLIT_TIMEOUT`` seconds (60) and then factorises everything itself.

    Storage:
        save_bases: ``False`` (default) saves only the trained singular values (plus the ranks and base-weight
            fingerprints in the config) and recomputes U_r, V_r at load; ``True`` also saves U_r, V_r and sigma_r
            (a LoRA-sized file, exact on any hardware, no SVD needed with ``low_cpu_mem_usage=True``). A module
            whose kept spectrum has (near-)repeated singular values that training moved apart always saves the
            singular vectors that another SVD could rotate most, enough for the rest to reload within 1e-3
            (``svfit.core.drift.columns_to_save``; all of them past a quarter of r), since they are not unique.
        bases: ``"auto"`` (default) stores only the basis of each Linear's smaller side (V_r, or U_r when
            d_out < d_in) wherever the kept spectrum is well conditioned, since W0 V_r = U_r diag(sigma_r) gives the
            other exactly (to 1e-6 relative in float32); ``"both"`` stores U_r and V_r. Other layer types and
            randomized SVDs keep both.
        bases_dtype: ``"base"`` (default) keeps the bases in the base weight's dtype: float32 for a float32 model,
            bf16 for a bf16 one (measured on SmolLM2-135M: Delta W and the singular-value gradient within 5e-3 of
            float32 bases, the rounding of bf16 itself); ``"float32"`` keeps them in float32. The trained vector is
            float32 either way (PEFT's autocast_adapter_dtype).

    Compute:
        compute_path: how an adapted Linear / Conv1D computes its update (all give the same model to round-off;
            see ``svfit.core.paths``). ``"auto"`` (default) picks the cheapest per call by a flop model: usually
            ``"merged"`` in training (forms W0 + U_r diag(c) V_r^T once per step and runs one matmul, like the
            base) and a one-basis side path (``"input"``/``"output"``) for few tokens. ``"reference"`` is the
            straightforward side branch ((x V_r) * c) U_r^T. With half-precision weights ``auto`` uses only
            ``output`` or ``reference`` (``merged``/``input`` would round a small update into a bf16 weight or
            input); naming a path forces it where it applies. The fast paths are once-differentiable and have no
            vmap rule: for double backward or ``torch.func`` per-sample gradients use ``"reference"``.

    Recorded at injection (do not set by hand):
        resolved_ranks: the r chosen for every adapted module; reused verbatim on reload, since re-thresholding a
            recomputed spectrum could shift r by one and break the checkpoint's shapes.
        base_fingerprints: a fingerprint of every adapted base weight; loading onto a different weight fails with
            an error naming the module. A config object applied once is bound to those weights: use a fresh
            SVFitConfig for another model.

    The remaining fields (``target_modules``, ``exclude_modules``, ``layers_to_transform``, ``layers_pattern``,
    ``modules_to_save``, ``trainable_token_indices``, ``fan_in_fan_out``, ``task_type``) mean what they mean for
    ``LoraConfig``.
    """

    r: Optional[Union[int, str]] = field(
        default=None,
        metadata={"help": "None: pick r by `threshold`; an int: fixed r; 'full': the whole spectrum."},
    )
    threshold: float = field(
        default=0.99, metadata={"help": "Share of the spectrum the kept singular values must hold (r=None)."}
    )
    information: Literal["energy", "nuclear"] = field(
        default="energy", metadata={"help": "Spectrum share measured on sigma^2 ('energy') or sigma ('nuclear')."}
    )
    rank_pattern: Optional[dict] = field(
        default_factory=dict,
        metadata={"help": "Per-module rank overrides {pattern: int | 'full' | threshold float}."},
    )
    scaling: Optional[Union[float, str]] = field(
        default="auto",
        metadata={
            "help": "Step unit of the delta vector, in rms singular values of each matrix ('auto': the default "
            "for new adapters; None: raw shift in singular-value units)."
        },
    )
    parametrization: Literal["delta", "sigma", "scale"] = field(
        default="delta", metadata={"help": "What the trained vector is: a shift, the values, or a scale."}
    )
    nonneg: bool = field(default=False, metadata={"help": "Clamp adapted singular values at zero."})
    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={
            "help": "Module names (exact or suffix) or a regex (full match) to adapt; 'all-linear' for every "
            "Linear/Conv1D but the output layer. Defaults per architecture, like LoRA's."
        },
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Module names or a regex to leave alone."}
    )
    layers_to_transform: Optional[Union[list[int], int]] = field(
        default=None, metadata={"help": "Only adapt the layers with these indices."}
    )
    layers_pattern: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Name of the layer list, used with layers_to_transform."}
    )
    modules_to_save: Optional[list[str]] = field(
        default=None, metadata={"help": "Modules trained in full and saved with the adapter (e.g. a new head)."}
    )
    trainable_token_indices: Optional[Union[list[int], dict[str, list[int]]]] = field(
        default=None,
        metadata={
            "help": "As in LoraConfig: token indices whose embedding rows train (a list for the input embedding, or "
            "{'embed_tokens': [...]}), e.g. tokens TRL's SFTTrainer adds when it clones a chat template."
        },
    )
    bias: str = field(default="none", metadata={"help": "Train biases: 'none', 'all' or 'svfit_only'."})
    fan_in_fan_out: Optional[bool] = field(
        default=None,
        metadata={
            "help": "None (default): read each layer's weight layout from its class (GPT-2's Conv1D stores (in, out)). "
            "True/False as in LoraConfig: a value that contradicts a layer warns with LoRA's message and is corrected."
        },
    )
    init_weights: bool = field(
        default=True, metadata={"help": "True: start at the base model. False: random non-identity init (tests)."}
    )
    svd: Literal["full", "lowrank"] = field(default="full", metadata={"help": "Exact or randomized SVD."})
    svd_dtype: Literal["float32", "float64"] = field(default="float32", metadata={"help": "Precision of the SVD."})
    svd_niter: int = field(default=4, metadata={"help": "Power iterations of the randomized SVD."})
    svd_oversample: int = field(default=8, metadata={"help": "Oversampling of the randomized SVD."})
    svd_seed: int = field(default=0, metadata={"help": "Seed of the randomized SVD."})
    svd_device: str = field(
        default="auto", metadata={"help": "Where to run the SVD: 'auto' (accelerator if present), 'cpu', 'cuda'..."}
    )
    svd_split: bool = field(
        default=True, metadata={"help": "Share the SVDs between torch.distributed ranks and broadcast them."}
    )
    save_bases: bool = field(default=False, metadata={"help": "Also save U_r, V_r, sigma_r (bigger file)."})
    bases: Literal["auto", "both"] = field(
        default="auto", metadata={"help": "Store one basis where the other follows from W0 ('auto'), or both."}
    )
    bases_dtype: Literal["float32", "base"] = field(
        default="base", metadata={"help": "Storage dtype of U_r and V_r: the base weight's, or float32."}
    )
    compute_path: Literal["auto", "reference", "merged", "input", "output"] = field(
        default="auto", metadata={"help": "How adapted Linear layers compute the update ('auto': cheapest)."}
    )
    resolved_ranks: dict = field(default_factory=dict, metadata={"help": "Filled at injection: r per module."})
    base_fingerprints: dict = field(
        default_factory=dict, metadata={"help": "Filled at injection: fingerprint of each base weight."}
    )
    svfit_version: str = field(default=__version__, metadata={"help": "svfit version that wrote this config."})

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = SVFIT_PEFT_TYPE
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        self.rank_pattern = dict(self.rank_pattern or {})
        self.resolved_ranks = {str(k): int(v) for k, v in (self.resolved_ranks or {}).items()}
        self.base_fingerprints = dict(self.base_fingerprints or {})
        if self.scaling == "auto":
            # new adapters get the default unit; a config written before the field existed trained the raw shift
            legacy = Version(str(self.svfit_version)) < SCALING_SINCE
            self.scaling = None if legacy or self.parametrization != "delta" else DEFAULT_SCALING
        self._validate()

    def _validate(self) -> None:
        check_rank_spec(self.r, "r", allow_none=True, allow_threshold=False)
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)):
            raise TypeError(f"threshold must be a float in (0, 1], got {self.threshold!r}")
        if not 0.0 < float(self.threshold) <= 1.0:
            raise ValueError(f"threshold must lie in (0, 1], got {self.threshold} (0.99 keeps 99% of the spectrum)")
        for key, spec in self.rank_pattern.items():
            check_rank_spec(spec, f"rank_pattern[{key!r}]", allow_none=False, allow_threshold=True)
        _check_choice("information", self.information, INFORMATION_MEASURES)
        _check_choice("parametrization", self.parametrization, PARAMETRIZATIONS)
        _check_choice("bias", self.bias, BIAS_OPTIONS)
        _check_choice("svd", self.svd, ("full", "lowrank"))
        _check_choice("svd_dtype", self.svd_dtype, tuple(SVD_DTYPES))
        _check_svd_device(self.svd_device)
        if self.scaling is not None:
            if isinstance(self.scaling, bool) or not isinstance(self.scaling, (int, float)) or not (
                math.isfinite(self.scaling) and self.scaling > 0
            ):
                raise ValueError(f"scaling must be a positive float, None or 'auto'; got {self.scaling!r}")
            if self.parametrization != "delta":
                raise ValueError(
                    f"scaling applies to parametrization='delta' only (the '{self.parametrization}' vector has its "
                    "own units); leave scaling unset"
                )
            self.scaling = float(self.scaling)
        _check_choice("bases_dtype", self.bases_dtype, ("float32", "base"))
        _check_choice("bases", self.bases, ("auto", "both"))
        _check_choice("compute_path", self.compute_path, COMPUTE_PATHS)
        for name in ("svd_niter", "svd_oversample"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative int, got {value!r}")
        if self.svd == "lowrank" and self.information == "nuclear":
            thresholds = [self.r is None] + [isinstance(s, float) for s in self.rank_pattern.values()]
            if any(thresholds):
                raise ValueError(
                    "information='nuclear' measures a share of the whole spectrum, which a randomized SVD does not "
                    "compute: use svd='full', or information='energy', or a fixed integer r"
                )
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("layers_pattern only works together with layers_to_transform")
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError("layers_to_transform cannot be used when target_modules is a str (regex)")
        if Version(str(self.svfit_version)) > Version(__version__):
            warnings.warn(
                f"This adapter config was written by svfit {self.svfit_version}, newer than the installed "
                f"{__version__}; fields it does not know were dropped. Upgrade svfit (pip install -U svfit).",
                stacklevel=3,
            )

    def rank_spec_for(self, module_name: str):
        """The rank specification that applies to ``module_name`` (pattern override, else r / threshold)."""
        from peft.utils.other import get_pattern_key

        if self.rank_pattern:
            key = get_pattern_key(list(self.rank_pattern), module_name)
            if key in self.rank_pattern:
                return self.rank_pattern[key]
        return float(self.threshold) if self.r is None else self.r


def check_rank_spec(spec, what: str, *, allow_none: bool, allow_threshold: bool) -> None:
    if spec is None and allow_none:
        return
    if spec == "full":
        return
    if isinstance(spec, int) and not isinstance(spec, bool):
        if spec < 1:
            raise ValueError(f"{what} must be >= 1, got {spec}")
        return
    if allow_threshold and isinstance(spec, float):
        if not 0.0 < spec <= 1.0:
            raise ValueError(f"{what}: a threshold must lie in (0, 1], got {spec}; use an int for a fixed rank")
        return
    hint = "an int, 'full' or a threshold float in (0, 1]" if allow_threshold else "None, an int or 'full'"
    extra = " (for a spectrum share use threshold=...)" if isinstance(spec, float) and not allow_threshold else ""
    raise ValueError(f"{what} must be {hint}, got {spec!r}{extra}")


def _check_svd_device(value) -> None:
    if value in ("auto", "cpu"):
        return
    try:
        import torch

        torch.device(value)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(
            f"svd_device must be 'auto', 'cpu' or a torch device such as 'cuda' or 'cuda:1'; got {value!r}"
        ) from exc


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
