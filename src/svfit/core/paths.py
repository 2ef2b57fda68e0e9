"""Fast ways to compute an SVFit linear layer, and a cost model that picks one per call.

The adapted layer is y = x (W0 + U_r diag(c) V_r^T)^T + b with c = (adapted - pre-trained) singular values and only
c trained. The straightforward side branch ``((x V_r) * c) U_r^T`` (``reference``) costs 2 T r (d_in + d_out) flops
forward and about the same again backward for T tokens, which with r close to the width (a 99% threshold usually
keeps 50-80% of the spectrum) is more than the base matmul itself. Three exact reformulations:

``merged``  W' = W0 + U_r diag(c) V_r^T is formed once per call (r d_in d_out flops, independent of T) and the layer
            runs one matmul with W', like the base. The singular-value gradient is the diagonal of U_r^T G V_r with
            G = g^T x the (never materialised elsewhere) weight gradient: T d_in d_out + r d_in d_out flops; or, when
            r is small, from token projections sum_t (g_t U_r) * (x_t V_r): T r (d_in + d_out). W' is recomputed in
            backward instead of kept, so memory stays at the base layer's plus x (which LoRA saves too).
``input``   one basis: with orthonormal V_r, U_r diag(c) V_r^T = W0 V_r diag(c / sigma_r) V_r^T, so
            y = base(x + ((x V_r) * c/sigma) V_r^T): 4 T r d_in flops in all, the base layer runs untouched.
``output``  the same with U_r: y = base(x) + ((y0 U_r) * c/sigma) U_r^T, y0 = base(x) - b: 4 T r d_out.

**One stored basis.** The identity also means a layer need *store* only one basis, that of its smaller side (half
the memory or less): ``input`` needs V_r, ``output`` needs U_r, and ``merged`` and the side branch compute the
missing one as W0 V_r (or W0^T U_r) on the fly, scaling by c / sigma_r (``one_basis_branch``). Functions here take
``U=None`` or ``V=None`` for that storage.

The one-basis forms divide by sigma_r, so they are used only when the kept spectrum is well conditioned
(``ONE_BASIS_MIN_RATIO``); they win when there are few tokens (generation, small batches), ``merged`` when T is large
(training). Every path is exactly the base layer when c = 0 (bit for bit: the update is an exact zero), and agrees
with ``reference`` to floating-point round-off; tests check both, and each autograd Function against finite
differences in float64.
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch.autograd import Function
from torch.autograd.function import once_differentiable

ComputePath = Literal["auto", "reference", "merged", "input", "output"]
COMPUTE_PATHS = ("auto", "reference", "merged", "input", "output")

# sigma_r / sigma_1 below this: dividing by sigma_r would amplify the SVD's round-off (|U^T W0 - S V^T| ~ eps sigma_1)
# into the update beyond float32 tolerance, so the one-basis paths are not offered.
ONE_BASIS_MIN_RATIO = 1e-3


def path_costs(
    tokens: int, d_in: int, d_out: int, r: int, *, training: bool, input_grad: bool = True, one_basis: bool = True,
    stored: str = "both",
) -> dict[str, float]:
    """Extra flops (beyond the base layer's own matmuls) of each path for one call, forward plus backward when
    ``training``. Multiply-adds counted once; elementwise work ignored (it is O(T r) everywhere). ``stored`` is
    which bases the layer keeps ("both", "U" or "V"): with one, only its one-basis path is offered, and merged and
    the side branch pay for forming the other from W0."""
    T = tokens
    rebuild = r * d_in * d_out if stored != "both" else 0  # W0 V_r or W0^T U_r, per formation of the delta
    if training:
        costs = {
            # forward both projections; backward g U_r, and (g U_r * c) V_r^T when the input needs a gradient
            "reference": T * r * (d_in + d_out) + T * r * d_out + (T * r * d_in if input_grad else 0),
            "merged": (r * d_in * d_out + rebuild) * (2 if input_grad else 1) + merged_sigma_grad_cost(T, d_in, d_out, r)[1],
        }
        if stored != "both":  # the side branch through W0: one more full matmul forward and backward
            costs["reference"] = 2 * T * r * (d_in if stored == "V" else d_out) * 2 + 2 * T * d_in * d_out
        if one_basis:
            # input: the base must backprop into x' for the sigma gradient even when x itself needs none
            costs["input"] = 2 * T * r * d_in + T * r * d_in + (T * r * d_in if input_grad else T * d_in * d_out)
            costs["output"] = 2 * T * r * d_out + T * r * d_out + (T * r * d_out if input_grad else 0)
    else:
        costs = {"reference": T * r * (d_in + d_out), "merged": r * d_in * d_out + rebuild}
        if stored != "both":
            costs["reference"] = 2 * T * r * (d_in if stored == "V" else d_out) + T * d_in * d_out
        if one_basis:
            costs["input"] = 2 * T * r * d_in
            costs["output"] = 2 * T * r * d_out
    if stored == "V":
        costs.pop("output", None)
    elif stored == "U":
        costs.pop("input", None)
    return {k: float(v) for k, v in costs.items()}


def merged_sigma_grad_cost(tokens: int, d_in: int, d_out: int, r: int) -> tuple[str, int]:
    """How ``merged`` gets the singular-value gradient: from the weight gradient ("weight") or from token
    projections ("tokens"), whichever takes fewer flops."""
    via_weight = tokens * d_in * d_out + r * d_in * d_out
    via_tokens = tokens * r * (d_in + d_out)
    return ("weight", via_weight) if via_weight <= via_tokens else ("tokens", via_tokens)


def choose_path(
    tokens: int, d_in: int, d_out: int, r: int, *, training: bool, input_grad: bool = True, one_basis: bool = True,
    allowed: Optional[set] = None, stored: str = "both",
) -> str:
    """The cheapest path by ``path_costs`` among ``allowed`` (default: all; ``reference`` always is), ties going to
    the earlier of reference, merged, input, output."""
    costs = path_costs(tokens, d_in, d_out, r, training=training, input_grad=input_grad, one_basis=one_basis,
                       stored=stored)
    if allowed is not None:
        costs = {k: v for k, v in costs.items() if k in allowed or k == "reference"}
    return min(costs, key=costs.get)


def one_basis_ok(sigma: torch.Tensor) -> bool:
    """Whether dividing by the kept singular values is numerically safe (see ONE_BASIS_MIN_RATIO)."""
    if sigma.numel() == 0:
        return False
    return bool(sigma.min() > ONE_BASIS_MIN_RATIO * sigma.max())


# -- merged ------------------------------------------------------------------------------------------------------


def _no_autocast(device_type: str):
    return torch.autocast(device_type=device_type, enabled=False)


def _delta(U: torch.Tensor, c: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """U diag(c) V^T in the bases' dtype, outside autocast (it is added to a weight, not an activation)."""
    with _no_autocast(U.device.type):
        return (U * c.to(U.dtype)) @ V.T


def _full_bases(weight: torch.Tensor, U, V, transposed: bool = False):
    """(U, V) with a missing basis formed from W0: W0 V_r = U_r diag(sigma_r), so with c already divided by sigma_r
    (a relative shift) U diag(c) V^T is the same delta. ``weight`` is in its stored layout."""
    if U is not None and V is not None:
        return U, V
    with _no_autocast(weight.device.type):
        W = weight.reshape(weight.shape[0], -1)
        W = W.T if transposed else W  # (d_out, d_in)
        basis = V if U is None else U
        W = W.detach().to(basis.dtype)
        return (W @ V, V) if U is None else (U, W.T @ U)


def _merged_weight(weight: torch.Tensor, U, c, V, transposed: bool = False) -> torch.Tensor:
    """W0 + U diag(c) V^T in the weight's stored layout: transposed for Conv1D, the kernel's shape for a conv."""
    U, V = _full_bases(weight, U, V, transposed)
    delta = _delta(U, c, V)
    return weight + (delta.T if transposed else delta.reshape(weight.shape)).to(weight.dtype)


def _sigma_grad_from_weight_grad(G: torch.Tensor, U: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """dL/dc = diag(U^T G V) for a weight gradient G (d_out, d_in), in float32."""
    return ((U.float().T @ G.float()) * V.float().T).sum(1)


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], transposed: bool) -> torch.Tensor:
    if not transposed:
        return F.linear(x, weight, bias)
    # transformers' Conv1D computes exactly this (weight stored (d_in, d_out)); same op, same bits at c = 0
    out = torch.addmm(bias, x.reshape(-1, x.shape[-1]), weight) if bias is not None else (
        x.reshape(-1, x.shape[-1]) @ weight
    )
    return out.reshape(*x.shape[:-1], weight.shape[-1])


