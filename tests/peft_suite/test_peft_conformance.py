"""Conformance: PEFT's own generic test battery, run against SVFit.

PEFT ships its tests only in the sdist. Nothing of it is copied into this repository: ``fetch_peft_tests.sh``
downloads the sdist of the installed peft version at test time and extracts its ``tests/`` into a cache directory
(``$SVFIT_CACHE``, default ``~/.cache/svfit``; or point ``SVFIT_PEFT_TESTS_DIR`` at an extracted ``tests/``). When
that is impossible (offline, no package mirror) this whole module is skipped with the reason.

The upstream modules are imported as the package ``_peft_upstream_tests``. Every upstream test class that the
battery uses (``TestPeftCustomModel`` and the other classes of ``test_custom_models.py``, plus ``TestDecoderModels``
of ``test_decoder_models.py``, which drives the ``PeftCommonTester._test_*`` functions that need a transformers model)
is subclassed here, and each of its test functions is re-parametrised the way upstream parametrises it, but over
SVFit cases:

* ``test_name, model_id, config_cls, config_kwargs`` (upstream ``TEST_CASES``) -> ``SVFIT_TEST_CASES``, on the same
  in-file model zoo (MLP, Embedding + transformers Conv1D, Conv1d/2d/3d with groups=1);
* ``config_cls`` -> ``[SVFitConfig]``; ``... config_kwargs_1, config_kwargs_2`` -> ``SVFIT_MULTI_ADAPTER_CASES``;
  the mixed-adapter-batch cases and other config instances -> SVFit equivalents (``SPECIFIC_PARAMS``);
* decoder tests: ``model_id`` -> tiny Llama / GPT-2 models built from a config (no hub), ``config_cls,config_kwargs``
  -> ``SVFIT_DECODER_CONFIGS``.

Upstream tests that cannot apply to SVFit by design are listed in ``SKIPPED`` with a one-line reason; tests that
upstream hard-codes to other PEFT methods (not parametrised over configs) are collected as skips naming those methods.
Tests that fail because of a bug in svfit are listed in ``KNOWN_SVFIT_BUGS`` and run as strict xfails.
``test_inventory_is_complete`` fails when a new PEFT version renames or adds tests that nothing here accounts for.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.metadata
import importlib.util
import os
import subprocess
import sys
import types
import warnings
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import pytest
import torch

import svfit  # noqa: F401  (registers PeftType.SVFIT)
from svfit import SVFitConfig

HERE = Path(__file__).resolve().parent
FETCH_SCRIPT = HERE / "fetch_peft_tests.sh"
PEFT_VERSION = importlib.metadata.version("peft")
UPSTREAM_PKG = "_peft_upstream_tests"


# ---------------------------------------------------------------------------------------------------------------------
# Fetching and importing PEFT's tests
# ---------------------------------------------------------------------------------------------------------------------


def _fetch_peft_tests() -> Path:
    """Path of the extracted ``tests/`` of the peft sdist; skips this module when it cannot be had."""
    env = dict(os.environ, PYTHON=sys.executable)
    try:
        proc = subprocess.run(
            ["bash", str(FETCH_SCRIPT), PEFT_VERSION], capture_output=True, text=True, env=env, timeout=600
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"cannot fetch PEFT {PEFT_VERSION}'s tests: {exc}", allow_module_level=True)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        why = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        pytest.skip(
            f"cannot fetch PEFT {PEFT_VERSION}'s tests (sdist not downloadable: offline or no package mirror?): {why}",
            allow_module_level=True,
        )
    return Path(lines[-1])


def _stub_module(name: str, **attrs) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)
    module.__dict__.update(attrs)
    return module


def _missing_import_stubs() -> dict[str, types.ModuleType]:
    """Stubs for heavy, optional packages that PEFT's test helpers import at module level but that none of the tests
    run here uses; a package that is installed is used as is."""
    stubs = {}

    def missing(name):
        try:
            return importlib.util.find_spec(name) is None
        except (ImportError, ValueError):
            return True

    if missing("datasets"):  # testing_utils: load_dataset, only for hub-data tests not run here

        def load_dataset(*args, **kwargs):
            raise RuntimeError("datasets is stubbed out in svfit's PEFT conformance tests")

        stubs["datasets"] = _stub_module("datasets", load_dataset=load_dataset)
    if missing("diffusers"):  # testing_common: StableDiffusionPipeline, only for isinstance checks

        class StableDiffusionPipeline:  # never instantiated: isinstance() is always False
            pass

        stubs["diffusers"] = _stub_module("diffusers", StableDiffusionPipeline=StableDiffusionPipeline)
    return stubs


def _prewarm_availability_checks(names) -> None:
    """Evaluate the (mostly lru-cached) ``is_<pkg>_available()`` checks of the HF libraries for the stubbed packages
    before the stubs exist. Otherwise a check first run while a stub sits in sys.modules would report the package as
    installed for the rest of the session (e.g. transformers' Trainer would then use a stub ``datasets``)."""
    for module_name in ("transformers.utils.import_utils", "accelerate.utils.imports", "peft.import_utils"):
        try:
            importlib.import_module(module_name)
        except ImportError:
            pass
    for module_name, module in list(sys.modules.items()):
        if module is None or not module_name.endswith(("import_utils", ".imports")):
            continue
        for name in names:
            check = getattr(module, f"is_{name}_available", None)
            if callable(check):
                try:
                    check()
                except Exception:  # noqa: BLE001  (a probe only)
                    pass


@contextmanager
def _hub_offline(model_id: str = ""):
    """Replaces upstream's ``hub_online_once``, which lets the first access of each model id go online."""
    with (
        mock.patch.dict(os.environ, {"HF_HUB_OFFLINE": "1"}),
        mock.patch("huggingface_hub.constants.HF_HUB_OFFLINE", True),
        mock.patch("transformers.utils.hub.is_offline_mode", lambda: True),
    ):
        yield


def _import_upstream(tests_dir: Path):
    if UPSTREAM_PKG not in sys.modules:
        # upstream uses plain asserts: let pytest rewrite them for readable failures (before anything is imported)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", pytest.PytestAssertRewriteWarning)
            pytest.register_assert_rewrite(UPSTREAM_PKG)
        spec = importlib.machinery.ModuleSpec(UPSTREAM_PKG, None, is_package=True)
        spec.submodule_search_locations = [str(tests_dir)]
        sys.modules[UPSTREAM_PKG] = importlib.util.module_from_spec(spec)

    stubs = _missing_import_stubs()
    _prewarm_availability_checks(stubs)
    saved = {name: sys.modules.get(name) for name in stubs}
    sys.modules.update(stubs)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            modules = {
                name: importlib.import_module(f"{UPSTREAM_PKG}.{name}")
                for name in ("testing_utils", "testing_common", "test_custom_models", "test_decoder_models")
            }
    finally:
        # the stubs were only needed while the upstream modules bound their names; keep them out of everyone else's way
        for name, previous in saved.items():
            if previous is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = previous
    for module in modules.values():
        if hasattr(module, "hub_online_once"):
            module.hub_online_once = _hub_offline
    return modules, sorted(stubs)


PEFT_TESTS_DIR = _fetch_peft_tests()
_UPSTREAM, STUBBED_MODULES = _import_upstream(PEFT_TESTS_DIR)
tcm = _UPSTREAM["test_custom_models"]  # the model zoo: MLP, ModelEmbConv1D, ModelConv2D, ... (MockTransformerWrapper)
tdm = _UPSTREAM["test_decoder_models"]


# ---------------------------------------------------------------------------------------------------------------------
# SVFit cases
# ---------------------------------------------------------------------------------------------------------------------

# Same shape as upstream's TEST_CASES: (test name, model id of test_custom_models' model zoo, config class, kwargs).
# The battery itself switches to init_weights=False (random non-identity singular values) where it needs an adapter
# that changes the output (upstream's set_init_weights_false), exactly as it does for the other methods.
# Not used on purpose: Conv1dGroups / Conv2dGroups / Conv2dGroups2 (grouped convolutions) and MHA
# (nn.MultiheadAttention) are unsupported by design; MlpUsingParameters needs target_parameters (LoRA only);
# Conv1dKernel1's forward takes `x`, not the battery's `X` input (upstream does not run it through TEST_CASES either).
SVFIT_TEST_CASES = [
    # nn.Linear
    ("Vanilla MLP 1 SVFit", "MLP", SVFitConfig, {"target_modules": "lin0"}),
    ("Vanilla MLP 2 SVFit", "MLP", SVFitConfig, {"target_modules": ["lin0"]}),
    ("Vanilla MLP 3 SVFit", "MLP", SVFitConfig, {"target_modules": ["lin1"]}),
    ("Vanilla MLP 4 SVFit", "MLP", SVFitConfig, {"target_modules": ["lin0", "lin1"]}),
    ("Vanilla MLP 5 SVFit", "MLP", SVFitConfig, {"target_modules": ["lin0"], "modules_to_save": ["lin1"]}),
    ("Vanilla MLP 6 SVFit fixed r", "MLP", SVFitConfig, {"target_modules": ["lin0", "lin1"], "r": 2}),
    (
        "Vanilla MLP 7 SVFit full spectrum sigma",
        "MLP",
        SVFitConfig,
        {"target_modules": ["lin0", "lin1"], "r": "full", "parametrization": "sigma"},
    ),
    (
        "Vanilla MLP 8 SVFit scale nonneg",
        "MLP",
        SVFitConfig,
        {"target_modules": ["lin0"], "parametrization": "scale", "nonneg": True},
    ),
    (
        "Vanilla MLP 9 SVFit nuclear threshold",
        "MLP",
        SVFitConfig,
        {"target_modules": ["lin0", "lin1"], "information": "nuclear", "threshold": 0.9},
    ),
    (
        "Vanilla MLP 10 SVFit lowrank rank_pattern",
        "MLP",
        SVFitConfig,
        {"target_modules": ["lin0", "lin1"], "svd": "lowrank", "r": 4, "rank_pattern": {"lin1": 1}},
    ),
    ("Vanilla MLP 11 SVFit save_bases", "MLP", SVFitConfig, {"target_modules": ["lin0", "lin1"], "save_bases": True}),
    (
        "Vanilla MLP 12 SVFit exclude_modules",
        "MLP_LayerNorm",
        SVFitConfig,
        {"target_modules": ["lin0", "lin1"], "exclude_modules": ["lin1"]},
    ),
    # nn.Embedding and transformers' Conv1D
    ("Embedding + transformers Conv1D 1 SVFit", "EmbConv1D", SVFitConfig, {"target_modules": ["conv1d"]}),
    ("Embedding + transformers Conv1D 2 SVFit", "EmbConv1D", SVFitConfig, {"target_modules": ["emb"]}),
    ("Embedding + transformers Conv1D 3 SVFit", "EmbConv1D", SVFitConfig, {"target_modules": ["emb", "conv1d"]}),
    # nn.Conv1d / Conv2d / Conv3d, groups=1
    ("Conv1d SVFit", "Conv1d", SVFitConfig, {"target_modules": ["conv1d"]}),
    ("Conv1d Bigger SVFit fixed r", "Conv1dBigger", SVFitConfig, {"target_modules": ["conv1d"], "r": 4}),
    ("Conv2d 1 SVFit", "Conv2d", SVFitConfig, {"target_modules": ["conv2d"]}),
    ("Conv2d 2 SVFit", "Conv2d", SVFitConfig, {"target_modules": ["conv2d", "lin0"]}),
    ("Conv2d 1x1 SVFit", "Conv2d1x1", SVFitConfig, {"target_modules": ["conv2d"]}),
    ("Conv2d2 SVFit save_bases", "Conv2d2", SVFitConfig, {"target_modules": ["lin0", "conv2d"], "save_bases": True}),
    ("Conv3d 1 SVFit", "Conv3d", SVFitConfig, {"target_modules": ["conv3d"]}),
    ("Conv3d 2 SVFit", "Conv3d", SVFitConfig, {"target_modules": ["conv3d", "lin0"]}),
]

# Upstream's MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES shape; tuner_method "svfit" gets upstream's default model,
# MLP(bias=True)
SVFIT_MULTI_ADAPTER_CASES = [
    (
        "SVFit Same",
        "svfit",
        SVFitConfig,
        {"target_modules": ["lin0"], "init_weights": False},
        {"target_modules": ["lin0"], "init_weights": False},
    ),
    (
        "SVFit Different",
        "svfit",
        SVFitConfig,
        {"target_modules": ["lin0"], "init_weights": False},
        {"target_modules": ["lin1"], "init_weights": False},
    ),
    (
        "SVFit Same different ranks and parametrizations",
        "svfit",
        SVFitConfig,
        {"target_modules": ["lin0", "lin1"], "r": 2, "init_weights": False},
        {"target_modules": ["lin0"], "r": "full", "parametrization": "sigma", "init_weights": False},
    ),
]


def _svfit(**kwargs) -> SVFitConfig:
    return SVFitConfig(init_weights=False, **kwargs)


# The mixed-adapter-batch tests (and a few others) parametrise over config *instances*; these are their SVFit
# counterparts. Factories, so that every test function gets fresh configs (SVFitConfig records ranks at injection).
def _mixed_default():
    return [("SVFit mixed adapter", _svfit(target_modules=["lin0"]), _svfit(target_modules=["lin0"], r=2))]


SPECIFIC_PARAMS = {
    # (upstream class, test function) -> {argnames: factory of the parameter values}
    ("TestPeftCustomModel", "test_adapter_name_makes_no_difference"): {
        "config0": lambda: [_svfit(target_modules=["lin0"])],
    },
    ("TestPeftCustomModel", "test_save_pretrained_targeting_lora_to_embedding_layer"): {
        "peft_config": lambda: [
            _svfit(target_modules=["lin0", "embed_tokens"]),
            _svfit(target_modules=r"^embed_tokens"),
        ],
    },
    ("TestPeftCustomModel", "test_save_pretrained_targeting_lora_to_embedding_layer_non_transformers"): {
        "peft_config": lambda: [_svfit(target_modules=["lin0", "emb"]), _svfit(target_modules=r"^emb")],
    },
    ("TestMixedAdapterBatches", "test_mixed_adapter_batches_mlp"): {"test_name,config0,config1": _mixed_default},
    ("TestMixedAdapterBatches", "test_mixed_adapter_batches_length_mismatch_raises"): {
        "test_name,config0,config1": _mixed_default
    },
    ("TestMixedAdapterBatches", "test_mixed_adapter_batches_training_mode_raises"): {
        "test_name,config0,config1": _mixed_default
    },
    ("TestMixedAdapterBatches", "test_mixed_adapter_batches_disabled"): {"test_name,config0,config1": _mixed_default},
    ("TestMixedAdapterBatches", "test_mixed_adapter_batches_merged_raises"): {
        "test_name,config0,config1": _mixed_default
    },
    ("TestMixedAdapterBatches", "test_mixed_adapter_batches_different_target_layers"): {
        "test_name,config0,config1": lambda: [
            ("SVFit mixed adapter, different target layers", _svfit(target_modules=["lin0"]),
             _svfit(target_modules=["lin1"])),
        ],
    },
    ("TestMixedAdapterBatches", "test_mixed_adapter_batches_multiple_modules_to_save"): {
        "test_name,config0,config1": lambda: [
            # pinned to the side branch, as for test_mixed_adapter_batches_mlp: a mixed batch always takes it, the
            # single-adapter forward a fast path, and upstream compares them at rtol 1e-5 on outputs near zero
            ("SVFit mixed adapter with modules to save",
             _svfit(target_modules=["lin0"], modules_to_save=["lin1"], compute_path="reference"),
             _svfit(target_modules=["lin0"], modules_to_save=["lin1"], compute_path="reference")),
        ],
    },
    ("TestMixedAdapterBatches", "test_mixed_adapter_batches_unsupported_layer_raises"): {
        "test_name,config0,config1": lambda: [
            ("SVFit mixed adapter with unsupported layer", _svfit(target_modules=["lin0"], modules_to_save=["gru"]),
             _svfit(target_modules=["lin0"], modules_to_save=["gru"])),
        ],
    },
    ("TestMixedAdapterBatches", "test_mixed_adapter_batches_partly_overlapping_target_layers"): {
        "test_name,config0,config1": lambda: [
            ("SVFit mixed adapter with overlapping layers", _svfit(target_modules=["lin0"]),
             _svfit(target_modules=["lin0", "lin1"])),
        ],
    },
    ("TestMixedAdapterBatches", "test_mixed_adapter_batches_lora_conv1d_emb"): {
        "test_name,config0,config1": lambda: [
            ("SVFit mixed adapter with conv1d and emb", _svfit(target_modules=["emb", "conv1d"]),
             _svfit(target_modules=["emb", "conv1d"], r=2)),
        ],
    },
    ("TestMixedAdapterBatches", "test_mixed_adapter_batches_lora_conv1d_emb_multiple_modules_to_save"): {
        "test_name,config0,config1": lambda: [
            ("SVFit mixed adapter with conv1d and emb and modules to save",
             _svfit(target_modules=["emb", "conv1d"], modules_to_save=["lin0"]),
             _svfit(target_modules=["emb", "conv1d"], modules_to_save=["lin0"])),
        ],
    },
    ("TestMixedAdapterBatches", "test_mixed_adapter_batches_lora_conv2d"): {
        "test_name,config0,config1": lambda: [
            ("SVFit mixed adapter with conv2d", _svfit(target_modules=["conv2d"]),
             _svfit(target_modules=["conv2d"], r=2)),
        ],
    },
    ("TestMixedAdapterBatches", "test_mixed_adapter_batches_lora_wrong_adapter_name_raises"): {
        "test_name,config": lambda: [("SVFit mixed batch wrong adapter name", _svfit(target_modules=["lin0"]))],
    },
}


# Decoder battery (PeftCommonTester._test_* that need generate / output_hidden_states / input embeddings): tiny models
# built from a config, so no hub access. The GPT-2 id avoids the substring "gpt2" on purpose: testing_common's
# _skip_if_conv1d_not_supported skips every method outside its hard-coded Conv1D allow-list (IA3/LoHa/LoKr/LoRA) for
# such ids, and SVFit does support transformers' Conv1D, so the Conv1D paths should run.
def _tiny_llama_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        tie_word_embeddings=False,
    )


