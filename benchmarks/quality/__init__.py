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

Modules: ``plan`` (rows and budgets), ``run`` (phases, jobs, workers, resume), ``analysis`` (picks, rows, verdicts,
from the JSON alone) and ``report`` (the markdown section and plots).
"""
from benchmarks.quality.analysis import (
    BOUND,
    END_GAP_LIMIT,
    choose,
    final_valid,
    grid_points,
    load,
    mcnemar,
    paired_interval,
    row,
    test_accuracy,
    verdict,
)
from benchmarks.quality.plan import ABLATIONS, ALL, CPU, CUDA, QUICK, VARIANTS, Profile, TaskPlan, Variant, profile_for
from benchmarks.quality.report import section
from benchmarks.quality.run import Bench, Job, execute, run, same_setting

__all__ = [
    "ABLATIONS", "ALL", "BOUND", "CPU", "CUDA", "END_GAP_LIMIT", "QUICK", "VARIANTS", "Bench", "Job", "Profile",
    "TaskPlan", "Variant", "choose", "execute", "final_valid", "grid_points", "load", "mcnemar", "paired_interval",
    "profile_for", "row", "run", "same_setting", "section", "test_accuracy", "verdict",
]
