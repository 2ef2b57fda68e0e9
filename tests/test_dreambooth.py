"""DreamBooth on diffusers: `svfit dreambooth` end to end on a tiny Stable-Diffusion-shaped pipeline built from configs
(UNet2DConditionModel + CLIPTextModel + word-level tokenizer + DDPMScheduler + AutoencoderKL), and the embedded
Fashion-MNIST demo through the benchmark's --quick variant."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

from svfit.cli import app
from svfit.tuner.checkpoint import FINGERPRINT_KEY

runner = CliRunner()
PROMPT = "a photo of sks dog"
CLASS = "a photo of a dog"
FAST = ["--steps", "3", "--batch-size", "2", "--num-class-images", "2", "--sample-steps", "2", "--num-samples", "2",
        "--quiet"]


def cli(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def build_tiny_pipeline(path, vae: bool = True):
    """A Stable-Diffusion-layout directory with random tiny components, saved with save_pretrained."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    from svfit.dreambooth.demo import build_tokenizer, text_config

    torch.manual_seed(0)
    vocab = ("<pad>", "<unk>", "<bos>", "<eos>", "a", "photo", "of", "sks", "dog")
    build_tokenizer(vocab).save_pretrained(path / "tokenizer")
    cfg = text_config()
    cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers = len(vocab), 32, 64, 1
    CLIPTextModel(cfg).save_pretrained(path / "text_encoder")
    UNet2DConditionModel(
        sample_size=8, in_channels=4 if vae else 3, out_channels=4 if vae else 3, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=8,
        norm_num_groups=8,
    ).save_pretrained(path / "unet")
    DDPMScheduler(num_train_timesteps=100).save_pretrained(path / "scheduler")
    if vae:
        AutoencoderKL(block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=4,
                      down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                      norm_num_groups=4, sample_size=16).save_pretrained(path / "vae")
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("dreambooth")
    model = build_tiny_pipeline(root / "pipe")
    images = root / "subject"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):  # odd sizes and modes: the loader crops, resizes and converts
        Image.fromarray(rng.integers(0, 255, (20 + i, 24, 3), dtype=np.uint8)).save(images / f"{i}.png")
    Image.fromarray(rng.integers(0, 255, (30, 30), dtype=np.uint8)).save(images / "grey.jpg")
    (images / "notes.txt").write_text("not an image")  # ignored
    return root, model, images


@pytest.fixture(scope="module")
def svfit_run(tiny):
    root, model, images = tiny
    out = root / "svfit"
    code, output = cli("dreambooth", "--model", model, "--instance-dir", images, "--instance-prompt", PROMPT,
                       "--class-prompt", CLASS, "--out", out, *FAST)
    assert code == 0, output
    return out, output


def vectors(adapter_dir):
    """The adapter file's tensors less its base-fingerprint table, which must hold one row per saved vector."""
    weights = load_file(adapter_dir / "adapter_model.safetensors")
    table = weights.pop(FINGERPRINT_KEY)
    assert table.dtype == torch.uint8 and table.shape[0] == len(weights)
    return weights


