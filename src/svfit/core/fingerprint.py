"""Fingerprints of base weights.

An SVFit adapter stores only the trained singular values; the singular vectors are recomputed from the base weight
when the adapter is loaded. Loading onto a different base weight would silently produce garbage, so every adapter
records a fingerprint of each base weight it was trained on and refuses to load onto anything else.

A fingerprint holds a hash of the weight's bytes (exact identity), its shape and dtype, a small seeded random
sketch G_out^T W G_in that survives a change of storage precision, and (for messages) the Frobenius norm. Same dtype
and a different hash means a different weight. Across dtypes (a bf16 copy of the right model), the sketches must
agree to within the rounding of the lower precision. Norms or top singular values cannot decide: they concentrate
for same-shape random or fine-tuned matrices.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass
from typing import Literal

import torch

# How far the sketch of the same weight may move when stored at the lower of two precisions: about 3x the
# rounding measured for that precision (bf16 moves it by ~1.8e-3). Anything further is another weight, even one
# only ~1% away (a merged adapter, another fine-tune).
SKETCH_RTOL = {"bfloat16": 5e-3, "float16": 1e-3, "float32": 1e-6}
SKETCH_RTOL_OTHER = 2e-2  # 8-bit float formats and anything else: only a coarse check is possible
PRECISION_ORDER = ("float64", "float32", "float16", "bfloat16")
SKETCH_PROBES = 4  # sketch = G_out^T W G_in with 4 x 4 seeded Gaussian probes: 16 numbers
SKETCH_SEED = 20240909
DIGITS = 9  # significant digits kept in adapter_config.json (float32 carries ~7)

Match = Literal["identical", "close", "different"]


@dataclass(frozen=True)
class Fingerprint:
    hash: str
    shape: tuple[int, ...]
    dtype: str
    fro: float
    sketch: tuple[float, ...]

    def to_json(self) -> dict:
        d = asdict(self)
        d["shape"] = list(self.shape)
        d["sketch"] = list(self.sketch)
        return d

    @classmethod
    def from_json(cls, d: dict) -> "Fingerprint":
        try:
            return cls(
                hash=str(d["hash"]),
                shape=tuple(int(x) for x in d["shape"]),
                dtype=str(d["dtype"]),
                fro=float(d["fro"]),
                sketch=tuple(float(x) for x in d["sketch"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"malformed base-weight fingerprint {d!r} in the adapter config") from exc

    def describe(self) -> str:
        return f"shape {list(self.shape)}, {self.dtype}, ||W||_F={self.fro:.6g}, blake2b {self.hash[:12]}"


def hash_tensor(t: torch.Tensor) -> str:
    """blake2b of a tensor's shape, dtype and raw bytes (any dtype, any device)."""
    t = t.detach()
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{tuple(t.shape)}|{t.dtype}|".encode())
    raw = t.contiguous().cpu().reshape(-1).view(torch.uint8)
    h.update(memoryview(raw.numpy()))
    return h.hexdigest()


def fingerprint(weight: torch.Tensor) -> Fingerprint:
    """Fingerprint a stored weight. Computed where the weight lives, in float32 (no float64 copy of a large
    embedding table); only a few numbers come back to the CPU."""
    W = weight.detach().reshape(weight.shape[0], -1).float()
    return Fingerprint(
        hash=hash_tensor(weight),
        shape=tuple(weight.shape),
        dtype=str(weight.dtype).removeprefix("torch."),
        fro=_round(float(torch.linalg.vector_norm(W))),
        sketch=tuple(_round(float(x)) for x in sketch(W).flatten()),
    )


def sketch(W: torch.Tensor) -> torch.Tensor:
    """G_out^T W G_in for seeded Gaussian probes: a few numbers that move with every entry of W."""
    g = torch.Generator().manual_seed(SKETCH_SEED)
    G_out = torch.randn(W.shape[0], SKETCH_PROBES, generator=g).to(W.device)
    G_in = torch.randn(W.shape[1], SKETCH_PROBES, generator=g).to(W.device)
    return (G_out.T @ (W.float() @ G_in)).double().cpu()


def compare(recorded: Fingerprint, weight: torch.Tensor) -> tuple[Match, Fingerprint]:
    """How ``weight`` relates to the weight a fingerprint was recorded from."""
    current_hash = hash_tensor(weight)
    if tuple(weight.shape) != recorded.shape:
        return "different", Fingerprint(current_hash, tuple(weight.shape), str(weight.dtype), math.nan, ())
    if current_hash == recorded.hash:
        return "identical", recorded  # the hash covers shape, dtype and bytes: nothing else can differ
    current = fingerprint(weight)
    if current.dtype == recorded.dtype:
        return "different", current  # same storage, other bytes: another weight
    a = torch.tensor(current.sketch, dtype=torch.float64)
    b = torch.tensor(recorded.sketch, dtype=torch.float64)
    rtol = sketch_tolerance(current.dtype, recorded.dtype)
    close = b.numel() == a.numel() and float(torch.linalg.vector_norm(a - b)) <= rtol * float(torch.linalg.vector_norm(b))
    return ("close" if close else "different"), current


def sketch_tolerance(dtype_a: str, dtype_b: str) -> float:
    """Relative sketch tolerance for the same weight stored as ``dtype_a`` and ``dtype_b``."""
    known = [d for d in (dtype_a, dtype_b) if d in PRECISION_ORDER]
    if len(known) < 2:
        return SKETCH_RTOL_OTHER
    lower = max(known, key=PRECISION_ORDER.index)
    return SKETCH_RTOL.get(lower, SKETCH_RTOL_OTHER)


def _round(x: float) -> float:
    return float(f"{x:.{DIGITS}g}")


_DTYPE_CODES = ("float32", "float16", "bfloat16", "float64", "float8_e4m3fn", "float8_e5m2", "other")
ROW_BYTES = 16 + 1 + 4 * (1 + SKETCH_PROBES**2)  # hash, dtype, norm and sketch (float32): 85 bytes


def to_row(fp: Fingerprint) -> torch.Tensor:
    """A fingerprint as ``ROW_BYTES`` uint8 values (the shape is known from the module it describes), so that an
    adapter file can carry one table of them and every load path can check the base, whatever config it is handed."""
    if len(fp.sketch) != SKETCH_PROBES**2:
        raise ValueError(f"cannot encode fingerprint {fp.describe()}")
    dtype = fp.dtype if fp.dtype in _DTYPE_CODES else "other"
    return torch.cat([
        torch.frombuffer(bytearray(bytes.fromhex(fp.hash)), dtype=torch.uint8),
        torch.tensor([_DTYPE_CODES.index(dtype)], dtype=torch.uint8),
        torch.tensor([fp.fro, *fp.sketch], dtype=torch.float32).view(torch.uint8),
    ])


def from_row(row: torch.Tensor, shape: tuple[int, ...]) -> Fingerprint:
    """Inverse of ``to_row`` for a weight of ``shape``; a malformed row raises ValueError."""
    raw = row.detach().cpu().to(torch.uint8).reshape(-1)
    if raw.numel() != ROW_BYTES:
        raise ValueError(f"malformed base-weight fingerprint in the adapter file ({raw.numel()} bytes, not {ROW_BYTES})")
    floats = raw[17:].clone().view(torch.float32).tolist()
    return Fingerprint(
        hash=bytes(raw[:16].tolist()).hex(), shape=tuple(shape),
        dtype=_DTYPE_CODES[min(int(raw[16]), len(_DTYPE_CODES) - 1)], fro=floats[0], sketch=tuple(floats[1:]),
    )
