"""Running the many SVDs of an SVFit init: fast on a busy machine, on an accelerator, or shared between ranks.

The SVD is the one start-up cost SVFit adds over LoRA. Three things make it slow in practice, and this module is
the answer to each; it runs named jobs and knows nothing of PEFT.

**A busy machine.** MKL's LAPACK runs an SVD as many small OpenMP parallel regions whose threads spin-wait between
them. When other processes hold the cores, every wait costs a scheduler time slice: on 2 cores with 2 busy
neighbours, 12 SVDs of 384x384 took 111 s instead of 0.7 s. Here every SVD runs *single-threaded* in a bounded pool
of worker threads (torch releases the GIL), one matrix per worker: nothing spins, a busy machine slows the init down
only by its fair share of the cores, and on an idle one the matrices run in parallel (on 2 idle cores that beat MKL's
own 2 threads by 1.7x). A single-threaded SVD is also the same computation whatever the process's thread count, so
recomputed bases do not depend on ``OMP_NUM_THREADS``. Nothing else's thread settings change: OpenMP's thread count
is set per thread, in the pool's threads only (``torch.set_num_threads`` would change process-wide state).

**An accelerator.** ``device="cuda"`` factorises CPU-resident weights there, one matrix at a time (peak accelerator
memory stays about one matrix's worth); the caller moves the results back to the weight's device and dtype.

**Data-parallel ranks.** Under ``torch.distributed`` every rank would repeat every SVD. With ``split=True`` the jobs
are dealt out by cost, each rank runs its share, and the owners broadcast their results, so every rank ends with
bit-identical bases. The ranks first agree through the process group's store, with a timeout, that all of them are
running the same set of jobs; a rank that adapts a model alone (say rank 0 loading an adapter for evaluation) falls
back to factorising everything itself instead of waiting forever in a collective.
"""

from __future__ import annotations

import ctypes
import hashlib
import itertools
import os
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from .spectrum import TruncatedSVD

WORKERS_ENV = "SVFIT_SVD_WORKERS"  # pool size override (default: the cores this process may use)
SPLIT_TIMEOUT_ENV = "SVFIT_SVD_SPLIT_TIMEOUT"  # seconds the ranks wait for each other before going it alone
DEFAULT_SPLIT_TIMEOUT = 60.0


@dataclass
class Job:
    """One factorisation. ``run(device)`` returns the truncated SVD computed on ``device`` (None: where the weight
    lives), results on that device; ``cost`` orders the work (largest first) and deals it out between ranks."""

    name: str
    cost: float
    run: Callable[[Optional[torch.device]], TruncatedSVD]


@dataclass
class Report:
    """What one init did: how many matrices this rank factorised itself, how long that took, and how the work was
    shared (``per_rank`` counts under a split; ``None`` when no split happened)."""

    jobs: int = 0
    factorised: int = 0
    seconds: float = 0.0
    workers: int = 0
    device: str = "cpu"
    rank: int = 0
    world_size: int = 1
    per_rank: Optional[list[int]] = None
    fallback: Optional[str] = None  # why a split was not used although ranks exist
    names: list[str] = field(default_factory=list)  # the jobs this rank factorised


