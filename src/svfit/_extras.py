"""Optional dependencies: which pip extra brings which module, and the one-line error when one is missing.

``pip install svfit`` installs the PEFT method only (torch, peft, transformers, safetensors, aenum, packaging). The
CLI, the tasks, DreamBooth, TRL and the benchmarks need extras; see pyproject.toml.
"""

from __future__ import annotations

import importlib.util

from .errors import SVFitUserError

# top-level module -> the extra that installs it
EXTRA_OF_MODULE = {
    "typer": "cli",
    "rich": "cli",
    "matplotlib": "cli",
    "PIL": "cli",
    "diffusers": "diffusion",
    "trl": "trl",
    "datasets": "trl",
    "scipy": "bench",
    "gguf": "assets",
    "onnx": "assets",
}


class MissingExtraError(SVFitUserError, ImportError):
    """An optional dependency is not installed; the message names the pip extra that installs it."""


def message(what: str, extra: str, module: str | None = None) -> str:
    missing = f" (no module named '{module}')" if module else ""
    return f"{what} needs extras: pip install 'svfit[{extra}]'{missing}"


def require(what: str, *modules: str) -> None:
    """Raise MissingExtraError naming the extra if any of ``modules`` is not installed. Only looks them up (no
    import), so it costs nothing when they are there."""
    for module in modules:
        if importlib.util.find_spec(module) is None:
            extra = EXTRA_OF_MODULE.get(module, "all")
            raise MissingExtraError(message(what, extra, module), name=module)


def extra_for(exc: ImportError) -> str | None:
    """The extra that would have prevented ``exc`` (a failed import of an optional module), or None."""
    name = getattr(exc, "name", None) or ""
    return EXTRA_OF_MODULE.get(name.split(".")[0])
