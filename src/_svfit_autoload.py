"""Register SVFit with PEFT as soon as ``peft`` is imported, so that saved SVFit adapters load without ``import svfit``.

PEFT has no plug-in discovery: a process that never imported svfit fails on a saved SVFit adapter with
``KeyError: 'SVFIT'`` (``PeftModel.from_pretrained``, ``AutoPeftModelFor*``, ``PeftConfig.from_pretrained``,
transformers' ``load_adapter``). The installed ``svfit-autoload.pth`` imports this module at interpreter start-up. It
only puts a finder at the front of ``sys.meta_path`` that waits for the first ``import peft``; after ``peft`` has
finished executing, it imports ``svfit`` (which registers itself) and removes itself.

Cost for processes that never import peft: this module (``sys`` and ``os`` only, both already loaded by ``site``) and
one cheap call per first-time import. peft, torch and svfit are never imported here. Opt out with
``SVFIT_AUTOLOAD=0``. If svfit cannot be imported, the hook warns once and the process goes on without it.

Kept free of svfit and of any third-party import on purpose: it runs in every interpreter of the environment.
"""

import os
import sys

_TARGET = "peft"


class _PeftImportHook:
    """Meta-path finder that finds nothing itself: for ``peft`` it asks the finders behind it for the real spec and
    wraps that spec's loader so that svfit registers right after peft's ``__init__`` has run."""

    def __init__(self):
        self._busy = False

    def find_spec(self, fullname, path=None, target=None):
        if fullname != _TARGET or self._busy:
            return None
        self._busy = True  # the finders below may import (or look up) peft themselves
        try:
            spec = None
            for finder in list(sys.meta_path):
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(fullname, path, target)
                if spec is not None:
                    break
        finally:
            self._busy = False
        loader = getattr(spec, "loader", None)
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        # a spec may be found and never loaded (importlib.util.find_spec("peft") in transformers' availability
        # checks): only an executed load counts, so the hook stays in place until then
        spec.loader = _RegisteringLoader(loader, self)
        return spec


class _RegisteringLoader:
    """Delegates to peft's real loader; after ``exec_module`` imports svfit."""

    def __init__(self, loader, hook):
        self._loader = loader
        self._hook = hook

    def create_module(self, spec):
        create = getattr(self._loader, "create_module", None)
        return create(spec) if create is not None else None

    def exec_module(self, module):
        self._loader.exec_module(module)
        # give the module peft's own loader back (inspect, pkgutil and importlib.resources read it)
        module.__loader__ = self._loader
        if getattr(module, "__spec__", None) is not None:
            module.__spec__.loader = self._loader
        uninstall()
        _register_svfit()

    def __getattr__(self, name):  # get_resource_reader, is_package, get_filename, ...
        if name == "_loader":  # not set yet (copy, pickle): no recursion
            raise AttributeError(name)
        return getattr(self._loader, name)


def _register_svfit():
    if "svfit" in sys.modules:
        return  # svfit is importing peft right now (or did already): its __init__ registers it
    try:
        import svfit  # noqa: F401  (registers SVFit with PEFT)
    except Exception as exc:  # never break a process that imports peft for something else
        import warnings

        warnings.warn(
            f"svfit is installed but could not be imported ({type(exc).__name__}: {exc}); saved SVFit adapters will "
            "not load until `import svfit` works. Set SVFIT_AUTOLOAD=0 to turn this hook off.",
            RuntimeWarning,
            stacklevel=2,
        )


def install():
    """Put the hook in front of ``sys.meta_path`` (no-op if peft is already imported or the hook is in place)."""
    if _TARGET in sys.modules:
        if "svfit" not in sys.modules:
            _register_svfit()
        return
    if not any(isinstance(f, _PeftImportHook) for f in sys.meta_path):
        sys.meta_path.insert(0, _PeftImportHook())


def uninstall():
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _PeftImportHook)]


if os.environ.get("SVFIT_AUTOLOAD", "1").strip().lower() not in ("0", "false", "no", "off"):
    install()
