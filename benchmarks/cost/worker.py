"""The cost benchmark's worker side: a fresh process per method that builds the model, times steps, init, load and
merged inference, and reads its own memory from /proc."""

from __future__ import annotations

import os
import tempfile
import time
import traceback
from pathlib import Path

from benchmarks.cost.spec import METHODS, Case
from benchmarks.procmem import peak_rss, reset_peak_rss, rss, trim


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

        return torch.cuda.memory_allocated() if self.cuda else rss()

    def _memory_peak(self) -> int:
        import torch

        return torch.cuda.max_memory_allocated() if self.cuda else peak_rss()

    def _reset_peak(self) -> bool:
        import torch

        trim()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            return True
        return reset_peak_rss()

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
        trim()
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
        trim()

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
            trim()
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


