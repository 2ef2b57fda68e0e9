"""The ``svfit`` command line: fine-tune a real pre-trained model on real data in one command, re-score and query
saved runs, and inspect what SVFit keeps of each weight's spectrum."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

from ._extras import require as _require_extras  # noqa: E402

_require_extras("the svfit CLI", "typer", "rich")  # MissingExtraError, printed as one line by svfit.__main__

import typer  # noqa: E402

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    help="SVFit: fine-tune only the top singular values of pre-trained weights (arXiv 2409.05926).",
)

TASK_HELP = "sentiment (default) | subjectivity | vit-fashion | fashion | lm-sentiment"
METHOD_HELP = "svfit (default) | lora | pissa | ia3 | full"


from .errors import SVFitUserError as UserError  # noqa: E402  (printed as one line, exit code 1)


def _fail(message: str, code: int = 1):
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _guard(fn, *args, **kwargs):
    """Run a command body; turn expected failures (bad input, missing assets, unwritable output, corrupt files)
    into one line on stderr and a non-zero exit, without a traceback."""
    from .assets import AssetMissingError
    from .tuner import BaseWeightMismatchError

    try:
        return fn(*args, **kwargs)
    except typer.Exit:
        raise
    except KeyboardInterrupt:
        _fail("interrupted; nothing was written", 130)
    except (UserError, AssetMissingError, BaseWeightMismatchError, OSError, FloatingPointError) as exc:
        _fail(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
    except ImportError as exc:
        from ._extras import extra_for, message

        extra = extra_for(exc)
        if extra is None or os.environ.get("SVFIT_DEBUG"):
            raise
        _fail(message("this command", extra, exc.name.split(".")[0]))
    except (ValueError, KeyError, TypeError) as exc:
        if os.environ.get("SVFIT_DEBUG"):
            raise
        _fail(f"{exc} (set SVFIT_DEBUG=1 for a traceback)")


def _on_terminal() -> bool:
    """Both streams are a terminal: the progress bar (stderr) is seen, and so is everything else. Otherwise (a log
    file, a pipe, nohup, a notebook cell) progress is printed as plain lines on stdout, next to the results."""
    return sys.stdout.isatty() and sys.stderr.isatty()


def _parse_rank(rank: Optional[str]):
    if rank is None:
        return None
    if rank == "full":
        return "full"
    try:
        value = int(rank)
    except ValueError:
        raise UserError(f"--rank must be an integer or 'full', got {rank!r}") from None
    if value < 1:
        raise UserError(f"--rank must be >= 1, got {value}")
    return value


def _parse_targets(targets: Optional[str]):
    if targets is None:
        return None
    if targets.startswith("re:"):
        import re

        try:
            re.compile(targets[3:])
        except re.error as exc:
            raise UserError(f"--targets {targets!r} is not a valid regular expression: {exc}") from None
        return targets[3:]
    names = [t.strip() for t in targets.split(",") if t.strip()]
    if not names:
        raise UserError("--targets is empty; give comma-separated module names, or re:REGEX")
    return names


@app.command()
def train(
    task: str = typer.Option("sentiment", help=TASK_HELP),
    method: str = typer.Option("svfit", help=METHOD_HELP),
    model: Optional[str] = typer.Option(
        None, help="Replace the task's bundled model with a local model directory or a Hugging Face Hub id"
    ),
    out: Optional[Path] = typer.Option(None, help="Output directory [default: runs/TASK-METHOD]"),
    seed: int = typer.Option(0, help="Seed for the data split, the new head and the data order."),
    epochs: Optional[float] = typer.Option(None, help="Epochs (fractions allowed) [default: per task]"),
    lr: Optional[float] = typer.Option(
        None, help="Learning rate of the adapter (singular values for svfit) [default: per task and method]"
    ),
    head_lr: Optional[float] = typer.Option(None, "--head-lr", help="Learning rate of the new head [default: per task]"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Batch size [default: per task]"),
    train_limit: Optional[int] = typer.Option(None, "--train-limit", help="Train on the first N examples of the split"),
    eval_limit: Optional[int] = typer.Option(None, "--eval-limit", help="Score on the first N held-out examples"),
    limit: Optional[int] = typer.Option(
        None, help="Smoke-test size: sets --train-limit N and --eval-limit N//2 (at least 8)"
    ),
    targets: Optional[str] = typer.Option(
        None, help="Target modules, comma-separated (e.g. query,value) or re:REGEX [default: per task]"
    ),
    rank: Optional[str] = typer.Option(
        None, help="svfit: fixed r or 'full' [default: threshold]; lora/pissa: rank [default: 8]"
    ),
    threshold: float = typer.Option(0.99, help="svfit: share of the spectrum the kept singular values hold"),
    information: str = typer.Option("energy", help="svfit: measure the share on sigma^2 (energy) or sigma (nuclear)"),
    parametrization: str = typer.Option("delta", help="svfit: delta (default) | sigma | scale"),
    weight_decay: float = typer.Option(0.0, "--weight-decay", help="AdamW weight decay"),
    validation: bool = typer.Option(
        False, "--validation", help="Score on a validation split of the training data, not the test split (tuning)"
    ),
    eval_every: Optional[int] = typer.Option(
        None, "--eval-every", help="Also score the validation split (--val-examples held-out training examples) every N "
        "steps (learning curve in result.json)"
    ),
    val_examples: int = typer.Option(200, "--val-examples", help="Size of the validation split for --eval-every"),
    steps: Optional[int] = typer.Option(None, help="Train for exactly N optimizer steps (replaces --epochs)"),
    split_seed: Optional[int] = typer.Option(
        None, "--split-seed", help="Seed of the train/test split [default: --seed]; fix it to keep one test set across seeds"
    ),
    bucket_by_length: bool = typer.Option(
        False, "--bucket-by-length", help="Batch examples of similar length together (text tasks: less padding)"
    ),
    head_init: Optional[Path] = typer.Option(
        None, "--head-init", help="Start the new head from a probe (head.safetensors written by `svfit probe`): LP-FT"
    ),
    image_size: Optional[int] = typer.Option(None, "--image-size", help="Image tasks: input side in pixels [default: 112]"),
    save_bases: bool = typer.Option(False, "--save-bases", help="svfit: also save U_r, V_r (bigger file, no SVD at load)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out directory"),
    quiet: bool = typer.Option(
        False, "--quiet", help="No progress (a bar on a terminal; a line per 10 steps in a log or a pipe)"
    ),
):
    """Fine-tune a pre-trained model on a task; print accuracy before and after; save the adapter and result.json.

    The bundled models and data come from installed packages (no hub access needed). Writes OUT/adapter/ (PEFT format; OUT/model/ for full
    fine-tuning) and OUT/result.json (PEFT method_comparison schema), atomically.
    """

    def body():
        from .methods import MethodOptions, get_method
        from .tasks import get_task
        from .train.run import RunConfig, train_run

        get_task(task, model)
        get_method(method)
        train_n, eval_n = train_limit, eval_limit
        if limit is not None:
            if limit < 1:
                raise UserError(f"--limit must be >= 1, got {limit}")
            train_n = limit if train_n is None else train_n
            eval_n = max(8, limit // 2) if eval_n is None else eval_n
        for name, value in (("--train-limit", train_n), ("--eval-limit", eval_n)):
            if value is not None and value < 1:
                raise UserError(f"{name} must be >= 1, got {value}")
        options = MethodOptions(
            targets=_parse_targets(targets),
            rank=_parse_rank(rank),
            threshold=threshold,
            information=information,
            parametrization=parametrization,
            save_bases=save_bases,
        )
        config = RunConfig(
            task=task, method=method, model=model, out=out or Path("runs") / f"{task}-{method}", seed=seed, epochs=epochs, lr=lr,
            head_lr=head_lr, batch_size=batch_size, train_limit=train_n, eval_limit=eval_n,
            weight_decay=weight_decay, validation=validation, eval_every=eval_every, options=options,
            curve_examples=val_examples, steps=steps, split_seed=split_seed, bucket_by_length=bucket_by_length,
            head_init=None if head_init is None else str(head_init), image_size=image_size,
            overwrite=overwrite or out is None,  # the default location is ours to refresh
            progress=not quiet and sys.stderr.isatty(),
            progress_lines=not quiet and not _on_terminal(),
        )
        _quiet_libraries()
        train_run(config, echo=typer.echo)

    _guard(body)


@app.command()
def probe(
    task: str = typer.Option("sentiment", help=TASK_HELP),
    out: Optional[Path] = typer.Option(None, help="Output directory [default: runs/TASK-probe]"),
    seed: int = typer.Option(0, help="Seed of the data split"),
    train_limit: Optional[int] = typer.Option(None, "--train-limit", help="Fit on the first N training examples"),
    eval_limit: Optional[int] = typer.Option(None, "--eval-limit", help="Score on the first N held-out examples"),
    val_examples: int = typer.Option(200, "--val-examples", help="Validation split (from the training data) for the L2"),
    image_size: Optional[int] = typer.Option(None, "--image-size", help="Image tasks: input side in pixels"),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out directory"),
):
    """Linear probe on the frozen pre-trained features: the floor for fine-tuning, and a head to start from.

    Writes OUT/probe.json (validation and held-out accuracy of each probe) and OUT/head.safetensors, which
    `svfit train --head-init OUT/head.safetensors` loads into the new head before training (LP-FT). Use the same
    --seed / --train-limit / --val-examples as the training runs, so that the probe sees their training split.
    """

    def body():
        from .train.probe import probe_run
        from .train.run import RunConfig

        config = RunConfig(task=task, out=out or Path("runs") / f"{task}-probe", seed=seed, train_limit=train_limit,
                           eval_limit=eval_limit, curve_examples=val_examples, image_size=image_size, overwrite=overwrite or out is None, progress=False)
        _quiet_libraries()
        probe_run(config, echo=typer.echo)

    _guard(body)


@app.command("eval")
def eval_(
    run_dir: Path = typer.Argument(..., help="A directory written by `svfit train`"),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars"),
):
    """Re-score a saved run on its own held-out split and compare with the recorded accuracy."""

    def body():
        from .train.results import held_out
        from .train.run import eval_run

        _quiet_libraries()
        metrics, recorded = eval_run(run_dir, progress=not quiet and sys.stderr.isatty())
        typer.echo(
            f"accuracy {metrics['accuracy']:.4f}  loss {metrics['loss']:.4f}  on {metrics['examples']} examples "
            f"(recorded at training: accuracy {held_out(recorded)['accuracy']:.4f})"
        )

    _guard(body)


@app.command()
def predict(
    run_dir: Path = typer.Argument(..., help="A directory written by `svfit train`"),
    inputs: list[str] = typer.Argument(..., help="Text(s) to classify, or image path(s) for fashion / vit-fashion"),
):
    """Predict with a saved run: prints the label and its probability for each input."""

    def body():
        from .train.run import load_run

        _quiet_libraries()
        task, model, _ = load_run(run_dir)
        for raw in inputs:
            p = task.predict(model, raw)
            said = f"  (generated: {p.generated!r})" if p.generated is not None else ""
            typer.echo(f"{p.label}\t{p.probability:.3f}\t{raw if task.input_kind == 'text' else Path(raw).name}{said}")

    _guard(body)


@app.command()
def inspect(
    model_or_dir: str = typer.Argument(
        ..., help="A run directory (after fine-tuning), a task name (its pre-trained model), or a HF model dir / hub id"
    ),
    targets: Optional[str] = typer.Option(None, help="Target modules for a task or model [default: per task/model]"),
    rank: Optional[str] = typer.Option(None, help="Fixed r or 'full' [default: threshold]"),
    threshold: float = typer.Option(0.99, help="Share of the spectrum to keep"),
    information: str = typer.Option("energy", help="energy | nuclear"),
    plot: Optional[Path] = typer.Option(
        None, help="Where to write the spectrum plot: .png, .pdf or .svg [default: DIR/spectrum.png or ./]"
    ),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the table as JSON"),
):
    """Per-module table (shape, chosen r, share of the spectrum kept, trainable count) and a spectrum plot."""

    def body():
        from .inspect import PLOT_FORMATS, check_output_file

        is_run = (Path(model_or_dir) / "result.json").is_file()
        parsed_targets = _parse_targets(targets)
        parsed_rank = _parse_rank(rank)
        # every output is checked before any computation, and written only once all of it is ready
        plot_path = check_output_file(plot or _default_plot(model_or_dir, is_run), "--plot", PLOT_FORMATS)
        if json_out:
            check_output_file(json_out, "--json")
        _quiet_libraries()
        rows, title = _inspect_rows(model_or_dir, is_run, parsed_targets, parsed_rank, threshold, information)
        if not rows:
            raise UserError(f"{model_or_dir} has no SVFit modules to inspect (was it trained with --method svfit?)")
        _print_table(rows, title)
        _write_inspection(rows, title, plot_path, json_out)
        typer.echo(f"spectrum plot: {plot_path}")

    _guard(body)


def _default_plot(arg: str, is_run: bool) -> Path:
    return Path(arg) / "spectrum.png" if is_run else Path(f"spectrum-{Path(arg).name}.png")


def _inspect_rows(arg, is_run, targets, rank, threshold, information):
    """(rows, title) for a run dir (read from its adapter, no SVD), a task name or a model dir (adapted afresh)."""
    from .inspect import run_spectra, spectra

    if is_run:
        rows, task = run_spectra(Path(arg))
        return rows, f"{task.name}: SVFit after fine-tuning"
    from peft import get_peft_model

    from .tasks import TASK_NAMES, get_task
    from .tuner import SVFitConfig

    path = Path(arg)
    config_kwargs = dict(r=rank, threshold=threshold, information=information)
    if arg in TASK_NAMES:
        task = get_task(arg)
        chosen = targets or task.targets
        chosen = list(chosen) if isinstance(chosen, tuple) else chosen
        model = get_peft_model(task.load_model(), SVFitConfig(target_modules=chosen, **config_kwargs))
        return spectra(model, trained=False), f"{task.model_name}: pre-trained spectra"
    if (path / "config.json").is_file() or (not path.exists() and arg.count("/") == 1):
        from transformers import AutoModel

        model = AutoModel.from_pretrained(arg)  # a local directory, or a hub id for users with hub access
        model = get_peft_model(model, SVFitConfig(target_modules=targets, **config_kwargs))
        return spectra(model, trained=False), f"{path.name}: pre-trained spectra"
    raise UserError(
        f"{arg!r} is neither a run directory (with result.json), a task ({', '.join(TASK_NAMES)}), nor a model "
        "directory (with config.json)"
    )


def _write_inspection(rows, title: str, plot_path: Path, json_out: Optional[Path]) -> None:
    """The plot and the JSON table together: both files or neither."""
    from .inspect import save_figure, write_outputs

    writers = [(plot_path, "--plot", lambda tmp: save_figure(rows, tmp, title, plot_path.suffix))]
    if json_out:
        from .train.results import _jsonable

        def write_table(tmp: Path) -> None:
            import json

            table = {"title": title, "modules": [_row_json(r) for r in rows]}
            tmp.write_text(json.dumps(table, indent=2, default=_jsonable) + "\n")

        writers.append((json_out, "--json", write_table))
    write_outputs(writers)


@app.command()
def dreambooth(
    model: Optional[Path] = typer.Option(
        None, help="Local diffusers text-to-image pipeline dir (unet/, text_encoder/, tokenizer/, scheduler/, "
        "optional vae/) [default: the bundled Fashion-MNIST demo]"
    ),
    instance_dir: Optional[Path] = typer.Option(
        None, "--instance-dir", help="Folder of 3-10 photos of the subject [default with the demo: 8 ankle boots]"
    ),
    instance_prompt: Optional[str] = typer.Option(
        None, "--instance-prompt", help="Prompt with a rare token, e.g. 'a photo of sks dog' [demo: 'a photo of sks shoe']"
    ),
    class_prompt: Optional[str] = typer.Option(
        None, "--class-prompt", help="Class prompt for prior preservation, e.g. 'a photo of a dog' [default: none; "
        "demo: 'a photo of a shoe']"
    ),
    method: str = typer.Option("svfit", help="svfit (default) | lora | full"),
    targets: Optional[str] = typer.Option(
        None, help="UNet target modules, comma-separated [default: to_q,to_k,to_v,to_out.0]"
    ),
    conv: bool = typer.Option(False, "--conv", help="Also adapt the UNet's ResNet 3x3 convolutions (conv1, conv2)"),
    train_text_encoder: bool = typer.Option(
        False, "--train-text-encoder", help="Also adapt the text encoder's attention (q/k/v/out_proj)"
    ),
    rank: Optional[int] = typer.Option(None, help="lora: rank [default: 4]; svfit: fixed r [default: 0.99 threshold]"),
    steps: int = typer.Option(300, help="Training steps"),
    lr: Optional[float] = typer.Option(None, help="Learning rate [default: svfit 1e-2, lora 1e-3, full 5e-5]"),
    batch_size: int = typer.Option(4, "--batch-size", help="Instance images per step (as many prior images again)"),
    num_class_images: int = typer.Option(
        64, "--num-class-images", help="Prior-preservation images the base model generates for --class-prompt"
    ),
    prior_weight: float = typer.Option(1.0, "--prior-weight", help="Weight of the prior-preservation loss"),
    sample_steps: int = typer.Option(25, "--sample-steps", help="DDIM steps when sampling"),
    guidance: Optional[float] = typer.Option(
        None, help="Classifier-free guidance scale, 1 = off [default: 7.5; demo: 2.0]"
    ),
    num_samples: int = typer.Option(8, "--num-samples", help="Samples per row of the grid"),
    seed: int = typer.Option(0, help="Seed for noise, timesteps and image order"),
    out: Optional[Path] = typer.Option(None, help="Output directory [default: runs/dreambooth-METHOD]"),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out directory"),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar"),
):
    """DreamBooth: teach a text-to-image diffusion model a subject from a few photos and a rare-token prompt.

    Fine-tunes the UNet's attention projections (and optionally its convolutions and the text encoder) with SVFit
    (LoRA or full fine-tuning as baselines), with prior-preservation loss when --class-prompt is given. Writes
    OUT/unet_adapter/ (PEFT format), OUT/samples.png (instance images, then samples before and after) and
    OUT/result.json, atomically. Runs on a GPU when one is present.
    """

    def body():
        from .dreambooth.run import RunOptions, run_dreambooth
        from .dreambooth.train import ATTENTION_TARGETS, METHODS

        if method not in METHODS:
            raise UserError(f"unknown --method {method!r}; choose from {', '.join(METHODS)}")
        parsed = _parse_targets(targets)
        if isinstance(parsed, str):
            raise UserError("--targets for dreambooth takes comma-separated module names, not re:REGEX")
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.set_verbosity_error()
        diffusers_logging.disable_progress_bar()
        opts = RunOptions(model=model, instance_dir=instance_dir, out=out or Path("runs") / f"dreambooth-{method}",
                          num_samples=num_samples, overwrite=overwrite or out is None,
                          progress=not quiet and sys.stderr.isatty(), progress_lines=not quiet and not _on_terminal())
        _quiet_libraries()
        run_dreambooth(opts, dict(
            instance_prompt=instance_prompt, class_prompt=class_prompt, method=method,
            targets=tuple(parsed) if parsed else ATTENTION_TARGETS, conv=conv, train_text_encoder=train_text_encoder,
            rank=rank, steps=steps, lr=lr, batch_size=batch_size, num_class_images=num_class_images,
            prior_weight=prior_weight, seed=seed, sample_steps=sample_steps, guidance=guidance,
        ), echo=typer.echo)

    _guard(body)


@app.command("list")
def list_():
    """List the tasks and methods."""
    from .methods import METHODS
    from .tasks import TASK_NAMES, get_task

    typer.echo("tasks:")
    for name in TASK_NAMES:
        typer.echo(f"  {name:13s} {get_task(name).help}")
    typer.echo("methods:")
    for name, m in METHODS.items():
        typer.echo(f"  {name:13s} {m.help}")


def _print_table(rows, title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    def pct(x):
        return "-" if x is None else f"{100 * x:.2f}%"

    table = Table(title=title, show_lines=False)
    for col, justify in (("module", "left"), ("shape", "right"), ("r / n", "right"), ("energy kept", "right"),
                         ("nuclear kept", "right"), ("trainable", "right")):
        table.add_column(col, justify=justify)
    for r in rows:
        table.add_row(r.module, "x".join(map(str, r.shape)), f"{r.r} / {min(r.shape)}", pct(r.energy_kept),
                      pct(r.nuclear_kept), f"{r.trainable:,}")
    table.add_section()
    table.add_row(f"{len(rows)} modules", "", f"{sum(r.r for r in rows)} / {sum(min(r.shape) for r in rows)}", "", "",
                  f"{sum(r.trainable for r in rows):,}")
    Console(width=max(150, Console().width)).print(table)


def _row_json(r) -> dict:
    return {
        "module": r.module, "shape": list(r.shape), "r": r.r, "trainable": r.trainable,
        "energy_kept": r.energy_kept, "nuclear_kept": r.nuclear_kept,
        "pretrained_sigma": r.pretrained.tolist(),
        "adapted_sigma": None if r.adapted is None else r.adapted.tolist(),
    }


def _quiet_libraries() -> None:
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
