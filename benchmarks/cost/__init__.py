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

Modules: ``spec`` (cases, methods, goals), ``run`` (the parent: one worker process per method), ``worker`` (the
measurements inside a worker) and ``report`` (the markdown section and plot).
"""

from benchmarks.cost.report import section
from benchmarks.cost.run import main, measure_case, run
from benchmarks.cost.spec import METHODS, NAME, REFERENCE, Case, cases
from benchmarks.cost.worker import LOADERS

__all__ = ["LOADERS", "METHODS", "NAME", "REFERENCE", "Case", "cases", "main", "measure_case", "run", "section"]