def test_svfit_dreambooth_trains_only_singular_values_and_saves_a_tiny_adapter(tiny, svfit_run):
    _, model, _ = tiny
    out, output = svfit_run
    result = json.loads((out / "result.json").read_text())
    info = result["train_info"]
    weights = vectors(out / "unet_adapter")
    # only the trained singular-value vectors are saved: one 1-D tensor per adapted matrix, no bases, no LoRA factors
    assert weights and all(k.endswith(".svfit_vector") and v.ndim == 1 for k, v in weights.items())
    assert info["num_trainable_params"] == sum(v.numel() for v in weights.values())
    # one vector per attention projection: 4 per attention layer, self + cross in each of the 4 transformer blocks
    # (down 1, mid 1, up 2 = layers_per_block + 1)
    assert len(weights) == 32
    unet_params = sum(v.numel() for v in load_file(model / "unet" / "diffusion_pytorch_model.safetensors").values())
    assert info["num_trainable_params"] < unet_params / 100
    size = (out / "unet_adapter" / "adapter_model.safetensors").stat().st_size
    # fp32 vectors + header, and the 85-byte-per-module base-fingerprint table that lets a reload refuse a wrong base
    assert info["file_size"] == size <= 4 * info["num_trainable_params"] + (160 + 85) * len(weights)
    assert any(v.abs().sum() > 0 for v in weights.values())  # training moved them
    assert len(info["losses"]) == 3 and all(np.isfinite(info["losses"]))
    config = json.loads((out / "unet_adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "SVFIT"
    assert result["run_info"]["dreambooth_config"]["class_prompt"] == CLASS
    assert "adapter:" in output and "samples:" in output


def test_the_grid_is_a_png_with_a_row_per_stage(svfit_run):
    out, _ = svfit_run
    grid = Image.open(out / "samples.png")
    assert grid.format == "PNG"
    # 5 rows (instance images, instance prompt before/after, class prompt before/after) of 16px images x2 + padding
    assert grid.height == 5 * (16 * 2 + 2) + 2
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no staging leftovers


def test_the_saved_adapter_reloads_onto_the_base_and_reproduces_the_samples(tiny, svfit_run):
    from svfit.dreambooth import load_pipeline, load_trained, sample

    _, model, _ = tiny
    out, _ = svfit_run
    base = sample(load_pipeline(model), [PROMPT] * 2, steps=2, seed=0)
    tuned_pipe = load_trained(load_pipeline(model), out)
    tuned = sample(tuned_pipe, [PROMPT] * 2, steps=2, seed=0)
    again = sample(load_trained(load_pipeline(model), out), [PROMPT] * 2, steps=2, seed=0)
    assert torch.equal(tuned, again)
    assert not torch.allclose(tuned, base)
    with tuned_pipe.unet.disable_adapter():
        assert torch.allclose(sample(tuned_pipe, [PROMPT] * 2, steps=2, seed=0), base, atol=1e-6)


def test_lora_baseline_and_conv_targets_and_text_encoder(tiny):
    root, model, images = tiny
    out = root / "lora"
    code, output = cli("dreambooth", "--model", model, "--instance-dir", images, "--instance-prompt", PROMPT,
                       "--method", "lora", "--conv", "--train-text-encoder", "--out", out, *FAST)
    assert code == 0, output
    unet = load_file(out / "unet_adapter" / "adapter_model.safetensors")
    assert any(".conv1.lora_A" in k for k in unet) and any("to_q.lora_B" in k for k in unet)
    text = load_file(out / "text_encoder_adapter" / "adapter_model.safetensors")
    assert any("q_proj.lora_A" in k for k in text)
    assert Image.open(out / "samples.png").height == 3 * (16 * 2 + 2) + 2  # no class prompt: 3 rows


def test_svfit_on_conv_layers_and_full_fine_tuning(tiny):
    root, model, images = tiny
    code, output = cli("dreambooth", "--model", model, "--instance-dir", images, "--instance-prompt", PROMPT,
                       "--conv", "--out", root / "svfit-conv", *FAST)
    assert code == 0, output
    weights = vectors(root / "svfit-conv" / "unet_adapter")
    assert any(".conv1.svfit_vector" in k for k in weights) and all(v.ndim == 1 for v in weights.values())
    code, output = cli("dreambooth", "--model", model, "--instance-dir", images, "--instance-prompt", PROMPT,
                       "--method", "full", "--out", root / "full", *FAST)
    assert code == 0, output
    info = json.loads((root / "full" / "result.json").read_text())["train_info"]
    assert (root / "full" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert info["num_trainable_params"] == sum(
        v.numel() for v in load_file(model / "unet" / "diffusion_pytorch_model.safetensors").values())


def test_pixel_space_pipeline_without_vae(tmp_path, tiny):
    _, _, images = tiny
    model = build_tiny_pipeline(tmp_path / "pixels", vae=False)
    code, output = cli("dreambooth", "--model", model, "--instance-dir", images, "--instance-prompt", PROMPT,
                       "--out", tmp_path / "out", *FAST)
    assert code == 0, output
    assert Image.open(tmp_path / "out" / "samples.png").height == 3 * (8 * 2 + 2) + 2


@pytest.mark.parametrize("breakage, message", [
    ("missing", "does not exist"),
    ("empty", "missing unet/, text_encoder/, tokenizer/, scheduler/"),
    ("corrupt-config", "unet/config.json is corrupt"),
    ("corrupt-weights", "cannot load unet/"),
])
def test_a_bad_model_dir_gives_a_one_line_error(tmp_path, tiny, breakage, message):
    _, good, images = tiny
    model = tmp_path / "model"
    if breakage == "empty":
        model.mkdir()
    elif breakage != "missing":
        import shutil

        shutil.copytree(good, model)
        if breakage == "corrupt-config":
            (model / "unet" / "config.json").write_text("{ not json")
        else:
            (model / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"\0" * 100)
    code, output = cli("dreambooth", "--model", model, "--instance-dir", images, "--instance-prompt", PROMPT,
                       "--out", tmp_path / "out", *FAST)
    assert code == 1
    assert output.startswith("error: ") and message in output and "Traceback" not in output
    assert len(output.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_usage_errors(tmp_path, tiny):
    _, model, images = tiny
    code, output = cli("dreambooth", "--model", model, "--instance-prompt", PROMPT, "--out", tmp_path / "o")
    assert code == 1 and "--instance-dir is required" in output
    empty = tmp_path / "empty"
    empty.mkdir()
    code, output = cli("dreambooth", "--model", model, "--instance-dir", empty, "--instance-prompt", PROMPT,
                       "--out", tmp_path / "o")
    assert code == 1 and "holds no images" in output
    code, output = cli("dreambooth", "--model", model, "--instance-dir", images, "--instance-prompt", PROMPT,
                       "--method", "dora", "--out", tmp_path / "o")
    assert code == 1 and "unknown --method 'dora'" in output
    code, output = cli("dreambooth", "--model", model, "--instance-dir", images, "--instance-prompt", PROMPT,
                       "--targets", "nothing_here", "--out", tmp_path / "o", *FAST)
    assert code == 1 and "match no layer" in output


def test_benchmark_quick_variant_measures_svfit_lora_and_full_and_writes_the_report(tmp_path):
    from benchmarks.__main__ import app as bench

    results, report = tmp_path / "results", tmp_path / "BENCHMARKS.md"
    out = runner.invoke(bench, ["run", "--quick", "--only", "dreambooth", "--results", str(results),
                                "--report", str(report)])
    assert out.exit_code == 0, out.output
    runs = {p.stem: json.loads(p.read_text()) for p in (results / "dreambooth").glob("*-seed0.json")}
    assert set(runs) == {"svfit-seed0", "lora-seed0", "full-seed0"}
    trainable = {k: r["train_info"]["num_trainable_params"] for k, r in runs.items()}
    assert trainable["svfit-seed0"] < trainable["lora-seed0"] < trainable["full-seed0"]
    sizes = {k: r["train_info"]["file_size"] for k, r in runs.items()}
    assert sizes["svfit-seed0"] < sizes["lora-seed0"] < sizes["full-seed0"]
    for r in runs.values():
        m = r["train_info"]["metrics"]
        assert 0 <= m["subject_fidelity"] <= 1 and 0 <= m["prior_accuracy"] <= 1 and m["subject_diversity"] > 0
        assert sum(m["subject_predictions"]) == r["run_info"]["settings"]["subject_n"]
    text = report.read_text()
    assert "## Subject-driven generation (DreamBooth)" in text and "| SVFit, attention (0.99 energy) |" in text
    assert "| LoRA r=4, attention |" in text and "| Full fine-tuning (UNet) |" in text
    grid = Image.open(tmp_path / "plots" / "dreambooth-samples.png")
    assert grid.format == "PNG" and grid.height > 10 * 28


def test_without_model_the_bundled_demo_runs_with_its_subject_and_prompts(tmp_path):
    out = tmp_path / "demo"
    code, output = cli("dreambooth", "--out", out, *FAST)
    assert code == 0, output
    info = json.loads((out / "result.json").read_text())
    cfg = info["run_info"]["dreambooth_config"]
    assert cfg["instance_prompt"] == "a photo of sks shoe" and cfg["class_prompt"] == "a photo of a shoe"
    assert info["run_info"]["instance_images"] == 8
    # the demo model's attention projections are 64-wide: SVFit trains at most 64 values per matrix
    weights = vectors(out / "unet_adapter")
    assert all(0 < v.numel() <= 64 for v in weights.values())
    assert Image.open(out / "samples.png").height == 5 * (28 * 2 + 2) + 2
    # the demo has a judge: the run prints and records the subject fidelity before and after, on 64 samples
    judged = info["train_info"]["demo_metrics"]
    assert judged["samples"] == 64 and 0 <= judged["fidelity_before"] <= 1 and 0 <= judged["fidelity_after"] <= 1
    line = next(line for line in output.splitlines() if line.startswith("subject fidelity"))
    assert f"{judged['fidelity_before']:.2f} before -> {judged['fidelity_after']:.2f} after" in line


def test_without_a_terminal_progress_is_printed_as_lines(tiny, tmp_path):
    root, model, images = tiny
    fast = [a for a in FAST if a != "--quiet"]
    code, output = cli("dreambooth", "--model", model, "--instance-dir", images, "--instance-prompt", PROMPT,
                       "--out", tmp_path / "out", *fast, "--steps", "60")
    assert code == 0, output
    assert [line.split()[1] for line in output.splitlines() if line.startswith("step ")] == ["50/60", "60/60"]


def test_the_demo_defaults_are_the_benchmarked_setting():
    """The benchmark measured a fidelity gain (BENCHMARKS.md) at 300 steps of lr 1e-2 with 64 prior images; the
    demo's defaults are that setting, so that its default run shows the gain."""
    from benchmarks.dreambooth import settings
    from svfit.dreambooth.train import DEFAULT_LR, DreamBoothConfig

    measured, cfg = settings(quick=False), DreamBoothConfig(instance_prompt="a photo of sks shoe")
    assert (cfg.steps, cfg.num_class_images, cfg.batch_size) == (measured["steps"], measured["num_class_images"],
                                                               measured["batch_size"])
    assert DEFAULT_LR["svfit"] == 1e-2 and cfg.sample_steps == measured["sample_steps"]
    code, output = cli("dreambooth", "--help")
    assert "[default: 300]" in output and "[default: 64]" in output
