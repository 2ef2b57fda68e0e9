"""What SVFit costs, as ratios to LoRA r=8 measured in the same run, on the same model and the same batch.

Cases (full run): MiniLM-L6 (pre-trained BERT) on a 32 x 128-token batch and SmolLM2-135M-Instruct (dequantised
GGUF) on a 4 x 256-token batch (8 x 256 takes 20-40 s per step on 2 CPU cores, too slow for the budget), each with
the paper's query+value targets and with ``all-linear``. Methods: SVFit at its default (99 % energy, fast compute
paths), the same with the reference side branch (the "before" of the fast paths), SVFit with the full spectrum, an
SVFT-style baseline (``benchmarks/svft.py``: full bases, W rebuilt every forward) and LoRA r=8 (alpha 8). ``quick=True`` runs the same code on two tiny random-init models.

Per method, measured in a worker process of its own (forked from multiprocessing's fork server, which has imported
torch/transformers/peft/svfit but run nothing, so each worker starts with clean memory and thread state):

* training step (forward + backward + AdamW step) time: median and IQR over many steps after warm-up. The
  workers of a case take turns, one step each (the order rotating every round), so a busy machine slows all
  methods alike and the ratios stay meaningful;
* bytes autograd saves for backward in one step (saved-tensor hooks, each storage counted once), with and without
  the model's own parameters and buffers (which are saved by reference and cost nothing extra);
* peak training memory: on CPU the growth of the process's peak RSS (VmHWM) over its RSS after the base model and
  the batch were loaded (and one no-grad forward ran, so thread pools and kernel caches are not counted). The peak is reset by writing "5" to /proc/self/clear_refs after get_peft_model (and after
  malloc_trim), so the SVD workspace of the init is reported on its own as the init peak; where the reset is refused
  the recorded peak is the larger of init and training, and the JSON says so. On CUDA: max_memory_allocated growth;
* cold init: wall time of the first get_peft_model in the process, next to the floor, the summed time of
  ``torch.linalg.svd(W.float(), full_matrices=False)`` over the same matrices in the same process, timed after the
  init (so init / floor also holds LAPACK's first-call costs);
* load: PeftModel.from_pretrained of the saved adapter onto a fresh base (SVFit recomputes the SVD and checks the
  base-weight fingerprints here), adapter_model.safetensors bytes, trainable parameters;
* merged inference: after merge_and_unload, forward time against the untouched base model (interleaved), and the
  largest output difference merged vs. unmerged and loaded vs. trained (correctness).

    python -m benchmarks.cost --out benchmarks/results [--quick] [--case minilm-qv] [--steps N] [--threads N]

Timings need an otherwise idle machine: on 2 cores, a second busy process slows two-thread torch many-fold
(``--threads 1`` is the fairer choice then). Each JSON records the load average before and after its case.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

NAME = "cost"
REFERENCE = "lora-r8"
BEFORE = "cost-before"  # results of the last run before the fast paths, kept for the before/after table
CALL_TIMEOUT_S = 1200  # one command of a worker (a setup, a step, the finish); a hung worker must not hang the run
METHODS: dict[str, dict[str, Any]] = {
    "svfit": {"kind": "svfit", "label": "SVFit (99% energy, default)"},
    "svfit-reference": {"kind": "svfit", "compute_path": "reference",
                        "label": "SVFit (99% energy), reference side branch (before the fast paths)"},
    "svfit-full": {"kind": "svfit", "r": "full", "label": "SVFit full spectrum"},
    "svft": {"kind": "svft", "label": "SVFT-style baseline (full bases, W rebuilt every forward)"},
    REFERENCE: {"kind": "lora", "r": 8, "lora_alpha": 8, "label": "LoRA r=8"},
}
# Issue #6's goals, checked in the report: (case suffix, measurement, limit)
GOALS = {
    "qv": {"step_time_median_s": 1.10, "peak_train_memory_growth_bytes": 1.10},
    "all": {"step_time_median_s": 1.50, "peak_train_memory_growth_bytes": 1.30},
}
INIT_GOAL = 1.1  # cold init / summed torch.linalg.svd
CACHE_GOAL_S = 1.0  # re-init from the SVD cache (SmolLM2-135M)
# measurement -> (label, unit); the ratios SVFit / LoRA are taken over these keys
RATIO_KEYS = {
    "step_time_median_s": ("training step time", "s"),
    "saved_activation_bytes": ("activations saved for backward", "B"),
    "peak_train_memory_growth_bytes": ("peak training memory growth", "B"),
    "init_s": ("cold init (get_peft_model)", "s"),
    "load_s": ("adapter load (from_pretrained)", "s"),
    "adapter_file_bytes": ("adapter_model.safetensors", "B"),
    "trainable_params": ("trainable parameters", ""),
}


@dataclass
class Case:
    id: str
    model_name: str
    loader: str  # key of LOADERS
    batch_size: int
    seq_len: int
    targets: list[str] | str
    targets_label: str
    steps: int
    warmup: int
    infer_reps: int
    threads: int | None = None  # torch threads in the workers; None: torch's default (all cores)
    notes: list[str] = field(default_factory=list)


def cases(quick: bool, threads: int | None = None, steps: int | None = None) -> list[Case]:
    """The cases of a run; ``threads`` overrides the torch threads of every worker (default: quick 1, full all),
    ``steps`` the number of timed steps."""
    chosen = _cases(quick)
    for c in chosen:
        c.threads = threads or c.threads
        c.steps = steps or c.steps
    return chosen


def _cases(quick: bool) -> list[Case]:
    if quick:
        return [
            Case("tiny-bert-qv", "tiny BERT (random init, hidden 64)", "tiny-bert", 8, 32, ["query", "value"],
                 "query, value", steps=4, warmup=1, infer_reps=2, threads=1),
            Case("tiny-llama-all", "tiny Llama (random init, hidden 64)", "tiny-llama", 4, 32, "all-linear",
                 "all-linear", steps=4, warmup=1, infer_reps=2, threads=1),
        ]
    smol_note = ("batch 4 x 256 instead of 8 x 256: a step of 8 x 256 takes 20-40 s on 2 CPU cores, too slow for "
                 "the time budget")
    minilm = "MiniLM-L6 (all-MiniLM-L6-v2, pre-trained BERT)"
    smol = "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised to fp32)"
    return [
        Case("minilm-qv", minilm, "minilm", 32, 128, ["query", "value"], "query, value", 10, 2, 3),
        Case("minilm-all", minilm, "minilm", 32, 128, "all-linear", "all-linear", 10, 2, 3),
        Case("smollm2-qv", smol, "smollm2", 4, 256, ["q_proj", "v_proj"], "q_proj, v_proj", 10, 1, 1, notes=[smol_note]),
        Case("smollm2-all", smol, "smollm2", 4, 256, "all-linear", "all-linear", 10, 1, 1, notes=[smol_note]),
    ]


# ---------------------------------------------------------------------------------------------------------------
# parent side: orchestrate one worker process per method


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


def _ratio(a, b) -> float | None:
    if a is None or b is None or not b or b <= 0 or a < 0:
        return None
    return a / b


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


# ---------------------------------------------------------------------------------------------------------------
# worker side (a fresh process per method)


def _tiny_bert():
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    return BertModel(BertConfig(vocab_size=200, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=128, max_position_embeddings=64))


def _tiny_llama():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=200, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))


def _minilm():
    from transformers import AutoModel

    from svfit.assets import minilm_dir

    return AutoModel.from_pretrained(minilm_dir())


def _smollm2():
    import torch
    from transformers import AutoModelForCausalLM

    from svfit.assets import smollm2_checkpoint

    return AutoModelForCausalLM.from_pretrained(smollm2_checkpoint(), dtype=torch.float32)


LOADERS = {"tiny-bert": _tiny_bert, "tiny-llama": _tiny_llama, "minilm": _minilm, "smollm2": _smollm2}


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _rss() -> int:
    return _status_kib("VmRSS") * 1024


def _hwm() -> int:
    return _status_kib("VmHWM") * 1024


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # 5: reset the peak RSS to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def _trim() -> None:
    """Give freed heap memory back to the OS, so that later RSS growth is not hidden by reuse (or inflated)."""
    import gc

    from svfit.core.factorize import release_freed_heap

    gc.collect()
    release_freed_heap()


class _Measure:
    def __init__(self, case: dict, method: str):
        import torch

        self.case = Case(**case)
        if self.case.threads:
            torch.set_num_threads(self.case.threads)
        self.method = method
        self.spec = METHODS[method]
        self.cuda = torch.cuda.is_available()
        self.device = torch.device("cuda" if self.cuda else "cpu")
        self.tmp = tempfile.TemporaryDirectory(prefix="svfit-cost-")

    def _sync(self):
        import torch

        if self.cuda:
            torch.cuda.synchronize()

    def _base(self):
        return LOADERS[self.case.loader]().to(self.device)

    def _config(self):
        import peft

        import svfit

        if self.spec["kind"] == "lora":
            return peft.LoraConfig(r=self.spec["r"], lora_alpha=self.spec["lora_alpha"],
                                   target_modules=self.case.targets)
        extra = {k: self.spec[k] for k in ("r", "compute_path") if k in self.spec}
        return svfit.SVFitConfig(target_modules=self.case.targets, **extra)

    def _adapt(self, base):
        from peft import get_peft_model

        if self.spec["kind"] == "svft":
            from benchmarks.svft import apply_svft

            return apply_svft(base, self.case.targets)
        return get_peft_model(base, self._config())

    def _factored_weights(self) -> list:
        from svfit.tuner import SVFitLayer

        if self.spec["kind"] == "svft":
            from benchmarks.svft import svft_layers

            # the SVFT layer dropped W0; the same-shape, same-spectrum product stands in for it
            return [(m.svft_U * m.svft_sigma) @ m.svft_V.T for m in svft_layers(self.model)]
        return [m.get_base_layer().weight for m in self.model.modules() if isinstance(m, SVFitLayer)]

    def _batch(self, model) -> dict:
        import torch

        g = torch.Generator().manual_seed(0)
        vocab = model.config.vocab_size
        low = min(1000, vocab // 10)
        ids = torch.randint(low, vocab, (self.case.batch_size, self.case.seq_len), generator=g)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if self.is_lm:
            batch["labels"] = ids.clone()
        return {k: v.to(self.device) for k, v in batch.items()}

    def _loss(self, out):
        if getattr(out, "loss", None) is not None:
            return out.loss
        loss = out.last_hidden_state.float().pow(2).mean()
        if getattr(out, "pooler_output", None) is not None:  # so that an adapted pooler gets a gradient too
            loss = loss + out.pooler_output.float().pow(2).mean()
        return loss

    def _output(self, model):
        import torch

        with torch.no_grad():
            out = model(**{k: v for k, v in self.batch.items() if k != "labels"})
        return (out.logits if self.is_lm else out.last_hidden_state).float()

    def _memory_now(self) -> int:
        import torch

        return torch.cuda.memory_allocated() if self.cuda else _rss()

    def _memory_peak(self) -> int:
        import torch

        return torch.cuda.max_memory_allocated() if self.cuda else _hwm()

    def _reset_peak(self) -> bool:
        import torch

        _trim()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            return True
        return _reset_hwm()

    # -- commands ------------------------------------------------------------------------------------------------

    def setup(self) -> dict:
        import torch

        from svfit.tuner import SVFitLayer

        base = self._base()
        self.is_lm = hasattr(base, "lm_head")
        base.train()
        self.batch = self._batch(base)
        # one-time costs that every method pays alike (thread pools, kernel caches, the autograd engine) happen
        # before the baseline, so that the growth measured below is the method's own
        self._output(base)
        (torch.ones(2, requires_grad=True) * 2).sum().backward()
        _trim()
        self.mem_base = self._memory_now()
        hwm_reset_init = self._reset_peak()
        self._sync()
        t0 = time.perf_counter()
        self.model = self._adapt(base)
        self._sync()
        init_s = time.perf_counter() - t0
        init_peak = self._memory_peak() - self.mem_base

        floor = None
        ranks = None
        saving_bases = None
        if self.spec["kind"] in ("svfit", "svft"):
            weights = self._factored_weights()
            floor = 0.0
            for w in weights:
                self._sync()
                t = time.perf_counter()
                torch.linalg.svd(w.detach().float(), full_matrices=False)
                self._sync()
                floor += time.perf_counter() - t
        if self.spec["kind"] == "svfit":
            ranks = [s.r for s in self.model.svfit_summary()]
            saving_bases = sum(m.needs_saved_bases(name) for m in self.model.modules() if isinstance(m, SVFitLayer)
                               for name in m.svfit_info)
        elif self.spec["kind"] == "svft":
            ranks = [m.svft_delta.numel() for m in self.model.modules() if hasattr(m, "svft_delta")]
        params = [p for p in self.model.parameters() if p.requires_grad]
        adapter_tensor_bytes = sum(
            t.numel() * t.element_size()
            for n, t in [*self.model.named_parameters(), *self.model.named_buffers()]
            if "svfit_" in n or ".basis_" in n or "lora_" in n or "svft_" in n
        )
        self.opt = torch.optim.AdamW(params, lr=1e-3)
        self.model.train()
        self.hwm_reset_train = self._reset_peak()
        self.step_i = 0
        return {
            "device": str(self.device),
            "torch_threads": torch.get_num_threads(),
            "init_s": init_s,
            "init_peak_memory_growth_bytes": init_peak,
            "peak_reset_before_init": hwm_reset_init,
            "svd_floor_s": floor,
            "svd_matrices": len(ranks) if ranks is not None else None,
            "ranks": ranks,
            "modules_saving_bases": saving_bases,
            "trainable_params": sum(p.numel() for p in params),
            "adapter_tensor_bytes": adapter_tensor_bytes,
            "memory_after_base_load_bytes": self.mem_base,
        }

    def step(self) -> dict:
        import torch

        saved = None
        if self.step_i == 0:
            own = {t.untyped_storage().data_ptr() for t in [*self.model.parameters(), *self.model.buffers()]}
            seen: dict[int, int] = {}

            def pack(t):
                storage = t.untyped_storage()
                seen[storage.data_ptr()] = storage.nbytes()
                return t

            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                self._sync()
                t0 = time.perf_counter()
                self._train_step()
            saved = {
                "saved_for_backward_bytes": sum(seen.values()),
                "saved_activation_bytes": sum(v for k, v in seen.items() if k not in own),
            }
        else:
            self._sync()
            t0 = time.perf_counter()
            self._train_step()
        self._sync()
        dt = time.perf_counter() - t0
        self.step_i += 1
        return {"step_s": dt, "saved": saved}

    def _train_step(self):
        loss = self._loss(self.model(**self.batch))
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def finish(self) -> dict:
        import statistics

        from peft import PeftModel

        peak = self._memory_peak() - self.mem_base
        self.opt = None
        self.model.eval()
        if self.spec["kind"] == "svft":  # measured for time and memory only: no PEFT checkpoint or merge
            return {
                "peak_train_memory_growth_bytes": peak,
                "peak_memory_kind": "cuda max_memory_allocated" if self.cuda else "VmHWM - VmRSS after base load",
                "peak_reset_before_training": self.hwm_reset_train,
            }
        trained = self._output(self.model)
        adapter_dir = Path(self.tmp.name) / "adapter"
        self.model.save_pretrained(adapter_dir)
        file_bytes = (adapter_dir / "adapter_model.safetensors").stat().st_size
        dir_bytes = sum(f.stat().st_size for f in adapter_dir.iterdir() if f.is_file() and f.name != "README.md")

        fresh = self._base().eval()
        self._sync()
        t0 = time.perf_counter()
        loaded = PeftModel.from_pretrained(fresh, adapter_dir)
        self._sync()
        load_s = time.perf_counter() - t0
        load_diff = float((self._output(loaded.eval()) - trained).abs().max())
        del loaded, fresh
        _trim()

        base = self._base().eval()
        base_out = self._output(base)  # also the warm-up of the timing below
        merged = self.model.merge_and_unload().eval()
        merged_out = self._output(merged)
        merge_diff = float((merged_out - trained).abs().max())
        moved = float((merged_out - base_out).abs().max())
        t_base, t_merged = [], []
        for i in range(self.case.infer_reps):
            pair = [(base, t_base), (merged, t_merged)]
            for model, times in pair if i % 2 == 0 else pair[::-1]:
                self._sync()
                t0 = time.perf_counter()
                self._output(model)
                self._sync()
                times.append(time.perf_counter() - t0)
        base_med, merged_med = statistics.median(t_base), statistics.median(t_merged)
        del base, merged
        cache = self._cache_reinit() if self.method == "svfit" else {}
        return {
            **cache,
            "peak_train_memory_growth_bytes": peak,
            "peak_memory_kind": "cuda max_memory_allocated" if self.cuda else "VmHWM - VmRSS after base load",
            "peak_reset_before_training": self.hwm_reset_train,
            "adapter_file_bytes": file_bytes,
            "adapter_dir_bytes": dir_bytes,
            "load_s": load_s,
            "load_max_abs_diff": load_diff,
            "merge_max_abs_diff": merge_diff,
            "trained_vs_base_max_abs_diff": moved,
            "base_forward_s": base_med,
            "merged_forward_s": merged_med,
            "merged_forward_over_base": merged_med / base_med,
            "forward_times_base_s": t_base,
            "forward_times_merged_s": t_merged,
        }


    def _cache_reinit(self) -> dict:
        """get_peft_model on a fresh base with the SVD cache on: once to fill it (untimed), once timed."""
        from peft import get_peft_model

        import svfit

        svfit.set_svd_cache(Path(self.tmp.name) / "svd-cache")
        try:
            get_peft_model(self._base(), self._config())
            _trim()
            base = self._base()
            self._sync()
            t0 = time.perf_counter()
            get_peft_model(base, self._config())
            self._sync()
            return {"cache_reinit_s": time.perf_counter() - t0}
        finally:
            svfit.set_svd_cache(None)


def _worker_entry(conn, case: dict, method: str) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    m = None
    try:
        import svfit  # noqa: F401  (registers SVFit with PEFT, also for from_pretrained)

        m = _Measure(case, method)
        conn.send({"ready": True})
        while True:
            cmd = conn.recv()
            if cmd == "quit":
                break
            conn.send(getattr(m, cmd)())
    except EOFError:
        pass
    except Exception:  # noqa: BLE001  (any failure goes back to the parent, with its traceback)
        conn.send({"error": traceback.format_exc()})
    finally:
        if m is not None:
            m.tmp.cleanup()
        conn.close()


# ---------------------------------------------------------------------------------------------------------------
# report


def _load_results(results: Path, folder: str = NAME) -> list[dict]:
    files = sorted((Path(results) / folder).glob("*.json"))
    out = []
    for f in files:
        try:
            out.append(json.loads(f.read_text()))
        except (OSError, json.JSONDecodeError):
            continue
    return out


def _fmt_bytes(b) -> str:
    if b is None or (isinstance(b, float) and math.isnan(b)):
        return "–"
    for unit, div in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(b) >= div:
            return f"{b / div:.1f} {unit}"
    return f"{int(b)} B"


def _fmt_s(s) -> str:
    if s is None:
        return "–"
    return f"{s * 1000:.1f} ms" if s < 1 else f"{s:.2f} s"


def _fmt_ratio(r) -> str:
    return "–" if r is None else f"{r:.2f}×"


def section(results: Path, plots: Path, link_prefix: str = "benchmarks/plots") -> str:
    from svfit.train.results import machine_name

    runs = _load_results(results)
    head = "## Cost of SVFit against LoRA r=8 (time, memory, init, load, file size)\n\n"
    if not runs:
        return head + "Not run: no results under `" + str(Path(results) / NAME) + "` (run `python -m benchmarks run --only cost`).\n"
    lines = [head.rstrip("\n"), ""]
    lines.append(
        "Every ratio is SVFit / LoRA r=8 measured in the same run, on the same model and the same batch; each "
        "method runs in a fresh process of its own and the processes take turns step by step. Step time is "
        "forward + backward + AdamW; activations are the bytes autograd saves for backward, without the model's "
        "own weights; peak memory is the growth of the peak RSS over the RSS after loading the base model (CPU) or "
        "of `max_memory_allocated` (CUDA). Init is the first `get_peft_model` in the process; its floor is "
        "`torch.linalg.svd` of the same matrices. Load is `PeftModel.from_pretrained` onto a fresh base."
    )
    lines.append("")
    done = [r for r in runs if "methods" in r.get("train_info", {})]
    for r in runs:
        if "skipped" in r.get("train_info", {}):
            lines.append(f"- `{r['run_info']['case']}` not run: {r['train_info']['skipped']}")
    if not done:
        return "\n".join(lines) + "\n"
    sysinfo = done[0]["meta_info"]["system_info"]
    lines.append(
        f"Machine: {machine_name(sysinfo)}, {sysinfo.get('cpu_count')} CPU cores, accelerator: "
        f"{sysinfo.get('accelerator')}. The load average is the machine's 1-minute load before and after each case: "
        "above the torch thread count, other work was competing for the cores."
        + (" **Quick run (tiny random models): for checking the code, not for quoting.**"
           if any(r["run_info"].get("quick") for r in done) else "")
    )
    lines.append("")
    lines.append("| case | model | targets | batch | timed steps (+ warm-up) | torch threads | load average |")
    lines.append("|---|---|---|---|---|---|---|")
    for r in done:
        ri = r["run_info"]
        threads = sorted({v.get("torch_threads") for v in r["train_info"]["methods"].values()} - {None}) or [
            ri.get("torch_threads_in_workers", "–")]
        load = ri.get("load_average_before"), ri.get("load_average_after")
        load_txt = f"{load[0][0]:.1f} → {load[1][0]:.1f}" if all(load) else "–"
        targets = ri["targets"] if isinstance(ri["targets"], str) else ", ".join(ri["targets"])
        lines.append(f"| {ri['case']} | {ri['model']} | {targets} | {ri['batch']['batch_size']}×"
                     f"{ri['batch']['seq_len']} | {ri['steps_timed']} (+{ri['warmup_steps']}) | "
                     f"{', '.join(map(str, threads)) or '–'} | {load_txt} |")
    lines.append("")
    lines.extend(_goals(done, Path(results)))
    # ratio table
    lines.append("| case | batch | method | " + " | ".join(v[0] for v in RATIO_KEYS.values()) + " | init / SVD floor |")
    lines.append("|---|---|---|" + "---|" * (len(RATIO_KEYS) + 1))
    for r in done:
        ri, ti = r["run_info"], r["train_info"]
        for m, ratios in ti["ratios_vs_lora_r8"].items():
            cells = [_fmt_ratio(ratios.get(k)) for k in RATIO_KEYS]
            lines.append(f"| {ri['case']} | {ri['batch']['batch_size']}×{ri['batch']['seq_len']} | "
                         f"{ti['methods'][m]['label']} | " + " | ".join(cells)
                         + f" | {_fmt_ratio(ratios.get('init_over_svd_floor'))} |")
    lines.append("")
    lines.append("Absolute numbers:")
    lines.append("")
    lines.append("| case | method | trainable | step median (IQR) | activations | peak mem growth | adapter tensors "
                 "(bases, vectors) | init | SVD floor | load | file | merged fwd / base fwd |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in done:
        ri, ti = r["run_info"], r["train_info"]
        for m, v in ti["methods"].items():
            file_bytes = f"{v['adapter_file_bytes']:,} B" if v.get("adapter_file_bytes") is not None else "–"
            merged = (f"{_fmt_s(v['merged_forward_s'])} / {_fmt_s(v['base_forward_s'])} "
                      f"({_fmt_ratio(v['merged_forward_over_base'])})") if v.get("merged_forward_s") else "–"
            lines.append(
                f"| {ri['case']} | {v['label']} | {v['trainable_params']:,} | {_fmt_s(v['step_time_median_s'])} "
                f"({_fmt_s(v['step_time_iqr_s'])}) | {_fmt_bytes(v.get('saved_activation_bytes'))} | "
                f"{_fmt_bytes(v.get('peak_train_memory_growth_bytes'))} | "
                f"{_fmt_bytes(v.get('adapter_tensor_bytes'))} | {_fmt_s(v['init_s'])} | "
                f"{_fmt_s(v.get('svd_floor_s'))} | {_fmt_s(v.get('load_s'))} | {file_bytes} | {merged} |"
            )
    lines.append("")
    notes = sorted({n for r in done for n in r["run_info"].get("notes", [])})
    for n in notes:
        lines.append(f"- Note: {n}")
    resets = all(v.get("peak_reset_before_training") for r in done for v in r["train_info"]["methods"].values())
    if not resets:
        lines.append("- Note: the peak-RSS reset was refused on this machine, so some peaks include the init peak.")
    if notes or not resets:
        lines.append("")
    png = _plot(done, Path(plots))
    lines.append(f"![SVFit / LoRA r=8 cost ratios]({link_prefix.rstrip('/')}/{png})")
    lines.append("")
    return "\n".join(lines)


def _verdict(value, limit) -> str:
    if value is None:
        return "–"
    return f"{value:.2f} {'✅ met' if value <= limit else '❌ not met'}"


def _goals(done: list[dict], results: Path) -> list[str]:
    """Issue #6's goals: before (the reference side branch, same run; and the run before the change, kept in
    ``cost-before/``) and after (default fast paths)."""
    earlier = {r["run_info"]["case"]: r for r in _load_results(results, BEFORE)}
    lines = ["### Goals of the fast paths (before → after)", "",
             "After: the default `compute_path=\"auto\"`. Before, same run: SVFit's reference side branch "
             "((x V_r) ⊙ c) U_rᵀ, measured next to it and LoRA r=8. Before, earlier run: the committed results of the "
             "last run before the fast paths and the init changes (`benchmarks/results/cost-before/`, same machine; "
             "only its ratios are comparable, not its absolute times).", "",
             "| case | measurement | goal | before (earlier run) | before (same run) | after |", "|---|---|---|---|---|---|"]
    for r in done:
        ri, ti = r["run_info"], r["train_info"]
        ratios = ti["ratios_vs_lora_r8"]
        kind = ri["case"].rsplit("-", 1)[-1]
        after, before = ratios.get("svfit", {}), ratios.get("svfit-reference", {})
        old = earlier.get(ri["case"], {}).get("train_info", {}).get("ratios_vs_lora_r8", {}).get("svfit", {})
        for key, limit in GOALS.get(kind, {}).items():
            lines.append(f"| {ri['case']} | {RATIO_KEYS[key][0]} / LoRA | ≤ {limit:.2f} | "
                         f"{_verdict(old.get(key), limit)} | {_verdict(before.get(key), limit)} | "
                         f"{_verdict(after.get(key), limit)} |")
        lines.append(f"| {ri['case']} | cold init / SVD floor | ≤ {INIT_GOAL:.2f} | "
                     f"{_verdict(old.get('init_over_svd_floor'), INIT_GOAL)} | "
                     f"{_verdict(before.get('init_over_svd_floor'), INIT_GOAL)} | "
                     f"{_verdict(after.get('init_over_svd_floor'), INIT_GOAL)} |")
        reinit = ti["methods"].get("svfit", {}).get("cache_reinit_s")
        if reinit is not None:
            lines.append(f"| {ri['case']} | re-init from the SVD cache (s) | ≤ {CACHE_GOAL_S:.1f} s | – | – | "
                         f"{_verdict(reinit, CACHE_GOAL_S)} |")
        merged = ti["methods"].get("svfit", {}).get("merged_forward_over_base")
        if merged is not None:
            lines.append(f"| {ri['case']} | merged inference / base | = 1 (noise ±5%) | – | – | {merged:.2f} |")
        svft = ti["methods"].get("svft")
        ours = ti["methods"].get("svfit")
        if svft and ours:
            lines.append(
                f"| {ri['case']} | SVFit / SVFT-style: step time, adapter tensors | < 1 | – | – | "
                f"{_fmt_ratio(_ratio(ours['step_time_median_s'], svft['step_time_median_s']))}, "
                f"{_fmt_ratio(_ratio(ours.get('adapter_tensor_bytes'), svft.get('adapter_tensor_bytes')))} |")
    lines.append("")
    return lines


def _plot(done: list[dict], plots: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    plots.mkdir(parents=True, exist_ok=True)
    rows = [(r["run_info"]["case"], m, ti_m) for r in done
            for m, ti_m in r["train_info"]["ratios_vs_lora_r8"].items()]
    keys = list(RATIO_KEYS)
    fig, ax = plt.subplots(figsize=(11, 4.5))
    width = 0.8 / max(len(rows), 1)
    x = np.arange(len(keys))
    for i, (case, m, ratios) in enumerate(rows):
        vals = [ratios.get(k) or np.nan for k in keys]
        # tab20: 20 distinct colours, where the default cycle repeats after 10 series
        ax.bar(x + i * width - 0.4 + width / 2, vals, width, label=f"{case}: {m}", color=plt.cm.tab20(i % 20))
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_yscale("log")
    ax.set_xticks(x)
    ax.set_xticklabels([RATIO_KEYS[k][0] for k in keys], rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("SVFit / LoRA r=8 (log)")
    ax.set_title("Cost of SVFit relative to LoRA r=8 (below 1: SVFit cheaper)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    name = "cost_ratios.png"
    fig.savefig(plots / name, dpi=110)
    plt.close(fig)
    return name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