def _tiny_gpt_2_config():
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=64, n_embd=16, n_layer=2, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )


# Note: test_decoder_models' check_beft_config skips the merge tests of *every* method on ids containing "llama" (an
# isinstance/issubclass slip meant for BEFT); those merge paths run on the GPT-2 model and the custom models instead.
TINY_DECODERS = {"svfit-tiny/llama": _tiny_llama_config, "svfit-tiny/gpt-2": _tiny_gpt_2_config}
SVFIT_DECODER_MODEL_IDS = list(TINY_DECODERS)

SVFIT_DECODER_CONFIGS = [
    # PEFT's default targets for the architecture (LoRA's mapping: q_proj/v_proj, c_attn)
    (SVFitConfig, {"task_type": "CAUSAL_LM", "target_modules": None}),
    # every projection, fixed r, trained singular values (names absent from a model are ignored by PEFT)
    (
        SVFitConfig,
        {
            "task_type": "CAUSAL_LM",
            "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                               "c_attn", "c_proj", "c_fc"],
            "r": 4,
            "parametrization": "sigma",
        },
    ),
]


class TinyCausalLM:
    """Stands in for AutoModelForCausalLM in the decoder battery: ``from_pretrained(id)`` builds a seeded tiny model
    from a config (no hub); a local directory (a merged model saved by a test) is loaded for real."""

    @classmethod
    def from_pretrained(cls, model_id, dtype=None, **kwargs):
        from transformers import AutoModelForCausalLM

        if os.path.isdir(str(model_id)):
            return AutoModelForCausalLM.from_pretrained(model_id, dtype=dtype, **kwargs)
        torch.manual_seed(0)
        config = TINY_DECODERS[model_id]()
        model = AutoModelForCausalLM.from_config(config)
        # what from_pretrained records: PEFT's adapter config and model card read it
        model.config._name_or_path = model.name_or_path = model_id
        if dtype is not None:
            model = model.to(dtype)
        return model.eval()  # like from_pretrained


