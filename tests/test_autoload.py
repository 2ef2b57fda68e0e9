"""Saved SVFit adapters load in a fresh interpreter that never imports svfit (issue 16, part 1).

Every check runs in a subprocess whose site setup processes the very ``svfit-autoload.pth`` that the wheel ships
(``site.addsitedir`` on a folder holding a copy), with this tree's ``src`` on PYTHONPATH: the state of a fresh
``pip install svfit``.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from peft import get_peft_model
from transformers import AutoModelForCausalLM

import svfit

import tiny_models as tm

ROOT = pathlib.Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
PTH = SRC / "svfit-autoload.pth"

# what the subprocesses run first: the site setup of an environment where svfit is installed
PRELUDE = """
import site, sys
site.addsitedir(sys.argv[1])
"""


def run(code: str, site_dir, *args, env=None, pythonpath=(), check=True):
    env = {**os.environ, **(env or {})}
    env["PYTHONPATH"] = os.pathsep.join([*map(str, pythonpath), str(SRC)])
    proc = subprocess.run(
        [sys.executable, "-c", PRELUDE + textwrap.dedent(code), str(site_dir), *map(str, args)],
        capture_output=True, text=True, env=env, timeout=240,
    )
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


@pytest.fixture(scope="module")
def site_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("site")
    shutil.copy(PTH, d / PTH.name)
    return d


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny Llama checkpoint, a trained-looking SVFit adapter on it, and that adapter's logits on a batch."""
    root = tmp_path_factory.mktemp("autoload")
    tm.llama().save_pretrained(root / "base")
    base = AutoModelForCausalLM.from_pretrained(root / "base")  # so the adapter records the base's path
    model = get_peft_model(base, svfit.SVFitConfig(target_modules=["q_proj", "v_proj"], init_weights=False)).eval()
    model.save_pretrained(root / "adapter")
    ids = tm.token_batch(vocab=120)
    with torch.no_grad():
        torch.save({"ids": ids, "logits": model(ids).logits}, root / "expected.pt")
    return root


LOADERS = {
    "PeftModel.from_pretrained": """
        from peft import PeftModel
        from transformers import AutoModelForCausalLM
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(root / "base"), root / "adapter")
    """,
    "AutoPeftModelForCausalLM": """
        from peft import AutoPeftModelForCausalLM
        model = AutoPeftModelForCausalLM.from_pretrained(root / "adapter")
    """,
    "transformers load_adapter": """
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(root / "base")
        model.load_adapter(root / "adapter")
    """,
    "transformers from_pretrained(adapter dir)": """
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(root / "adapter")
    """,
}


@pytest.mark.parametrize("entry", sorted(LOADERS))
def test_a_fresh_interpreter_loads_a_saved_adapter_without_import_svfit(entry, saved, site_dir):
    code = textwrap.dedent("""
        import pathlib, sys
        assert "svfit" not in sys.modules and "peft" not in sys.modules
        import torch
        root = pathlib.Path(sys.argv[2])
    """) + textwrap.dedent(LOADERS[entry]) + textwrap.dedent("""
        assert "svfit" in sys.modules  # brought in by the hook, not by this script
        expected = torch.load(root / "expected.pt")
        with torch.no_grad():
            logits = model.eval()(expected["ids"]).logits
        print("MAXDIFF", (logits - expected["logits"]).abs().max().item())
    """)
    proc = run(code, site_dir, saved)
    diff = float(proc.stdout.split("MAXDIFF")[1].split()[0])
    assert diff == 0.0, proc.stdout + proc.stderr


def test_peft_config_from_pretrained_after_a_find_spec_probe(saved, site_dir):
    """transformers' is_peft_available() looks peft up without importing it: the hook must survive that probe and
    fire on the real import."""
    code = """
        import importlib.util, pathlib, sys
        assert importlib.util.find_spec("peft") is not None and "peft" not in sys.modules
        from peft import PeftConfig
        config = PeftConfig.from_pretrained(pathlib.Path(sys.argv[2]) / "adapter")
        print(type(config).__module__, type(config).__name__, config.peft_type)
        import peft
        assert type(peft.__loader__).__name__ != "_RegisteringLoader"  # peft keeps its own loader
        assert not any(type(f).__name__ == "_PeftImportHook" for f in sys.meta_path)  # gone once it fired
    """
    out = run(code, site_dir, saved).stdout
    assert "svfit.tuner.config SVFitConfig PeftType.SVFIT" in out


