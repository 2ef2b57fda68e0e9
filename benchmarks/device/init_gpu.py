"""SVFit's start-up on an accelerator for one Llama-3-8B-shaped decoder layer (hidden 4096, MLP 14336, 32 query and
8 key/value heads, bf16): ``get_peft_model`` on all seven linear layers with the weights on the CPU (the SVDs run on
the GPU, ``svd_device="auto"``) and with the layer on the GPU, against the floor of seven plain float32
``torch.linalg.svd`` calls on the GPU (each matrix copied there first). Weights are random (no 8B checkpoint fits on
the device tool), so r is that of a flat spectrum, and the GPU's iterative SVD may take another time on a trained
spectrum. One sample of each. Prints one JSON line.

``python -m benchmarks.device.init_gpu [--small] [--out FILE]`` (``--small``: a 256-wide layer, to check the script on
a CPU; ``--out``: also write the result there, as the init benchmark's report reads it)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from peft import get_peft_model
from torch import nn
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

import svfit

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class Layer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.layer = LlamaDecoderLayer(config, 0)


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main() -> None:
    small = "--small" in sys.argv
    cfg = LlamaConfig(hidden_size=256 if small else 4096, intermediate_size=896 if small else 14336,
                      num_attention_heads=8 if small else 32, num_key_value_heads=2 if small else 8)
    torch.manual_seed(0)
    base = Layer(cfg).to(torch.bfloat16)
    weights = [m.weight for n, m in base.named_modules() if n.rsplit(".", 1)[-1] in TARGETS]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = {"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
           "shapes": [list(w.shape) for w in weights]}
    # warm-up: the solver's first call loads its kernels
    torch.linalg.svd(torch.randn(512, 512, device=device), full_matrices=False)
    _sync()
    t0 = time.perf_counter()
    for w in weights:
        torch.linalg.svd(w.to(device, torch.float32), full_matrices=False)
    _sync()
    out["floor_s"] = time.perf_counter() - t0
    for where in ("weights on cpu", "weights on gpu"):
        model = Layer(cfg).to(torch.bfloat16)
        model.load_state_dict(base.state_dict())
        if where == "weights on gpu":
            model = model.to(device)
        _sync()
        t0 = time.perf_counter()
        peft_model = get_peft_model(model, svfit.SVFitConfig(target_modules=TARGETS))
        _sync()
        out[where] = {"init_s": time.perf_counter() - t0,
                      "ranks": list(peft_model.peft_config["default"].resolved_ranks.values()),
                      "bases_device": sorted({b.device.type for b in peft_model.buffers()})}
        del peft_model, model
    out["per_8b_model_s"] = {k: out[k]["init_s"] * 32 for k in ("weights on cpu", "weights on gpu")}
    print(json.dumps(out))
    if "--out" in sys.argv:
        from svfit.train.results import now_iso, write_json

        path = Path(sys.argv[sys.argv.index("--out") + 1])
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, {"run_info": {"created_at": now_iso(), "benchmark": out}})


if __name__ == "__main__":
    main()
