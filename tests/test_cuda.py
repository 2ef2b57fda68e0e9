"""The accelerator paths: the SVD on CUDA for a CPU-resident model (svd_device), a model that lives on CUDA (init,
gradients, every compute path, merge, bf16), and adapters that cross between CUDA and the CPU (the
fingerprints and the reload drift bound). Skipped without a CUDA device; CI has none, so these run on a lent GPU
machine (benchmarks/device/run.sh). Autocast on CUDA: tests/test_drift.py's device-parametrized test."""

import json

import pytest
import torch
from peft import PeftModel, get_peft_model

import svfit
from svfit.core.drift import RELOAD_DRIFT_BOUND
from svfit.core.fingerprint import compare, fingerprint
from svfit.tuner import SVFitLayer
from test_drift import _Net, _drifts, _layers, _trained
from test_tuner import perturb
from tiny_models import llama

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

TARGETS = ["a", "b", "c"]
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(autouse=True)
def _no_tf32():
    """Full float32 matmuls, as on the CPU: TF32 would round the comparisons below at 1e-3."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _all_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, SVFitLayer)}


def _svd_device(model) -> str:
    return model.base_model.svfit_init_report["default"].device


@pytest.mark.parametrize("device", ["cuda", "auto"])
def test_a_cpu_model_factorised_on_cuda_keeps_its_bases_on_the_cpu_and_matches_the_cpu_svd(device):
    cpu = get_peft_model(_Net(), svfit.SVFitConfig(target_modules=TARGETS, svd_device="cpu"))
    gpu = get_peft_model(_Net(), svfit.SVFitConfig(target_modules=TARGETS, svd_device=device))
    assert gpu.peft_config["default"].resolved_ranks == cpu.peft_config["default"].resolved_ranks
    x = torch.randn(8, 40)
    with torch.no_grad():
        assert torch.equal(gpu(x), _Net()(x))  # the model at init is the base model, exactly
    for layer in _layers(gpu).values():
        assert {p.device.type for p in layer.parameters()} | {b.device.type for b in layer.buffers()} == {"cpu"}
    assert _svd_device(gpu).startswith("cuda") and _svd_device(cpu) == "cpu"
    perturb(cpu)
    perturb(gpu)
    gaps = {}
    for name, layer in _layers(gpu).items():  # the same Delta W, whichever LAPACK factorised the weight
        d_gpu = layer._delta_matrix("default").double()
        d_cpu = _layers(cpu)[name]._delta_matrix("default").double()
        gaps[name] = float((d_gpu - d_cpu).norm() / d_cpu.norm())
    assert 0 < max(gaps.values()) <= RELOAD_DRIFT_BOUND, gaps  # not bit-equal: cuSOLVER really ran


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_model_on_cuda_starts_exact_and_trains_only_the_singular_values(dtype):
    base = llama().to("cuda", dtype)
    ids = torch.randint(0, 120, (4, 16), device="cuda")
    with torch.no_grad():
        expected = base(ids).logits
    model = get_peft_model(base, svfit.SVFitConfig(target_modules=LLAMA_TARGETS))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, expected)
    for layer in _all_layers(model).values():
        assert {b.device.type for b in layer.buffers()} == {"cuda"}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("svfit_vector" in n for n in trainable)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(20):  # memorise one batch: the loss must fall
        loss = model(ids, labels=ids).loss
        loss.backward()
        assert all((p.grad is None) == (n not in trainable) for n, p in model.named_parameters()), "grads off sigma"
        opt.step()
        opt.zero_grad()
        losses.append(float(loss))
    assert losses[-1] < 0.9 * losses[0], losses


@pytest.mark.parametrize("path", ["merged", "input", "output"])
def test_every_compute_path_on_cuda_gives_the_reference_output_and_gradient(path):
    x = torch.randn(32, 40, device="cuda")
    outs = {}
    for p in (path, "reference"):
        model = get_peft_model(_Net().cuda(), svfit.SVFitConfig(target_modules=TARGETS, compute_path=p, bases="both"))
        perturb(model)
        used = {}
        for name, layer in _all_layers(model).items():  # the path each layer really takes, with its own input
            layer.register_forward_pre_hook(lambda m, args, n=name: used.__setitem__(n, m.compute_path_for(args[0])[0]))
        model.train()
        y = model(x)
        assert set(used.values()) == {p}, used
        y.square().sum().backward()
        outs[p] = (y.detach(), {n: l.svfit_vector["default"].grad.clone() for n, l in _layers(model).items()})
    y, grads = outs[path]
    y_ref, grads_ref = outs["reference"]
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5)
    for name in grads_ref:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merging_on_cuda_equals_the_unmerged_model_and_unmerging_restores_the_base(dtype):
    base = llama().to("cuda", dtype)
    weights = {n: p.detach().clone() for n, p in base.named_parameters()}
    ids = torch.randint(0, 120, (2, 12), device="cuda")
    with torch.no_grad():
        plain = base(ids).logits.float()
    model = get_peft_model(base, svfit.SVFitConfig(target_modules=LLAMA_TARGETS))
    perturb(model, scale=0.3)
    # float32: round-off; bf16: the merged weight is rounded once to bf16 (relative 2^-8 per entry)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    with torch.no_grad():
        unmerged = model(ids).logits.float()
        assert (unmerged - plain).norm() > 5 * tol * plain.norm()  # the adapter moves the output well past tol
        model.merge_adapter()
        merged = model(ids).logits.float()
        assert (merged - unmerged).norm() <= tol * unmerged.norm()
        model.unmerge_adapter()
        assert (model(ids).logits.float() - plain).norm() > 5 * tol * plain.norm()  # unmerged: still adapted
    restored = {n.replace("base_model.model.", "").replace(".base_layer", ""): p
                for n, p in model.named_parameters() if "svfit_" not in n}
    for n, w in weights.items():  # unmerge subtracts the update again (as LoRA's does): back to round-off
        assert (restored[n].float() - w.float()).norm() <= tol * w.float().norm(), n


def test_a_cuda_adapter_reloads_bit_exact_on_the_same_machine(tmp_path):
    model = _trained().cuda().eval()  # svd_device "auto": factorised on the GPU
    x = torch.randn(8, 40, device="cuda")
    with torch.no_grad():
        expected = model(x)
    model.save_pretrained(tmp_path)
    again = PeftModel.from_pretrained(_Net().cuda(), tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(again(x), expected)  # the same machine and SVD: the trained adapter, bit for bit


@pytest.mark.parametrize("trained_on, loaded_on", [("cpu", "cuda"), ("cuda", "cpu")])
def test_an_adapter_refactorised_by_the_other_lapack_stays_within_the_bound(tmp_path, trained_on, loaded_on):
    """Trained where one LAPACK factorised the weights (MKL or cuSOLVER), reloaded where the other one does (what
    ``svd_device="auto"`` does when a GPU machine's adapter is loaded on a laptop, and back)."""
    model = _trained(svd_device=trained_on).eval()
    assert _svd_device(model).startswith(trained_on)
    model.save_pretrained(tmp_path)
    config_path = tmp_path / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["svd_device"] = loaded_on
    config_path.write_text(json.dumps(config))
    loaded = PeftModel.from_pretrained(_Net(), tmp_path).eval()
    assert _svd_device(loaded).startswith(loaded_on)
    drifts = _drifts(model, loaded)
    assert 0 < max(drifts.values()) <= RELOAD_DRIFT_BOUND, drifts  # refactorised by the other LAPACK, within bound
    x = torch.randn(8, 40)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=1e-4, atol=1e-5)


def test_fingerprints_agree_between_cuda_and_the_cpu():
    torch.manual_seed(0)
    w = torch.randn(96, 64)
    on_cpu, on_gpu = fingerprint(w), fingerprint(w.cuda())
    assert on_gpu.hash == on_cpu.hash
    torch.testing.assert_close(torch.tensor(on_gpu.sketch), torch.tensor(on_cpu.sketch), rtol=1e-5, atol=1e-6)
    assert compare(on_gpu, w)[0] == "identical"
    assert compare(on_cpu, w.cuda().bfloat16())[0] == "close"  # a bf16 copy on the GPU of the recorded weight
    assert compare(on_cpu, (w * 1.01).cuda().bfloat16())[0] == "different"
