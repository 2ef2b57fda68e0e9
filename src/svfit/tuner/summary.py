"""Per-module summary of what SVFit chose: shape, r, share of the spectrum kept, trainable count."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

from torch import nn


@dataclass(frozen=True)
class ModuleSummary:
    module: str
    layer_type: str
    shape: tuple[int, int]  # (d_out, d_in) of the factored matrix
    n: int  # full spectrum length
    r: int  # kept singular values (= trainable parameters of this module)
    energy_kept: Optional[float]
    nuclear_kept: Optional[float]

    def to_json(self) -> dict:
        d = asdict(self)
        d["shape"] = list(self.shape)
        return d


def summarize(model: nn.Module, adapter_name: str = "default") -> list[ModuleSummary]:
    from .layer import SVFitLayer  # local: layer imports this module's users

    rows = []
    for name, module in model.named_modules():
        if isinstance(module, SVFitLayer) and adapter_name in module.svfit_info:
            info = module.svfit_info[adapter_name]
            rows.append(
                ModuleSummary(
                    module=name,
                    layer_type=type(module.get_base_layer()).__name__,
                    shape=tuple(info.shape),
                    n=info.n,
                    r=info.r,
                    energy_kept=info.energy_kept,
                    nuclear_kept=info.nuclear_kept,
                )
            )
    return rows


def format_summary(rows: list[ModuleSummary]) -> str:
    """A plain-text table (one line per module, then totals) that prints well anywhere."""

    def pct(x: Optional[float]) -> str:
        return "-" if x is None else f"{100 * x:.2f}%"

    header = ("module", "type", "shape", "r / n", "energy kept", "nuclear kept")
    body = [
        (row.module, row.layer_type, "x".join(map(str, row.shape)), f"{row.r} / {row.n}", pct(row.energy_kept),
         pct(row.nuclear_kept))
        for row in rows
    ]
    total_r, total_n = sum(r.r for r in rows), sum(r.n for r in rows)
    footer = ("total", f"{len(rows)} modules", "", f"{total_r} / {total_n}", "", "")
    table = [header, *body, footer]
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    fmt = lambda line: "  ".join(cell.ljust(w) if i < 3 else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths)))  # noqa: E731
    rule = "-" * len(fmt(header))
    return "\n".join([fmt(header), rule, *map(fmt, body), rule, fmt(footer)])