# ---------------------------------------------------------------------------------------------------------------------
# What runs, what is skipped and why
# ---------------------------------------------------------------------------------------------------------------------

_CUSTOM_CASES = "test_name,model_id,config_cls,config_kwargs"
_MULTI_CASES = "test_name,tuner_method,config_cls,config_kwargs_1,config_kwargs_2"

def _on_reference_path(cases):
    """The same cases pinned to SVFit's reference side branch. For upstream tests that compare two runs of one adapter
    which take different compute paths by design and then demand near bit-equality (torch.allclose's rtol 1e-5):
    FSDP1 with use_orig_params makes the frozen base weight a view of a flat parameter that requires grad, so the
    wrapped model stays on the reference branch while the unwrapped one takes a fast path; a mixed-adapter batch
    always takes the reference branch. The paths agree to float32 round-off (a few 1e-6, checked in
    tests/test_paths.py); pinning the path keeps these tests about what they test (state dicts, batching)."""
    return [(name, model, cls, {**kwargs, "compute_path": "reference"}) for name, model, cls, kwargs in cases]


def _mixed_reference_path():
    return [("SVFit mixed adapter", _svfit(target_modules=["lin0"], compute_path="reference"),
             _svfit(target_modules=["lin0"], r=2, compute_path="reference"))]


