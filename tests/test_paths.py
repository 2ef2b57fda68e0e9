"""The fast compute paths (svfit.core.paths) against the reference side branch, finite differences and the base."""

import pytest
import torch
import torch.nn.functional as F
from peft import get_peft_model
from torch import nn
from transformers.pytorch_utils import Conv1D

from svfit import SVFitConfig
from svfit.core import paths
from svfit.core.spectrum import thin_svd
from svfit.tuner.layer import SVFitLayer


def _factors(d_out, d_in, r, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(d_out, d_in, generator=g, dtype=dtype) / d_in**0.5
    svd = thin_svd(W, r, dtype=dtype)
    c = 0.3 * svd.S * torch.randn(r, generator=g, dtype=dtype)
    b = torch.randn(d_out, generator=g, dtype=dtype)
    return W, svd.U, svd.S, svd.V, c, b


def _reference(x, W, b, U, V, c):
    return F.linear(x, W, b) + paths.reference_branch(x, c, U, V)


def _path(name, x, W, b, U, S, V, c, transposed=False):
    if name.startswith("merged"):
        grad = name.split("-")[1]
        weight = W.T.contiguous() if transposed else W
        return paths.merged_linear(x, c, weight, b, U, V, transposed=transposed, sigma_grad=grad)
    s = c / S
    if name == "input":
        return F.linear(paths.project_input(x, s, V), W, b)
    return paths.project_output(F.linear(x, W, b), s, U, b)


PATHS = ["merged-weight", "merged-tokens", "input", "output"]


@pytest.mark.parametrize("name", PATHS)
@pytest.mark.parametrize("shape", [(24, 16), (16, 24)])
def test_every_path_matches_the_reference_in_value_and_gradient(name, shape):
    d_out, d_in = shape
    W, U, S, V, c, b = _factors(d_out, d_in, r=10)
    x = torch.randn(3, 5, d_in)
    leaves = [t.clone().requires_grad_(True) for t in (x, c, b)]
    y = _path(name, leaves[0], W, leaves[2], U, S, V, leaves[1])
    ref_leaves = [t.clone().requires_grad_(True) for t in (x, c, b)]
    y_ref = _reference(ref_leaves[0], W, ref_leaves[2], U, V, ref_leaves[1])
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, leaves, g)
    grads_ref = torch.autograd.grad(y_ref, ref_leaves, g)
    for a, e in zip(grads, grads_ref):
        torch.testing.assert_close(a, e, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("grad", ["weight", "tokens"])
def test_merged_path_on_a_transposed_conv1d_weight(grad):
    W, U, S, V, c, b = _factors(12, 20, r=7)
    x = torch.randn(2, 3, 20)
    conv = Conv1D(12, 20)
    conv.weight.data.copy_(W.T)
    conv.bias.data.copy_(b)
    c_leaf = c.clone().requires_grad_(True)
    y = paths.merged_linear(x, c_leaf, conv.weight, conv.bias, U, V, transposed=True, sigma_grad=grad)
    y_ref = conv(x) + paths.reference_branch(x, c, U, V)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    y.sum().backward()
    c_ref = c.clone().requires_grad_(True)
    (conv(x) + paths.reference_branch(x, c_ref, U, V)).sum().backward()
    torch.testing.assert_close(c_leaf.grad, c_ref.grad, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("name", PATHS)
def test_every_path_is_bit_identical_to_the_base_layer_at_c_zero(name):
    W, U, S, V, _, b = _factors(20, 12, r=8)
    x = torch.randn(4, 12)
    y = _path(name, x, W, b, U, S, V, torch.zeros(8))
    assert torch.equal(y, F.linear(x, W, b))


def test_float64_gradients_of_every_autograd_function_match_finite_differences():
    W, U, S, V, c, b = _factors(6, 5, r=4, dtype=torch.float64)
    x = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    c = c.clone().requires_grad_(True)
    b = b.clone().requires_grad_(True)
    for grad in ("weight", "tokens"):
        assert torch.autograd.gradcheck(
            lambda x, c, b: paths.merged_linear(x, c, W, b, U, V, sigma_grad=grad), (x, c, b)
        )
        assert torch.autograd.gradcheck(
            lambda x, c, b: paths.merged_linear(x, c, W.T.contiguous(), b, U, V, transposed=True, sigma_grad=grad),
            (x, c, b),
        )
    s = (c / S).detach().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x, s: paths.project_input(x, s, V), (x, s))
    y = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda y, s, b: paths.project_output(y, s, U, b), (y, s, b))


