"""What SVFit did to each weight: the per-module table and spectrum plots before and after fine-tuning.

A finished run is inspected without rebuilding the adapted model (:func:`run_spectra`): the table and the plot need
each base weight's singular values, not its singular vectors, so one ``torch.linalg.svdvals`` per weight replaces
the SVD that loading the adapter would compute (and the SVD cache, when on, keeps the spectrum for next time).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from .core.parametrization import adapted_singular_values
from .errors import SVFitUserError
from .validation import nearest_existing, write_error

PLOT_FORMATS = (".png", ".pdf", ".svg")


@dataclass
class ModuleSpectrum:
    module: str
    shape: tuple[int, int]
    r: int
    trainable: int
    energy_kept: Optional[float]
    nuclear_kept: Optional[float]
    pretrained: torch.Tensor  # full spectrum of the base weight, descending
    adapted: Optional[torch.Tensor]  # the r adapted singular values (None before fine-tuning)


def spectra(model: nn.Module, adapter_name: str = "default", trained: bool = True) -> list[ModuleSpectrum]:
    """The rows of a model with SVFit layers (e.g. a pre-trained model just adapted by get_peft_model)."""
    from .tuner.layer import SVFitLayer

    rows = []
    for name, layer in model.named_modules():
        if not isinstance(layer, SVFitLayer) or adapter_name not in layer.svfit_info:
            continue
        info = layer.svfit_info[adapter_name]
        full = torch.linalg.svdvals(layer._weight_matrix().detach().float())
        vector = layer.svfit_vector[adapter_name].detach()
        adapted = None
        if trained:
            adapted = adapted_singular_values(
                vector, layer.svfit_sigma[adapter_name], layer.svfit_parametrization[adapter_name],
                layer.svfit_nonneg[adapter_name], layer.svfit_unit.get(adapter_name, 1.0),
            ).float()
        rows.append(
            ModuleSpectrum(
                module=name.removeprefix("base_model.model."),
                shape=tuple(info.shape),
                r=info.r,
                trainable=vector.numel(),
                energy_kept=info.energy_kept,
                nuclear_kept=info.nuclear_kept,
                pretrained=full,
                adapted=adapted,
            )
        )
    return rows


def run_spectra(run_dir: Path, model_dir: Optional[str] = None) -> tuple[list[ModuleSpectrum], object]:
    """(rows, task) of a finished SVFit run, read from its adapter without building the adapted model: the base
    model loads, its weights are checked against the adapter's fingerprints, and each adapted weight costs one
    ``svdvals`` (or an SVD-cache read) instead of the full SVD a reload would compute."""
    import json

    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .methods import get_method
    from .tasks import get_task
    from .train.results import read_result
    from .train.run import check_adapter_config
    from .core.fingerprint import Fingerprint
    from .tuner import SVFitConfig, verify_base_weights
    from .tuner.factorization import shift_unit

    run_dir = Path(run_dir)
    result = read_result(run_dir)
    tc = result["run_info"]["train_config"]
    if tc["method"] != "svfit":
        raise SVFitUserError(f"{run_dir} was trained with --method {tc['method']}, not svfit")
    task = get_task(tc["task"], tc.get("model"))
    weights = get_method("svfit").weights_path(run_dir)
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} is missing: the run directory is incomplete; re-run `svfit train`")
    check_adapter_config(weights)
    try:
        config = SVFitConfig.from_pretrained(str(weights.parent))
        tensors = load_file(weights)
    except (SafetensorError, json.JSONDecodeError, UnicodeDecodeError, TypeError, KeyError) as exc:
        raise ValueError(f"cannot load {weights.parent}: {exc}. The adapter is corrupt; re-run `svfit train`") from None
    base = task.load_model()
    verify_base_weights(base, config)
    modules = {key: base.get_submodule(key) for key in config.resolved_ranks}
    for key in modules:
        if f"base_model.model.{key}.svfit_vector" not in tensors:
            raise ValueError(f"cannot load {weights}: it has no trained values for module '{key}'. The file is "
                             "corrupt; re-run `svfit train`")
    spectra_ = all_spectra(modules, config.svd_dtype)
    rows = []
    for key, r in config.resolved_ranks.items():
        vector = tensors[f"base_model.model.{key}.svfit_vector"]
        matrix, full = spectra_[key]
        saved_sigma = tensors.get(f"base_model.model.{key}.svfit_sigma")
        sigma = saved_sigma.float() if saved_sigma is not None else full[:r]
        recorded = Fingerprint.from_json(config.base_fingerprints[key])
        unit = shift_unit(config, recorded, min(matrix.shape))  # what a unit of the trained vector shifts sigma by
        adapted = adapted_singular_values(vector.float(), sigma, config.parametrization, config.nonneg, unit).float()
        energy, nuclear = _shares(full, r)
        rows.append(ModuleSpectrum(module=key, shape=tuple(matrix.shape), r=r, trainable=vector.numel(),
                                   energy_kept=energy, nuclear_kept=nuclear, pretrained=full, adapted=adapted))
    return rows, task


def all_spectra(modules: dict[str, nn.Module], svd_dtype: str = "float32") -> dict[str, tuple[torch.Tensor, ...]]:
    """{name: (weight matrix, its singular values)}. Each svdvals runs single-threaded, several at a time, in the
    pool the SVD init uses (svfit.core.factorize): on a machine whose cores are busy, one multi-threaded LAPACK call
    at a time waits on its slowest thread (measured on a loaded 2-core machine: 12x slower than one thread for
    SmolLM2's q/v projections)."""
    from .core.factorize import default_workers, single_threaded_pool
    from .tuner.factorization import weight_matrix

    def one(item):
        name, module = item
        matrix = weight_matrix(module).detach()
        return name, (matrix, _spectrum(module, matrix, svd_dtype))

    with single_threaded_pool(max(1, min(default_workers(), len(modules)))) as pool:
        return dict(pool.map(one, modules.items()))


def _spectrum(module: nn.Module, matrix: torch.Tensor, svd_dtype: str) -> torch.Tensor:
    """All singular values of ``matrix`` (descending, float32), from the SVD cache when it is on and has them."""
    from .core import cache
    from .core.spectrum import SVD_DTYPES

    dtype = SVD_DTYPES.get(svd_dtype, torch.float32)

    def compute() -> torch.Tensor:
        return torch.linalg.svdvals(matrix.to(dtype)).float().cpu()

    if cache.svd_cache_dir() is None:
        return compute()
    from transformers.pytorch_utils import Conv1D

    from .core.fingerprint import hash_tensor

    key = cache.cache_key(hash_tensor(module.weight.detach()), kind="svdvals", dtype=str(dtype),
                          layer=type(module).__name__, transposed=isinstance(module, Conv1D), matrix=list(matrix.shape))
    return cache.cached_spectrum(key, compute)


def _shares(S: torch.Tensor, r: int) -> tuple[float, float]:
    S = S.double()
    energy, nuclear = float((S**2).sum()), float(S.sum())
    kept_energy = float((S[:r] ** 2).sum()) / energy if energy > 0 else 0.0
    return kept_energy, float(S[:r].sum()) / nuclear if nuclear > 0 else 0.0


def check_output_file(path: Path, flag: str, suffixes: Optional[tuple[str, ...]] = None) -> Path:
    """Fail before any work when ``path`` cannot be written: a directory, a file below a file, a read-only place,
    or (with ``suffixes``) a type that is not written."""
    path = Path(path)
    if path.is_dir():
        raise SVFitUserError(f"{flag} {path} is a directory; give a file name")
    if suffixes is not None and path.suffix.lower() not in suffixes:
        raise SVFitUserError(f"{flag} {path}: cannot write a '{path.suffix or '(no suffix)'}' file; give a name ending "
                             f"in {', '.join(suffixes)}")
    ancestor = nearest_existing(path.parent)
    if not ancestor.is_dir():
        raise SVFitUserError(f"cannot write {flag} {path}: {ancestor} is a file")
    error = write_error(ancestor)
    if error is not None:
        raise SVFitUserError(f"cannot write {flag} {path}: {ancestor} is not writable ({error})")
    return path


def write_outputs(writers: list[tuple[Path, str, object]]) -> None:
    """Write several files all or none: each ``(path, flag, write(tmp_path))`` writes a temp file beside its path
    first; only when every one succeeded are they renamed into place. An error names the file and its flag."""
    staged = []
    try:
        for path, flag, write in writers:
            path = Path(path)
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
                os.close(fd)
                staged.append((Path(tmp), path))
                write(Path(tmp))
            except OSError as exc:
                raise OSError(f"cannot write {flag} {path}: {exc.strerror or exc}") from None
        from .train.results import _UMASK

        for tmp, path in staged:
            os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the mode open() would have
            os.replace(tmp, path)
    finally:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)