def default_workers() -> int:
    """Pool size: ``SVFIT_SVD_WORKERS``, else the CPUs this process may run on, capped by torch's thread count (a
    user who limited torch to n threads gets at most n SVDs at once)."""
    env = os.environ.get(WORKERS_ENV)
    if env:
        try:
            n = int(env)
        except ValueError:
            raise ValueError(f"{WORKERS_ENV} must be a positive integer, got {env!r}") from None
        if n < 1:
            raise ValueError(f"{WORKERS_ENV} must be a positive integer, got {env!r}")
        return n
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    try:
        local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        local = 1
    return max(1, min(cpus // local, torch.get_num_threads()))


def run_jobs(
    jobs: Sequence[Job],
    *,
    device: Optional[torch.device] = None,
    workers: Optional[int] = None,
    split: bool = True,
) -> tuple[dict[str, TruncatedSVD], Report]:
    """Run every job once; returns ``({name: result}, report)``. CPU jobs go through the single-threaded pool,
    accelerator jobs run one at a time; under an initialised ``torch.distributed`` group with ``split``, the ranks
    share the work (see the module docstring)."""
    jobs = list(jobs)
    names = [j.name for j in jobs]
    if len(set(names)) != len(names):
        raise ValueError("factorisation jobs need unique names")
    report = Report(jobs=len(jobs), device=str(device) if device is not None else "weight's device")
    started = time.perf_counter()
    group = _agreed_group(names, report) if split and jobs else None
    if group is None:
        mine = jobs
    else:
        owners = deal(jobs, report.world_size)
        mine = [j for j in jobs if owners[j.name] == report.rank]
    results = _run_local(mine, device, workers, report)
    if group is not None:
        results = share(jobs, owners, results, report)
    report.factorised = len(mine)
    report.names = [j.name for j in mine]
    report.seconds = time.perf_counter() - started
    return results, report


def deal(jobs: Sequence[Job], world_size: int) -> dict[str, int]:
    """Owner rank of every job: largest first, each to the least-loaded rank (ties: the lower rank). The same on
    every rank, since it depends only on the job list."""
    load = [0.0] * world_size
    owners = {}
    for job in sorted(jobs, key=lambda j: (-j.cost, j.name)):
        rank = min(range(world_size), key=lambda k: (load[k], k))
        owners[job.name] = rank
        load[rank] += job.cost
    return owners


# -- local execution ---------------------------------------------------------------------------------------------


def _run_local(jobs: list[Job], device, workers: Optional[int], report: Report) -> dict[str, TruncatedSVD]:
    if not jobs:
        return {}
    if device is not None and torch.device(device).type != "cpu":
        report.workers = 1
        results = {}
        for job in sorted(jobs, key=lambda j: -j.cost):  # one matrix on the accelerator at a time
            results[job.name] = job.run(torch.device(device))
        return results
    n = min(workers or default_workers(), len(jobs))
    report.workers = n
    order = sorted(jobs, key=lambda j: -j.cost)  # largest first: the pool ends together
    with single_threaded_pool(n) as pool:
        futures = {job.name: pool.submit(_run_and_trim, job, device) for job in order}
        return {name: f.result() for name, f in futures.items()}


def _run_and_trim(job: Job, device) -> TruncatedSVD:
    """Run a job in a pool thread, then hand the LAPACK workspace it freed back to the OS. glibc gives every thread
    its own heap arena, and freed workspace stayed resident there after the init: ~10 MiB on SmolLM2 q,v, most of
    what SVFit's init held beyond its bases (benchmarks/memory.py). Trimming costs well under a millisecond."""
    try:
        return job.run(device)
    finally:
        release_freed_heap()


def release_freed_heap() -> None:
    """glibc's ``malloc_trim(0)``: hand freed heap pages of every arena back to the OS (a no-op elsewhere)."""
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):  # not glibc: nothing to do
            _libc = False
    if _libc:
        _libc(0)


_libc = None  # glibc's malloc_trim, found on first use (False: not available)


def single_threaded_pool(workers: int) -> ThreadPoolExecutor:
    """A ThreadPoolExecutor whose threads run OpenMP (and so MKL's LAPACK) with one thread each."""
    return ThreadPoolExecutor(workers, thread_name_prefix="svfit-svd", initializer=_one_thread)


def _one_thread() -> None:
    """Limit OpenMP to one thread *in this thread only*: OpenMP's thread count is a per-thread setting, unlike
    torch.set_num_threads, which also changes the default of threads created later and turns off MKL's dynamic
    threading for the whole process. torch first initialises its own per-thread setting (lazily, on first use,
    which would otherwise overwrite ours)."""
    torch.get_num_threads()
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # without it the SVDs still run, with MKL's own threads
        return
    threadpool_limits(1, user_api="openmp")


# -- sharing the work between ranks ------------------------------------------------------------------------------

_calls = itertools.count()  # every process counts its inits in the same order when all ranks run the same code


def _agreed_group(names: list[str], report: Report):
    """The default process group when every rank is running this same set of jobs now, else None (and why, in
    ``report.fallback``)."""
    try:
        import torch.distributed as dist
    except ImportError:
        return None
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() <= 1:
        return None
    report.rank, report.world_size = dist.get_rank(), dist.get_world_size()
    digest = hashlib.blake2b("\n".join(names).encode(), digest_size=8).hexdigest()
    key = f"svfit/svd/{next(_calls)}/{digest}"
    try:
        store = dist.distributed_c10d._get_default_store()
    except Exception as exc:  # a process group without a store (rare): factorise locally
        report.fallback = f"no store to agree on ({exc})"
        return None
    timeout = float(os.environ.get(SPLIT_TIMEOUT_ENV, DEFAULT_SPLIT_TIMEOUT))
    arrived = store.add(f"{key}/arrived", 1)
    decision = f"{key}/decision"
    deadline = time.monotonic() + timeout
    while True:
        if arrived >= report.world_size or store.add(f"{key}/arrived", 0) >= report.world_size:
            # everyone is here: try to settle on a split (the first writer wins; a late "local" would lose)
            verdict = store.compare_set(decision, "", "split")
            break
        if time.monotonic() > deadline:
            verdict = store.compare_set(decision, "", "local")
            break
        time.sleep(0.01)
    verdict = verdict.decode() if isinstance(verdict, bytes) else str(verdict)
    if verdict != "split":
        report.fallback = (
            f"not every rank adapted the same modules within {timeout:g} s ({SPLIT_TIMEOUT_ENV}); "
            "this rank factorised all of them itself"
        )
        warnings.warn(f"SVFit init: {report.fallback}", stacklevel=4)
        return None
    return dist.group.WORLD


def share(jobs: Sequence[Job], owners: dict[str, int], mine: dict[str, TruncatedSVD], report: Report):
    """Broadcast every result from its owner (a collective: every rank calls it with the same jobs and owners, having
    computed its own share ``mine``). Metadata (shapes, spectrum shares) first, as objects; then one flat tensor per
    job, on the device the backend communicates from. Fills ``report.per_rank``."""
    import torch.distributed as dist

    meta = {name: _meta(svd) for name, svd in mine.items()}
    gathered: list = [None] * report.world_size
    dist.all_gather_object(gathered, meta)
    everything = {}
    for part in gathered:
        everything.update(part)
    report.per_rank = [sum(1 for o in owners.values() if o == k) for k in range(report.world_size)]
    comm = _comm_device()
    results = {}
    for job in jobs:  # the same order on every rank
        m = everything[job.name]
        owner = owners[job.name]
        if owner == report.rank:
            svd = mine[job.name]
            flat = torch.cat([svd.U.reshape(-1), svd.S.reshape(-1), svd.V.reshape(-1)]).to(comm)
        else:
            flat = torch.empty(m["numel"], dtype=getattr(torch, m["dtype"]), device=comm)
        dist.broadcast(flat, src=owner)
        if owner == report.rank:
            results[job.name] = mine[job.name]
            continue
        d_out, d_in, r = m["d_out"], m["d_in"], m["r"]
        U, S, V = flat.split([d_out * r, r, d_in * r])
        results[job.name] = TruncatedSVD(
            U=U.reshape(d_out, r).clone(), S=S.clone(), V=V.reshape(d_in, r).clone(), n=m["n"],
            energy_kept=m["energy_kept"], nuclear_kept=m["nuclear_kept"], min_gap=m["min_gap"],
            spectrum=torch.tensor(m["spectrum"]) if m["spectrum"] is not None else None,
        )
    return results


def _meta(svd: TruncatedSVD) -> dict:
    return {
        "d_out": svd.U.shape[0], "d_in": svd.V.shape[0], "r": svd.r, "n": svd.n, "energy_kept": svd.energy_kept,
        "nuclear_kept": svd.nuclear_kept, "min_gap": svd.min_gap, "dtype": str(svd.U.dtype).removeprefix("torch."),
        "numel": svd.U.numel() + svd.S.numel() + svd.V.numel(),
        "spectrum": svd.spectrum.tolist() if svd.spectrum is not None else None,
    }


def _comm_device() -> torch.device:
    import torch.distributed as dist

    backend = str(dist.get_backend()).lower()
    if "nccl" in backend and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