class MergedLinear(Function):
    """y = x W'^T + b with W' = W0 + U diag(c) V^T formed here (and again in backward, not kept)."""

    @staticmethod
    def forward(ctx, x, c, weight, bias, U, V, transposed: bool, sigma_grad: str):
        W = _merged_weight(weight, U, c, V, transposed)
        y = _linear(x, W, bias, transposed)
        ctx.transposed, ctx.sigma_grad = transposed, sigma_grad
        ctx.x_dtype, ctx.x_shape = x.dtype, x.shape
        if ctx.needs_input_grad[1] and sigma_grad == "tokens":
            with _no_autocast(x.device.type):
                Vf = _full_bases(weight, U, V, transposed)[1]
                saved = x.reshape(-1, x.shape[-1]).to(Vf.dtype) @ Vf  # (T, r): only this is needed of x
        else:
            saved = x if ctx.needs_input_grad[1] else None
        ctx.save_for_backward(saved, c, weight, U, V)
        return y

    @staticmethod
    @once_differentiable  # no second-order terms: a double backward raises rather than drop them silently
    def backward(ctx, g):
        saved, c, weight, U, V = ctx.saved_tensors
        grad_x = grad_c = grad_bias = None
        d_out = g.shape[-1]
        g2 = g.reshape(-1, d_out)
        with _no_autocast(g.device.type):
            if ctx.needs_input_grad[0]:
                W = _merged_weight(weight, U, c, V, ctx.transposed).to(g.dtype)
                gx = g2 @ (W.T if ctx.transposed else W)
                del W  # not alive next to the weight gradient below
                grad_x = gx.reshape(*ctx.x_shape[:-1], gx.shape[-1]).to(ctx.x_dtype)
            if ctx.needs_input_grad[1]:
                Uf, Vf = _full_bases(weight, U, V, ctx.transposed)
                if ctx.sigma_grad == "tokens":
                    grad_c = (saved.float() * (g2.to(Uf.dtype) @ Uf).float()).sum(0)
                else:
                    x2 = saved.reshape(-1, saved.shape[-1])
                    grad_c = _sigma_grad_from_weight_grad(g2.T @ x2.to(g2.dtype), Uf, Vf)  # from the weight gradient
                grad_c = grad_c.to(c.dtype)
            if ctx.needs_input_grad[3]:
                grad_bias = g2.sum(0)
        return grad_x, grad_c, None, grad_bias, None, None, None, None


