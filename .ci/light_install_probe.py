"""Run inside a venv where svfit was installed without extras (see check_light_install.sh). Exits non-zero on a
failed check; prints what it found.

1. No diffusers or matplotlib at all; typer and rich only if something other than svfit requires them (transformers
   5.x lists typer, which brings rich): svfit's own requirements must not reach them.
2. get_peft_model(tiny Llama, SVFitConfig(...)) trains a step and saves an adapter.
3. A fresh interpreter that never imports svfit loads that adapter through PeftModel.from_pretrained (the .pth hook).
4. `svfit dreambooth` without the diffusion extra prints one line naming it.
"""

import importlib.metadata as md
import os
import subprocess
import sys
import sysconfig
import tempfile

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

FORBIDDEN = ("diffusers", "matplotlib", "typer", "rich")
MAY_COME_FROM_OTHERS = ("typer", "rich")  # transformers>=5 requires typer (its CLI), typer requires rich
mode = sys.argv[1] if len(sys.argv) > 1 else "regular"
failures = []


def requires(dist_name):
    try:
        reqs = md.requires(dist_name) or []
    except md.PackageNotFoundError:
        return []
    out = []
    for r in map(Requirement, reqs):
        if r.marker is None or r.marker.evaluate({"extra": ""}):
            out.append(canonicalize_name(r.name))
    return out


installed = {canonicalize_name(d.metadata["Name"]) for d in md.distributions()}
print(f"[{mode}] {len(installed)} distributions installed")

# who pulls each forbidden package in: a path from svfit's own requirements
parents = {}
queue = ["svfit"]
while queue:
    name = queue.pop()
    for child in requires(name):
        if child not in parents and child != "svfit":
            parents[child] = name
            queue.append(child)


def chain(name):
    path = [name]
    while path[-1] in parents:
        path.append(parents[path[-1]])
    return " <- ".join(path)


direct = set(requires("svfit"))
for pkg in FORBIDDEN:
    if pkg not in installed:
        print(f"  {pkg}: not installed")
        continue
    if pkg in direct or pkg not in MAY_COME_FROM_OTHERS:
        failures.append(f"{pkg} is installed ({chain(pkg)})")
        continue
    print(f"  {pkg}: installed, not by svfit: {chain(pkg)} (version {md.version(pkg)})")
print(f"  svfit requires: {sorted(direct)}")

site = sysconfig.get_paths()["purelib"]
pth = os.path.join(site, "svfit-autoload.pth")
if not os.path.exists(pth):
    failures.append(f"{pth} is missing")

with tempfile.TemporaryDirectory() as tmp:
    code_train = f"""
import torch, svfit
from peft import get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM
torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, initializer_range=0.2)
LlamaForCausalLM(cfg).save_pretrained({tmp!r} + "/base")
model = get_peft_model(LlamaForCausalLM.from_pretrained({tmp!r} + "/base"), svfit.SVFitConfig(target_modules=["q_proj", "v_proj"]))
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-1)
ids = torch.randint(0, 64, (2, 12))
for _ in range(3):
    loss = model(ids, labels=ids).loss
    loss.backward(); opt.step(); opt.zero_grad()
model.eval().save_pretrained({tmp!r} + "/adapter")
torch.save({{"ids": ids, "logits": model(ids).logits.detach()}}, {tmp!r} + "/expected.pt")
model.print_trainable_parameters()
"""
    code_load = f"""
import sys, torch
from peft import PeftModel
from transformers import LlamaForCausalLM
model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained({tmp!r} + "/base"), {tmp!r} + "/adapter").eval()
exp = torch.load({tmp!r} + "/expected.pt")
print("svfit imported by the hook:", "svfit" in sys.modules, "max |diff|:", (model(exp["ids"]).logits - exp["logits"]).abs().max().item())
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)
    for what, code in (("get_peft_model + 3 steps + save", code_train), ("fresh-process load", code_load)):
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp)
        lines = proc.stdout.strip().splitlines()
        print(f"  {what}: rc={proc.returncode} {lines[-1] if lines else ''}")
        if proc.returncode != 0:
            failures.append(f"{what} failed:\n{proc.stderr[-3000:]}")
        elif what == "fresh-process load" and "max |diff|: 0.0" not in proc.stdout:
            failures.append(f"{what}: outputs differ: {proc.stdout}")

    proc = subprocess.run([sys.executable, "-m", "svfit", "dreambooth", "--out", tmp + "/db"], capture_output=True,
                          text=True, env=env, cwd=tmp)
    print(f"  svfit dreambooth without the extra: rc={proc.returncode} {proc.stderr.strip()!r}")
    if proc.returncode != 1 or "svfit[diffusion]" not in proc.stderr or len(proc.stderr.strip().splitlines()) != 1:
        failures.append(f"svfit dreambooth: expected one line naming svfit[diffusion], got:\n{proc.stderr[-3000:]}")

if failures:
    print(f"[{mode}] FAILED:\n  " + "\n  ".join(failures))
    sys.exit(1)
print(f"[{mode}] all checks passed")
