"""The main job through the CLI, on real pre-trained models and real data, at smoke-test sizes."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ranks import free_port
from safetensors.torch import load_file
from typer.testing import CliRunner

from svfit.cli import app

runner = CliRunner()
TINY = ["--limit", "24", "--epochs", "1", "--batch-size", "8", "--quiet"]


def cli(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.output  # click >= 8.2: stdout and stderr interleaved


@pytest.fixture(scope="module")
def sentiment_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "sentiment-svfit"
    code, output = cli("train", "--out", out, *TINY)
    assert code == 0, output
    return out, output


def test_train_prints_accuracy_before_and_after_and_writes_the_run(sentiment_run):
    out, output = sentiment_run
    assert "before fine-tuning: accuracy" in output and "after fine-tuning:  accuracy" in output
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "adapter" / "adapter_config.json").is_file()
    result = json.loads((out / "result.json").read_text())
    assert set(result) == {"run_info", "train_info", "meta_info"}
    info = result["train_info"]
    assert info["status"] == "success"
    assert info["file_size"] == (out / "adapter" / "adapter_model.safetensors").stat().st_size
    assert 0 < info["num_trainable_params"] < info["num_total_params"]
    final = info["metrics"][-1]
    # what the run printed is what it recorded
    assert f"before fine-tuning: accuracy {final['accuracy before']:.4f}" in output
    assert f"after fine-tuning:  accuracy {final['test accuracy']:.4f}" in output
    assert any("train loss" in m for m in info["metrics"][:-1])
    assert info["cpu_rss_max"] > 0 and info["train_time"] > 0
    assert result["run_info"]["train_config"]["task"] == "sentiment"
    assert result["run_info"]["peft_config"]["peft_type"] == "SVFIT"
    assert result["meta_info"]["package_info"]["peft-version"]
    assert result["meta_info"]["system_info"]["cpu_count"]
    code = result["meta_info"]["code_version"]
    if (Path(__file__).resolve().parents[1] / ".git").exists():  # run from a checkout: the commit is recorded
        assert len(code["git_commit"]) == 40 and isinstance(code["git_dirty"], bool)
    ranks = info["svfit_ranks"]
    assert len(ranks) == 12 and all(0 < r["r"] <= 384 for r in ranks)
    assert sum(r["r"] for r in ranks) + 770 == info["num_trainable_params"]  # singular values + the new head
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no staging leftovers


def test_progress_goes_to_a_log_file_as_plain_lines(tmp_path):
    """`svfit train > log`: no terminal, so no progress bar; a line per logging interval (10 steps) instead."""
    log = tmp_path / "log"
    with open(log, "w") as stdout:
        proc = subprocess.run(
            [sys.executable, "-m", "svfit", "train", "--out", str(tmp_path / "run"), "--limit", "48", "--epochs", "1",
             "--batch-size", "4", "--lr", "0.01"],
            stdout=stdout, stderr=subprocess.PIPE, text=True, timeout=600,
        )
    assert proc.returncode == 0, proc.stderr
    text = log.read_text()
    lines = [line for line in text.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in lines] == ["10/12", "12/12"], text
    assert all(" loss " in line and "examples/s" in line and "s elapsed" in line for line in lines)
    assert text.index("before fine-tuning") < text.index(lines[0]) < text.index("after fine-tuning")
    assert "\r" not in text and "\r" not in proc.stderr  # no progress bar redraws anywhere


def test_quiet_prints_no_progress_lines(sentiment_run):
    _, output = sentiment_run
    assert not [line for line in output.splitlines() if line.startswith("step ")]


def test_a_run_that_moved_singular_values_through_zero_says_so(tmp_path):
    out = tmp_path / "hot"
    code, output = cli("train", "--out", out, *TINY, "--lr", "50")
    assert code == 0, output
    warnings = [line for line in output.splitlines() if line.startswith("warning: ")]
    assert any("kept singular values changed sign during training" in w and "--lr 50" in w for w in warnings), output
    assert any("held-out loss ended above where it started" in w for w in warnings), output
    assert json.loads((out / "result.json").read_text())["train_info"]["warnings"] == [w[9:] for w in warnings]


def test_a_gentle_run_moves_no_singular_value_through_zero(tmp_path):
    out = tmp_path / "gentle"
    code, output = cli("train", "--out", out, *TINY, "--lr", "1e-3")
    assert code == 0, output
    assert "changed sign" not in output
    assert not [w for w in json.loads((out / "result.json").read_text())["train_info"]["warnings"] if "sign" in w]


def test_eval_reproduces_the_recorded_accuracy(sentiment_run):
    out, _ = sentiment_run
    code, output = cli("eval", out, "--quiet")
    assert code == 0, output
    recorded = json.loads((out / "result.json").read_text())["train_info"]["metrics"][-1]["test accuracy"]
    assert f"accuracy {recorded:.4f}" in output.split("(")[0]


def test_predict_prints_label_and_probability(sentiment_run):
    out, _ = sentiment_run
    code, output = cli("predict", out, "A triumph: funny, warm and beautifully acted.")
    assert code == 0, output
    label, prob, _ = output.strip().split("\t")
    assert label in {"fresh", "rotten"} and 0.5 <= float(prob) <= 1.0


def test_inspect_a_run_writes_the_table_and_plot(sentiment_run, tmp_path):
    out, _ = sentiment_run
    code, output = cli("inspect", out, "--plot", tmp_path / "s.png", "--json", tmp_path / "s.json")
    assert code == 0, output
    assert "attention.self.query" in output and "12 modules" in output
    assert (tmp_path / "s.png").stat().st_size > 10_000
    table = json.loads((tmp_path / "s.json").read_text())
    assert len(table["modules"]) == 12 and table["modules"][0]["adapted_sigma"] is not None


def test_inspect_reads_a_run_without_any_svd(sentiment_run, tmp_path, monkeypatch):
    """The table and plot need singular values only: one svdvals per weight, not the SVD a reload computes; with the
    SVD cache on, a second inspect reads the spectra from it."""
    from svfit import set_svd_cache

    out, _ = sentiment_run

    def no_svd(*args, **kwargs):
        raise AssertionError("svfit inspect computed a full SVD")

    monkeypatch.setattr(torch.linalg, "svd", no_svd)
    set_svd_cache(tmp_path / "cache")
    try:
        code, output = cli("inspect", out, "--plot", tmp_path / "a.png")
        assert code == 0, output
        assert len(list((tmp_path / "cache").glob("*.svdvals.safetensors"))) == 12
        monkeypatch.setattr(torch.linalg, "svdvals", no_svd)
        code, output = cli("inspect", out, "--plot", tmp_path / "b.svg", "--json", tmp_path / "b.json")
        assert code == 0, output
    finally:
        set_svd_cache(None)
    assert (tmp_path / "b.svg").read_text().lstrip().startswith("<?xml")  # the format follows the suffix
    assert len(json.loads((tmp_path / "b.json").read_text())["modules"]) == 12


def test_inspect_of_a_run_matches_the_reloaded_adapted_model(sentiment_run):
    from svfit.inspect import run_spectra, spectra
    from svfit.train.run import load_run

    out, _ = sentiment_run
    fast, _ = run_spectra(out)
    _, model, _ = load_run(out)
    slow = spectra(model)
    assert [r.module for r in fast] == [r.module for r in slow] and [r.r for r in fast] == [r.r for r in slow]
    for a, b in zip(fast, slow):
        assert a.shape == b.shape and a.trainable == b.trainable
        assert a.energy_kept == pytest.approx(b.energy_kept, abs=1e-5)
        assert a.nuclear_kept == pytest.approx(b.nuclear_kept, abs=1e-5)
        torch.testing.assert_close(a.pretrained, b.pretrained, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(a.adapted, b.adapted, rtol=1e-4, atol=1e-5)


def test_inspect_checks_its_outputs_before_computing_and_writes_all_or_nothing(sentiment_run, tmp_path):
    out, _ = sentiment_run
    (tmp_path / "file").write_text("x")
    blocked = tmp_path / "file" / "x.json"  # below a regular file: cannot be created, even by root
    for args, message in (
        (["--plot", tmp_path / "p.png", "--json", blocked], f"cannot write --json {blocked}"),
        (["--plot", tmp_path / "file" / "p.png"], f"cannot write --plot {tmp_path / 'file' / 'p.png'}"),
        (["--plot", tmp_path / "p.txt"], "cannot write a '.txt' file; give a name ending in .png, .pdf, .svg"),
        (["--plot", tmp_path], "is a directory"),
    ):
        code, output = cli("inspect", out, *args)
        assert code == 1, output
        assert output.strip().splitlines() == [f"error: {output.strip().split('error: ', 1)[1]}"], output
        assert message in output and ".tmp" not in output, output
        assert "modules" not in output  # failed before computing (the table is printed after)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]  # no PNG, no temp file


def test_several_outputs_are_written_together_or_not_at_all(tmp_path):
    from svfit.inspect import write_outputs

    def fail(tmp):
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match=r"cannot write --json .*b.json: No space left on device"):
        write_outputs([(tmp_path / "a.png", "--plot", lambda tmp: tmp.write_bytes(b"png")),
                       (tmp_path / "b.json", "--json", fail)])
    assert list(tmp_path.iterdir()) == []
    write_outputs([(tmp_path / "a.png", "--plot", lambda tmp: tmp.write_bytes(b"png"))])
    assert (tmp_path / "a.png").read_bytes() == b"png" and len(list(tmp_path.iterdir())) == 1


def test_inspect_a_task_before_fine_tuning(tmp_path):
    code, output = cli("inspect", "sentiment", "--information", "nuclear", "--plot", tmp_path / "p.png")
    assert code == 0, output
    assert (tmp_path / "p.png").is_file() and "12 modules" in output


@pytest.mark.parametrize("method", ["lora", "pissa", "ia3", "full"])
def test_baseline_methods_train_save_and_reload(method, tmp_path):
    out = tmp_path / method
    code, output = cli("train", "--method", method, "--out", out, *TINY)
    assert code == 0, output
    code, output = cli("eval", out, "--quiet")
    assert code == 0, output
    recorded = json.loads((out / "result.json").read_text())["train_info"]["metrics"][-1]["test accuracy"]
    assert f"accuracy {recorded:.4f}" in output.split("(")[0]


@pytest.mark.parametrize("task", ["subjectivity", "vit-fashion", "fashion"])
def test_every_task_runs_end_to_end(task, tmp_path):
    out = tmp_path / task
    code, output = cli("train", "--task", task, "--out", out, *TINY)
    assert code == 0, output
    # the saved adapter, reloaded onto a fresh base model, scores exactly what the run recorded
    info = json.loads((out / "result.json").read_text())["train_info"]
    assert info["status"] == "success" and 0 < info["num_trainable_params"] < info["num_total_params"]
    code, output = cli("eval", out, "--quiet")
    assert code == 0, output
    assert f"accuracy {info['metrics'][-1]['test accuracy']:.4f}" in output.split("(")[0]


def test_lm_task_runs_end_to_end(tmp_path):
    out = tmp_path / "lm"
    code, output = cli("train", "--task", "lm-sentiment", "--out", out, "--limit", "8", "--epochs", "1",
                       "--batch-size", "4", "--quiet")
    assert code == 0, output
    info = json.loads((out / "result.json").read_text())["train_info"]
    assert len(info["test correct"]) == info["metrics"][-1]["test examples"] and info["metrics"][-1]["train total tokens"] > 0
    code, output = cli("predict", out, "An utterly charming film.")
    assert code == 0, output
    assert output.split("\t")[0] in {"positive", "negative"} and "generated" in output


def test_image_predict_takes_a_file(tmp_path):
    from PIL import Image

    from svfit.assets import load_fashion_mnist

    out = tmp_path / "fashion"
    assert cli("train", "--task", "fashion", "--out", out, *TINY)[0] == 0
    images, _ = load_fashion_mnist("test")
    Image.fromarray(images[0]).save(tmp_path / "item.png")
    code, output = cli("predict", out, tmp_path / "item.png")
    assert code == 0, output
    assert output.split("\t")[0] in {"T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                                     "Sneaker", "Bag", "Ankle boot"}
    assert "not writable" not in output  # no PyTorch UserWarning about PIL's read-only pixel buffer
    code, output = cli("predict", out, tmp_path / "missing.png")
    assert code == 1 and "image not found" in output
    (tmp_path / "bad.png").write_text("not an image")
    code, output = cli("predict", out, tmp_path / "bad.png")
    assert code == 1 and "not an image" in output


def test_an_image_file_becomes_pixels_without_a_warning(tmp_path):
    """PIL hands out a read-only buffer; torch.from_numpy on it prints a "NumPy array is not writable" UserWarning."""
    import warnings

    from PIL import Image

    from svfit.tasks import get_task
    from svfit.tasks.vision import load_image_as_fashion_mnist

    Image.fromarray((torch.rand(40, 30) * 100).to(torch.uint8).numpy()).save(tmp_path / "dark.png")  # not inverted
    image = load_image_as_fashion_mnist(str(tmp_path / "dark.png"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pixels = get_task("fashion").pixels(image[None])
    assert pixels.shape[0] == 1


# -- wrong input: one clear line, non-zero exit, nothing written ----------------------------------------------------


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--task", "imdb"], "unknown task 'imdb'"),
        (["train", "--method", "dora"], "unknown method 'dora'"),
        (["train", "--rank", "big"], "--rank must be an integer or 'full'"),
        (["train", "--limit", "0"], "--limit must be >= 1"),
        (["train", "--lr", "-1", "--limit", "8"], "--lr must be positive"),
        (["train", "--threshold", "1.5", "--limit", "8"], "threshold must lie in (0, 1]"),
        (["train", "--targets", "nope", "--limit", "8"], "check your `target_modules`"),
        (["train", "--parametrization", "scale", "--limit", "8"], "pass --lr explicitly"),
        (["train", "--parametrization", "sigma", "--lr", "1e-2", "--weight-decay", "0.1", "--limit", "8"],
         "towards zero"),
        (["train", "--targets", "re:[", "--limit", "8"], "--targets 're:[' is not a valid regular expression"),
        (["inspect", "sentiment", "--targets", "re:(q"], "is not a valid regular expression"),
        (["eval", "/nonexistent/run"], "not an svfit run directory"),
        (["inspect", "not-a-thing"], "neither a run directory"),
    ],
)
def test_bad_input_gives_one_clear_line_and_exit_1(args, message, tmp_path):
    code, output = cli(*args)
    assert code == 1, output
    lines = [line for line in output.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], output
    assert "Traceback" not in output


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--lr", "nan"], "--lr must be a finite number, got nan"),
        (["train", "--lr", "inf"], "--lr must be a finite number, got inf"),
        (["train", "--head-lr", "nan"], "--head-lr must be a finite number"),
        (["train", "--head-lr", "inf"], "--head-lr must be a finite number"),
        (["train", "--head-lr", "0"], "--head-lr must be positive"),
        (["train", "--epochs", "nan"], "--epochs must be a finite number"),
        (["train", "--weight-decay", "-1"], "--weight-decay must be >= 0, got -1"),
        (["train", "--weight-decay", "nan"], "--weight-decay must be a finite number"),
        (["train", "--threshold", "nan"], "--threshold must lie in (0, 1]"),
        (["train", "--information", "entropy"], "unknown --information 'entropy'; choose one of: energy, nuclear"),
        # the name is wrong: say so, rather than ask for --lr first and report the name only once --lr is given
        (["train", "--parametrization", "foo"], "unknown --parametrization 'foo'; choose one of: delta, sigma, scale"),
        (["train", "--parametrization", "foo", "--lr", "0.1"], "unknown --parametrization 'foo'"),
        # dreambooth takes the same checks, with the same words
        (["dreambooth", "--lr", "nan"], "--lr must be a finite number, got nan"),
        (["dreambooth", "--lr", "-1"], "--lr must be positive"),
        (["dreambooth", "--prior-weight", "-1"], "--prior-weight must be >= 0, got -1"),
        (["dreambooth", "--guidance", "-3"], "--guidance must be >= 1, got -3"),
        (["dreambooth", "--guidance", "nan"], "--guidance must be a finite number"),
    ],
)
def test_bad_numbers_fail_up_front_naming_the_flag(args, message, tmp_path):
    """NaN, infinite and out-of-range hyper-parameters are refused before the model or the data load."""
    small = TINY if args[0] == "train" else ["--steps", "1", "--num-samples", "1", "--sample-steps", "1", "--quiet"]
    # small sizes first (the flag under test comes later and wins), so that a check that lets it through stays cheap
    code, output = cli(args[0], *small, *args[1:], "--out", tmp_path / "out")
    assert code == 1, output
    lines = [line for line in output.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], output
    assert "task " not in output and "instance images" not in output  # nothing was loaded
    assert not (tmp_path / "out").exists()


def test_a_diverging_head_names_head_lr():
    from svfit.train.loop import OptimConfig, fit

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    data = [{"x": torch.zeros(2)} for _ in range(4)]
    collate = lambda xs: {"x": torch.stack([d["x"] for d in xs])}  # noqa: E731
    nan_loss = lambda m, batch: m(batch["x"]).sum() * float("nan")  # noqa: E731
    with pytest.raises(FloatingPointError, match=r"lower the learning rate \(--lr or --head-lr\)"):
        fit(model, data, collate, nan_loss, OptimConfig(lr=1e-3, head_lr=1e-3), epochs=1, batch_size=2, seed=0,
            is_head=lambda name: name.startswith("1."), progress=False)
    with pytest.raises(FloatingPointError, match=r"lower the learning rate \(--lr\)"):
        fit(model, data, collate, nan_loss, OptimConfig(lr=1e-3, head_lr=1e-3), epochs=1, batch_size=2, seed=0,
            is_head=lambda name: False, progress=False)


def test_a_full_disk_at_save_time_gives_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    """safetensors reports a full disk as SafetensorError("... I/O error: No space left on device (os error 28)")."""
    from safetensors import SafetensorError

    from svfit.methods import SVFitMethod

    def full_disk(self, model, run_dir):
        (run_dir / "adapter").mkdir()
        (run_dir / "adapter" / "adapter_model.safetensors").write_bytes(b"partial")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(SVFitMethod, "save", full_disk)
    out = tmp_path / "runs" / "run"
    code, output = cli("train", "--out", out, *TINY)
    assert code == 1, output
    assert output.strip().splitlines()[-1] == (
        f"error: cannot write {out}: No space left on device; nothing was written (free some space or choose "
        "another --out)"
    )
    assert "Traceback" not in output and "SafetensorError" not in output
    assert not out.exists() and not list(out.parent.iterdir())  # no partial run, no staging directory


def test_output_below_a_file_fails_before_training(tmp_path):
    (tmp_path / "file").write_text("x")
    code, output = cli("train", "--out", tmp_path / "file" / "run", *TINY)
    assert code == 1 and "is a file" in output and "before fine-tuning" not in output


def test_unwritable_output_fails_before_training(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as a user that can write anywhere (root)")
        code, output = cli("train", "--out", locked / "run", *TINY)
        assert code == 1 and "cannot write" in output and "before fine-tuning" not in output
    finally:
        locked.chmod(stat.S_IRWXU)


def test_output_that_is_a_file_or_non_empty_dir_is_refused(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    code, output = cli("train", "--out", f, *TINY)
    assert code == 1 and "is a file" in output and "before fine-tuning" not in output
    d = tmp_path / "full"
    d.mkdir()
    (d / "keep.txt").write_text("x")
    code, output = cli("train", "--out", d, *TINY)
    assert code == 1 and "--overwrite" in output
    assert (d / "keep.txt").read_text() == "x"


def test_corrupt_adapter_gives_a_clear_error(sentiment_run, tmp_path):
    import shutil

    out, _ = sentiment_run
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    (broken / "adapter" / "adapter_model.safetensors").write_bytes(b"\x00" * 64)
    for command in (["eval", broken, "--quiet"], ["predict", broken, "some text"]):
        code, output = cli(*command)
        assert code == 1 and "corrupt" in output and "Traceback" not in output
    shutil.copy(out / "adapter" / "adapter_model.safetensors", broken / "adapter" / "adapter_model.safetensors")
    (broken / "adapter" / "adapter_config.json").write_text("{ truncated")
    for command in (["eval", broken, "--quiet"], ["predict", broken, "some text"], ["inspect", broken]):
        code, output = cli(*command)
        assert code == 1 and "corrupt" in output and "Traceback" not in output
        assert "adapter_config.json" in output and "adapter_model.safetensors" not in output, output  # the right file
    (broken / "result.json").write_text("{ not json")
    code, output = cli("eval", broken)
    assert code == 1 and "corrupt" in output


def test_eval_every_records_a_learning_curve_on_unseen_training_examples(tmp_path):
    out = tmp_path / "curve"
    code, output = cli("train", "--out", out, "--eval-every", "2", *TINY)
    assert code == 0, output
    info = json.loads((out / "result.json").read_text())["train_info"]
    curve = info["eval curve"]
    steps = [entry["step"] for entry in curve]
    assert steps == [0, 2, 3]  # 24 examples / batch 8 = 3 steps: at start, every 2 steps, and at the end
    assert all(0 <= entry["valid accuracy"] <= 1 for entry in curve)
    assert curve[0]["valid loss"] != curve[-1]["valid loss"]
    code, output = cli("train", "--out", tmp_path / "bad", "--eval-every", "0", *TINY)
    assert code == 1 and "--eval-every" in output


def test_a_validation_run_records_valid_scores_and_re_scores(tmp_path):
    out = tmp_path / "val"
    code, output = cli("train", "--out", out, "--validation", *TINY)
    assert code == 0, output
    final = json.loads((out / "result.json").read_text())["train_info"]["metrics"][-1]
    assert "valid accuracy" in final and "test accuracy" not in final
    code, output = cli("eval", out, "--quiet")
    assert code == 0 and f"recorded at training: accuracy {final['valid accuracy']:.4f}" in output, output


def test_list_shows_tasks_and_methods():
    code, output = cli("list")
    assert code == 0
    for name in ("sentiment", "subjectivity", "vit-fashion", "fashion", "lm-sentiment", "svfit", "lora", "pissa",
                 "ia3", "full"):
        assert name in output


def test_model_option_loads_another_checkpoint_from_a_local_directory(tmp_path):
    """The hub path (`--model org/name`) goes through the same from_pretrained call; here it reads local files."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from svfit.assets import minilm_dir

    local = tmp_path / "tiny-bert"
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64)
    BertForSequenceClassification(config).save_pretrained(local)
    tokenizer.save_pretrained(local)
    out = tmp_path / "run"
    code, output = cli("train", "--model", local, "--out", out, *TINY)
    assert code == 0, output
    result = json.loads((out / "result.json").read_text())
    assert result["run_info"]["train_config"]["model"] == str(local)
    assert {r["shape"][0] for r in result["train_info"]["svfit_ranks"]} == {32}
    assert cli("eval", out, "--quiet")[0] == 0  # reloads onto the same local model
    code, output = cli("train", "--task", "fashion", "--model", local, "--out", tmp_path / "x", *TINY)
    assert code == 1 and "--model is not supported" in output


