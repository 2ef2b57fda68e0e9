"""Measures for the DreamBooth demo, all judged by the 10-class classifier trained with the demo model.

* **subject fidelity**: share of samples for the subject prompt ("a photo of sks shoe") classified as ankle boot;
* **prior preservation**: class accuracy of samples for the nine "a photo of a <class>" prompts the model was
  pre-trained on, before and after fine-tuning, and for the class prompt "a photo of a shoe" the share still
  classified as sandal or sneaker and the share that drifted to ankle boot;
* **diversity**: mean pairwise distance among the subject samples, as the RMS pixel difference in [0, 1]
  (0 = identical images); reference values for the instance images themselves and for real ankle boots.
  **Copying**: mean distance from each subject sample to its nearest instance image (lower = closer to a copy).
"""

from __future__ import annotations

import time
from typing import Optional

import torch

from . import CLASS_PROMPT, CLASS_WORDS, HELD_OUT, SHOE_CLASSES, SUBJECT_PROMPT, class_prompt, classify


def pairwise_rms(a: torch.Tensor, b: Optional[torch.Tensor] = None) -> torch.Tensor:
    """RMS pixel distance between every image of ``a`` and every image of ``b`` (or of ``a``)."""
    fa = a.flatten(1).double()
    fb = fa if b is None else b.flatten(1).double()
    d2 = (fa * fa).sum(1)[:, None] + (fb * fb).sum(1)[None] - 2 * fa @ fb.T
    return (d2.clamp_min(0) / fa.shape[1]).sqrt()


def diversity(images: torch.Tensor) -> float:
    """Mean pairwise RMS distance over distinct pairs."""
    n = len(images)
    if n < 2:
        return float("nan")
    d = pairwise_rms(images)
    return float(d.sum() / (n * (n - 1)))


def nearest_distance(images: torch.Tensor, references: torch.Tensor) -> float:
    return float(pairwise_rms(images, references).min(1).values.mean())


@torch.no_grad()
def evaluate(pipe, classifier, instance_images: torch.Tensor, *, subject_n: int, per_class_n: int, shoe_n: int,
             steps: int, guidance: float, seed: int = 1234, unet=None, text_encoder=None) -> dict:
    """Sample the subject prompt, the nine class prompts and the class prompt; score them. Returns a dict of
    metrics plus the sample tensors under ``"samples"`` (for grids). The noise is fixed by ``seed``, so before and
    after are paired."""
    from ..sampling import sample

    labels = [c for c, w in enumerate(CLASS_WORDS) if w is not None]
    prompts = [SUBJECT_PROMPT] * subject_n + [class_prompt(c) for c in labels for _ in range(per_class_n)]
    prompts += [CLASS_PROMPT] * shoe_n
    original = pipe.text_encoder
    if text_encoder is not None:
        pipe.text_encoder = text_encoder
    t0 = time.perf_counter()
    try:
        images = sample(pipe, prompts, steps=steps, guidance=guidance, seed=seed, unet=unet, batch_size=128)
    finally:
        pipe.text_encoder = original
    seconds = time.perf_counter() - t0
    pred = classify(classifier, images)
    subject, rest = images[:subject_n], images[subject_n:]
    sp, rp = pred[:subject_n], pred[subject_n:]
    class_pred = rp[: len(labels) * per_class_n].view(len(labels), per_class_n)
    per_class = {CLASS_WORDS[c]: float((class_pred[i] == c).float().mean()) for i, c in enumerate(labels)}
    shoe_pred = rp[len(labels) * per_class_n:]
    inst = instance_images.cpu()
    return {
        "subject_fidelity": float((sp == HELD_OUT).float().mean()),
        "subject_predictions": torch.bincount(sp, minlength=10).tolist(),
        "prior_accuracy": sum(per_class.values()) / len(per_class),
        "prior_accuracy_per_class": per_class,
        "class_prompt_shoe_share": float(sum((shoe_pred == c).float().sum() for c in SHOE_CLASSES) / max(1, shoe_n)),
        "class_prompt_drift_to_subject": float((shoe_pred == HELD_OUT).float().mean()) if shoe_n else float("nan"),
        "subject_diversity": diversity(subject),
        "subject_nearest_instance": nearest_distance(subject, inst),
        "sampling_seconds": seconds,
        "images": len(prompts),
        "samples": {"subject": subject, "classes": rest[: len(labels) * per_class_n],
                    "shoe": rest[len(labels) * per_class_n:]},
    }


def reference_metrics(instance_images: torch.Tensor, real_subject: torch.Tensor, classifier) -> dict:
    """The same diversity / copying numbers for real photos, to read the generated ones against."""
    return {
        "instance_diversity": diversity(instance_images),
        "real_subject_diversity": diversity(real_subject),
        "real_subject_nearest_instance": nearest_distance(real_subject, instance_images),
        "real_subject_fidelity": float((classify(classifier, real_subject) == HELD_OUT).float().mean()),
    }
