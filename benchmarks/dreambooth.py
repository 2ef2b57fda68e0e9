"""Subject-driven generation (DreamBooth) on the embedded Fashion-MNIST text-to-image model: SVFit vs LoRA vs full.

The demo model (``src/svfit/dreambooth/demo/``, pre-trained by this project with ankle boots held out) learns a new
subject from a few ankle-boot photos and the prompt "a photo of sks shoe", with prior preservation on "a photo of
a shoe" (whose prior images the pre-trained model generates once and every method shares). Every method runs the
same loop (svfit.dreambooth.finetune), data, steps, batch and seeds; only the PEFT config (and the learning rate)
differs. Afterwards a 10-class CNN judges samples drawn from fixed noise (paired before/after):

* subject fidelity: share of "a photo of sks shoe" samples classified as ankle boot;
* prior preservation: class accuracy on the nine pre-training prompts, before vs after, and how "a photo of a
  shoe" drifts towards the subject;
* diversity: mean pairwise RMS pixel distance among the subject samples; copying: distance to the nearest
  instance image. See svfit/dreambooth/demo/evaluate.py.

    python -m benchmarks run --only dreambooth [--quick]
"""

from __future__ import annotations

import json
import math
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

NAME = "dreambooth"
BASE_FILE = "pretrained.json"

# label, DreamBoothConfig overrides; the learning rate comes from the probe below (per method family)
VARIANTS = {
    "svfit": ("SVFit, attention (0.99 energy)", dict(method="svfit")),
    "svfit-conv": ("SVFit, attention + ResNet convs", dict(method="svfit", conv=True)),
    "lora": ("LoRA r=4, attention", dict(method="lora", rank=4)),
    "lora-conv": ("LoRA r=4, attention + ResNet convs", dict(method="lora", rank=4, conv=True)),
    "full": ("Full fine-tuning (UNet)", dict(method="full")),
}
# Learning-rate probe: one fine-tuning seed and evaluation noise of its own (not the table's), attention targets;
# the lr with the highest fidelity + prior accuracy is used for the family (the conv variants included).
LR_GRID = {"svfit": [1e-2, 3e-2, 1e-1], "lora": [1e-3, 3e-3, 1e-2], "full": [3e-5, 1e-4, 3e-4]}
QUICK_LR = {"svfit": 3e-2, "lora": 3e-3, "full": 1e-4}
TUNE_SEED, TUNE_EVAL_SEED, EVAL_SEED = 100, 4321, 1234
GRID_IMAGES = 8  # subject samples kept per run for the report's grid


def settings(quick: bool) -> dict:
    if quick:
        return {"instances": 4, "steps": 4, "batch_size": 2, "num_class_images": 4, "subject_n": 4, "per_class_n": 2,
                "shoe_n": 4, "sample_steps": 3, "guidance": 2.0, "seeds": [0], "variants": ["svfit", "lora", "full"],
                "tune": None}
    return {"instances": 8, "steps": 300, "batch_size": 4, "num_class_images": 64, "subject_n": 64, "per_class_n": 16,
            "shoe_n": 32, "sample_steps": 25, "guidance": 2.0, "seeds": [0, 1], "variants": list(VARIANTS),
            "tune": {"subject_n": 24, "per_class_n": 6, "shoe_n": 0}}