SPECIFIC_PARAMS[("TestMixedAdapterBatches", "test_mixed_adapter_batches_mlp")] = {
    "test_name,config0,config1": _mixed_reference_path
}

GENERIC_PARAMS = {
    # upstream class -> {argnames: factory}; applies to every test function of the class parametrised that way
    "TestPeftCustomModel": {_CUSTOM_CASES: lambda: SVFIT_TEST_CASES, "config_cls": lambda: [SVFitConfig]},
    "TestPeftFsdpStateDict": {_CUSTOM_CASES: lambda: _on_reference_path(SVFIT_TEST_CASES)},
    "TestMultipleActiveAdapters": {_MULTI_CASES: lambda: SVFIT_MULTI_ADAPTER_CASES},
    "TestRequiresGrad": {"config_cls": lambda: [SVFitConfig]},
    "TestDefaultTargetModules": {"config_cls": lambda: [SVFitConfig]},
    "TestDecoderModels": {
        "model_id": lambda: SVFIT_DECODER_MODEL_IDS,
        "config_cls,config_kwargs": lambda: SVFIT_DECODER_CONFIGS,
    },
}

# Parametrisations that do not select a PEFT method (kept as upstream has them).
NEUTRAL_ARGNAMES = {
    "dtype", "autocast_adapter_dtype", "low_cpu_mem_usage", "is_trainable", "bias_arg", "use_reentrant",
    "save_embedding_layers", "safe_merge", "mixed",
}

