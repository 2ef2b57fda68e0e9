"""The cost benchmark's parent side: one worker process per method, driven step by step, turns rotating so that a
busy machine slows every method alike; ratios to LoRA r=8; the JSON per case."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from benchmarks.cost.report import section
from benchmarks.cost.spec import CALL_TIMEOUT_S, METHODS, NAME, RATIO_KEYS, REFERENCE, Case, _ratio, cases
from benchmarks.cost.worker import _worker_entry


class _Worker:
    """A method's measurements in a process of its own, driven command by command over a pipe.

    Workers are forked from multiprocessing's fork server, which has imported torch, transformers and peft once (and
    has run no torch computation, so no thread pool is inherited): each worker is a fresh process with its own
    memory accounting, without paying ~4 s of imports per method."""

    def __init__(self, case: Case, method: str):
        import multiprocessing

        self.method = method
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["torch", "transformers", "peft", "svfit"])
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_entry, args=(child, asdict(case), method), daemon=True,
                                name=f"{NAME}-{case.id}-{method}")
        self.proc.start()
        child.close()

    def read(self) -> dict:
        if not self.conn.poll(CALL_TIMEOUT_S):
            self.proc.kill()
            raise RuntimeError(f"{NAME} worker '{self.method}' gave no answer in {CALL_TIMEOUT_S} s; killed it")
        try:
            reply = self.conn.recv()
        except EOFError:
            self.proc.join(timeout=10)
            raise RuntimeError(f"{NAME} worker '{self.method}' died (exit code {self.proc.exitcode})") from None
        if "error" in reply:
            raise RuntimeError(f"{NAME} worker '{self.method}' failed:\n{reply['error']}")
        return reply

    def call(self, cmd: str) -> dict:
        self.conn.send(cmd)
        return self.read()

    def close(self) -> None:
        try:
            self.conn.send("quit")
        except OSError:
            pass
        self.proc.join(timeout=30)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()
        self.conn.close()


def _asset_problem(case: Case) -> str | None:
    """Why a case cannot run here (a missing model package), or None."""
    from svfit.assets import AssetMissingError

    try:
        if case.loader == "minilm":
            from svfit.assets import minilm_dir

            minilm_dir()
        elif case.loader == "smollm2":
            from svfit.assets import smollm2_checkpoint

            smollm2_checkpoint()  # builds the dequantised cache once (~30 s) if needed
    except AssetMissingError as exc:
        return str(exc)
    return None


def _iqr(xs: list[float]) -> float:
    import numpy as np

    return float(np.percentile(xs, 75) - np.percentile(xs, 25)) if xs else float("nan")


def measure_case(case: Case, log) -> dict:
    """All methods of one case; returns the train_info dict."""
    import statistics

    t_start = time.perf_counter()

    def say(msg):
        log(f"[{NAME} {case.id} {time.perf_counter() - t_start:6.1f}s] {msg}")

    workers = {m: _Worker(case, m) for m in METHODS}
    try:
        for w in workers.values():  # nothing is timed until every worker is up and idle
            w.read()
        say("workers up")
        results = {}
        for m, w in workers.items():  # one at a time: cold init is timed here
            results[m] = w.call("setup")
            say(f"{m}: init {results[m]['init_s']:.2f} s")
        times: dict[str, list[float]] = {m: [] for m in workers}
        order = list(workers)
        for i in range(case.warmup + case.steps):
            rotated = order[i % len(order):] + order[: i % len(order)]
            for m in rotated:
                reply = workers[m].call("step")
                if i == 0:  # the first (warm-up) step carries the saved-tensor hooks
                    results[m].update(reply["saved"])
                if i >= case.warmup:
                    times[m].append(reply["step_s"])
            say(f"round {i + 1}/{case.warmup + case.steps}: " + ", ".join(
                f"{m} {t[-1]:.3f} s" for m, t in times.items() if t))
        for m, w in workers.items():
            results[m].update(w.call("finish"))
            say(f"{m}: finished")
    finally:
        for w in workers.values():
            w.close()
    for m, r in results.items():
        r["step_times_s"] = times[m]
        r["step_time_median_s"] = statistics.median(times[m])
        r["step_time_iqr_s"] = _iqr(times[m])
        r["label"] = METHODS[m]["label"]
        r["config"] = {k: v for k, v in METHODS[m].items() if k != "label"}
    ref = results[REFERENCE]
    ratios = {
        m: {k: _ratio(results[m].get(k), ref.get(k)) for k in RATIO_KEYS}
        for m in results if m != REFERENCE
    }
    for m, r in ratios.items():
        r["init_over_svd_floor"] = _ratio(results[m].get("init_s"), results[m].get("svd_floor_s"))
        r["merged_forward_over_base"] = results[m].get("merged_forward_over_base")
    return {"methods": results, "ratios_vs_lora_r8": ratios}


def run(out: Path, quick: bool, threads: int | None = None, only: list[str] | None = None,
        steps: int | None = None, log=None) -> None:
    from svfit.train.results import meta_info, now_iso, write_json

    target = Path(out) / NAME
    target.mkdir(parents=True, exist_ok=True)
    for case in cases(quick, threads, steps):
        if only and case.id not in only:
            continue
        t0 = time.perf_counter()
        load0 = os.getloadavg()
        run_info = {
            "benchmark": NAME,
            "case": case.id,
            "model": case.model_name,
            "targets": case.targets,
            "batch": {"batch_size": case.batch_size, "seq_len": case.seq_len,
                      "tokens": case.batch_size * case.seq_len, "content": "random token ids, seed 0"},
            "steps_timed": case.steps,
            "warmup_steps": case.warmup,
            "merged_inference_reps": case.infer_reps,
            "torch_threads_in_workers": case.threads or "default",
            "methods": {m: {k: v for k, v in spec.items() if k != "label"} for m, spec in METHODS.items()},
            "reference": REFERENCE,
            "quick": quick,
            "optimizer": "AdamW lr 1e-3 over the trainable parameters",
            "loss": "causal LM loss (labels = input ids) for LMs; mean square of the last hidden state (+ pooler "
                    "output) for encoders",
            "notes": list(case.notes),
            "created_at": now_iso(),
        }
        problem = _asset_problem(case)
        if problem:
            train_info: dict = {"skipped": problem}
        else:
            train_info = measure_case(case, log or (lambda msg: print(msg, file=sys.stderr, flush=True)))
        run_info["total_time"] = time.perf_counter() - t0
        run_info["load_average_before"] = load0  # 1/5/15-minute load: other work on the machine skews timings
        run_info["load_average_after"] = os.getloadavg()
        data = {"run_info": run_info, "train_info": train_info,
                "meta_info": meta_info(case.model_name, "synthetic batch of random token ids")}
        write_json(target / f"{case.id}.json", data)


def main() -> None:
    import benchmarks.cost as package

    parser = argparse.ArgumentParser(prog="python -m benchmarks.cost", description=package.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, help="torch threads per worker (default: quick 1, full all cores)")
    parser.add_argument("--case", action="append", help="run only this case (repeatable), e.g. minilm-qv")
    parser.add_argument("--steps", type=int, help="timed steps per method (default: per case)")
    args = parser.parse_args()
    run(args.out, args.quick, args.threads, args.case, args.steps, log=lambda msg: print(msg, flush=True))
    with tempfile.TemporaryDirectory() as plots:  # the committed plots are the report's (python -m benchmarks report)
        print(section(args.out, Path(plots)))


if __name__ == "__main__":
    main()
