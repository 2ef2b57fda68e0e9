"""svfit: singular-value fine-tuning (SVFit, arXiv 2409.05926) as a Hugging Face PEFT method.

``import svfit`` registers the method with PEFT; afterwards ``peft.get_peft_model(model, svfit.SVFitConfig(...))``,
``save_pretrained`` and ``PeftModel.from_pretrained`` work as for LoRA. Loading a saved adapter needs no
``import svfit``: the installed ``svfit-autoload.pth`` registers SVFit as soon as peft is imported (see
``_svfit_autoload``; ``SVFIT_AUTOLOAD=0`` turns that off, and then svfit must be imported first).

The import itself is light: torch, transformers and peft load only when something needs them (so that ``svfit
--help`` answers at once). When peft is already imported, ``import svfit`` registers SVFit there and then; otherwise
it registers the moment peft is first imported, or the first time an svfit name such as ``SVFitConfig`` is used.
"""

from __future__ import annotations

import importlib
import sys
from importlib.abc import MetaPathFinder
from importlib.util import find_spec

from ._version import __version__

_EXPORTS = {
    "BaseWeightMismatchError": "tuner",
    "ModuleSummary": "tuner",
    "SVFitConfig": "tuner",
    "SVFitModel": "tuner",
    "format_summary": "tuner",
    "register": "tuner",
    "summarize": "tuner",
    "set_svd_cache": "core.cache",
}
_SUBPACKAGES = ("assets", "cli", "core", "dreambooth", "errors", "inspect", "methods", "tasks", "train", "tuner")

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


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value
    if name in _SUBPACKAGES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS) | set(_SUBPACKAGES))


def _register() -> None:
    """Import svfit.tuner, which registers SVFit with PEFT at the end of its own import. When svfit.tuner is
    itself being imported (it is what pulled peft in), its import finishes the registration."""
    if f"{__name__}.tuner" not in sys.modules:
        importlib.import_module(f"{__name__}.tuner")


class _RegisterWhenPeftLoads(MetaPathFinder):
    """A one-shot import hook: lets the normal finders locate peft, and registers SVFit once peft has loaded."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "peft":
            return None
        _remove_hook()
        spec = find_spec("peft")  # the remaining finders
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        loader = spec.loader

        def exec_module(module):
            del loader.exec_module  # back to the loader's own method
            loader.exec_module(module)
            _register()

        loader.exec_module = exec_module
        return spec


def _remove_hook() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _RegisterWhenPeftLoads)]


if "peft" in sys.modules:
    _register()
else:
    _remove_hook()  # a reloaded svfit installs one hook, not two
    sys.meta_path.insert(0, _RegisterWhenPeftLoads())