def merged_linear(x, c, weight, bias, U, V, *, transposed: bool = False, sigma_grad: Optional[str] = None):
    """The ``merged`` path. ``weight`` is the base weight in its stored layout ((d_in, d_out) when ``transposed``,
    i.e. transformers' Conv1D); it is read, never written. ``sigma_grad`` forces "weight" or "tokens". With one
    basis (``U`` or ``V`` None), ``c`` is the relative shift c / sigma_r (see ``_full_bases``)."""
    if sigma_grad is None:
        d_in, d_out = (weight.shape[0], weight.shape[1]) if transposed else (weight.shape[1], weight.shape[0])
        r = (V if V is not None else U).shape[1]
        sigma_grad = merged_sigma_grad_cost(x.numel() // max(d_in, 1), d_in, d_out, r)[0]
    return MergedLinear.apply(x, c, weight, bias, U, V, transposed, sigma_grad)


class MergedConv(Function):
    """conv(x, W') with W' = W0 + reshape(U diag(c) V^T) for a groups=1 convolution with zero padding; the
    singular-value gradient comes from the kernel gradient, which convolution_backward gives with the input's."""

    @staticmethod
    def forward(ctx, x, c, weight, bias, U, V, stride, padding, dilation):
        W = _merged_weight(weight, U, c, V)
        conv = (F.conv1d, F.conv2d, F.conv3d)[weight.dim() - 3]  # what the base's forward calls, also under autocast
        y = conv(x, W, bias, stride, padding, dilation, 1)
        ctx.conv = (stride, padding, dilation)
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, c, weight, U, V)
        return y

    @staticmethod
    @once_differentiable  # no second-order terms: a double backward raises rather than drop them silently
    def backward(ctx, g):
        x, c, weight, U, V = ctx.saved_tensors
        stride, padding, dilation = ctx.conv
        need_x, need_c, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[3]
        with _no_autocast(g.device.type):
            W = _merged_weight(weight, U, c, V).to(g.dtype)
            grad_x, grad_w, grad_b = torch.ops.aten.convolution_backward(
                g, x.to(g.dtype), W, [W.shape[0]] if ctx.has_bias else None, stride, padding, dilation, False,
                [0] * len(stride), 1, [need_x, need_c, need_b and ctx.has_bias],
            )
            grad_c = None
            if need_c:
                grad_c = _sigma_grad_from_weight_grad(grad_w.reshape(W.shape[0], -1), U, V).to(c.dtype)
        return (grad_x.to(x.dtype) if need_x else None), grad_c, None, (grad_b if need_b else None), None, None, \
            None, None, None