def test_merged_path_never_writes_the_base_weight():
    W, U, S, V, c, b = _factors(10, 10, r=5)
    before = W.clone()
    c = c.requires_grad_(True)
    paths.merged_linear(torch.randn(4, 10, requires_grad=True), c, W, b, U, V).sum().backward()
    assert torch.equal(W, before) and c.grad is not None


def test_cost_model_merges_for_many_tokens_and_uses_one_basis_for_few():
    # a 99%-energy adapter keeps most of the spectrum: r close to the width
    assert paths.choose_path(4096, 384, 384, 290, training=True) == "merged"
    assert paths.choose_path(1, 384, 1536, 300, training=True) == "input"
    assert paths.choose_path(1, 1536, 384, 300, training=True) == "output"
    assert paths.choose_path(1, 384, 1536, 300, training=True, one_basis=False) == "reference"
    assert paths.choose_path(4096, 384, 384, 290, training=True, allowed=set(), one_basis=False) == "reference"
    assert paths.merged_sigma_grad_cost(4096, 384, 384, 290)[0] == "weight"
    assert paths.merged_sigma_grad_cost(4096, 384, 384, 8)[0] == "tokens"


def test_one_basis_paths_are_refused_for_an_ill_conditioned_kept_spectrum():
    assert paths.one_basis_ok(torch.tensor([3.0, 1.0, 0.5]))
    assert not paths.one_basis_ok(torch.tensor([3.0, 1.0, 1e-6]))
    assert not paths.one_basis_ok(torch.tensor([]))


# -- through the tuner ---------------------------------------------------------------------------------------------


class _MLP(nn.Module):
    def __init__(self, dtype=torch.float32):
        super().__init__()
        torch.manual_seed(0)
        self.up = nn.Linear(16, 40).to(dtype)
        self.down = nn.Linear(40, 16).to(dtype)

    def forward(self, x):
        return self.down(torch.tanh(self.up(x)))


def _adapted(compute_path, dtype=torch.float32, **kw):
    """Both bases stored unless asked otherwise, so that any forced path applies to both layers."""
    kw.setdefault("bases", "both")
    model = get_peft_model(_MLP(dtype), SVFitConfig(target_modules=["up", "down"], compute_path=compute_path,
                                                    init_weights=False, **kw))
    return model


def _set_shift(layer, shift, adapter="default"):
    """Set the trained vector so that the singular values move by ``shift`` (the vector is in units of
    ``svfit_unit``)."""
    layer.svfit_vector[adapter].data = (shift / layer.svfit_unit[adapter]).to(layer.svfit_vector[adapter].dtype)


def _svfit_layers(model):
    return [m for m in model.modules() if isinstance(m, SVFitLayer)]


@pytest.mark.parametrize("compute_path", ["merged", "input", "output", "auto"])
def test_each_compute_path_trains_the_same_model_as_the_reference(compute_path):
    torch.manual_seed(1)
    x = torch.randn(6, 16)
    fast, ref = _adapted(compute_path), _adapted("reference")
    for m in (fast, ref):  # same random init in both
        for layer in _svfit_layers(m):
            torch.manual_seed(7)
            _set_shift(layer, 0.1 * torch.randn_like(layer.svfit_vector["default"]))
    out, out_ref = fast(x), ref(x)
    torch.testing.assert_close(out, out_ref, atol=1e-5, rtol=1e-5)
    out.square().sum().backward()
    out_ref.square().sum().backward()
    for a, b in zip(_svfit_layers(fast), _svfit_layers(ref)):
        torch.testing.assert_close(a.svfit_vector["default"].grad, b.svfit_vector["default"].grad, atol=1e-4,
                                   rtol=1e-4)
    assert [n for n, p in fast.named_parameters() if p.requires_grad] == [
        n for n, p in fast.named_parameters() if p.requires_grad and "svfit_vector" in n
    ]
    if compute_path != "auto":
        assert {layer.compute_path_for(x)[0] for layer in _svfit_layers(fast)} == {compute_path}


def test_the_path_does_not_depend_on_grad_mode_so_eval_matches_training_bits():
    model = _adapted("auto")
    x = torch.randn(2, 16)
    y = model(x)
    with torch.no_grad():
        assert torch.equal(model(x), y)