def run(out: Path, quick: bool, weights: Path | None = None, variants: list[str] | None = None,
        log=print) -> None:
    import torch

    from svfit.dreambooth import demo
    from svfit.dreambooth.demo.evaluate import evaluate, reference_metrics
    from svfit.dreambooth.train import DreamBoothConfig, finetune, generate_class_images, save_trained
    from svfit.train.results import meta_info, now_iso, write_json

    weights = Path(weights or demo.WEIGHTS)
    s = settings(quick)
    target = Path(out) / NAME
    target.mkdir(parents=True, exist_ok=True)
    classifier = demo.load_classifier(weights)
    instances = demo.subject_images(s["instances"], seed=0)
    real = demo.subject_images(s["subject_n"], seed=1, split="test")  # real boots, for reference numbers
    eval_kw = dict(subject_n=s["subject_n"], per_class_n=s["per_class_n"], shoe_n=s["shoe_n"],
                   steps=s["sample_steps"], guidance=s["guidance"])
    pretrain_info = _read(weights / "pretrain_info.json") or {}

    def record(extra_run: dict, train: dict) -> dict:
        return {"run_info": {"benchmark": NAME, "quick": quick, "settings": s, "created_at": now_iso(),
                             "weights": str(weights), **extra_run},
                "train_info": train, "meta_info": meta_info("svfit Fashion-MNIST demo (ankle boot held out)",
                                                            "Fashion-MNIST")}

    base_path = target / BASE_FILE
    base = _read(base_path)
    if not base or base["run_info"].get("settings") != s:
        pipe = demo.load_demo_pipeline(weights=weights)
        t0 = time.perf_counter()
        metrics = evaluate(pipe, classifier, instances, seed=EVAL_SEED, **eval_kw)
        samples = metrics.pop("samples")
        cfg = DreamBoothConfig(instance_prompt=demo.SUBJECT_PROMPT, class_prompt=demo.CLASS_PROMPT,
                               num_class_images=s["num_class_images"], sample_steps=s["sample_steps"],
                               guidance=s["guidance"])
        t1 = time.perf_counter()
        class_images = generate_class_images(pipe, cfg)
        class_seconds = time.perf_counter() - t1
        base = record({"variant": "pretrained"}, {
            "metrics": metrics, "reference": reference_metrics(instances, real, classifier),
            "instances_u8": _u8(instances), "samples_u8": _u8(samples["subject"][:GRID_IMAGES]),
            "class_samples_u8": _u8(samples["classes"][:: s["per_class_n"]]),
            "class_images_u8": _u8((class_images + 1) / 2), "class_images_seconds": class_seconds,
            "seconds": time.perf_counter() - t0, "pretrain_info": pretrain_info,
            "unet_parameters": sum(p.numel() for p in pipe.unet.parameters()),
        })
        write_json(base_path, base)
        log(f"pre-trained: fidelity {metrics['subject_fidelity']:.3f}, prior accuracy {metrics['prior_accuracy']:.3f}"
            f" ({base['train_info']['seconds']:.0f}s)")
    class_images = torch.from_numpy(np.asarray(base["train_info"]["class_images_u8"], np.float32) / 127.5 - 1)[:, None]

    lrs = dict(QUICK_LR)
    if s["tune"]:
        lrs = _tune(target, weights, s, record, demo, instances, class_images, classifier, eval_kw, log)

    for seed in s["seeds"]:  # seed-major: an interrupted run has every method at the first seed
        for name in variants or s["variants"]:
            label, overrides = VARIANTS[name]
            overrides = {**overrides, "lr": lrs[overrides["method"]]}
            path = target / f"{name}-seed{seed}.json"
            done = _read(path)
            if done and done["run_info"].get("settings") == s and done["run_info"].get("overrides") == overrides:
                continue
            pipe = demo.load_demo_pipeline(weights=weights)  # fresh weights: full fine-tuning edits them in place
            cfg = DreamBoothConfig(instance_prompt=demo.SUBJECT_PROMPT, class_prompt=demo.CLASS_PROMPT,
                                   steps=s["steps"], batch_size=s["batch_size"], num_class_images=s["num_class_images"],
                                   seed=seed, sample_steps=s["sample_steps"], guidance=s["guidance"], **overrides)
            result = finetune(pipe, instances * 2 - 1, cfg, class_images=class_images)
            metrics = evaluate(pipe, classifier, instances, unet=result.unet, text_encoder=result.text_encoder,
                               seed=EVAL_SEED, **eval_kw)
            samples = metrics.pop("samples")
            with tempfile.TemporaryDirectory() as tmp:
                sizes = save_trained(result, cfg, Path(tmp))
            write_json(path, record({"variant": name, "label": label, "overrides": overrides, "seed": seed}, {
                "metrics": metrics, "num_trainable_params": result.trainable, "file_size": sum(sizes.values()),
                "train_time": result.train_time, "losses": result.losses,
                "samples_u8": _u8(samples["subject"][:GRID_IMAGES]),
                "class_samples_u8": _u8(samples["classes"][:: s["per_class_n"]]),
            }))
            log(f"{name} seed {seed}: fidelity {metrics['subject_fidelity']:.3f}, prior accuracy "
                f"{metrics['prior_accuracy']:.3f}, diversity {metrics['subject_diversity']:.3f}, "
                f"{result.trainable:,} trainable, train {result.train_time:.0f}s + sampling "
                f"{metrics['sampling_seconds']:.0f}s")


