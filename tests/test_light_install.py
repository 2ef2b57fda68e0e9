"""`pip install svfit` is the PEFT method only; the CLI, tasks, DreamBooth, TRL and benchmarks are extras, and a
missing extra is named in one line (issue 16, part 3).

The real check builds a fresh venv (.ci/check_light_install.sh, minutes); these are its fast stand-ins: the
declared requirements, what the library's modules import, and a subprocess in which the optional packages are
made unimportable.
"""

from __future__ import annotations

import ast
import os
import pathlib
import re
import subprocess
import sys
import tomllib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "svfit"
CORE = {"torch", "peft", "transformers", "safetensors", "aenum", "packaging", "threadpoolctl"}
OPTIONAL = ("typer", "rich", "matplotlib", "diffusers", "trl", "datasets")  # never needed by the PEFT method
LIBRARY = [SRC / "__init__.py", SRC / "_version.py", SRC / "errors.py", SRC / "_extras.py",
           *sorted((SRC / "tuner").glob("*.py")), *sorted((SRC / "core").glob("*.py"))]


def _requirement_name(req: str) -> str:
    return re.split(r"[<>=!~;\[ ]", req, maxsplit=1)[0].strip().lower()


def test_core_requirements_are_the_peft_method_only():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert {_requirement_name(r) for r in project["dependencies"]} == CORE
    extras = project["optional-dependencies"]
    assert {"cli", "diffusion", "trl", "bench", "all"} <= set(extras)
    everything = " ".join(extras["all"])
    for extra in extras:
        if extra not in ("all", "test"):
            assert extra in everything, f"extra {extra!r} is missing from 'all'"
    assert "diffusers" in " ".join(extras["diffusion"]) and "typer" in " ".join(extras["cli"])
    assert "trl" in " ".join(extras["trl"])


def test_the_library_modules_import_only_core_requirements():
    """svfit, svfit.tuner and svfit.core: every third-party import (also the lazy ones inside functions)."""
    stdlib = set(sys.stdlib_module_names)
    third_party = {}
    for path in LIBRARY:
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                if top not in stdlib:
                    third_party.setdefault(top, set()).add(path.relative_to(SRC).as_posix())
    assert set(third_party) <= CORE, {k: v for k, v in third_party.items() if k not in CORE}


BLOCK = "import sys\nfor _m in {mods!r}:\n    sys.modules[_m] = None  # as if not installed\n"


def _python(code: str, env=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), **(env or {})}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=240)


def test_get_peft_model_works_without_the_optional_packages():
    code = BLOCK.format(mods=OPTIONAL) + (
        "import torch, svfit\n"
        "from peft import PeftModel, get_peft_model\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "torch.manual_seed(0)\n"
        "cfg = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,\n"
        "                  num_attention_heads=2, num_key_value_heads=1)\n"
        "model = get_peft_model(LlamaForCausalLM(cfg), svfit.SVFitConfig(target_modules=['q_proj', 'v_proj']))\n"
        "model(torch.tensor([[1, 2, 3]])).logits.sum().backward()\n"
        "print('trainable', sum(p.numel() for p in model.parameters() if p.requires_grad))\n"
    )
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr
    assert "trainable" in proc.stdout


@pytest.mark.parametrize("blocked", ["typer", "rich"])
def test_the_cli_without_its_extra_says_which_extra_in_one_line(blocked):
    code = BLOCK.format(mods=(blocked,)) + "sys.argv = ['svfit', '--help']\nfrom svfit.__main__ import main\nmain()\n"
    proc = _python(code)
    assert proc.returncode == 1
    assert proc.stderr.strip() == (
        f"error: the svfit CLI needs extras: pip install 'svfit[cli]' (no module named '{blocked}')"
    )


def test_dreambooth_without_diffusers_names_the_diffusion_extra(tmp_path):
    code = BLOCK.format(mods=("diffusers",)) + (
        f"sys.argv = ['svfit', 'dreambooth', '--out', {str(tmp_path / 'out')!r}]\n"
        "from svfit.__main__ import main\nmain()\n"
    )
    proc = _python(code)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "error: svfit.dreambooth needs extras: pip install 'svfit[diffusion]' (no module named 'diffusers')"
    ]


def test_a_missing_optional_module_inside_a_command_names_its_extra(capsys):
    """Imports deep inside a command (not guarded by require()) still end in one line naming the extra."""
    from svfit import cli

    def body():
        raise ModuleNotFoundError("No module named 'scipy.stats'", name="scipy.stats")

    with pytest.raises(cli.typer.Exit) as info:
        cli._guard(body)
    assert info.value.exit_code == 1
    assert capsys.readouterr().err.strip() == (
        "error: this command needs extras: pip install 'svfit[bench]' (no module named 'scipy')"
    )


def test_missing_extra_error_is_an_import_error_and_a_user_error():
    from svfit._extras import MissingExtraError, require
    from svfit.errors import SVFitUserError

    with pytest.raises(MissingExtraError, match=r"^the example needs extras: pip install 'svfit\[all\]'") as info:
        require("the example", "surely_not_an_installed_module")
    assert isinstance(info.value, ImportError) and isinstance(info.value, SVFitUserError)
    assert info.value.name == "surely_not_an_installed_module"
