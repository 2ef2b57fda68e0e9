"""Fingerprints of base weights.

An SVFit adapter stores only the trained singular values; the singular vectors are recomputed from the base weight
when the adapter is loaded. Loading onto a different base weight would silently produce garbage, so every adapter
records a fingerprint of each base weight it was trained on and refuses to load onto anything else.

A fingerprint holds a hash of the weight's bytes (exact identity), its shape and dtype, and spectral summaries
(Frobenius norm, top singular values) that survive a dtype or device change, so that a bf16 copy of the right model
is told apart from the wrong model.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass
from typing import Literal

import torch

# Spectral summaries of the same weight stored at different precisions agree to well within this (bf16 keeps ~3
# significant digits); a different pre-trained weight differs by far more.
SPECTRAL_RTOL = 1e-2
N_TOP_SIGMA = 2

Match = Literal["identical", "close", "different"]


@dataclass(frozen=True)
class Fingerprint:
    hash: str
    shape: tuple[int, ...]
    dtype: str
    fro: float
    top_sigma: tuple[float, ...]

    def to_json(self) -> dict:
        d = asdict(self)
        d["shape"] = list(self.shape)
        d["top_sigma"] = list(self.top_sigma)
        return d

    @classmethod
    def from_json(cls, d: dict) -> "Fingerprint":
        try:
            return cls(
                hash=str(d["hash"]),
                shape=tuple(int(x) for x in d["shape"]),
                dtype=str(d["dtype"]),
                fro=float(d["fro"]),
                top_sigma=tuple(float(x) for x in d["top_sigma"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"malformed base-weight fingerprint {d!r} in the adapter config") from exc

    def describe(self) -> str:
        sig = ", ".join(f"{s:.4g}" for s in self.top_sigma)
        return f"shape {list(self.shape)}, {self.dtype}, ||W||_F={self.fro:.6g}, top sigma=[{sig}]"


def hash_tensor(t: torch.Tensor) -> str:
    """blake2b of a tensor's shape, dtype and raw bytes (any dtype, any device)."""
    t = t.detach()
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{tuple(t.shape)}|{t.dtype}|".encode())
    raw = t.contiguous().cpu().reshape(-1).view(torch.uint8)
    h.update(memoryview(raw.numpy()))
    return h.hexdigest()


def fingerprint(weight: torch.Tensor, top_sigma: torch.Tensor | None = None) -> Fingerprint:
    """Fingerprint a stored weight. ``top_sigma`` (descending) avoids a second SVD when the caller already has one."""
    W = weight.detach().float()
    if top_sigma is None:
        top_sigma = _top_singular_values(W.reshape(W.shape[0], -1))
    return Fingerprint(
        hash=hash_tensor(weight),
        shape=tuple(weight.shape),
        dtype=str(weight.dtype).removeprefix("torch."),
        fro=float(torch.linalg.vector_norm(W.double())),
        top_sigma=tuple(float(s) for s in top_sigma[:N_TOP_SIGMA]),
    )


def compare(recorded: Fingerprint, weight: torch.Tensor) -> tuple[Match, Fingerprint]:
    """How ``weight`` relates to the weight a fingerprint was recorded from."""
    if tuple(weight.shape) != recorded.shape:
        return "different", Fingerprint(hash_tensor(weight), tuple(weight.shape), str(weight.dtype), math.nan, ())
    if hash_tensor(weight) == recorded.hash:
        # the hash covers shape, dtype and bytes: nothing else can differ
        return "identical", recorded
    current = fingerprint(weight)
    close = _rel_close(current.fro, recorded.fro) and all(
        _rel_close(a, b, scale=recorded.top_sigma[0] if recorded.top_sigma else 1.0)
        for a, b in zip(current.top_sigma, recorded.top_sigma)
    )
    return ("close" if close else "different"), current


def _top_singular_values(W: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(W)[:N_TOP_SIGMA]


def _rel_close(a: float, b: float, scale: float | None = None) -> bool:
    ref = max(abs(b), abs(scale) if scale is not None else 0.0, 1e-12)
    return abs(a - b) <= SPECTRAL_RTOL * ref