def _tune(target, weights, s, record, demo, instances, class_images, classifier, eval_kw, log) -> dict:
    """Run (or read back) the learning-rate probe; return {method: chosen lr}."""
    from svfit.dreambooth.demo.evaluate import evaluate
    from svfit.dreambooth.train import DreamBoothConfig, finetune
    from svfit.train.results import write_json

    tune_dir = target / "tune"
    tune_dir.mkdir(exist_ok=True)
    kw = {**eval_kw, **s["tune"]}
    chosen = {}
    for method, grid in LR_GRID.items():
        scores = {}
        for lr in grid:
            path = tune_dir / f"{method}-lr{lr:g}.json"
            done = _read(path)
            if not (done and done["run_info"].get("settings") == s):
                pipe = demo.load_demo_pipeline(weights=weights)
                cfg = DreamBoothConfig(instance_prompt=demo.SUBJECT_PROMPT, class_prompt=demo.CLASS_PROMPT,
                                       method=method, rank=4 if method == "lora" else None, lr=lr, steps=s["steps"],
                                       batch_size=s["batch_size"], num_class_images=s["num_class_images"],
                                       seed=TUNE_SEED, sample_steps=s["sample_steps"], guidance=s["guidance"])
                result = finetune(pipe, instances * 2 - 1, cfg, class_images=class_images)
                m = evaluate(pipe, classifier, instances, unet=result.unet, text_encoder=result.text_encoder,
                             seed=TUNE_EVAL_SEED, **kw)
                m.pop("samples")
                done = record({"variant": f"tune-{method}", "method": method, "lr": lr, "seed": TUNE_SEED},
                              {"metrics": m, "train_time": result.train_time, "losses": result.losses})
                write_json(path, done)
                log(f"tune {method} lr {lr:g}: fidelity {m['subject_fidelity']:.3f}, prior accuracy "
                    f"{m['prior_accuracy']:.3f}")
            m = done["train_info"]["metrics"]
            scores[lr] = m["subject_fidelity"] + m["prior_accuracy"]
        chosen[method] = max(grid, key=lambda lr: (scores[lr], -lr))  # ties: the smaller lr
    return chosen


def _u8(images) -> list:
    return (images.clamp(0, 1)[:, 0].numpy() * 255).round().astype(np.uint8).tolist()


def _read(path: Path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None


# -- report ------------------------------------------------------------------------------------------------------


def _mean_sd(values: list[float], fmt: str = "{:.2f}") -> str:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return "-"
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(statistics.mean(values))} ± {fmt.format(statistics.stdev(values))}"