# Upstream classes subclassed here (module, class name, our class name, overrides of class attributes).
UPSTREAM_CLASSES = [
    ("test_custom_models", "TestPeftCustomModel", "TestSVFitCustomModel", {}),
    ("test_custom_models", "TestMultipleActiveAdapters", "TestSVFitMultipleActiveAdapters", {}),
    ("test_custom_models", "TestMixedAdapterBatches", "TestSVFitMixedAdapterBatches", {}),
    ("test_custom_models", "TestRequiresGrad", "TestSVFitRequiresGrad", {}),
    ("test_custom_models", "TestDefaultTargetModules", "TestSVFitDefaultTargetModules", {}),
    ("test_custom_models", "TestPeftFsdpStateDict", "TestSVFitFsdpStateDict", {}),
    ("test_custom_models", "TestMultiRankAdapter", "TestSVFitMultiRankAdapter", {}),
    ("test_custom_models", "TestLayerRepr", "TestSVFitLayerRepr", {}),
    ("test_custom_models", "TestDynamicDispatch", "TestSVFitDynamicDispatch", {}),
    ("test_decoder_models", "TestDecoderModels", "TestSVFitDecoderModels", {"transformers_class": TinyCausalLM}),
]

_WEIGHTED = ("upstream hard-codes LoraConfig or skips configs other than LoRA/IA3 here; SVFit's add_weighted_adapter is "
             "tested in tests/test_weighted_adapter.py")