def test_auto_does_not_merge_into_half_precision_weights_but_merged_can_be_forced():
    x = torch.randn(64, 16, dtype=torch.bfloat16)
    auto = _adapted("auto", dtype=torch.bfloat16)
    assert all(layer.compute_path_for(x)[0] != "merged" for layer in _svfit_layers(auto))
    forced = _adapted("merged", dtype=torch.bfloat16)
    assert all(layer.compute_path_for(x)[0] == "merged" for layer in _svfit_layers(forced))


def test_fast_paths_step_aside_where_they_do_not_apply():
    model = _adapted("merged")
    layer = _svfit_layers(model)[0]
    x = torch.randn(3, 16)
    assert layer.compute_path_for(x)[0] == "merged"
    assert layer.compute_path_for(x, adapter_names=["default"] * 3)[0] == "reference"
    handle = layer.get_base_layer().register_forward_hook(lambda *a: None)
    assert layer.compute_path_for(x)[0] == "reference"  # a merged matmul would skip the user's hook
    handle.remove()
    model.add_adapter("second", SVFitConfig(target_modules=["up", "down"], compute_path="merged"))
    model.base_model.set_adapter(["default", "second"])
    assert layer.compute_path_for(x)[0] == "reference"
    model.base_model.set_adapter("default")
    model.merge_adapter()
    assert layer.compute_path_for(x)[0] == "reference"


def test_a_bad_compute_path_is_a_clear_config_error():
    with pytest.raises(ValueError, match="compute_path must be one of"):
        SVFitConfig(compute_path="fast")


# -- the SVD cache -------------------------------------------------------------------------------------------------


def test_svd_cache_reuses_a_factorisation_and_survives_a_corrupt_entry(tmp_path, monkeypatch):
    import svfit
    from svfit.core import spectrum

    calls = []
    real = spectrum.thin_svd

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr("svfit.tuner.factorization.thin_svd", counting)
    svfit.set_svd_cache(tmp_path)
    try:
        first = get_peft_model(_MLP(), SVFitConfig(target_modules=["up", "down"], init_weights=False))
        assert len(calls) == 2 and len(list(tmp_path.glob("*.safetensors"))) == 2
        torch.manual_seed(0)
        again = get_peft_model(_MLP(), SVFitConfig(target_modules=["up", "down"], init_weights=False))
        assert len(calls) == 2  # both read from the cache
        for a, b in zip(_svfit_layers(first), _svfit_layers(again)):
            assert torch.equal(a.dense_bases("default")[0], b.dense_bases("default")[0])
            assert torch.equal(a.svfit_sigma["default"], b.svfit_sigma["default"])
        # another threshold is another entry; a corrupt entry is recomputed, with a warning, and rewritten
        get_peft_model(_MLP(), SVFitConfig(target_modules=["up"], threshold=0.5))
        assert len(calls) == 3
        for f in tmp_path.glob("*.safetensors"):
            f.write_bytes(b"garbage")
        with pytest.warns(UserWarning, match="unreadable SVD cache entry"):
            fresh = get_peft_model(_MLP(), SVFitConfig(target_modules=["up", "down"], init_weights=False))
        assert len(calls) == 5
        torch.testing.assert_close(_svfit_layers(fresh)[0].dense_bases("default")[0],
                                   _svfit_layers(first)[0].dense_bases("default")[0])
    finally:
        svfit.set_svd_cache(None)


def test_without_the_cache_nothing_is_written(tmp_path, monkeypatch):
    monkeypatch.delenv("SVFIT_SVD_CACHE", raising=False)
    monkeypatch.chdir(tmp_path)
    get_peft_model(_MLP(), SVFitConfig(target_modules=["up"]))
    assert list(tmp_path.iterdir()) == []


# -- convolutions ----------------------------------------------------------------------------------------------------


def _conv_factors(dtype=torch.float32, r=6):
    torch.manual_seed(3)
    conv = nn.Conv2d(3, 8, 3, stride=2, padding=1, dilation=1).to(dtype)
    svd = thin_svd(conv.weight.detach().reshape(8, -1), r, dtype=dtype)
    c = 0.3 * svd.S * torch.randn(r, dtype=dtype)
    return conv, svd.U, svd.V, c


def _conv_reference(conv, x, c, U, V):
    h = F.conv2d(x, V.T.reshape(-1, *conv.weight.shape[1:]), None, conv.stride, conv.padding, conv.dilation)
    return conv(x) + F.conv2d(h * c.reshape(1, -1, 1, 1), U.reshape(*U.shape, 1, 1))


