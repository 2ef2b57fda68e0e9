"""Quality: converged runs that answer "does SVFit match LoRA with 16x fewer parameters?".

Every run goes through `svfit train`'s own runner (`svfit.train.run.train_run`), with the recipe of SVFIT.md section
6 for every method: AdamW, 10% warm-up, linear decay, a fixed number of optimizer steps (>= 500 on CPU), batches
of similar length for text. Each task has one fixed test set (the same for every seed and method), and a validation
split carved from its training data, disjoint from the test set, that is scored every 10% of the steps (the
validation curve) and chooses the learning rates.

* Floor: linear probes on the frozen pre-trained features (`svfit.train.probe`). The first probe (on what the task's
  new head reads) is also the head every method starts from (LP-FT), so the head's learning rate needs no tuning
  and every method starts from the floor.
* Grids: each tuned method runs 5 learning rates at x2 spacing (seed 0, full length); while the best validation
  accuracy sits at an end of the grid, the grid grows by one point past that end. The grid runs double as seed 0.
* Seeds 1 and 2 at the pick; methods without a grid of their own use their family's pick (stated in the report).
* Ceiling: full fine-tuning, with its own grid.

Each experiment's result.json is stored as `<results>/quality/<task>/runs/<variant>-lr<lr>-seed<seed>.json` (the run
directory is deleted); the probe as `<task>/probe/`. An experiment whose JSON exists with the same settings is
skipped, so an interrupted run resumes where it stopped: run the same command again.
"""

from __future__ import annotations

import json
import math
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional

from benchmarks import ACCELERATOR_RESULTS, RESULTS
from svfit.errors import SVFitUserError
from svfit.methods import MethodOptions
from svfit.train.results import write_json
from svfit.train.run import RunConfig, train_run


@dataclass(frozen=True)
class Variant:
    """A row of a task's table: a method with options. ``lr_from`` names the variant whose pick it uses (itself
    when it is tuned); ``lr_factor`` scales that pick (a parametrization with other units)."""

    name: str
    method: str
    options: MethodOptions = field(default_factory=MethodOptions)
    label: str = ""
    lr_from: str = ""
    lr_factor: float = 1.0

    @property
    def tuned(self) -> bool:
        return not self.lr_from or self.lr_from == self.name

    @property
    def source(self) -> str:
        return self.lr_from or self.name


VARIANTS = {
    v.name: v
    for v in [
        Variant("svfit", "svfit", MethodOptions(), "SVFit, energy 0.99 (default)"),
        Variant("svfit-full", "svfit", MethodOptions(rank="full"), "SVFit, full spectrum (SVFT-Plain)", "svfit"),
        Variant("svfit-r8", "svfit", MethodOptions(rank=8), "SVFit, fixed r=8", "svfit"),
        Variant("lora", "lora", MethodOptions(), "LoRA r=8"),
        Variant("pissa", "pissa", MethodOptions(), "PiSSA r=8", "lora"),
        Variant("full", "full", MethodOptions(), "full fine-tuning (ceiling)"),
    ]
}
# Why SVFit trails, if it does: one seed each at SVFit's pick (scale: the same rms step, and a quarter of it)
ABLATIONS = {
    v.name: v
    for v in [
        Variant("abl-scale", "svfit", MethodOptions(parametrization="scale"), "parametrization: scale (σ·z)",
                "svfit", 500.0),
        Variant("abl-scale-low", "svfit", MethodOptions(parametrization="scale"),
                "parametrization: scale (σ·z), lr / 4", "svfit", 125.0),
        Variant("abl-t0.90", "svfit", MethodOptions(threshold=0.9), "threshold: energy 0.90", "svfit"),
        Variant("abl-nuclear", "svfit", MethodOptions(information="nuclear"), "threshold: nuclear 0.99", "svfit"),
        Variant("abl-all-linear", "svfit", MethodOptions(targets="all-linear"), "layers: every Linear", "svfit"),
    ]
}
ALL = {**VARIANTS, **ABLATIONS}


EVERYTHING = 10**7  # a limit above any split's size: the whole split (None would mean the task's CLI default)


