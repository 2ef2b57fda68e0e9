"""svfit's benchmarks: `python -m benchmarks run [--quick]` measures, `python -m benchmarks report` writes
BENCHMARKS.md and its plots from the JSON results alone."""

from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"  # the committed results (measured on the project's CPU machine)
ACCELERATOR_RESULTS = RESULTS.parent / "results-cuda"  # beside them: what `--device cuda` measured (benchmarks/device)
