"""The PEFT wiring of SVFit: config, layers, tuner model (with its checkpoints, base-weight checks and weighted
adapters), registration."""

from .config import SVFitConfig
from .guards import BaseWeightMismatchError
from .layer import Conv, Embedding, Linear, SpectrumInfo, SVFitLayer
from .model import SVFitModel
from .registration import register
from .summary import ModuleSummary, format_summary, summarize
from .verify import verify_base_weights

__all__ = [
    "BaseWeightMismatchError",
    "Conv",
    "Embedding",
    "Linear",
    "ModuleSummary",
    "SVFitConfig",
    "SVFitLayer",
    "SVFitModel",
    "SpectrumInfo",
    "format_summary",
    "register",
    "summarize",
    "verify_base_weights",
]

register()  # importing the tuner (directly, via ``import svfit``, or when peft loads after svfit) registers it
