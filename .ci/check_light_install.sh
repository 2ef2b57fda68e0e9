#!/usr/bin/env bash
# Issue 16, "a light core": in a fresh venv, `pip install .` (no extras) must bring no diffusers, matplotlib, typer or
# rich of svfit's own, get_peft_model(model, SVFitConfig(...)) must work there, and a saved adapter must load in a
# fresh interpreter without `import svfit` (the svfit-autoload.pth hook), for a regular and an editable install.
# Minutes (a venv and a torch install), so not part of pytest; tests/test_light_install.py holds the fast stand-ins.
#
#   bash .ci/check_light_install.sh [VENV_DIR]        # default: a new temporary directory
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
venv=${1:-$(mktemp -d)/venv}
python=${PYTHON:-python3}

echo "[light] fresh venv: $venv" >&2
"$python" -m venv "$venv"
pip() { "$venv/bin/python" -m pip -q --disable-pip-version-check "$@"; }
pip install torch==2.13.0    # first and pinned, as setup.sh does (an unpinned torch pulls CUDA)
echo "[light] pip install $repo   (regular install, no extras)" >&2
pip install "$repo"
"$venv/bin/python" "$repo/.ci/light_install_probe.py" regular

echo "[light] pip install -e $repo   (editable, no extras)" >&2
pip uninstall -y svfit
pip install --no-deps -e "$repo"
"$venv/bin/python" "$repo/.ci/light_install_probe.py" editable
echo "[light] OK" >&2