@dataclass(frozen=True)
class TaskPlan:
    steps: Optional[int]  # optimizer steps per run (None: ``epochs`` over the training split)
    batch_size: int
    val_examples: int  # validation split (the last examples of the training data)
    test_examples: int  # the fixed test set (EVERYTHING: the whole test split)
    train_limit: int  # training split (EVERYTHING: all that remains after the validation split)
    centre: dict  # tuned method -> the middle of its grid
    variants: tuple[str, ...]
    eval_points: int = 10  # validation scores per run (plus step 0)
    epochs: Optional[float] = None
    image_size: Optional[int] = None
    bucket: bool = False
    head_lr: float = 1e-3  # the probe-initialised head (LP-FT): one rate for every method
    lpft: bool = True
    probe_train_limit: Optional[int] = None  # the probe's training examples (None: the runs' training split)
    ablation: bool = True
    dropped: str = ""  # what the budget dropped, for the report

    def eval_every(self, train_size: int) -> int:
        steps = self.steps or math.ceil(self.epochs * math.ceil(train_size / self.batch_size))
        return max(1, steps // self.eval_points)


@dataclass(frozen=True)
class Profile:
    name: str
    tasks: dict  # task -> TaskPlan, in run order
    seeds: tuple[int, ...] = (0, 1, 2)
    extra_seeds: tuple[int, ...] = (3, 4)  # SVFit and LoRA, where 3 seeds neither resolve nor bound the verdict
    grid_points: int = 5
    spacing: float = 2.0
    max_extend: int = 3  # grid points added past an end, per end
    split_seed: int = 0  # one train/validation/test split for every seed and method
    workers: int = 2  # experiments run side by side, each in its own process
    threads: int = 1  # torch threads per worker (0: torch's default)


CPU = Profile(
    "cpu",
    {
        "sentiment": TaskPlan(
            500, 16, 1000, EVERYTHING, EVERYTHING, {"svfit": 1e-4, "lora": 1e-3, "full": 5e-5},
            ("svfit", "svfit-full", "svfit-r8", "lora", "pissa", "full"), bucket=True,
        ),
        "fashion": TaskPlan(
            500, 16, 1000, 2000, 8000, {"svfit": 6e-5, "lora": 1e-3, "full": 2e-4},
            ("svfit", "svfit-full", "svfit-r8", "lora", "full"), image_size=56,
            dropped="PiSSA: PEFT's PiSSA initialises Linear layers only, and this task adapts Conv2d layers.",
        ),
        "vit-fashion": TaskPlan(
            500, 16, 1000, 2000, 8000, {"svfit": 3e-4, "lora": 1e-3, "full": 2e-5},
            ("svfit", "svfit-full", "svfit-r8", "lora", "pissa", "full"), image_size=56,
        ),
        "lm-sentiment": TaskPlan(
            500, 10, 2000, 1000, EVERYTHING, {"svfit": 4e-5, "lora": 1e-3, "full": 2e-5},
            ("svfit", "svfit-full", "lora"), eval_points=5, bucket=True, lpft=False, probe_train_limit=2000,
            ablation=False,
            dropped="SVFit r=8, PiSSA, full fine-tuning and the ablation: a SmolLM2-135M step costs ~4x a MiniLM "
            "step on 2 CPU cores; the issue's rule keeps SVFit, SVFit full spectrum and LoRA and drops methods "
            "before steps.",
        ),
    },
)
# An accelerator scales the budget up: whole training sets, 3 epochs, the whole test sets, full resolution. Up to four
# experiments share the GPU at a time (small models leave most of it idle), each with 2 CPU threads (profile_for
# lowers the count on a machine with fewer than 8 cores). Measured on sentiment only (benchmarks/results-cuda).
CUDA = Profile(
    "cuda",
    {
        task: replace(plan, steps=None, epochs=3.0, batch_size=32, train_limit=EVERYTHING, test_examples=EVERYTHING,
                      val_examples=2000, image_size=224 if plan.image_size else None, probe_train_limit=None,
                      variants=plan.variants if task == "fashion" else tuple(VARIANTS),
                      dropped=plan.dropped if task == "fashion" else "")
        for task, plan in CPU.tasks.items()
    },
    workers=4,
    threads=2,
)
QUICK = Profile(
    "quick",
    {"sentiment": TaskPlan(4, 4, 8, 8, 16, {"svfit": 1e-4, "lora": 1e-3}, ("svfit", "lora"),
                           eval_points=2, bucket=True)},
    seeds=(0, 1),
    extra_seeds=(),
    grid_points=1,
    workers=1,
)


def profile_for(quick: bool, device: str) -> Profile:
    if quick:
        return QUICK
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA device is visible")
        import os

        # up to 4 experiments share the GPU, 2 CPU threads each, never more threads than the machine has cores
        return replace(CUDA, workers=max(1, min(CUDA.workers, (os.cpu_count() or 2) // CUDA.threads)))
    if device != "cpu":
        raise ValueError(f"--device must be cpu or cuda, got {device!r}")
    return CPU


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


def grid_lr(x: float) -> float:
    return float(f"{x:.3g}")


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
        half = p.grid_points // 2
        lrs = {n: [grid_lr(plan.centre[n] * p.spacing ** (k - half)) for k in range(p.grid_points)] for n in names}
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


# -- reading results -------------------------------------------------------------------------------------------


def ok(result: dict) -> bool:
    return result["train_info"].get("status") == "success"


def final_valid(result: dict) -> tuple[float, float]:
    """(accuracy, loss) on the validation split at the end of training: the last point of the curve."""
    curve = result["train_info"].get("eval curve") or []
    if not ok(result) or not curve:
        return float("nan"), float("nan")
    return curve[-1]["valid accuracy"], curve[-1]["valid loss"]


def test_accuracy(result: dict) -> float:
    return result["train_info"]["metrics"][-1].get("test accuracy", float("nan"))


def steps_of(result: dict) -> int:
    return result["train_info"]["metrics"][-1].get("step", 0)


def grid_points(runs: list[dict]) -> list[tuple[float, float, float, str]]:
    """(lr, final validation accuracy, loss, status) of a variant's seed-0 runs, by lr."""
    points = []
    for r in runs:
        b = r["run_info"]["benchmark"]
        if b["seed"] == 0:
            acc, loss = final_valid(r)
            points.append((b["lr"], acc, loss, r["train_info"].get("status")))
    return sorted(points)


def choose(grid) -> tuple[Optional[float], bool]:
    """The learning rate with the best final validation accuracy (ties: lower validation loss), and whether it is
    an end of the grid (only a grid of 3 or more points has ends)."""
    good = [(acc, -loss, lr) for lr, acc, loss, status in grid if status == "success" and not math.isnan(acc)]
    if not good:
        return None, False
    pick = max(good)[2]
    lrs = [lr for lr, *_ in grid]
    return pick, len(lrs) >= 3 and pick in (min(lrs), max(lrs))


def load(results: Path) -> dict:
    """{task: {"probe": probe.json, "runs": [...], "grids": {variant: points}, "picks": {variant: (lr, edge)},
    "rows": {variant: row}}} from the JSON files alone."""
    table = {}
    for task_dir in sorted(p for p in (results / "quality").glob("*") if p.is_dir()):
        probe_path = task_dir / "probe" / "probe.json"
        runs = [json.loads(p.read_text()) for p in sorted((task_dir / "runs").glob("*.json"))]
        if not runs and not probe_path.is_file():
            continue
        by_variant: dict[str, list[dict]] = {}
        for r in runs:
            by_variant.setdefault(r["run_info"]["benchmark"]["variant"], []).append(r)
        grids = {name: grid_points(rs) for name, rs in by_variant.items() if ALL.get(name, Variant(name, "")).tuned}
        picks = {name: choose(g) for name, g in grids.items()}
        rows = {}
        for name, rs in by_variant.items():
            v = ALL.get(name)
            if v is None:
                continue
            source = picks.get(v.source, (None, False))[0]
            if source is None:
                continue
            lr = grid_lr(source * v.lr_factor)
            at = [r for r in rs if r["run_info"]["benchmark"]["lr"] == lr]
            if at:
                rows[name] = row(at, v)
        table[task_dir.name] = {"probe": json.loads(probe_path.read_text()) if probe_path.is_file() else None,
                                "runs": runs, "grids": grids, "picks": picks, "rows": rows}
    return table


def mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


END_GAP_LIMIT = 0.01  # a converged run ends within 1 point of its best validation accuracy


def row(results: list[dict], v: Variant) -> dict:
    good = [r for r in results if ok(r)]
    accs = {r["run_info"]["benchmark"]["seed"]: test_accuracy(r) for r in good}
    m, s = mean_std(list(accs.values()))
    info = good[0]["train_info"] if good else {}
    gaps, late = [], {}  # best validation accuracy on the curve minus the final one, per seed; the seeds past 1 point
    for r in good:
        curve = r["train_info"].get("eval curve", [])
        if curve:
            best = max(curve, key=lambda e: e["valid accuracy"])
            gaps.append(best["valid accuracy"] - curve[-1]["valid accuracy"])
            if gaps[-1] > END_GAP_LIMIT:
                late[r["run_info"]["benchmark"]["seed"]] = (best, curve[-1])
    final = good[0]["train_info"]["metrics"][-1] if good else {}
    return {
        "label": v.label or v.name,
        "lr": results[0]["run_info"]["benchmark"]["lr"],
        "mean": m,
        "std": s,
        "n": len(accs),
        "diverged": len(results) - len(good),
        "by_seed": accs,
        "correct": {r["run_info"]["benchmark"]["seed"]: r["train_info"].get("test correct") for r in good},
        "steps": sorted({steps_of(r) for r in good}),
        "epochs": max((e.get("epoch", 0.0) for r in good for e in r["train_info"]["metrics"][:-1]), default=0.0),
        "end_gap": max(gaps) if gaps else float("nan"),
        "late": late,
        "valid": statistics.fmean(final_valid(r)[0] for r in good) if good else float("nan"),
        "adapter_params": info.get("num_trainable_params", 0) - info.get("num_head_params", 0),
        "head_params": info.get("num_head_params", 0),
        "file_bytes": info.get("file_size", 0),
        "train_time": statistics.median(r["train_info"]["train_time"] for r in good) if good else float("nan"),
        "examples": final.get("test examples"),
        "curves": [r["train_info"].get("eval curve", []) for r in good],
    }


def paired_interval(gaps: list[float], level: float = 0.95) -> tuple[float, float]:
    """Student-t interval of the mean per-seed gap (a paired t-test: each seed fixes the init and data order; the
    test set is the same for every seed)."""
    from scipy import stats

    m, s = mean_std(gaps)
    if s == 0.0:  # identical gaps: the interval collapses (scipy would divide by zero)
        return m, m
    half = stats.t.ppf(0.5 + level / 2, len(gaps) - 1) * s / len(gaps) ** 0.5
    return m - half, m + half


def mcnemar(a: str, b: str) -> tuple[int, int, float]:
    """(a right and b wrong, a wrong and b right, exact two-sided McNemar p) over the same test examples."""
    from scipy import stats

    if len(a) != len(b):
        raise ValueError("McNemar needs both runs on the same test examples")
    only_a = sum(1 for x, y in zip(a, b) if x == "1" and y == "0")
    only_b = sum(1 for x, y in zip(a, b) if x == "0" and y == "1")
    p = stats.binomtest(only_a, only_a + only_b, 0.5).pvalue if only_a + only_b else 1.0
    return only_a, only_b, float(p)


BOUND = 1.5  # points: an interval inside +-BOUND bounds the gap (a tie)


def verdict(svfit: dict, lora: dict) -> dict:
    """SVFit vs LoRA over the seeds both have: the mean per-seed gap in points, its paired 95% t-interval, McNemar's
    exact test on the pooled discordant pairs (each seed's SVFit run against the same seed's LoRA run), and
    the status: 'wins' / 'loses' (the interval excludes zero), 'ties' (it lies within +-1.5 points) or
    'unresolved'."""
    seeds = sorted(set(svfit["by_seed"]) & set(lora["by_seed"]))
    out = {"seeds": seeds, "n": len(seeds)}
    if len(seeds) < 2:
        return {**out, "status": "unresolved", "text": f"not enough paired seeds ({len(seeds)}) to call"}
    gaps = [100 * (svfit["by_seed"][k] - lora["by_seed"][k]) for k in seeds]
    m, s = mean_std(gaps)
    low, high = paired_interval(gaps)
    if low > 0 or high < 0:
        status = "wins" if m > 0 else "loses"
    elif -BOUND <= low and high <= BOUND:
        status = "ties"
    else:
        status = "unresolved"
    b = c = 0
    per_seed = []
    for k in seeds:
        x, y = svfit.get("correct", {}).get(k), lora.get("correct", {}).get(k)
        if x and y:
            bk, ck, pk = mcnemar(x, y)
            b, c = b + bk, c + ck
            per_seed.append(pk)
    p = mcnemar("1" * b + "0" * c, "0" * b + "1" * c)[2] if per_seed else float("nan")
    return {**out, "status": status, "gap": m, "std": s, "low": low, "high": high, "b": b, "c": c, "p": p,
            "p_per_seed": per_seed}


# -- the report ------------------------------------------------------------------------------------------------

TASK_TITLES = {
    "sentiment": "MiniLM-L6 (BERT) on Rotten Tomatoes sentiment",
    "fashion": "EfficientNet-Lite0 (convolutions) on Fashion-MNIST",
    "vit-fashion": "DINOv2 ViT-S/14 on Fashion-MNIST",
    "lm-sentiment": "SmolLM2-135M-Instruct (causal LM) on Rotten Tomatoes sentiment",
    "subjectivity": "MiniLM-L6 on Rotten Tomatoes subjectivity",
}
PAPER_CLAIM = ("The paper (abstract): SVFit \"outperforms LoRA while requiring 16 times fewer trainable "
               "parameters\" (RoBERTa on GLUE, ViT image classification; its tables were not read, see SVFIT.md).")
WORDS = {"wins": "SVFit beats LoRA r=8", "loses": "SVFit loses to LoRA r=8", "ties": "SVFit ties LoRA r=8",
         "unresolved": "SVFit vs LoRA r=8 is not resolved"}


def _cpu_hours(runs: list[dict]) -> float:
    return sum(r["run_info"]["benchmark"].get("cpu_time", 0.0) for r in runs) / 3600


def _load_range(runs: list[dict]) -> str:
    loads = [x for r in runs for x in r["run_info"]["benchmark"].get("load_average", [])]
    return f"{min(loads):.1f}–{max(loads):.1f}" if loads else "not recorded"


def _pct(x: float) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def _size(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB" if n >= 1e4 else f"{n:,} B"


def verdict_text(v: dict, svfit: dict, lora: dict) -> str:
    if "gap" not in v:
        return v.get("text", "not run")
    ratio = lora["adapter_params"] / max(svfit["adapter_params"], 1)
    return (f"**{WORDS[v['status']]}**: {v['gap']:+.1f} ± {v['std']:.1f} points over {v['n']} paired seeds, 95% "
            f"interval {v['low']:+.1f} to {v['high']:+.1f}; McNemar (pooled over seeds, {svfit['examples']} test "
            f"examples each): SVFit alone right {v['b']}×, LoRA alone right {v['c']}×, exact p = {v['p']:.2g} "
            f"(per seed: {', '.join(f'{p:.2g}' for p in v['p_per_seed'])}); {ratio:.1f}× fewer adapter parameters "
            f"({svfit['adapter_params']:,} vs {lora['adapter_params']:,}), adapter file "
            f"{_size(svfit['file_bytes'])} vs {_size(lora['file_bytes'])}.")


PROVENANCE = "PROVENANCE.md"  # in <results>/quality: how a run outside this machine got its model and data
NOTE = "NOTE.md"  # in <results>/quality: what a reader must know first (e.g. a task being re-run in a new setting)


def _recipe(profile: str) -> str:
    length = ("a fixed number of epochs over the whole training split" if profile == "cuda"
              else "a fixed number of optimizer steps")
    return (
        "Every run went through `svfit train`'s runner with one recipe (SVFIT.md §6, SVFT-Plain's): AdamW, 10% "
        f"linear warm-up then linear decay, gradient clipping at 1, no weight decay, {length}, and every method "
        "starting from the same probe-initialised head (LP-FT: the linear probe below, head lr 1e-3 for every "
        "method) where the task adds a head. Each task has **one fixed test set**, the same for every seed and "
        "method, and a validation split taken from its training data (disjoint from the test set) that is scored "
        "every 10% of the steps. Learning rates: 5 points at ×2 spacing per tuned method, run to full length on "
        "seed 0 (these runs are also seed 0), picked by final validation accuracy; a grid whose best point sat at "
        "an end grew past it. Seeds 1 and 2 ran at the pick, and seeds 3 and 4 of SVFit and LoRA where three seeds "
        "neither resolved the verdict nor bounded it within ±1.5 points. SVFit's variants use SVFit's pick and PiSSA uses "
        "LoRA's (its paper's protocol), for budget. Accuracy is on the test set, mean ± std over seeds; *end gap* "
        "is the largest drop from a run's best validation accuracy to its final one (converged runs: < 1 point); "
        "*adapter* counts trainable parameters outside the head; *file* is the saved adapter (with the head where "
        "there is one; the whole model for full fine-tuning), as saved by the code of its run: runs older than "
        "commit 9b468f7 carried a module's whole bases where the few singular vectors that a recomputation could "
        "rotate now suffice, so their SVFit files are larger than today's (README, \"another machine or LAPACK\")."
    )


def _compute(table: dict, every: list[dict], profile: str) -> str:
    wall = sum(r["run_info"].get("total_time", 0.0) for r in every)
    wall += sum((t["probe"] or {}).get("run_info", {}).get("total_time", 0.0) for t in table.values())
    head = f"{len(every)} training runs and {sum(1 for t in table.values() if t['probe'])} probes: "
    if profile == "cuda":
        system = every[0]["meta_info"].get("system_info", {}) if every else {}
        threads = sorted({r["run_info"]["benchmark"].get("torch_threads") for r in every} - {None})
        return head + (f"{wall / 3600:.2f} h of summed wall time on one {system.get('accelerator', 'accelerator')} "
                       f"(experiments sharing it, {'/'.join(map(str, threads)) or '?'} CPU threads each).")
    return head + (f"{_cpu_hours(every):.1f} CPU-hours (the runs' own CPU seconds, single-threaded: about half that "
                   f"in wall time on an idle 2-core machine, whose two workers run side by side), {wall / 3600:.1f} h "
                   f"of summed wall time on this shared machine (load average {_load_range(every)} during the runs).")


def _profile(every: list[dict]) -> str:
    return next((r["run_info"]["benchmark"].get("profile") for r in every), "cpu")


def _summary(table: dict) -> tuple[list[str], dict]:
    """The one-line-per-task table, and each task's (verdict, floor)."""
    summary = ["| task | probe (floor) | SVFit | SVFit full | LoRA r=8 | full FT (ceiling) | SVFit − LoRA [95% CI] "
               "| McNemar p | verdict |", "|---|---|---|---|---|---|---|---|---|"]
    verdicts = {}
    for task, t in table.items():
        rows = t["rows"]
        floor = max((p["test accuracy"] for p in (t["probe"] or {}).get("train_info", {}).get("probes", [])),
                    default=float("nan"))
        if "svfit" in rows and "lora" in rows:
            v = verdict(rows["svfit"], rows["lora"])
        else:  # no pair to compare: say which, rather than call it unresolved
            v = {"status": "not run (probe only)" if not rows else "unresolved"}

        def cell(name):
            r = rows.get(name)
            return f"{_pct(r['mean'])} ± {100 * r['std']:.1f} ({r['n']})" if r else "—"

        ci = f"{v['gap']:+.1f} [{v['low']:+.1f}, {v['high']:+.1f}]" if "gap" in v else "—"
        p = f"{v['p']:.2g}" if "p" in v and not math.isnan(v["p"]) else "—"
        summary.append(f"| {task} | {_pct(floor)} | {cell('svfit')} | {cell('svfit-full')} | {cell('lora')} | "
                       f"{cell('full')} | {ci} | {p} | {v['status']} |")
        verdicts[task] = (v, floor)
    return summary, verdicts


def section(results: Path, plots: Path, link_prefix: str = "benchmarks/plots") -> str:
    table = load(results)
    accelerator = _accelerator_lines(results)
    if not table:
        return "## Quality\n\nNot run (`python -m benchmarks run --only quality`).\n" + "\n".join(accelerator)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots.mkdir(parents=True, exist_ok=True)
    every = [r for t in table.values() for r in t["runs"]]
    profile = _profile(every)
    plans = {"cpu": CPU, "cuda": CUDA, "quick": QUICK}.get(profile, CPU).tasks
    lines = ["## Quality: converged runs, SVFit vs LoRA", "", _recipe(profile), "",
             _compute(table, every, profile) + " " + PAPER_CLAIM, ""]
    provenance = results / "quality" / PROVENANCE
    if provenance.is_file():
        lines += [provenance.read_text().strip(), ""]
    note = results / "quality" / NOTE
    if note.is_file():
        lines += [note.read_text().strip(), ""]
    summary, verdicts = _summary(table)
    body = []
    for task, t in table.items():
        v, floor = verdicts[task]
        body += _task_section(task, t, plans.get(task), v, floor, plt, plots, link_prefix)
    lines += ["Test accuracy in %, mean ± std (seeds):", "", *summary, "", *accelerator, *body]
    return "\n".join(lines) + "\n"


def _budget(runs: list[dict]) -> str:
    """What the runs' recorded settings were, in words (e.g. "whole training splits, 3 epochs, batch 32")."""
    tc = runs[0]["run_info"]["train_config"]
    length = f"{tc['steps']} steps" if tc.get("steps") else f"{tc['epochs']:g} epochs"
    split = "whole training splits" if tc.get("train_limit", 0) >= EVERYTHING else f"{tc['train_limit']} examples"
    return f"{split}, {length}, batch {tc['batch_size']}"


def _accelerator_lines(results: Path) -> list[str]:
    """For the committed CPU results: the summary of what the accelerator profile measured, beside them."""
    other = ACCELERATOR_RESULTS
    if results.resolve() != RESULTS.resolve() or not (other / "quality").is_dir():
        return []
    table = load(other)
    every = [r for t in table.values() for r in t["runs"]]
    if not every:
        return []
    summary, _ = _summary(table)
    provenance = other / "quality" / PROVENANCE
    return [
        f"**The same benchmark on an accelerator** (`--device cuda`: {_budget(every)}), in "
        f"`benchmarks/{ACCELERATOR_RESULTS.name}/` (full tables and curves in its BENCHMARKS.md). "
        + _compute(table, every, "cuda"), "",
        *([provenance.read_text().strip(), ""] if provenance.is_file() else []),
        *summary, "",
    ]


def _late_note(r: dict, examples: Optional[int]) -> str:
    """A row whose runs end more than 1 point below their best validation accuracy: which seeds, where each peaked,
    what that drop is in validation examples, what the validation loss did meanwhile, and each seed's test
    accuracy against the row's mean (a run that had degraded would sit below it)."""
    parts = []
    for seed, (best, last) in sorted(r["late"].items()):
        drop = best["valid accuracy"] - last["valid accuracy"]
        count = f", {round(drop * examples)} of {examples} examples" if examples else ""
        parts.append(f"seed {seed}: {_pct(best['valid accuracy'])} at step {best.get('step', '?')} → "
                     f"{_pct(last['valid accuracy'])} at {last.get('step', '?')} ({100 * drop:.1f} points{count}; "
                     f"validation loss {best['valid loss']:.3f} → {last['valid loss']:.3f}; test "
                     f"{_pct(r['by_seed'][seed])} against the row's {_pct(r['mean'])})")
    return (f"{r['label']} ends {100 * r['end_gap']:.1f} points below its best validation accuracy, more than the "
            f"1-point convergence check allows: " + "; ".join(parts) + ".")


def _task_section(task, t, plan, v, floor, plt, plots, link_prefix) -> list[str]:
    rows, probe = t["rows"], t["probe"]
    out = [f"### {task}: {TASK_TITLES.get(task, task)}", ""]
    runs = [r for r in t["runs"] if ok(r)]
    if runs:
        tc = runs[0]["run_info"]["train_config"]
        examples = runs[0]["train_info"]["metrics"][-1]
        size = f", {tc['image_size']} px inputs" if tc.get("image_size") else ""
        length = f"{tc['steps']} optimizer steps" if tc.get("steps") else f"{tc['epochs']:g} epochs"
        seen = examples.get("train samples")
        out.append(f"Validation split {tc['curve_examples']} examples (the end of the training data), fixed test set "
                   f"{examples.get('test examples')} examples (split seed {tc.get('split_seed')}); {length} × batch "
                   f"{tc['batch_size']} ({seen:,} training examples seen per run){size}"
                   f"{', batches grouped by length' if tc.get('bucket_by_length') else ''}; "
                   f"{'every method starts from the probe head (LP-FT), head lr ' + format(tc['head_lr'], 'g') if tc.get('head_init') else 'no new head (the LM head stays frozen)'}.")
    if not runs:
        out.append(f"No training runs yet, only the probe (the floor): the compute spent so far went to the "
                   f"tasks with runs. `python -m benchmarks run --only quality --task {task}` runs them (existing results are "
                   "kept).")
    if runs:
        if _profile(runs) == "cuda":
            out.append(f"Compute: {len(runs)} runs, "
                       f"{sum(r['run_info'].get('total_time', 0.0) for r in runs) / 3600:.2f} h summed wall time on "
                       f"the accelerator.")
        else:
            out.append(f"Compute: {len(runs)} runs, {_cpu_hours(runs):.1f} CPU-hours, "
                       f"{sum(r['run_info'].get('total_time', 0.0) for r in runs) / 3600:.1f} h summed wall time "
                       f"(load average {_load_range(runs)}).")
    if plan is not None and plan.dropped:
        out.append(f"Dropped: {plan.dropped}")
    out.append("")
    table = ["| method | lr | test accuracy % | steps | epochs | end gap | valid % | adapter params | file | train s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for p in (probe or {}).get("train_info", {}).get("probes", []):
        table.append(f"| linear probe on {p['features']} (floor) | L2 {p['l2']:g} | {_pct(p['test accuracy'])} | — | — "
                     f"| — | {_pct(p['valid accuracy'])} | 0 (a {p['feature dim']}-d linear head) | — | — |")
    for name in [*VARIANTS]:
        r = rows.get(name)
        if r is None:
            continue
        steps = "/".join(map(str, r["steps"]))
        shared = "" if ALL[name].tuned else f" ({ALL[name].source}'s)"
        edge = " **(edge)**" if ALL[name].tuned and t["picks"].get(name, (None, False))[1] else ""
        table.append(f"| {r['label']} | {r['lr']:g}{shared}{edge} | {_pct(r['mean'])} ± {100 * r['std']:.1f} "
                     f"({r['n']} seed{'s' if r['n'] != 1 else ''}) | {steps} | {r['epochs']:.2f} | {100 * r['end_gap']:.1f} | "
                     f"{_pct(r['valid'])} | {r['adapter_params']:,} | {_size(r['file_bytes'])} | "
                     f"{r['train_time']:.0f} |")
    out += table + [""]
    if "svfit" in rows and "lora" in rows:
        out.append(verdict_text(v, rows["svfit"], rows["lora"]))
        out.append("")
        notes = []
        for name in ("svfit", "lora"):
            r = rows[name]
            if not math.isnan(floor) and r["mean"] <= floor:
                notes.append(f"{r['label']} ({_pct(r['mean'])}) does not beat the linear probe ({_pct(floor)}).")
            if r["late"]:
                notes.append(_late_note(r, t["runs"][0]["run_info"]["train_config"].get("curve_examples")))
            if min(r["steps"], default=0) < 500:
                notes.append(f"{r['label']} ran {min(r['steps'])} steps (< 500).")
        if notes:
            out += ["Checks: " + " ".join(notes), ""]
        else:
            out += [f"Checks: SVFit and LoRA beat the probe, ran ≥ 500 steps and end within 1 point of their best "
                    "validation accuracy.", ""]
    out += _grid_table(t)
    image = _plot_task(task, t, floor, plt, plots)
    if image:
        out += [f"![validation curves and learning-rate grids on {task}]({link_prefix}/{image})", ""]
    out += _ablation_table(t)
    return out


def _grid_table(t) -> list[str]:
    if not t["grids"]:
        return []
    lines = ["Learning-rate grids (final validation accuracy %, seed 0; **bold**: the pick):", "",
             "| method | grid |", "|---|---|"]
    for name, grid in t["grids"].items():
        pick, edge = t["picks"][name]
        cells = []
        for lr, acc, _, status in grid:
            text = f"{lr:g}: {_pct(acc)}" if status == "success" else f"{lr:g}: {status}"
            cells.append(f"**{text}**" if lr == pick else text)
        lines.append(f"| {ALL[name].label if name in ALL else name} | {', '.join(cells)}"
                     f"{' — pick at an edge' if edge else ''} |")
    return lines + [""]


def _ablation_table(t) -> list[str]:
    rows = t["rows"]
    names = [n for n in ABLATIONS if n in rows]
    if not names or "svfit" not in rows:
        return []
    base = rows["svfit"]
    seed = min(base["by_seed"]) if base["by_seed"] else 0
    lora = rows.get("lora", {}).get("by_seed", {})
    lines = ["Why SVFit trails (ablation at SVFit's pick; SVFit's seed "
             f"{seed} at {base['lr']:g}: {_pct(base['by_seed'].get(seed, float('nan')))}%; learning rate: the grid "
             "above). *vs LoRA*: the mean gap to LoRA r=8 over the seeds both ran:", "",
             "| change | lr | test accuracy % (seeds) | vs LoRA, points | valid % | adapter params |",
             "|---|---|---|---|---|---|"]
    for name in ("svfit-r8", *names, "svfit-full"):
        r = rows.get(name)
        if r:
            accs = list(r["by_seed"].values())
            spread = f" ± {100 * statistics.stdev(accs):.1f}" if len(accs) > 1 else ""
            shared = [s for s in r["by_seed"] if s in lora]
            gap = (f"{100 * statistics.fmean(r['by_seed'][s] - lora[s] for s in shared):+.1f}" if shared else "—")
            lines.append(f"| {r['label']} | {r['lr']:g} | {_pct(statistics.fmean(accs))}{spread} ({len(accs)}) | "
                         f"{gap} | {_pct(r['valid'])} | {r['adapter_params']:,} |")
    return lines + [""]


def _plot_task(task, t, floor, plt, plots) -> Optional[str]:
    rows = t["rows"]
    if not rows:
        return None
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.6))
    for name, r in rows.items():
        if name not in VARIANTS or not r["curves"]:
            continue
        steps = [e["step"] for e in r["curves"][0]]
        acc = [100 * statistics.fmean(c[i]["valid accuracy"] for c in r["curves"] if i < len(c))
               for i in range(len(steps))]
        a1.plot(steps, acc, marker=".", label=name, linestyle="-" if name.startswith("svfit") else "--")
    probe = (t["probe"] or {}).get("train_info", {}).get("probes", [])
    if probe:
        a1.axhline(100 * probe[0]["valid accuracy"], color="gray", linewidth=0.8, linestyle=":",
                   label="probe (start)")
    a1.set_xlabel("optimizer step")
    a1.set_ylabel("validation accuracy %")
    a1.set_title(f"{task}: validation curves at the picks (mean over seeds)", fontsize=9)
    a1.legend(fontsize=7)
    for name, grid in t["grids"].items():
        pts = [(lr, 100 * acc) for lr, acc, _, status in grid if status == "success"]
        if pts:
            a2.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    a2.set_xscale("log")
    a2.set_xlabel("learning rate")
    a2.set_ylabel("final validation accuracy %")
    a2.set_title("learning-rate grids (seed 0)", fontsize=9)
    a2.legend(fontsize=7)
    fig.tight_layout()
    name = f"quality-{task}.png"
    fig.savefig(plots / name, dpi=110)
    plt.close(fig)
    return name
