"""svfit: singular-value fine-tuning (SVFit, arXiv 2409.05926) as a Hugging Face PEFT method.

``import svfit`` registers the method with PEFT; afterwards ``peft.get_peft_model(model, svfit.SVFitConfig(...))``,
``save_pretrained`` and ``PeftModel.from_pretrained`` work as for LoRA. Loading a saved adapter needs no
``import svfit``: the installed ``svfit-autoload.pth`` registers SVFit as soon as peft is imported (see
``_svfit_autoload``; ``SVFIT_AUTOLOAD=0`` turns that off, and then svfit must be imported first).
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
