"""Running the quality benchmark: the phases, one job per experiment, worker processes, and resuming from the JSON
files a previous invocation left."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from benchmarks.quality.analysis import choose, final_valid, grid_points, load, steps_of, test_accuracy, verdict
from benchmarks.quality.plan import ABLATIONS, ALL, VARIANTS, Profile, Variant, grid_lr, planned_grid, profile_for
from svfit.errors import SVFitUserError
from svfit.train.results import write_json
from svfit.train.run import RunConfig, train_run


def run(out: Path, quick: bool, tasks: Optional[list[str]] = None, log: Callable[[str], None] = print,
        device: str = "cpu") -> None:
    profile = profile_for(quick, device)
    unknown = sorted(set(tasks or ()) - set(profile.tasks))
    if unknown:
        raise ValueError(f"no benchmark plan for task(s) {unknown}; choose from {', '.join(profile.tasks)}")
    order = [t for t in profile.tasks if tasks is None or t in tasks]
    scratch = Path(tempfile.mkdtemp(prefix="svfit-bench-"))
    bench = Bench(out / "quality", profile, scratch, log)
    try:
        bench.probes(order)
        # phases across tasks, most important first, so that an interrupted run has every task's verdict first
        for task in order:  # the verdict: SVFit and LoRA tuned, 3 seeds each
            bench.tune(task, ["svfit", "lora"])
            bench.seeds(task, ["svfit", "lora"])
        for task in order:  # more seeds where 3 neither resolve nor bound the verdict
            bench.extra_seeds(task)
        for task in order:  # SVFit full spectrum (SVFT-Plain), after the verdict it does not enter
            bench.seeds(task, [n for n in ("svfit-full",) if n in profile.tasks[task].variants])
        for task in order:  # the other rows: the ceiling's grid, then the variants
            variants = profile.tasks[task].variants
            bench.tune(task, [n for n in ("full",) if n in variants],
                       extra=[n for n in variants if n not in ("svfit", "lora", "svfit-full", "full")])
        for task in order:  # why SVFit trails; the ceiling's seeds
            bench.more(task)
    finally:
        bench.close()
        shutil.rmtree(scratch, ignore_errors=True)


@dataclass(frozen=True)
class Job:
    path: Path  # where the result JSON goes
    config: RunConfig
    meta: dict  # run_info["benchmark"] (None for a probe)
    kind: str = "run"  # or "probe"


def execute(job: Job, threads: int) -> str:
    """One experiment, in a worker process (or inline): train (or probe), write the JSON, return a log line."""
    import os

    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # no load report per run in the log
    hf_logging.disable_progress_bar()
    previous = torch.get_num_threads()
    if threads:
        # one thread per worker: on a shared machine, OpenMP threads of one process wait for each other at every
        # parallel region (measured: a MiniLM step 3x slower in wall time, 4.5x more CPU with 2 threads under load)
        torch.set_num_threads(threads)
    try:
        return _execute(job, os.getloadavg()[0])
    finally:
        torch.set_num_threads(previous)


def _execute(job: Job, load_before: float) -> str:
    import os

    import torch

    started, cpu = time.perf_counter(), time.process_time()
    config = job.config
    if job.kind == "probe":
        from svfit.train.probe import probe_run

        result = probe_run(config, echo=lambda _: None)
        best = result["train_info"]["probes"][0]
        return (f"{config.task:13s} probe  valid {best['valid accuracy']:.4f}  test {best['test accuracy']:.4f}  "
                f"({time.perf_counter() - started:.0f} s)")
    try:
        result = train_run(config, echo=lambda _: None)
    except FloatingPointError as exc:  # a diverging grid point is a result (it loses), not a crash
        result = _failed(config, str(exc), "diverged")
    except SVFitUserError as exc:  # e.g. PEFT's PiSSA on Conv2d targets
        result = _failed(config, str(exc), "unsupported")
    except torch.cuda.OutOfMemoryError as exc:  # recorded (and reported) rather than ending the whole benchmark
        result = _failed(config, str(exc), "out of memory")
    finally:
        shutil.rmtree(config.out, ignore_errors=True)  # run dirs can hold a whole model; the JSON is the record
    # CPU seconds of this process: what the run costs on an idle machine, whatever else shared the cores
    result["run_info"]["benchmark"] = {**job.meta, "torch_threads": torch.get_num_threads(),
                                       "cpu_time": time.process_time() - cpu,
                                       "load_average": [load_before, os.getloadavg()[0]]}
    job.path.parent.mkdir(parents=True, exist_ok=True)
    write_json(job.path, result)
    m = job.meta
    return (f"{config.task:13s} {m['variant']:14s} lr {m['lr']:<8g} seed {m['seed']}  steps {steps_of(result)}  "
            f"valid {final_valid(result)[0]:.4f}  test {test_accuracy(result):.4f}  "
            f"({time.perf_counter() - started:.0f} s)")


def _die_with_parent() -> None:
    """Worker processes end when the benchmark process ends, however it ends (Linux): killing the one process that
    `python -m benchmarks run` started stops the whole run."""
    import signal
    import sys

    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except OSError:
            pass


class Bench:
    """Runs experiments in batches of independent jobs: in ``profile.workers`` single-threaded worker processes
    (or inline with one worker), skipping every job whose JSON already exists with the same settings."""

    def __init__(self, root: Path, profile: Profile, scratch: Path, log):
        self.root, self.profile, self.scratch, self.log = root, profile, scratch, log
        self.pool = None

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)

    def submit(self, jobs: list[Job]) -> None:
        todo, seen = [], set()
        for job in jobs:
            if job.path in seen or self.done(job):
                continue
            seen.add(job.path)
            todo.append(job)
        if not todo:
            return
        if self.profile.workers <= 1:
            for job in todo:
                self.log(execute(job, self.profile.threads))
            return
        if self.pool is None:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            self.pool = ProcessPoolExecutor(self.profile.workers, mp_context=multiprocessing.get_context("spawn"),
                                            initializer=_die_with_parent)
        from concurrent.futures import as_completed

        futures = [self.pool.submit(execute, job, self.profile.threads) for job in todo]
        for future in as_completed(futures):
            self.log(future.result())

    def done(self, job: Job) -> bool:
        if not job.path.is_file():
            return False
        recorded = json.loads(job.path.read_text())["run_info"]["train_config"]
        if job.kind == "probe":
            wanted = job.config.resolved().to_json()
            return all(recorded.get(k) == wanted[k] for k in
                       ("task", "train_limit", "eval_limit", "curve_examples", "split_seed", "image_size"))
        return same_setting(recorded, job.config)

    # -- jobs ------------------------------------------------------------------------------------------------------

    def run_job(self, task: str, v: Variant, lr: float, seed: int) -> Job:
        plan = self.profile.tasks[task]
        path = self.root / task / "runs" / f"{v.name}-lr{lr:g}-seed{seed}.json"
        head = self.root / task / "probe" / "head.safetensors"
        config = RunConfig(
            task=task, method=v.method, out=self.scratch / path.stem, seed=seed, split_seed=self.profile.split_seed,
            steps=plan.steps, epochs=plan.epochs if plan.steps is None else 1.0, batch_size=plan.batch_size, lr=lr,
            head_lr=plan.head_lr, train_limit=plan.train_limit, eval_limit=plan.test_examples,
            eval_every=plan.eval_every(self._train_size(task)), curve_examples=plan.val_examples,
            bucket_by_length=plan.bucket, head_init=str(head) if plan.lpft else None, score_before=False,
            image_size=plan.image_size, options=v.options, overwrite=True, progress=False,
        )
        meta = {"variant": v.name, "label": v.label or v.name, "lr": lr, "seed": seed, "profile": self.profile.name,
                "lpft": plan.lpft}
        return Job(path, config, meta)

    def _train_size(self, task: str) -> int:
        probe = self.probe_result(task)
        return probe["train_info"]["train examples"] if probe else 1

    def probes(self, tasks: list[str]) -> None:
        jobs = []
        for task in tasks:
            plan = self.profile.tasks[task]
            out = self.root / task / "probe"
            config = RunConfig(task=task, out=out, seed=self.profile.split_seed, split_seed=self.profile.split_seed,
                               train_limit=plan.probe_train_limit or plan.train_limit, eval_limit=plan.test_examples,
                               curve_examples=plan.val_examples, image_size=plan.image_size, overwrite=True,
                               progress=False)
            jobs.append(Job(out / "probe.json", config, {}, kind="probe"))
        self.submit(jobs)

    def probe_result(self, task: str) -> Optional[dict]:
        path = self.root / task / "probe" / "probe.json"
        return json.loads(path.read_text()) if path.is_file() else None

    # -- learning rates and seeds ----------------------------------------------------------------------------------

    def tune(self, task: str, names: list[str], extra: list[str] = ()) -> None:
        """Run the grids of tuned variants together (and ``extra`` variants' seeds, whose picks are known), growing
        each grid past an end while its best point sits there (at most ``max_extend`` points per end)."""
        plan, p = self.profile.tasks[task], self.profile
        lrs = {n: planned_grid(p, plan, n) for n in names}
        added = {(n, low): 0 for n in names for low in (True, False)}
        jobs = [job for n in extra for job in self.seed_jobs(task, n)]
        while True:
            self.submit(jobs + [self.run_job(task, VARIANTS[n], lr, p.seeds[0]) for n in names for lr in lrs[n]])
            jobs, grown = [], False
            for n in names:
                pick, edge = choose(grid_points(self.runs(task, n)))
                if pick is None or not edge:
                    continue
                low = pick == min(lr for lr, *_ in grid_points(self.runs(task, n)))
                if added[n, low] < p.max_extend:
                    added[n, low] += 1
                    lrs[n].append(grid_lr(pick / p.spacing if low else pick * p.spacing))
                    grown = True
            if not grown:
                return

    def lr_of(self, task: str, v: Variant) -> Optional[float]:
        pick, _ = choose(grid_points(self.runs(task, v.source)))
        return None if pick is None else grid_lr(pick * v.lr_factor)

    def runs(self, task: str, variant: str) -> list[dict]:
        runs = [json.loads(p.read_text()) for p in sorted((self.root / task / "runs").glob(f"{variant}-lr*.json"))]
        return [r for r in runs if r["run_info"]["benchmark"]["variant"] == variant]

    def seed_jobs(self, task: str, name: str, seeds: Optional[tuple] = None) -> list[Job]:
        v = ALL[name]
        lr = self.lr_of(task, v)
        if lr is None:
            return []
        return [self.run_job(task, v, lr, seed) for seed in seeds or self.profile.seeds]

    def seeds(self, task: str, names: list[str], seeds: Optional[tuple] = None) -> None:
        self.submit([job for n in names for job in self.seed_jobs(task, n, seeds)])

    def extra_seeds(self, task: str) -> None:
        """Seeds 3 and 4 for SVFit and LoRA where 3 seeds neither resolve nor bound the verdict."""
        rows = load(self.root.parent).get(task, {}).get("rows", {})
        if self.profile.extra_seeds and "svfit" in rows and "lora" in rows \
                and verdict(rows["svfit"], rows["lora"])["status"] == "unresolved":
            self.submit([j for n in ("svfit", "lora") for j in self.seed_jobs(task, n, self.profile.extra_seeds)])

    def more(self, task: str) -> None:
        plan = self.profile.tasks[task]
        rows = load(self.root.parent).get(task, {}).get("rows", {})
        jobs = []
        if "svfit" in rows and "lora" in rows:
            if plan.ablation and rows["svfit"]["mean"] < rows["lora"]["mean"]:  # SVFit trails: find out why
                jobs += [j for n in ABLATIONS for j in self.seed_jobs(task, n, (self.profile.seeds[0],))]
        if "full" in plan.variants:
            jobs += self.seed_jobs(task, "full")
        self.submit(jobs)


def same_setting(recorded: dict, config: RunConfig) -> bool:
    wanted = config.resolved().to_json()
    keys = ("task", "method", "seed", "epochs", "lr", "train_limit", "eval_limit", "validation", "options",
            "batch_size", "head_lr", "steps", "split_seed", "bucket_by_length", "curve_examples", "eval_every",
            "image_size", "weight_decay")
    same = all(json.loads(json.dumps(recorded.get(k))) == json.loads(json.dumps(wanted.get(k))) for k in keys)
    return same and (recorded.get("head_init") is None) == (wanted.get("head_init") is None)


def _failed(config: RunConfig, message: str, status: str) -> dict:
    nan = float("nan")
    return {
        "run_info": {"train_config": config.resolved().to_json(), "error_msg": message},
        "train_info": {"status": status, "metrics": [{"step": 0, "test accuracy": nan, "test loss": nan}],
                       "eval curve": []},
        "meta_info": {},
    }