def test_merged_conv_matches_the_reference_branch_and_is_exact_at_zero():
    conv, U, V, c = _conv_factors()
    x = torch.randn(2, 3, 9, 9, requires_grad=True)
    c = c.requires_grad_(True)
    merged = lambda x, c: paths.merged_conv(x, c, conv.weight, conv.bias, U, V, stride=conv.stride,  # noqa: E731
                                            padding=conv.padding, dilation=conv.dilation)
    y, y_ref = merged(x, c), _conv_reference(conv, x, c, U, V)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(y)
    for a, e in zip(torch.autograd.grad(y, (x, c), g), torch.autograd.grad(y_ref, (x, c), g)):
        torch.testing.assert_close(a, e, atol=1e-4, rtol=1e-5)
    with torch.no_grad():
        assert torch.equal(merged(x, torch.zeros_like(c)), conv(x))


def test_merged_conv_gradients_match_finite_differences_in_float64():
    conv, U, V, c = _conv_factors(torch.float64, r=4)
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    bias = conv.bias.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x, c, b: paths.merged_conv(x, c, conv.weight.detach(), b, U, V, stride=conv.stride,
                                          padding=conv.padding, dilation=conv.dilation),
        (x, c.requires_grad_(True), bias),
    )


class _ConvNet(nn.Module):
    def __init__(self, padding_mode="zeros"):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 16, 3, padding=1, padding_mode=padding_mode)
        self.head = nn.Linear(16, 2)

    def forward(self, x):
        return self.head(self.conv(x).mean((2, 3)))


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect"])
def test_conv_layers_merge_when_they_can_and_match_the_reference(padding_mode):
    x = torch.randn(4, 3, 12, 12)
    fast = get_peft_model(_ConvNet(padding_mode), SVFitConfig(target_modules=["conv"], compute_path="merged",
                                                              init_weights=False))
    torch.manual_seed(0)
    ref = get_peft_model(_ConvNet(padding_mode), SVFitConfig(target_modules=["conv"], compute_path="reference",
                                                             init_weights=False))
    for m in (fast, ref):
        layer = _svfit_layers(m)[0]
        _set_shift(layer, 0.1 * torch.arange(layer.svfit_vector["default"].numel()).float())
    expected_path = "merged" if padding_mode == "zeros" else "reference"  # reflect padding is not merged
    assert _svfit_layers(fast)[0].compute_path_for(x)[0] == expected_path
    out, out_ref = fast(x), ref(x)
    torch.testing.assert_close(out, out_ref, atol=1e-5, rtol=1e-5)
    out.sum().backward()
    out_ref.sum().backward()
    torch.testing.assert_close(_svfit_layers(fast)[0].svfit_vector["default"].grad,
                               _svfit_layers(ref)[0].svfit_vector["default"].grad, atol=1e-4, rtol=1e-4)
    auto = get_peft_model(_ConvNet(), SVFitConfig(target_modules=["conv"]))
    assert _svfit_layers(auto)[0].compute_path_for(torch.randn(64, 3, 32, 32))[0] == "merged"  # many positions


# -- where the fast paths must step aside or stay exact (from review) -----------------------------------------------


def test_svfit_on_top_of_another_adapter_keeps_that_adapter_on_every_path():
    import copy

    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(0)
    lora = inject_adapter_in_model(LoraConfig(target_modules=["up"], init_lora_weights=False, r=4), _MLP())
    x = torch.randn(3, 16)
    with torch.no_grad():
        expected = lora(x)
    for path in ("auto", "merged", "input", "output"):
        model = get_peft_model(copy.deepcopy(lora), SVFitConfig(target_modules=["up"], compute_path=path))
        layer = _svfit_layers(model)[0]
        assert layer.compute_path_for(x)[0] == "reference"  # a fused matmul would skip the LoRA in between
        with torch.no_grad():
            torch.testing.assert_close(model(x), expected)


def test_a_model_built_under_inference_mode_runs_every_path():
    """Built and run under inference_mode (no version counters, no autograd): every path gives the reference
    model's output, and the adapter is not a no-op."""
    x = torch.randn(5, 16)
    with torch.inference_mode():
        expected = _adapted("reference")(x)
        base = _MLP()(x)
        assert not torch.allclose(expected, base, atol=1e-3)
        for path in ("auto", "merged", "input", "output"):
            model = _adapted(path)
            if path != "auto":
                assert _svfit_layers(model)[0].compute_path_for(x)[0] == path
            torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("compute_path", ["auto", "merged"])