def test_import_svfit_first_still_registers_once(saved, site_dir):
    code = """
        import pathlib, sys
        import svfit
        from peft import PeftModel, PeftConfig
        from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
        assert PEFT_TYPE_TO_TUNER_MAPPING["SVFIT"] is svfit.SVFitModel
        print(type(PeftConfig.from_pretrained(pathlib.Path(sys.argv[2]) / "adapter")).__name__)
    """
    assert "SVFitConfig" in run(code, site_dir, saved).stdout


def test_the_hook_imports_nothing_at_start_up(site_dir):
    """A process that never imports peft pays for one small module: no torch, peft, transformers or svfit."""
    code = """
        import json, sys
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "peft", "transformers", "svfit"))
        hooks = [type(f).__name__ for f in sys.meta_path]
        print(json.dumps({"heavy": heavy, "hooks": hooks}))
    """
    out = json.loads(run(code, site_dir).stdout)
    assert out["heavy"] == [] and "_PeftImportHook" in out["hooks"]
    # what the module itself adds to an interpreter (past what site.py loads anyway): nothing but itself
    added = subprocess.run(
        [sys.executable, "-c", "import sys; sys.modules.pop('_svfit_autoload', None); before = set(sys.modules); "
         "import _svfit_autoload; print(sorted(set(sys.modules) - before))"],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(SRC)}, check=True,
    ).stdout.strip()
    assert added == "['_svfit_autoload']"


def test_a_broken_svfit_never_breaks_import_peft(site_dir, tmp_path):
    broken = tmp_path / "broken"
    (broken / "svfit").mkdir(parents=True)
    (broken / "svfit" / "__init__.py").write_text("raise ImportError('simulated broken install')\n")
    code = """
        import warnings
        warnings.simplefilter("always")
        import peft
        from peft import LoraConfig
        print("peft ok", LoraConfig().peft_type)
    """
    proc = run(code, site_dir, pythonpath=[broken])
    assert "peft ok" in proc.stdout
    assert "svfit is installed but could not be imported" in proc.stderr
    assert "simulated broken install" in proc.stderr


def test_svfit_autoload_0_turns_the_hook_off(saved, site_dir):
    code = """
        import pathlib, sys
        assert not any(type(f).__name__ == "_PeftImportHook" for f in sys.meta_path)
        from peft import PeftConfig
        assert "svfit" not in sys.modules
        try:
            PeftConfig.from_pretrained(pathlib.Path(sys.argv[2]) / "adapter")
        except KeyError as exc:
            print("KeyError", exc)
    """
    assert "KeyError 'SVFIT'" in run(code, site_dir, saved, env={"SVFIT_AUTOLOAD": "0"}).stdout


def test_regular_and_editable_wheels_ship_the_pth_file(tmp_path):
    """Both wheels that pip builds from this tree carry svfit-autoload.pth at their root (site-packages), and the
    regular one the module it imports. Built with the installed setuptools (no isolation, no network)."""
    zipfile = pytest.importorskip("zipfile")
    pytest.importorskip("setuptools")
    project = tmp_path / "project"
    project.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(ROOT / name, project / name)
    shutil.copytree(SRC, project / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "weights"))
    out = tmp_path / "wheels"
    code = (
        "import sys, setuptools.build_meta as b; out = sys.argv[1]; "
        "print('WHEELS', b.build_wheel(out), b.build_editable(out))"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(out)], cwd=project, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    regular, editable = proc.stdout.split("WHEELS")[1].split()
    with zipfile.ZipFile(out / regular) as z:
        names = set(z.namelist())
        assert {"svfit-autoload.pth", "_svfit_autoload.py", "svfit/__init__.py"} <= names
        assert z.read("svfit-autoload.pth") == PTH.read_bytes()
    with zipfile.ZipFile(out / editable) as z:
        assert z.read("svfit-autoload.pth") == PTH.read_bytes()
