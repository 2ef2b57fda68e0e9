"""SVFit's start-up cost: cold init (``get_peft_model``) against the SVD floor, on an idle machine and under a
competing load, and with the SVDs shared between 2 data-parallel ranks.

* **floor**: the summed wall time of ``torch.linalg.svd(W.float(), full_matrices=False)`` over the same targeted
  matrices, one after another with torch's default threads: what factorising the weights costs when nothing is
  done about threads. Measured in the same process, after the init, so that both see LAPACK warm.
* **cold init**: the first ``get_peft_model(model, SVFitConfig(target_modules="all-linear"))`` in a fresh process.
* **load**: ``idle``, or ``busy``: 2 extra processes spinning on the CPU for the whole measurement (as many as this
  machine has cores), started before and stopped after. Under load the floor can take minutes per matrix set; it is
  timed on the first matrices until ``FLOOR_BUDGET_S`` is spent and extrapolated by matrix size (the JSON says so).
* **ranks**: the init of the same model in 1 process, and in 2 gloo processes that split the SVDs (each rank
  factorises its share and broadcasts it); every rank's bases are hashed to show they are bit-identical.

Every measurement is a fresh process, repeated ``REPEATS`` times; the report takes medians. The load average is
recorded with every run.

    python -m benchmarks.init [--quick]     # or: python -m benchmarks run --only init
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import ACCELERATOR_RESULTS, RESULTS

NAME = "init"
REPEATS = 3
FLOOR_BUDGET_S = 60.0
CASES = {
    "minilm-all": ("MiniLM-L6 (BERT), all linear layers", "minilm"),
    "smollm2-all": ("SmolLM2-135M, all linear layers", "smollm2"),
}
QUICK_CASES = {"tiny-bert-all": ("tiny BERT (random init), all linear layers", "tiny-bert")}
IDLE_GOAL = 1.1  # cold init / SVD floor, idle
LOAD_GOAL = 2.0  # cold init under load / cold init idle


# -- running ---------------------------------------------------------------------------------------------------------


def run(out: Path, quick: bool) -> None:
    cases = QUICK_CASES if quick else CASES
    repeats = 1 if quick else REPEATS
    target = out / NAME
    target.mkdir(parents=True, exist_ok=True)
    for case, (label, loader) in cases.items():
        record = {"case": case, "label": label, "runs": {"idle": [], "busy": []}, "ranks": {}}
        for load in ("idle", "busy"):
            for i in range(repeats):
                with _competing_load(2 if load == "busy" else 0):
                    result = _subprocess(["--worker", loader], timeout=3600)
                record["runs"][load].append(result)
                print(f"init {case} {load} #{i + 1}: init {result['init_s']:.2f} s, floor {result['floor_s']:.2f} s "
                      f"({'extrapolated' if result['floor_extrapolated'] else 'measured'}), load "
                      f"{result['loadavg_before'][0]:.2f}", flush=True)
        for world in (1, 2):
            runs = [_subprocess(["--ranks", str(world), loader], timeout=3600) for _ in range(repeats)]
            record["ranks"][str(world)] = runs
            print(f"init {case} {world} rank(s): {[round(r['init_s'], 2) for r in runs]} s, per rank "
                  f"{runs[0]['per_rank']}, identical bases {runs[0]['identical']}", flush=True)
        from svfit.train.results import meta_info, now_iso, write_json

        write_json(target / f"{case}.json", {
            "run_info": {"created_at": now_iso(), "benchmark": record},
            "train_info": {},
            "meta_info": meta_info(label, "none (weights only)"),
        })


class _competing_load:
    """``n`` processes spinning on the CPU (unniced) for the duration of the block."""

    def __init__(self, n: int):
        self.n = n

    def __enter__(self):
        self.procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(self.n)]
        if self.procs:
            time.sleep(2)  # let them take the cores before the measured process starts
        return self

    def __exit__(self, *exc):
        for p in self.procs:
            p.kill()
            p.wait()


def _subprocess(args: list[str], timeout: float) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.pop("SVFIT_SVD_CACHE", None)  # a cold init means no cache
    root = Path(__file__).resolve().parent.parent
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "benchmarks.init", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=root)
    if proc.returncode != 0:
        raise RuntimeError(f"init benchmark worker {args} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- the measured processes ------------------------------------------------------------------------------------------


def _load(loader: str):
    import torch

    if loader == "tiny-bert":
        from transformers import BertConfig, BertModel

        torch.manual_seed(0)
        return BertModel(BertConfig(vocab_size=200, hidden_size=96, num_hidden_layers=2, num_attention_heads=2,
                                    intermediate_size=192, max_position_embeddings=64))
    if loader == "minilm":
        from transformers import AutoModel

        from svfit.assets import minilm_dir

        return AutoModel.from_pretrained(minilm_dir())
    if loader == "smollm2":
        from transformers import AutoModelForCausalLM

        from svfit.assets import smollm2_checkpoint

        return AutoModelForCausalLM.from_pretrained(smollm2_checkpoint(), dtype=torch.float32)
    raise ValueError(loader)


def _matrices(model) -> list:
    from svfit.tuner.factorization import weight_matrix
    from svfit.tuner.layer import SVFitLayer

    return [weight_matrix(m.get_base_layer()).detach() for m in model.modules() if isinstance(m, SVFitLayer)]


def _worker(loader: str) -> dict:
    import torch
    from peft import get_peft_model

    import svfit

    model = _load(loader)
    before = os.getloadavg()
    t0 = time.perf_counter()
    peft_model = get_peft_model(model, svfit.SVFitConfig(target_modules="all-linear"))
    init_s = time.perf_counter() - t0
    report = peft_model.base_model.svfit_init_report["default"]
    mats = _matrices(peft_model)
    done, spent = [], 0.0
    for W in mats:  # the floor: default threads, one matrix after another
        t = time.perf_counter()
        torch.linalg.svd(W.float(), full_matrices=False)
        spent += time.perf_counter() - t
        done.append(W)
        if spent > FLOOR_BUDGET_S:
            break
    size = lambda W: W.shape[0] * W.shape[1] * min(W.shape)  # noqa: E731 - LAPACK's O(m n min(m, n))
    floor = spent * sum(size(W) for W in mats) / sum(size(W) for W in done)
    return {
        "init_s": init_s, "floor_s": floor, "floor_matrices_timed": len(done), "matrices": len(mats),
        "floor_extrapolated": len(done) < len(mats), "workers": report.workers, "torch_threads":
        torch.get_num_threads(), "loadavg_before": before, "loadavg_after": os.getloadavg(),
    }


def _rank_main(rank: int, world: int, port: int, loader: str, queue) -> None:
    import torch.distributed as dist
    from peft import get_peft_model

    import svfit

    os.environ["LOCAL_WORLD_SIZE"] = str(world)  # as torchrun sets it: the ranks share this machine's cores
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    model = _load(loader)
    dist.barrier()
    t0 = time.perf_counter()
    peft_model = get_peft_model(model, svfit.SVFitConfig(target_modules="all-linear"))
    dist.barrier()
    init_s = time.perf_counter() - t0
    report = peft_model.base_model.svfit_init_report["default"]
    digest = hashlib.sha256()
    for name, buf in sorted(peft_model.named_buffers()):
        if ".svfit_" in name:
            digest.update(name.encode())
            digest.update(buf.contiguous().numpy().tobytes())
    queue.put({"rank": rank, "init_s": init_s, "factorised": report.factorised, "per_rank": report.per_rank,
               "bases": digest.hexdigest()})
    dist.destroy_process_group()


def _ranks(world: int, loader: str) -> dict:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    before = os.getloadavg()
    procs = [ctx.Process(target=_rank_main, args=(k, world, port, loader, queue)) for k in range(world)]
    for p in procs:
        p.start()
    results = sorted((queue.get(timeout=3600) for _ in procs), key=lambda r: r["rank"])
    for p in procs:
        p.join()
    return {
        "world": world, "init_s": max(r["init_s"] for r in results),
        "per_rank": results[0]["per_rank"] or [results[0]["factorised"]],
        "factorised": [r["factorised"] for r in results],
        "identical": len({r["bases"] for r in results}) == 1, "loadavg_before": before,
    }


# -- the report ------------------------------------------------------------------------------------------------------


def _median(xs):
    return statistics.median(xs) if xs else float("nan")


def section(results: Path, plots: Path, link_prefix: str = "benchmarks/plots") -> str:
    files = sorted((results / NAME).glob("*.json"))
    head = "## Init: cold start against the SVD floor, idle and busy, 1 and 2 ranks\n\n"
    if not files:
        return head + "Not run yet (`python -m benchmarks run --only init`).\n" + "\n".join(_accelerator_lines(results))
    lines = [head.rstrip(), "", (
        "Each number is the median of fresh processes. *Floor*: summed `torch.linalg.svd` of the same matrices with "
        "torch's default threads, measured the same way (idle, or under the same load). *Busy*: 2 extra processes "
        "spinning on the CPU during the run. SVFit runs every SVD single-threaded in a pool of worker threads "
        "(`svfit.core.factorize`). Goals (issue 14): idle init ≤ 1.1× the idle floor; busy init ≤ 2× idle init."), "",
        "| case | idle init | idle floor | init / floor | busy init | busy floor | busy / idle init | load avg (busy) |",
        "|---|---|---|---|---|---|---|---|"]
    rank_lines = ["", "| case | 1 rank | 2 ranks | speed-up | matrices per rank | bases identical on both ranks |",
                  "|---|---|---|---|---|---|"]
    for path in files:
        b = json.loads(path.read_text())["run_info"]["benchmark"]
        idle, busy = b["runs"]["idle"], b["runs"]["busy"]
        ii, fi = _median([r["init_s"] for r in idle]), _median([r["floor_s"] for r in idle])
        ib, fb = _median([r["init_s"] for r in busy]), _median([r["floor_s"] for r in busy])
        extrap = any(r["floor_extrapolated"] for r in busy)
        load = _median([r["loadavg_before"][0] for r in busy])
        lines.append(
            f"| {b['label']} ({idle[0]['matrices']} matrices) | {ii:.2f} s | {fi:.2f} s | {ii / fi:.2f} "
            f"({'✓' if ii / fi <= IDLE_GOAL else '✗'}) | {ib:.2f} s | {fb:.1f} s{' (extrapolated)' if extrap else ''} "
            f"| {ib / ii:.2f} ({'✓' if ib / ii <= LOAD_GOAL else '✗'}) | {load:.2f} |"
        )
        if b.get("ranks"):
            one, two = b["ranks"].get("1", []), b["ranks"].get("2", [])
            if one and two:
                t1, t2 = _median([r["init_s"] for r in one]), _median([r["init_s"] for r in two])
                rank_lines.append(
                    f"| {b['label']} | {t1:.2f} s | {t2:.2f} s | {t1 / t2:.2f}× | {two[0]['per_rank']} | "
                    f"{'yes' if all(r['identical'] for r in two) else 'NO'} |"
                )
    if len(rank_lines) > 2:
        rank_lines += ["", (
            f"The 2 ranks share this machine's {os.cpu_count()} cores, which the 1-rank init already keeps busy with "
            "its pool of SVD threads: here a split can only add the process group's start-up and the broadcasts. "
            "What it saves where each rank has cores (or an accelerator) of its own is not measured here; the "
            "table shows that each rank did half of the SVDs and that the bases agree bit for bit.")]
    return "\n".join(lines + rank_lines + _accelerator_lines(results)) + "\n"


def _accelerator_lines(results: Path) -> list[str]:
    """What benchmarks/device/init_gpu.py measured on a lent accelerator (beside the committed CPU results)."""
    path = ACCELERATOR_RESULTS / "init-gpu" / "llama3-8b-layer.json"
    if results.resolve() != RESULTS.resolve() or not path.is_file():
        return []
    b = json.loads(path.read_text())["run_info"]["benchmark"]
    cpu, gpu = b["weights on cpu"], b["weights on gpu"]
    shapes = ", ".join("×".join(map(str, s)) for s in b["shapes"])
    return ["", (
        f"**On an accelerator** ({b['device']}, `benchmarks/device/init_gpu.py`, one sample each, not a median): one "
        f"Llama-3-8B-shaped decoder layer in bf16, all 7 linear layers ({shapes}; random weights, so r is that of a "
        f"flat spectrum: {', '.join(map(str, cpu['ranks']))}, and the GPU's iterative SVD may take another time on "
        "a trained checkpoint's spectrum). The floor is 7 plain float32 `torch.linalg.svd` calls on the GPU, each "
        "matrix copied there from the CPU first."), "",
        "| weights | init | floor | init / floor | bases kept on | × 32 layers (an 8B model) |",
        "|---|---|---|---|---|---|",
        *(f"| {where} | {r['init_s']:.2f} s | {b['floor_s']:.2f} s | {r['init_s'] / b['floor_s']:.2f} | "
          f"{', '.join(r['bases_device'])} | {32 * r['init_s']:.0f} s |"
          for where, r in (("on the CPU (SVDs on the GPU)", cpu), ("on the GPU", gpu))),
        "",
        "Beyond the floor, SVFit's init fingerprints each weight, selects the rank and stores the bases (on the CPU "
        "for CPU weights: they are copied back).",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--ranks", nargs=2, metavar=("WORLD", "LOADER"), help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(_worker(args.worker)))
    elif args.ranks:
        print(json.dumps(_ranks(int(args.ranks[0]), args.ranks[1])))
    else:
        run(args.out, args.quick)


if __name__ == "__main__":
    main()