def test_torch_compile_traces_the_fast_paths_in_one_graph(compute_path):
    model = _adapted(compute_path)
    x = torch.randn(4, 16)
    eager = model(x)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)  # fullgraph: any graph break fails
    out = compiled(x)
    torch.testing.assert_close(out, eager)
    out.sum().backward()
    assert all(layer.svfit_vector["default"].grad is not None for layer in _svfit_layers(model))


def test_one_basis_paths_are_not_offered_after_a_randomized_svd():
    model = get_peft_model(_MLP(), SVFitConfig(target_modules=["up", "down"], r=6, svd="lowrank",
                                               compute_path="input"))
    assert {layer.compute_path_for(torch.randn(1, 16))[0] for layer in _svfit_layers(model)} == {"reference"}


def test_merged_conv_is_bit_exact_at_init_under_cpu_autocast():
    base = _ConvNet()
    model = get_peft_model(_ConvNet(), SVFitConfig(target_modules=["conv"], compute_path="merged"))
    x = torch.randn(2, 3, 12, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        assert torch.equal(model(x), base(x))


def test_double_backward_through_a_fast_path_raises_instead_of_dropping_terms():
    model = _adapted("output")
    x = torch.randn(3, 16, requires_grad=True)
    (grad_x,) = torch.autograd.grad(model(x).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|marked with"):
        grad_x.sum().backward()


def test_backward_hooks_on_the_base_keep_the_reference_path():
    model = _adapted("merged")
    layer = _svfit_layers(model)[0]
    fired = []
    layer.get_base_layer().register_full_backward_hook(lambda *a: fired.append(1))
    assert layer.compute_path_for(torch.randn(2, 16))[0] == "reference"
    model(torch.randn(2, 16, requires_grad=True)).sum().backward()
    assert fired


def test_svd_cache_keeps_linear_and_conv1d_with_the_same_bytes_apart(tmp_path):
    import svfit

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.lin = nn.Linear(8, 8)
            self.c1d = Conv1D(8, 8)
            self.c1d.weight.data.copy_(self.lin.weight.data)  # same bytes, transposed meaning

        def forward(self, x):
            return self.c1d(self.lin(x))

    svfit.set_svd_cache(tmp_path)
    try:
        for _ in range(2):  # the second pass reads every factorisation from the cache
            model = get_peft_model(Two(), SVFitConfig(target_modules=["lin", "c1d"]))
            for layer in _svfit_layers(model):
                W = layer._weight_matrix().detach()
                (U, V), S = layer.dense_bases("default"), layer.svfit_sigma["default"]
                torch.testing.assert_close(U.T @ W @ V, torch.diag(S), atol=1e-5, rtol=1e-5)
    finally:
        svfit.set_svd_cache(None)


def test_svd_cache_serves_the_reload_of_a_threshold_adapter(tmp_path, monkeypatch):
    import svfit
    from peft import PeftModel

    svfit.set_svd_cache(tmp_path / "cache")
    try:
        model = get_peft_model(_MLP(), SVFitConfig(target_modules=["up", "down"], init_weights=False))
        model.save_pretrained(tmp_path / "adapter")
        monkeypatch.setattr("svfit.tuner.factorization.thin_svd", lambda *a, **k: pytest.fail("SVD recomputed on reload"))
        loaded = PeftModel.from_pretrained(_MLP(), tmp_path / "adapter")  # recorded int ranks hit the cache
        x = torch.randn(2, 16)
        assert torch.equal(loaded(x), model(x))
    finally:
        svfit.set_svd_cache(None)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_one_basis_projection_of_half_precision_on_cpu_runs_in_float32(dtype):
    """On CPU the projection's matmuls run in float32 and the update is rounded once, when added: oneDNN would
    otherwise compile a kernel per matmul shape, and every adapted matrix has its own r (benchmarks/memory.py)."""
    torch.manual_seed(0)
    a = torch.randn(2, 5, 16).to(dtype).requires_grad_()
    B = torch.linalg.qr(torch.randn(16, 6))[0].to(dtype)
    s = torch.randn(6, requires_grad=True)
    z = paths.project_input(a, s, B)
    update = ((a.float() @ B.float()) * s) @ B.float().T
    assert z.dtype == dtype and torch.equal(z, a + update.to(dtype))
    g = torch.randn_like(z)
    z.backward(g)
    gh = g.float() @ B.float()
    assert torch.equal(a.grad, g + ((gh * s) @ B.float().T).to(dtype))
    assert torch.allclose(s.grad, ((a.float() @ B.float()) * gh).reshape(-1, 6).sum(0), rtol=1e-5, atol=1e-6)