def section(results: Path, plots: Path, link_prefix: str = "benchmarks/plots") -> str:
    head = "## Subject-driven generation (DreamBooth) on the embedded Fashion-MNIST model"
    target = Path(results) / NAME
    base = _read(target / BASE_FILE)
    if not base:
        return f"{head}\n\nNot run: no results at `{target / BASE_FILE}` (run `python -m benchmarks run --only {NAME}`).\n"
    s = base["run_info"]["settings"]
    runs: dict[str, list[dict]] = {}
    for path in sorted(target.glob("*-seed*.json")):
        r = _read(path)
        if r and r["run_info"].get("settings") == s:
            runs.setdefault(r["run_info"]["variant"], []).append(r)
    bi, bm, ref = base["train_info"], base["train_info"]["metrics"], base["train_info"]["reference"]
    pre = bi.get("pretrain_info") or {}
    lines = [head, ""]
    if base["run_info"].get("quick"):
        lines += ["**Quick run: for checking the code, not for quoting.**", ""]
    d, c = pre.get("diffusion", {}), pre.get("classifier", {})
    lines.append(
        "No pre-trained diffusion weights install offline, so the project pre-trained its own small text-to-image "
        "model (`python -m svfit.dreambooth.demo.pretrain`, committed beside its weights in "
        "`src/svfit/dreambooth/demo/`): a diffusers `UNet2DConditionModel` on 28×28 grey pixels "
        f"({bi['unet_parameters']:,} parameters, channels 16/32/64, cross-attention at 7×7) and a 2-layer "
        "`CLIPTextModel` with a word-level tokenizer, trained jointly on Fashion-MNIST captions \"a photo of a "
        "<class>\" with **ankle boots held out**; sandals and sneakers are also captioned \"shoe\""
        + (f" ({d.get('train_images', 0):,} images, {d.get('steps', 0):,} steps of batch {d.get('batch_size')}, "
           f"{d.get('seconds', 0) / 60:.0f} min on this machine's CPU)" if d else "")
        + ". The judge is a small CNN trained by the same script on all ten classes"
        + (f" (test accuracy {c['test_accuracy']:.3f}; on ankle boots {c['per_class_test_accuracy'][9]:.3f})"
           if c else "") + "."
    )
    lines.append("")
    lines.append(
        f"DreamBooth: {s['instances']} ankle-boot photos (Fashion-MNIST train split, seeded) with \"a photo of sks "
        f"shoe\"; prior preservation on \"a photo of a shoe\" with {s['num_class_images']} images the pre-trained "
        f"model generated (shared by all methods); {s['steps']} steps of {s['batch_size']} instance + "
        f"{s['batch_size']} prior images, AdamW, 10 % warm-up, gradient clipping 1.0; seeds "
        f"{', '.join(map(str, s['seeds']))}. Sampling: DDIM, {s['sample_steps']} steps, classifier-free guidance "
        f"{s['guidance']} (the scale at which the pre-trained model's class prompts came out best in a by-hand probe "
        f"over 1–5); {s['subject_n']} subject samples, {s['per_class_n']} per class prompt × 9, "
        f"{s['shoe_n']} for \"a photo of a shoe\", from the same noise before and after."
    )
    lines.append("")
    lines.append(
        "Columns: **fidelity** = share of \"sks shoe\" samples the judge calls ankle boot; **prior acc.** = judge "
        "accuracy on the nine pre-training prompts (pre-trained model: "
        f"{bm['prior_accuracy']:.3f}); **shoe→boot** = share of \"a photo of a shoe\" samples called ankle boot "
        "(language drift; the pre-trained model: "
        f"{bm['class_prompt_drift_to_subject']:.3f}); **diversity** = mean pairwise RMS pixel distance among subject "
        f"samples (real ankle boots: {ref['real_subject_diversity']:.3f}; the {s['instances']} instance photos: "
        f"{ref['instance_diversity']:.3f}); **→nearest instance** = mean distance from a subject sample to its "
        f"closest instance photo (real held-out boots: {ref['real_subject_nearest_instance']:.3f}; lower = closer "
        "to copying). Mean ± sd over seeds; seeds change the fine-tuning (batches, noise, timesteps), not the "
        f"evaluation noise. With {s['subject_n']} subject samples a fidelity carries a binomial standard error of up "
        f"to {math.sqrt(0.25 / s['subject_n']):.2f}, and a prior accuracy over {9 * s['per_class_n']} samples up to "
        f"{math.sqrt(0.25 / (9 * s['per_class_n'])):.2f}: smaller differences are not resolved."
    )
    lines.append("")
    lines.append("| method | lr | trainable | adapter file | train time (fastest seed) | fidelity | prior acc. (before → after) "
                 "| shoe→boot | diversity | →nearest instance |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|")
    lines.append(f"| pre-trained, no fine-tuning | - | - | - | - | {bm['subject_fidelity']:.2f} | "
                 f"{bm['prior_accuracy']:.3f} | {bm['class_prompt_drift_to_subject']:.2f} | "
                 f"{bm['subject_diversity']:.3f} | {bm['subject_nearest_instance']:.3f} |")
    order = [v for v in VARIANTS if v in runs]
    for v in order:
        rs = runs[v]
        m = [r["train_info"]["metrics"] for r in rs]
        t = rs[0]["train_info"]
        note = "" if len(rs) == len(s["seeds"]) else f" ({len(rs)} of {len(s['seeds'])} seeds)"
        lines.append(
            f"| {VARIANTS[v][0]}{note} | {rs[0]['run_info']['overrides'].get('lr', '-'):g} | "
            f"{t['num_trainable_params']:,} | {_bytes(t['file_size'])} | "
            f"{min(r['train_info']['train_time'] for r in rs):.0f} s | "
            f"{_mean_sd([x['subject_fidelity'] for x in m])} | "
            f"{bm['prior_accuracy']:.3f} → {_mean_sd([x['prior_accuracy'] for x in m], '{:.3f}')} | "
            f"{_mean_sd([x['class_prompt_drift_to_subject'] for x in m])} | "
            f"{_mean_sd([x['subject_diversity'] for x in m], '{:.3f}')} | "
            f"{_mean_sd([x['subject_nearest_instance'] for x in m], '{:.3f}')} |"
        )
    lines.append("")
    if order:
        sampling = statistics.mean(r["train_info"]["metrics"]["sampling_seconds"] for v in order for r in runs[v])
        lines.append(
            f"Per run, sampling the {runs[order[0]][0]['train_info']['metrics']['images']} evaluation images took "
            f"{sampling:.0f} s on average; the pre-trained model's evaluation plus its prior images "
            f"{bi['seconds']:.0f} s. Adapter file = the PEFT `adapter_model.safetensors` (the whole UNet for full "
            "fine-tuning). Train time is the fastest seed's: the runs shared the 2 CPU cores with other jobs, "
            "which slowed single runs many-fold (each JSON keeps its own time)."
        )
        lines.append("")
        png = _grid(base, runs, order, Path(plots))
        lines += _tune_table(target, s)
        lines.append(f"![DreamBooth samples]({link_prefix}/{png})")
        lines.append("")
        lines.append("Rows: the instance photos; the prior images (\"a photo of a shoe\" by the pre-trained model); "
                     "\"a photo of sks shoe\" before fine-tuning; after each method (seed "
                     f"{runs[order[0]][0]['run_info']['seed']}); then one sample per class prompt (t-shirt … bag) "
                     "before and after each method.")
        lines.append("")
    return "\n".join(lines)


