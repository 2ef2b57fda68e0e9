"""SVFit under FSDP2 (torch.distributed.fsdp.fully_shard) with 2 CPU processes over gloo.

PEFT's order: adapt first, then shard. FSDP then shards the singular values and the frozen bases like any parameter,
all-gathers the base weights for each forward, and averages gradients across ranks, so every compute path must give
the single-process gradient. An already-sharded model works too: each weight is gathered, one rank factorises it and
broadcasts the result, and each SVFit layer becomes an FSDP2 unit of its own.
"""

import pytest
import torch
import torch.distributed as dist
from ranks import gloo_group, run_ranks
from torch import nn

import svfit

pytest.importorskip("torch.distributed.fsdp")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch without gloo", allow_module_level=True)

PATHS = ("reference", "merged", "input", "output", "auto")  # forced paths on both bases; auto on one basis


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 16), nn.Tanh(), nn.Linear(16, 4))


def _batch():
    torch.manual_seed(1)
    return torch.randn(8, 16)


def _config(path):
    import svfit

    return svfit.SVFitConfig(target_modules=["0", "2"], init_weights=False, compute_path=path,
                             bases="auto" if path == "auto" else "both")


def _worker(rank, world, port, prefix):
    with gloo_group(rank, world, port, prefix):
        from peft import get_peft_model
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        result = {}
        for path in PATHS:
            model = get_peft_model(_model(), _config(path))
            inner = model.base_model.model
            for i in (0, 2):
                fully_shard(inner[i], mesh=mesh)
            fully_shard(model, mesh=mesh)
            x = _batch().chunk(world)[rank]
            model(x).square().sum().backward()
            result[path] = {
                n: p.grad.full_tensor() for n, p in model.named_parameters() if p.requires_grad
            }
            result[path + " used"] = {inner[0].compute_path_for(x)[0],
                                   inner[2].compute_path_for(torch.zeros(x.shape[0], 32))[0]}
            # the frozen bases are parameters: FSDP2 shards them, each rank holds its share
            result[path + " bases"] = {
                n: (p.to_local().numel(), p.numel()) for n, p in model.named_parameters()
                if ".basis_U." in n or ".basis_V." in n
            }
        # an already-sharded model: each weight is gathered, factorised by one rank, broadcast; the SVFit layers
        # become FSDP2 units of their own
        sharded = _model()
        for i in (0, 2):
            fully_shard(sharded[i], mesh=mesh)
        fully_shard(sharded, mesh=mesh)
        model = get_peft_model(sharded, _config("auto"))
        report = model.base_model.svfit_init_report["default"]
        x = _batch().chunk(world)[rank]
        model(x).square().sum().backward()
        result["presharded"] = {
            "per_rank": report.per_rank,
            "grads": {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.requires_grad},
            "bases": {n: p.full_tensor() for n, p in model.named_parameters() if ".basis_" in n},
        }
        if rank == 0:
            torch.save(result, f"{prefix}.pt")
        dist.barrier()  # neither rank tears gloo down while its peer still uses it (an intermittent SIGABRT in CI)


def test_fsdp2_two_cpu_processes_give_the_single_process_gradients(tmp_path):
    from peft import get_peft_model

    sharded = torch.load(f"{run_ranks(_worker, tmp_path)}.pt")
    for path in PATHS:
        model = get_peft_model(_model(), _config(path))
        (model(_batch()).square().sum() / 2).backward()  # FSDP averages the 2 ranks' gradients
        expected = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        if path != "auto":
            assert sharded[path + " used"] == {path}  # the fast path itself ran under FSDP, not a fallback
        bases = sharded[path + " bases"]
        assert bases and all(local * 2 == full for local, full in bases.values()), bases  # each rank: half
        assert set(sharded[path]) == set(expected) and expected
        for name, grad in expected.items():
            torch.testing.assert_close(sharded[path][name], grad, atol=1e-5, rtol=1e-5)
    pre = sharded["presharded"]
    assert pre["per_rank"] == [1, 1]  # two targeted matrices, one factorised on each rank
    # an already-sharded layer keeps both bases (W0 is whole only inside its own unit's forward)
    model = get_peft_model(_model(), svfit.SVFitConfig(target_modules=["0", "2"], init_weights=False, bases="both"))
    (model(_batch()).square().sum() / 2).backward()
    expected = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert set(pre["grads"]) == set(expected)
    for name, grad in expected.items():  # the reference branch there, a fast path here: round-off apart
        torch.testing.assert_close(pre["grads"][name], grad, atol=1e-4, rtol=1e-4)
    bases = {n: p for n, p in model.named_parameters() if ".basis_" in n}
    assert set(pre["bases"]) == set(bases) and all(torch.equal(pre["bases"][n], b) for n, b in bases.items())
