"""svfit's benchmarks: `python -m benchmarks run [--quick]` measures, `python -m benchmarks report` writes
BENCHMARKS.md and its plots from the JSON results alone."""