def plot_spectra(rows: list[ModuleSpectrum], path: Path, title: str, max_panels: int = 12) -> Path:
    """Write :func:`spectrum_figure` to ``path`` (PNG, PDF or SVG by its suffix), atomically."""
    path = Path(path)
    write_outputs([(path, "--plot", lambda tmp: save_figure(rows, tmp, title, path.suffix, max_panels))])
    return path


def save_figure(rows: list[ModuleSpectrum], dest: Path, title: str, suffix: str = ".png", max_panels: int = 12) -> None:
    import matplotlib.pyplot as plt

    fig = spectrum_figure(rows, title, max_panels)
    try:
        fig.savefig(dest, dpi=110, format=suffix.lstrip(".").lower() or "png")
    finally:
        plt.close(fig)


def spectrum_figure(rows: list[ModuleSpectrum], title: str, max_panels: int = 12):
    """A grid of per-module spectra: the pre-trained singular values, the cut at r, and (after fine-tuning) the
    adapted values. Modules are sampled evenly when there are more than ``max_panels``."""
    from ._extras import require

    require("the spectrum plot", "matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullLocator

    if not rows:
        raise ValueError("no SVFit modules to plot")
    step = max(1, -(-len(rows) // max_panels))
    chosen = rows[::step][:max_panels]
    cols = min(4, len(chosen))
    nrows = -(-len(chosen) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 3 * nrows), squeeze=False)
    for ax, row in zip(axes.flat, chosen):
        idx = torch.arange(1, row.pretrained.numel() + 1)
        ax.semilogy(idx, row.pretrained.clamp_min(1e-12), color="0.55", lw=1.2, label="pre-trained")
        ax.axvline(row.r + 0.5, color="tab:red", ls="--", lw=0.8, label=f"r = {row.r}")
        if row.adapted is not None:
            ax.semilogy(idx[: row.r], row.adapted.abs().clamp_min(1e-12), color="tab:blue", lw=1.0, label="fine-tuned")
            # the change is usually small next to the spectrum's range: show it relative to sigma on a second axis
            change = ax.twinx()
            rel = 100 * (row.adapted - row.pretrained[: row.r]) / row.pretrained[: row.r].clamp_min(1e-12)
            change.plot(idx[: row.r], rel, color="tab:orange", lw=0.6, alpha=0.8)
            change.set_ylabel("change (%)", fontsize=7, color="tab:orange")
            change.tick_params(labelsize=6, colors="tab:orange")
        # y given: no automatic title placement, which measures every tick label of the twin axes (seconds)
        ax.set_title(_short(row.module), fontsize=8, y=1.0)
        ax.yaxis.set_minor_locator(NullLocator())  # a log axis's minor ticks cost more to draw than all the rest
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6, loc="lower left")
    for ax in list(axes.flat)[len(chosen) :]:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.supxlabel("index i", fontsize=8)
    fig.supylabel("singular value", fontsize=8)
    # fixed margins: tight_layout measures every tick label of every (twin) axis, seconds per figure
    fig.subplots_adjust(left=0.06, right=0.95, bottom=0.1 / nrows ** 0.5, top=1 - 0.12 / nrows ** 0.5,
                        wspace=0.45, hspace=0.45)
    return fig


def _short(name: str, width: int = 48) -> str:
    return name if len(name) <= width else "..." + name[-(width - 3) :]