def _tune_table(target: Path, s: dict) -> list[str]:
    probes = [r for r in (_read(p) for p in sorted((target / "tune").glob("*.json"))) if r and r["run_info"].get("settings") == s]
    if not probes:
        return []
    lines = [f"Learning rates: a probe per method family (attention targets; fine-tuning seed {TUNE_SEED} and "
             "evaluation noise of its own, "
             f"{s['tune']['subject_n']} subject samples and {s['tune']['per_class_n']} per class prompt), picking the "
             "highest fidelity + prior accuracy; the conv variants use their family's rate.", "",
             "| method | lr | fidelity | prior acc. | chosen |", "|---|---|---|---|---|"]
    best = {}
    for r in probes:
        m, ri = r["train_info"]["metrics"], r["run_info"]
        score = m["subject_fidelity"] + m["prior_accuracy"]
        if ri["method"] not in best or (score, -ri["lr"]) > best[ri["method"]]:
            best[ri["method"]] = (score, -ri["lr"])
    for method in LR_GRID:
        for r in sorted((r for r in probes if r["run_info"]["method"] == method), key=lambda r: r["run_info"]["lr"]):
            m, lr = r["train_info"]["metrics"], r["run_info"]["lr"]
            mark = "✓" if best[method][1] == -lr else ""
            lines.append(f"| {method} | {lr:g} | {m['subject_fidelity']:.2f} | {m['prior_accuracy']:.3f} | {mark} |")
    return lines + [""]


def _bytes(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB" if n >= 1e3 else f"{n} B"


def _grid(base: dict, runs: dict, order: list[str], plots: Path) -> str:
    import torch

    from svfit.dreambooth.sampling import save_grid

    def t(u8):
        return torch.from_numpy(np.asarray(u8, np.float32) / 255.0)[:, None]

    bi = base["train_info"]
    rows = [t(bi["instances_u8"]), t(bi["class_images_u8"][:GRID_IMAGES]), t(bi["samples_u8"])]
    labels = ["instance photos", "prior images (shoe)", "sks shoe: before"]
    for v in order:
        rows.append(t(runs[v][0]["train_info"]["samples_u8"]))
        labels.append(f"sks shoe: {v}")
    rows.append(t(bi["class_samples_u8"]))
    labels.append("9 classes: before")
    for v in order:
        rows.append(t(runs[v][0]["train_info"]["class_samples_u8"]))
        labels.append(f"9 classes: {v}")
    name = "dreambooth-samples.png"
    save_grid(rows, plots / name, labels=labels, scale=2)
    return name