_PROMPT = "applies to prompt-learning methods only"
_MIXED_ALLOWLIST = (
    "upstream allow-lists LoRA/RoAd for this check and skips every other method; SVFit's mixed batches run in "
    "TestSVFitMixedAdapterBatches"
)

# Upstream test functions that are parametrised over PEFT methods but cannot apply to SVFit by design.
_FROZEN_BASES = (
    "upstream asserts that every parameter whose name holds the adapter name requires grad (exempting AdaLoRA's "
    "ranknum); SVFit's bases are frozen parameters keyed by adapter name, by design, so that FSDP2 shards them: "
    "tests/test_storage.py::test_loading_sets_requires_grad_on_the_singular_values_only checks the same property"
)

SKIPPED = {
    ("TestRequiresGrad", "test_loading_model_requires_grad_set_correctly"): _FROZEN_BASES,
    ("TestRequiresGrad", "test_loading_model_with_modules_to_save_requires_grad_set_correctly"): _FROZEN_BASES,
    ("TestPeftCustomModel", "test_add_weighted_adapter_cat_with_rank_pattern"): _WEIGHTED,
    ("TestPeftCustomModel", "test_disable_adapter_with_bias_warns"):
        "upstream checks this bias warning for LoRA/BOFT only and skips every other method",
    ("TestMixedAdapterBatches", "test_mixed_adapter_batches_mha_raises"):
        "nn.MultiheadAttention is not supported by SVFit (by design)",
    ("TestMixedAdapterBatches", "test_mixed_adapter_batches_lora_opt_timing"):
        "LoRA timing benchmark on a hub OPT model (LoRA only; needs the hub)",
    ("TestDecoderModels", "test_weighted_combination_of_adapters"): _WEIGHTED,
    ("TestDecoderModels", "test_mixed_adapter_batches"): _MIXED_ALLOWLIST,
    ("TestDecoderModels", "test_generate_with_mixed_adapter_batches"): _MIXED_ALLOWLIST,
    ("TestDecoderModels", "test_prompt_tuning_text_prepare_for_training"): _PROMPT,
    ("TestDecoderModels", "test_prompt_tuning_sample_vocab_prepare_for_training"): _PROMPT,
    ("TestDecoderModels", "test_training_prompt_learning_tasks"): _PROMPT,
    ("TestDecoderModels", "test_set_requires_grad_prompt_learning_raises"): _PROMPT,
    ("TestDecoderModels", "test_prompt_learning_with_gradient_checkpointing"):
        _PROMPT + " (and needs a hub tokenizer and dataset)",
}


