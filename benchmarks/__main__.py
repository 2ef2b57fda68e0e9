"""`python -m benchmarks run|report`: one command for every measurement, one for the report."""

from __future__ import annotations

import importlib
import json
import time
from pathlib import Path
from typing import Optional

import typer

from benchmarks import ACCELERATOR_RESULTS, RESULTS
from svfit.train.results import machine_name, meta_info, now_iso, system_info, write_json

HERE = Path(__file__).resolve().parent
PARTS = ("params", "quality", "dreambooth", "dropin", "cost", "memory", "init", "scaling")  # timing parts last, alone

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)


def _provenance(results: Path) -> str:
    """When the results were measured and from which commits: they are measured part by part, often over
    several sittings, and the report must not read as one run."""
    stamps, commits, unrecorded = [], set(), 0
    for path in results.rglob("*.json"):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(data, dict) or "run_info" not in data:
            continue
        if data["run_info"].get("created_at"):
            stamps.append(data["run_info"]["created_at"])
        code = data.get("meta_info", {}).get("code_version")
        if code and code.get("git_commit"):
            commits.add(code["git_commit"][:7] + ("+dirty" if code.get("git_dirty") else ""))
        else:
            unrecorded += 1
    if not stamps:
        return ""
    text = f"Results measured between {min(stamps)} and {max(stamps)}, part by part (not in one sitting)"
    if commits:
        text += f", from commit(s) {', '.join(sorted(commits))}"
    if unrecorded:
        text += f"; {unrecorded} result files predate the recording of the code version"
    return text + "."


def _shown(path: Path) -> str:
    """A results folder as the report names it: relative to the repository when inside it."""
    try:
        return str(path.resolve().relative_to(HERE.parent.resolve()))
    except ValueError:
        return str(path)


def _module(name: str):
    return importlib.import_module(f"benchmarks.{name}")


def _exists(part: str) -> bool:
    return (HERE / f"{part}.py").is_file() or (HERE / part / "__init__.py").is_file()


@app.command()
def run(
    quick: bool = typer.Option(False, "--quick", help="Tiny slices and models: checks the pipeline in about a minute"),
    only: Optional[list[str]] = typer.Option(None, "--only", help=f"Run some parts only: {', '.join(PARTS)}"),
    tasks: Optional[list[str]] = typer.Option(None, "--task", help="quality: these tasks only"),
    device: str = typer.Option("cpu", help="quality: cpu (the 2-core budget) or cuda (whole training sets, more "
                               "epochs; untested)"),
    results: Optional[Path] = typer.Option(
        None, help="Where the JSON results go (default: benchmarks/results; benchmarks/results-quick with --quick, "
        "benchmarks/results-cuda with --device cuda)"
    ),
    report_to: Optional[Path] = typer.Option(
        None, "--report", help="Markdown report to write afterwards (default: BENCHMARKS.md beside the repository's "
        "results, or inside --results for any other results folder)"
    ),
):
    """Run the benchmarks (skipping quality experiments whose JSON already exists), then write the report."""
    parts = list(only or PARTS)
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise typer.BadParameter(f"unknown part(s) {unknown}; choose from {', '.join(PARTS)}")
    if results is None:  # quick results must never mix into the real ones
        results = HERE / "results-quick" if quick else ACCELERATOR_RESULTS if device == "cuda" else RESULTS
    results.mkdir(parents=True, exist_ok=True)
    timings = {}
    for part in parts:
        t0 = time.perf_counter()
        typer.echo(f"== {part}")
        module = _module(part)
        if part == "quality":
            try:
                module.run(results, quick, tasks=tasks, log=typer.echo, device=device)
            except ValueError as exc:
                raise typer.BadParameter(str(exc)) from None
        else:
            module.run(results, quick)
        timings[part] = time.perf_counter() - t0
    # parts are often run separately (timing parts alone): the log keeps each part's latest duration
    log_path = results / "run_log.json"
    seconds = {}
    if log_path.is_file():
        seconds = json.loads(log_path.read_text())["train_info"].get("seconds_per_part", {})
    seconds.update(timings)
    write_json(log_path, {
        "run_info": {"created_at": now_iso(), "quick": quick, "parts": sorted(seconds), "tasks": tasks,
                     "total_time": sum(seconds.values())},
        "train_info": {"seconds_per_part": seconds},
        "meta_info": meta_info("(several)", "(several)"),
    })
    report(results=results, out=report_to)


@app.command()
def report(
    results: Path = typer.Option(RESULTS, help="Where the JSON results are"),
    out: Optional[Path] = typer.Option(
        None, help="The markdown file to write (default: the repository's BENCHMARKS.md for benchmarks/results, "
        "else BENCHMARKS.md inside --results)"
    ),
):
    """Write the markdown report and its PNG plots from the JSON results (measures nothing)."""
    if out is None:  # only the committed results may rewrite the committed report and plots
        same = results.resolve() == RESULTS.resolve()
        out = HERE.parent / "BENCHMARKS.md" if same else results / "BENCHMARKS.md"
    plots = out.parent / "benchmarks" / "plots" if out.parent == HERE.parent else out.parent / "plots"
    link_prefix = str(plots.relative_to(out.parent))
    sections = [_module(part).section(results, plots, link_prefix=link_prefix) for part in PARTS if _exists(part)]
    system = system_info()
    log = results / "run_log.json"
    when = ""
    if log.is_file():
        info = json.loads(log.read_text())
        system = info["meta_info"]["system_info"]  # the machine that measured, not the one writing the report
        per_part = ", ".join(f"{k} {v / 60:.0f} min" for k, v in info["train_info"]["seconds_per_part"].items())
        when = (f"{_provenance(results)} Wall time of each part's latest invocation: {per_part}. A resumed part "
                "counts only what it re-ran, so these do not add up to a full run: the quality section states its "
                "whole compute (the sum of its experiments' wall times) and the dreambooth section its per-run times.")
    header = [
        "# svfit benchmarks",
        "",
        f"Generated by `python -m benchmarks report` from the JSON files in `{_shown(results)}/` (never typed by "
        "hand); `python -m benchmarks run` re-measures. Every number was measured by us, every ratio against LoRA in "
        "the same run on the same machine. Nothing is quoted from the SVFit paper.",
        "",
        f"Machine: {machine_name(system)}, {system.get('cpu_count')} CPU cores, "
        f"torch threads {system.get('torch_threads')}, accelerator: {system.get('accelerator')}. {when}",
        "",
    ]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(header) + "\n" + "\n".join(sections))
    typer.echo(f"wrote {out} and {plots}/")


if __name__ == "__main__":
    app()
