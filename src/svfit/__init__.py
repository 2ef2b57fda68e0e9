"""svfit: singular-value fine-tuning (SVFit, arXiv 2409.05926) as a Hugging Face PEFT method.

``import svfit`` registers the method with PEFT; afterwards ``peft.get_peft_model(model, svfit.SVFitConfig(...))``,
``save_pretrained`` and ``PeftModel.from_pretrained`` work as for LoRA. Import svfit before loading a saved adapter.
"""

from ._version import __version__
from .core.cache import set_svd_cache
from .tuner import (
    BaseWeightMismatchError,
    ModuleSummary,
    SVFitConfig,
    SVFitModel,
    format_summary,
    register,
    summarize,
)

register()

__all__ = [
    "BaseWeightMismatchError",
    "ModuleSummary",
    "SVFitConfig",
    "SVFitModel",
    "__version__",
    "format_summary",
    "set_svd_cache",
    "summarize",
]