# Module globals replaced for single upstream tests, each with the reason. Used only where the upstream test builds
# its base model twice without a seed and reloads the adapter onto the second one: that is a different base model,
# which SVFit refuses by design (its singular vectors come from the base weights; BaseWeightMismatchError), whereas
# LoRA-like adapters do not care. The test's assertions are unchanged.
GLOBALS_OVERRIDES: dict = {}

# Upstream tests that fail because of svfit (not because they cannot apply): strict xfails, so that a fix shows up.
# Keys: (upstream class, test function) or (upstream class, test function, case name).
KNOWN_SVFIT_BUGS: dict[tuple, str] = {}


# ---------------------------------------------------------------------------------------------------------------------
# Building the test classes
# ---------------------------------------------------------------------------------------------------------------------


def _argnames(mark) -> str:
    names = mark.args[0]
    if isinstance(names, (list, tuple)):
        names = ",".join(names)
    return names.replace(" ", "")


def _ids(argnames: str, values) -> list[str] | None:
    if argnames.startswith("test_name,"):
        return [getattr(v, "values", v)[0] for v in values]  # a plain tuple, or a pytest.param (ParameterSet)
    if argnames == "config_cls,config_kwargs":
        return [f"{cls.__name__}{i}" for i, (cls, _) in enumerate(values)]
    if argnames in ("config_cls", "config0", "peft_config"):
        return [f"{argnames}{i}" for i in range(len(values))]
    return None


def _hard_coded_methods(func, marks=()) -> list[str]:
    """PEFT config classes named in a function's code (nested code included) or in its parametrisations."""
    import peft
    from peft.config import PeftConfig

    names, stack = set(), [func.__code__]
    while stack:
        code = stack.pop()
        names.update(code.co_names)
        stack.extend(c for c in code.co_consts if isinstance(c, types.CodeType))
    values = [v for mark in marks for row in mark.args[1] for v in (row if isinstance(row, (tuple, list)) else [row])]
    names.update(type(v).__name__ for v in values if isinstance(v, PeftConfig))
    names.update(v.__name__ for v in values if isinstance(v, type) and issubclass(v, PeftConfig))
    return sorted(n for n in names if n.endswith("Config") and hasattr(peft, n) and n != "PeftConfig")


def _copy_function(func, marks, globals_override=None):
    func_globals = func.__globals__
    if globals_override:
        func_globals = {**func_globals, **globals_override}
    new = types.FunctionType(func.__code__, func_globals, func.__name__, func.__defaults__, func.__closure__)
    new.__kwdefaults__ = func.__kwdefaults__
    new.__dict__.update({k: v for k, v in func.__dict__.items() if k != "pytestmark"})
    new.__doc__ = func.__doc__
    new.pytestmark = marks
    return new


def _skip_stub(name, reason):
    def stub(self):
        pytest.skip(reason)

    stub.__name__ = name
    return stub


def _xfail_marks(upstream_cls, name, argnames, values):
    """Strict xfail marks for KNOWN_SVFIT_BUGS, per function or per case."""
    reason = KNOWN_SVFIT_BUGS.get((upstream_cls, name))
    if reason is not None:
        return [pytest.mark.xfail(reason=f"svfit bug: {reason}", strict=True).mark], values
    if not argnames.startswith("test_name,"):
        return [], values
    out = []
    for value in values:
        reason = KNOWN_SVFIT_BUGS.get((upstream_cls, name, value[0]))
        if reason is not None:
            value = pytest.param(*value, marks=pytest.mark.xfail(reason=f"svfit bug: {reason}", strict=True))
        out.append(value)
    return [], out


