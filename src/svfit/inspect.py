"""What SVFit did to each weight: the per-module table and spectrum plots before and after fine-tuning."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from .core.parametrization import adapted_singular_values
from .tuner.layer import SVFitLayer


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


def plot_spectra(rows: list[ModuleSpectrum], path: Path, title: str, max_panels: int = 12) -> Path:
    """A grid of per-module spectra: the pre-trained singular values, the cut at r, and (after fine-tuning) the
    adapted values. Modules are sampled evenly when there are more than ``max_panels``."""
    from ._extras import require

    require("the spectrum plot", "matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
        ax.set_title(_short(row.module), fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6, loc="lower left")
    for ax in list(axes.flat)[len(chosen) :]:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.supxlabel("index i", fontsize=8)
    fig.supylabel("singular value", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path


def _short(name: str, width: int = 48) -> str:
    return name if len(name) <= width else "..." + name[-(width - 3) :]
