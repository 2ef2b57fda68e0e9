"""From a model's targeted modules to their truncated SVDs: which matrix each base layer is factored as, the cache
key of that factorisation, and one batch of jobs for ``svfit.core.factorize`` per injected adapter (so that the SVDs
run in parallel, on the accelerator, or shared between ranks, instead of one after another inside each layer)."""

from __future__ import annotations

import dataclasses
import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..core import cache as svd_cache
from ..core.factorize import Job, Report, run_jobs
from ..core.fingerprint import Fingerprint, fingerprint
from ..core.spectrum import SVD_DTYPES, TruncatedSVD, thin_svd
from .guards import is_dtensor


@dataclass
class Factorization:
    """A base weight's fingerprint and its truncated SVD (on the weight's device, SVD dtype)."""

    fingerprint: Fingerprint
    svd: TruncatedSVD


def weight_matrix(base: nn.Module) -> torch.Tensor:
    """The base weight as the (d_out, d_in) matrix SVFit factors: a view, never a copy to be written. Conv1D
    (GPT-2) stores (d_in, d_out); a convolution kernel is read as (c_out, c_in * prod(kernel))."""
    W = base.weight
    if isinstance(base, Conv1D):
        return W.T
    if isinstance(base, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return W.reshape(W.shape[0], -1)
    return W


def svd_device(config) -> Optional[torch.device]:
    """Where the SVDs run: None means where each weight lives."""
    choice = config.svd_device
    if choice == "auto":
        return _accelerator()
    device = torch.device(choice)
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as exc:
        raise ValueError(
            f"svd_device={choice!r}, but this process cannot use that device ({exc}). Use svd_device='auto' (an "
            "accelerator when present, else where the weights live) or 'cpu'."
        ) from None
    return device


def skips_svd(config, rank_spec, recorded: Optional[Fingerprint], on_meta: bool) -> bool:
    """A ``low_cpu_mem_usage`` load of a checkpoint that carries its bases needs no SVD: the state dict fills them."""
    randomized = config.svd == "lowrank" and rank_spec != "full"
    return on_meta and (config.save_bases or randomized) and isinstance(rank_spec, int) and recorded is not None


def factorize_modules(
    modules: dict[str, tuple[nn.Module, object]], config, layer_type: dict[str, str]
) -> tuple[dict[str, Factorization], Report]:
    """Fingerprint and factorise every ``{name: (base_module, rank_spec)}`` in one batch."""
    if any(is_sharded(base.weight) for base, _ in modules.values()):
        return _factorize_sharded(modules, config, layer_type)
    device = svd_device(config)
    fps = _fingerprints({name: base.weight for name, (base, _) in modules.items()})
    jobs = [
        _job(name, weight_matrix(base), isinstance(base, Conv1D), rank_spec, config, fps[name], layer_type[name],
             device)
        for name, (base, rank_spec) in modules.items()
    ]
    results, report = run_jobs(jobs, device=device, split=config.svd_split)
    return _on_weight_devices(modules, fps, results), report


def _factorize_sharded(modules, config, layer_type) -> tuple[dict[str, Factorization], Report]:
    """Weights sharded by FSDP2 (DTensor) or DeepSpeed ZeRO-3: every rank must take part in gathering each one, so
    they are gathered one at a time in the same order everywhere; each rank keeps only the whole weights whose SVD
    it owns (dealt by cost), factorises them, and the owners broadcast the results."""
    import torch.distributed as dist

    from ..core.factorize import deal, share

    device = svd_device(config)
    rank, world = dist.get_rank(), dist.get_world_size()
    shapes = {name: weight_matrix_shape(base) for name, (base, _) in modules.items()}
    costs = [Job(name, float(m) * n * min(m, n), None) for name, (m, n) in shapes.items()]
    owners = deal(costs, world)
    fps, jobs = {}, []
    for name, (base, rank_spec) in modules.items():  # the same order on every rank: each gather is a collective
        with gathered(base.weight) as full:
            fps[name] = fingerprint(full)
            if owners[name] == rank:
                W = full.detach().clone()
                W = W.T if isinstance(base, Conv1D) else W.reshape(W.shape[0], -1)
                jobs.append(_job(name, W, isinstance(base, Conv1D), rank_spec, config, fps[name], layer_type[name],
                                 device))
    mine, report = run_jobs(jobs, device=device, split=False)
    report.rank, report.world_size, report.jobs = rank, world, len(modules)
    results = share(costs, owners, mine, report)
    return _on_weight_devices(modules, fps, results), report


def _on_weight_devices(modules, fps, results) -> dict[str, Factorization]:
    out = {}
    for name, (base, _) in modules.items():
        svd = results[name]
        target = base.weight.device
        if svd.U.device != target:  # computed on the accelerator, or received from another rank
            svd = dataclasses.replace(svd, U=svd.U.to(target), S=svd.S.to(target), V=svd.V.to(target))
        out[name] = Factorization(fps[name], svd)
    return out


def is_sharded(weight) -> bool:
    """An FSDP2 / tensor-parallel DTensor or a DeepSpeed ZeRO-3 partition: the weight is not whole on this rank."""
    return is_dtensor(weight) or hasattr(weight, "ds_id")


@contextmanager
def gathered(weight: torch.Tensor):
    """The whole weight, for the length of the block (a collective for sharded weights: every rank must enter)."""
    if is_dtensor(weight):
        yield weight.full_tensor().detach()
    elif hasattr(weight, "ds_id"):  # DeepSpeed ZeRO-3, gathered as PEFT gathers around its SVD inits (untested here)
        from peft.utils.integrations import gather_params_ctx

        with gather_params_ctx(weight):
            yield weight.detach()
    else:
        yield weight.detach()


def weight_matrix_shape(base: nn.Module) -> tuple[int, int]:
    """(d_out, d_in) of the matrix SVFit factors, from the weight's global shape (also for a sharded weight)."""
    shape = tuple(base.weight.shape)
    if isinstance(base, Conv1D):
        return shape[1], shape[0]
    return shape[0], int(math.prod(shape[1:]))


def _settings(config) -> dict:
    return dict(
        method=config.svd, dtype=SVD_DTYPES[config.svd_dtype], niter=config.svd_niter,
        oversample=config.svd_oversample, seed=config.svd_seed,
    )


def cache_key(fp: Fingerprint, shape, transposed: bool, config, layer_type: str, where: str, rank) -> str:
    """The SVD cache's name for this factorisation: the stored weight's bytes, how they were laid out as a matrix
    (Conv1D factors the transpose of the same bytes an nn.Linear would), the rank and SVD settings, and the kind of
    device the SVD ran on (another LAPACK gives other bits)."""
    return svd_cache.cache_key(
        fp.hash, rank=rank, information=config.information, layer=layer_type, transposed=transposed,
        matrix=list(shape), where=where, **_settings(config),
    )


def _job(name, W, transposed: bool, rank_spec, config, fp: Fingerprint, layer_type: str, device) -> Job:
    """Factorise the (d_out, d_in) matrix ``W`` (through the SVD cache when it is on)."""
    exact = config.svd == "full" or rank_spec == "full"
    where = device.type if device is not None else W.device.type

    def key(rank):
        return cache_key(fp, W.shape, transposed, config, layer_type, where, rank)

    def run(run_device):
        compute = lambda: thin_svd(W, rank_spec, config.information, device=run_device, **_settings(config))  # noqa: E731
        return svd_cache.cached(key(rank_spec), compute, run_device or W.device, rank_key=key if exact else None)

    d_out, d_in = W.shape
    return Job(name, float(d_out) * d_in * min(d_out, d_in), run)


def _fingerprints(weights: dict[str, torch.Tensor]) -> dict[str, Fingerprint]:
    """Fingerprints of many weights; the byte hashing releases the GIL, so they run in the same thread pool."""
    from ..core.factorize import default_workers, single_threaded_pool

    if len(weights) <= 1:
        return {name: fingerprint(w) for name, w in weights.items()}
    with single_threaded_pool(min(default_workers(), len(weights))) as pool:
        futures = {name: pool.submit(_fingerprint_and_trim, w) for name, w in weights.items()}
        return {name: f.result() for name, f in futures.items()}


def _fingerprint_and_trim(weight: torch.Tensor) -> Fingerprint:
    """A fingerprint in a pool thread, whose float32 copy of a half-precision weight is then handed back to the OS
    (see ``svfit.core.factorize._run_and_trim``: freed memory otherwise stays in the thread's heap arena)."""
    from ..core.factorize import release_freed_heap

    try:
        return fingerprint(weight)
    finally:
        release_freed_heap()


def rms_singular_value(fp: Fingerprint, n: int) -> float:
    """sqrt(mean sigma_i^2) over the whole spectrum = ||W0||_F / sqrt(n), read from the fingerprint (the same
    number at training and at every reload, whatever the thread count or the base's dtype)."""
    return fp.fro / math.sqrt(n) if n > 0 and fp.fro > 0 else 1.0


def _accelerator() -> Optional[torch.device]:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    xpu = getattr(torch, "xpu", None)
    if xpu is not None and xpu.is_available():
        return torch.device("xpu", xpu.current_device())
    return None


def shift_unit(config, fp: Fingerprint, n: int) -> float:
    """What one unit of the trained ``delta`` vector shifts a singular value by: ``scaling`` x the matrix's rms
    singular value (1 for the other parametrizations, and for ``scaling=None``: the raw shift)."""
    scaling = getattr(config, "scaling", None)
    if config.parametrization != "delta" or scaling is None:
        return 1.0
    return float(scaling) * rms_singular_value(fp, n)


def layer_kind(base: nn.Module) -> Optional[str]:
    """The SVFit layer class that adapts ``base`` (part of the SVD cache key), or None if none does."""
    if isinstance(base, (nn.Linear, Conv1D)):
        return "Linear"
    if isinstance(base, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return "Conv" if base.groups == 1 else None
    if isinstance(base, nn.Embedding):
        return "Embedding"
    return None