def _plan(upstream_cls_name, name, func):
    """('run', marks) | ('skip', reason) | ('hard-coded', reason) for one upstream test function."""
    key = (upstream_cls_name, name)
    if key in SKIPPED:
        return "skip", SKIPPED[key]
    generic = GENERIC_PARAMS.get(upstream_cls_name, {})
    specific = SPECIFIC_PARAMS.get(key, {})
    marks, mapped, unmapped, unmapped_marks = [], False, [], []
    for mark in getattr(func, "pytestmark", []):
        if mark.name != "parametrize":
            marks.append(mark)
            continue
        argnames = _argnames(mark)
        factory = specific.get(argnames) or generic.get(argnames)
        if factory is not None:
            values = list(factory())
            extra, values = _xfail_marks(upstream_cls_name, name, argnames, values)
            marks.append(pytest.mark.parametrize(mark.args[0], values, ids=_ids(argnames, values)).mark)
            marks.extend(extra)
            mapped = True
        elif argnames in NEUTRAL_ARGNAMES:
            marks.append(mark)
        else:
            unmapped.append(argnames)
            unmapped_marks.append(mark)
    if mapped and not unmapped:
        return "run", marks
    methods = _hard_coded_methods(func, unmapped_marks)
    what = "/".join(m.removesuffix("Config") for m in methods) if methods else "specific models or data"
    return "hard-coded", f"upstream test hard-coded to {what}; not parametrised over PEFT methods"


def _build_class(module_name, upstream_name, our_name, overrides):
    upstream = getattr(_UPSTREAM[module_name], upstream_name)
    attrs = dict(overrides)
    attrs["__doc__"] = f"PEFT {PEFT_VERSION}'s {module_name}.{upstream_name}, re-parametrised over SVFit."
    attrs["__module__"] = __name__
    plan = {}
    for name in dir(upstream):
        if not name.startswith("test"):
            continue
        func = getattr(upstream, name)
        if not callable(func):
            continue
        kind, detail = _plan(upstream_name, name, func)
        plan[name] = (kind, detail)
        if kind == "run":
            attrs[name] = _copy_function(func, detail, GLOBALS_OVERRIDES.get((upstream_name, name)))
        else:
            attrs[name] = _skip_stub(name, detail)
    return type(our_name, (upstream,), attrs), plan


PLAN: dict[tuple[str, str], tuple[str, object]] = {}
for _module_name, _upstream_name, _our_name, _overrides in UPSTREAM_CLASSES:
    _cls, _plan_of_cls = _build_class(_module_name, _upstream_name, _our_name, _overrides)
    globals()[_our_name] = _cls
    PLAN.update({(_upstream_name, name): v for name, v in _plan_of_cls.items()})
del _cls, _plan_of_cls


# ---------------------------------------------------------------------------------------------------------------------
# Bookkeeping
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """The models here are tiny: intra-op threads only add overhead, and on a busy CI machine their spin-waiting
    multiplies the run time. Restored afterwards for the rest of the session."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_inventory_is_complete():
    """Every skip / xfail entry names an upstream test that exists, and every upstream Test* class of the two files is
    accounted for, so that a PEFT upgrade that renames or adds tests does not go unnoticed."""
    for key in list(SKIPPED) + [k[:2] for k in KNOWN_SVFIT_BUGS] + list(SPECIFIC_PARAMS) + list(GLOBALS_OVERRIDES):
        assert key in PLAN, f"{key} is listed here but is no longer an upstream test"
    for key in list(SPECIFIC_PARAMS) + list(GLOBALS_OVERRIDES):
        assert PLAN[key][0] == "run", f"{key} has SVFit parameters but does not run: {PLAN[key][1]}"
    covered = {(m, c) for m, c, _, _ in UPSTREAM_CLASSES}
    for module_name in ("test_custom_models", "test_decoder_models"):
        module = _UPSTREAM[module_name]
        for name, obj in vars(module).items():
            if isinstance(obj, type) and name.startswith("Test") and obj.__module__ == module.__name__:
                assert (module_name, name) in covered, f"upstream class {module_name}.{name} is not covered"
    assert any(kind == "run" for kind, _ in PLAN.values())
