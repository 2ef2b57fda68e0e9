"""An opt-in on-disk cache of truncated SVDs, keyed by the exact bytes of the weight and the SVD settings.

Re-adapting a base model seen before (another run, another adapter, loading a saved adapter) then reads U_r,
sigma, V_r from disk instead of factoring every matrix again. Enable it with the environment variable
``SVFIT_SVD_CACHE=/some/dir`` or ``svfit.set_svd_cache("/some/dir")`` (``None`` turns it off). Entries are plain
safetensors files written atomically; one that cannot be read is ignored (with a warning) and rewritten.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Optional, Union

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .spectrum import TruncatedSVD

ENV_VAR = "SVFIT_SVD_CACHE"
_UNSET = object()
_directory: object = _UNSET  # set_svd_cache overrides the environment variable


def set_svd_cache(directory: Optional[Union[str, os.PathLike]]) -> None:
    """Use ``directory`` as the SVD cache from now on in this process (``None``: no cache)."""
    global _directory
    _directory = Path(directory).expanduser() if directory is not None else None


def svd_cache_dir() -> Optional[Path]:
    if _directory is not _UNSET:
        return _directory  # type: ignore[return-value]
    env = os.environ.get(ENV_VAR)
    return Path(env).expanduser() if env else None


def cache_key(weight_hash: str, **settings) -> str:
    """A file name for the SVD of the weight with blake2b ``weight_hash`` under ``settings`` (rank spec, method,
    dtype, randomized-SVD parameters: anything that changes the result)."""
    blob = json.dumps({"weight": weight_hash, **settings}, sort_keys=True, default=str)
    return hashlib.blake2b(blob.encode(), digest_size=20).hexdigest()


_READ_ERRORS = (OSError, SafetensorError, KeyError, ValueError, TypeError, json.JSONDecodeError)


def cached(
    key: str, compute: Callable[[], TruncatedSVD], device: torch.device, rank_key: Optional[Callable[[int], str]] = None
) -> TruncatedSVD:
    """``compute()``, or its stored result under ``key`` when the cache is on and has it.

    ``rank_key(r)``, when given, is the key the same computation has with the rank given as the integer r (an exact
    SVD truncated at r is the same whether r came from a threshold or was fixed): the entry is stored under it and
    ``key`` becomes a small alias naming r, so that reloading a saved adapter, which passes its recorded r, hits.
    """
    root = svd_cache_dir()
    if root is None:
        return compute()
    path = root / f"{key}.safetensors"
    alias = root / f"{key}.rank.json"
    try:
        if rank_key is not None and alias.is_file():
            path = root / f"{rank_key(int(json.loads(alias.read_text())['r']))}.safetensors"
        if path.is_file():
            return _read(path, device)
    except _READ_ERRORS as exc:
        warnings.warn(f"ignoring unreadable SVD cache entry {path} ({exc}); recomputing it")
    svd = compute()
    try:
        if rank_key is not None:
            path = root / f"{rank_key(svd.r)}.safetensors"
            _write_atomic(alias, lambda tmp: Path(tmp).write_text(json.dumps({"r": svd.r})))
        _write(path, svd)
    except OSError as exc:  # a read-only or full cache must not fail the adaptation itself
        warnings.warn(f"could not write the SVD cache entry {path}: {exc}")
    return svd


def cached_spectrum(key: str, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``compute()`` (a whole spectrum, e.g. ``torch.linalg.svdvals`` of a weight: what ``svfit inspect`` plots), or
    its stored result under ``key`` when the cache is on and has it."""
    root = svd_cache_dir()
    if root is None:
        return compute()
    path = root / f"{key}.svdvals.safetensors"
    try:
        if path.is_file():
            return load_file(str(path))["S"]
    except _READ_ERRORS as exc:
        warnings.warn(f"ignoring unreadable SVD cache entry {path} ({exc}); recomputing it")
    S = compute()
    try:
        _write_atomic(path, lambda tmp: save_file({"S": S.detach().contiguous().cpu()}, tmp))
    except OSError as exc:
        warnings.warn(f"could not write the SVD cache entry {path}: {exc}")
    return S


def _read(path: Path, device: torch.device) -> TruncatedSVD:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["svfit"])
    tensors = load_file(str(path), device=str(device))
    if "spectrum" not in tensors and meta.get("full_spectrum"):
        raise KeyError("spectrum")  # an entry written before spectra were stored: recompute it
    return TruncatedSVD(
        U=tensors["U"], S=tensors["S"], V=tensors["V"], n=int(meta["n"]), energy_kept=float(meta["energy_kept"]),
        nuclear_kept=None if meta["nuclear_kept"] is None else float(meta["nuclear_kept"]),
        min_gap=float(meta["min_gap"]),
        spectrum=tensors["spectrum"].cpu() if "spectrum" in tensors else None,
    )


def _write(path: Path, svd: TruncatedSVD) -> None:
    meta = {"n": svd.n, "energy_kept": svd.energy_kept, "nuclear_kept": svd.nuclear_kept, "min_gap": svd.min_gap,
            "full_spectrum": svd.spectrum is not None}
    parts = [("U", svd.U), ("S", svd.S), ("V", svd.V)] + ([("spectrum", svd.spectrum)] if svd.spectrum is not None else [])
    tensors = {k: t.detach().contiguous().cpu() for k, t in parts}
    _write_atomic(path, lambda tmp: save_file(tensors, tmp, metadata={"svfit": json.dumps(meta)}))


def _write_atomic(path: Path, write: Callable[[str], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)  # readers see the whole entry or none
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
