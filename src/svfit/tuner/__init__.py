"""The PEFT wiring of SVFit: config, layers, tuner model, registration."""

from .config import SVFitConfig
from .layer import Conv, Embedding, Linear, SVFitLayer, SpectrumInfo
from .model import BaseWeightMismatchError, SVFitModel, verify_base_weights
from .registration import register
from .summary import ModuleSummary, format_summary, summarize

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