def merged_conv(x, c, weight, bias, U, V, *, stride, padding, dilation):
    """The ``merged`` path of a groups=1 convolution (numeric zero padding) whose kernel was factored as a
    (c_out, c_in * prod(kernel)) matrix."""
    return MergedConv.apply(x, c, weight, bias, U, V, list(stride), list(padding), list(dilation))


def conv_path_costs(tokens: int, d_in: int, d_out: int, r: int) -> dict[str, float]:
    """Extra flops of a training step for a convolution with ``tokens`` output positions (batch x spatial),
    d_in = c_in * prod(kernel), d_out = c_out: the reference branch (a conv with r kernels and a 1x1 conv, and their
    backward) or ``merged`` (σ-gradient from the kernel gradient)."""
    T = tokens
    return {
        "reference": float(T * r * (d_in + d_out) * 2),
        "merged": float(2 * r * d_in * d_out + T * d_in * d_out + r * d_in * d_out),
    }


# -- one basis ---------------------------------------------------------------------------------------------------


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    """float32 for half-precision tensors on CPU, else their own dtype. On CPU, half-precision matmuls go to oneDNN,
    which compiles and caches a kernel per matmul shape: with a different r in every adapted matrix, that cache grew
    by ~75 MiB on SmolLM2 q,v (benchmarks/memory.py), three times LoRA's. MKL's float32 GEMM compiles nothing, costs
    a basis-sized copy per call (1/T of the matmul) and rounds less."""
    if t.device.type == "cpu" and t.dtype in (torch.bfloat16, torch.float16):
        return torch.float32
    return t.dtype


class _Project(Function):
    """z = a + (((a - shift) B) * s) B^T for an orthonormal-column basis B (d, r); saves only (a - shift) B (T, r).

    The input-side update has no shift; the output-side one projects the base output without its bias."""

    @staticmethod
    def forward(ctx, a, s, B, shift):
        a0 = a - shift if shift is not None else a
        dt = _compute_dtype(a)
        Bc = B.to(dt)
        h = a0.to(dt) @ Bc
        z = a + ((h * s).to(dt) @ Bc.T).to(a.dtype)
        ctx.save_for_backward(h if ctx.needs_input_grad[1] else None, s, B)
        return z

    @staticmethod
    @once_differentiable  # no second-order terms: a double backward raises rather than drop them silently
    def backward(ctx, g):
        h, s, B = ctx.saved_tensors
        dt = _compute_dtype(g)
        Bg = B.to(dt)
        gh = g.to(dt) @ Bg
        through = ((gh * s).to(dt) @ Bg.T).to(g.dtype)  # what the update sends back to a - shift
        grad_a = g + through if ctx.needs_input_grad[0] else None
        grad_s = None
        if ctx.needs_input_grad[1]:
            grad_s = (h.float() * gh.float()).reshape(-1, B.shape[1]).sum(0).to(s.dtype)
        grad_shift = -through.reshape(-1, through.shape[-1]).sum(0) if ctx.needs_input_grad[3] else None
        return grad_a, grad_s, None, grad_shift


def project_input(x: torch.Tensor, s: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """x + ((x V) * s) V^T, to be fed to the untouched base layer (``input`` path; s = c / sigma)."""
    return _Project.apply(x, s, V, None)


def project_output(y: torch.Tensor, s: torch.Tensor, U: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """y + (((y - b) U) * s) U^T on the base layer's output y (``output`` path; s = c / sigma)."""
    return _Project.apply(y, s, U, bias)


def one_basis_branch(
    x: torch.Tensor, s: torch.Tensor, weight: torch.Tensor, U: Optional[torch.Tensor], V: Optional[torch.Tensor],
    transposed: bool = False,
) -> torch.Tensor:
    """Delta W x through the one stored basis and W0 (``s`` = c / sigma_r): (((x V) * s) V^T) W0^T, or
    (((x W0^T) U) * s) U^T. W0 is detached: the adapter's update must not send gradient into the base weight,
    exactly as with two stored bases."""
    W = weight.detach()
    W = W.T if transposed else W  # (d_out, d_in)
    if V is not None:
        h = x.to(V.dtype) @ V
        return ((h * s).to(V.dtype) @ V.T).to(W.dtype) @ W.T
    y0 = x.to(W.dtype) @ W.T
    h = y0.to(U.dtype) @ U
    return (h * s).to(U.dtype) @ U.T


def reference_branch(x: torch.Tensor, c: torch.Tensor, U: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """((x V) * c) U^T: the straightforward two-basis side branch, kept as the definition the fast paths are
    tested against (and used where they do not apply)."""
    h = x.to(V.dtype) @ V
    return (h * c).to(U.dtype) @ U.T