def test_validation_split_comes_from_the_training_data_only():
    from svfit.tasks import get_task
    from svfit.train.run import load_split

    task = get_task("sentiment")
    _, test = task.load_data(0, None, None)
    train, val = load_split(task, 0, 500, 200, validation=True)
    assert len(train) == 500 and len(val) == 200
    texts = lambda xs: {t for t, _ in xs}  # noqa: E731
    assert not texts(val) & texts(test) and not texts(val) & texts(train)


def _tiny_bert_dir(path):
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from svfit.assets import minilm_dir

    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64)
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_two_process_data_parallel_run_ends_with_identical_singular_values(tmp_path):
    """`accelerate launch` with 2 CPU processes (gloo): gradients are all-reduced, so both replicas must end with the
    same trained parameters; each process records a checksum of its own."""
    local = _tiny_bert_dir(tmp_path / "tiny-bert")
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
         "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
         "-m", "svfit", "train", "--model", str(local), "--out", str(out), "--limit", "48", "--epochs", "1",
         "--batch-size", "8", "--lr", "0.5", "--quiet"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("after fine-tuning") == 1  # only the main process reports and writes
    info = json.loads((out / "result.json").read_text())["train_info"]
    dist = info["distributed"]
    assert dist["num_processes"] == 2 and len(dist["trained_checksums"]) == 2
    assert dist["trained_checksums"][0] == dist["trained_checksums"][1]
    assert info["metrics"][-1]["train samples"] == 48  # each process saw half of every batch
    # training moved the singular values, and the saved adapter re-scores to the recorded accuracy
    vector = [v for k, v in load_file(out / "adapter" / "adapter_model.safetensors").items() if "svfit_vector" in k]
    assert vector and any(v.abs().sum() > 0 for v in vector)
    code, output = cli("eval", out, "--quiet")
    assert code == 0, output


# -- start-up: `svfit --help` must not wait for torch, transformers, peft, diffusers or matplotlib ---------------------

HEAVY = ("torch", "transformers", "peft", "diffusers", "matplotlib")


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["dreambooth", "--help"]])
def test_help_imports_no_heavy_module(argv):
    code = (
        "import sys\nfrom svfit.cli import main\n"
        f"sys.argv = ['svfit', *{argv!r}]\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        f"print('HEAVY', sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "Usage:" in out and "HEAVY []" in out, out


def test_svfit_registers_with_peft_when_peft_is_imported_after_it(tmp_path):
    """`import svfit` no longer imports peft itself; importing peft afterwards (or using an svfit name) registers."""
    code = (
        "import sys\nimport svfit\nassert 'peft' not in sys.modules\n"
        "from peft import PeftConfig, PeftType\n"
        "from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING\n"
        "print(PEFT_TYPE_TO_TUNER_MAPPING[PeftType.SVFIT].__name__, svfit.SVFitConfig.__name__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["SVFitModel", "SVFitConfig"]
