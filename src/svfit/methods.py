"""The fine-tuning methods the CLI compares, all built from PEFT itself so that comparisons are fair:
SVFit (this package), LoRA, PiSSA (LoRA with an SVD init), IA3 (learned scaling vectors: the other
vector-only PEFT method) and full fine-tuning."""

from __future__ import annotations

import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from torch import nn

from .errors import SVFitUserError

ADAPTER_DIR = "adapter"
FULL_MODEL_FILE = "model.safetensors"


@dataclass
class MethodOptions:
    """Knobs shared by the CLI; each method reads the ones that apply to it."""

    targets: Optional[Union[list[str], str]] = None  # None: the task's default (attention q, v or equivalent)
    rank: Optional[Union[int, str]] = None  # svfit: None = threshold, int, "full"; lora/pissa: int (default 8)
    threshold: float = 0.99
    information: str = "energy"
    parametrization: str = "delta"
    save_bases: bool = False


@dataclass(frozen=True)
class Method:
    name: str
    help: str

    def apply(self, model: nn.Module, task, options: MethodOptions) -> nn.Module:
        """Return the model ready to train (trainable parameters set)."""
        from peft import get_peft_model

        return get_peft_model(model, self.peft_config(task, options))

    def peft_config(self, task, options: MethodOptions):
        raise NotImplementedError

    def save(self, model: nn.Module, run_dir: Path) -> Path:
        """Write what this method trained under ``run_dir``; return the main weights file (for its size)."""
        dest = run_dir / ADAPTER_DIR
        model.save_pretrained(dest)
        return dest / "adapter_model.safetensors"

    def load(self, base: nn.Module, run_dir: Path) -> nn.Module:
        from peft import PeftModel

        import svfit  # noqa: F401  (registers SVFIT with PEFT before any adapter config is read)

        return PeftModel.from_pretrained(base, run_dir / ADAPTER_DIR).eval()

    def weights_path(self, run_dir: Path) -> Path:
        return run_dir / ADAPTER_DIR / "adapter_model.safetensors"


def _common(task, options: MethodOptions) -> dict:
    targets = options.targets if options.targets is not None else task.targets
    kwargs = {"target_modules": list(targets) if isinstance(targets, (list, tuple)) else targets}
    if task.peft_task_type:
        kwargs["task_type"] = task.peft_task_type  # PEFT then trains and saves the new head itself
    elif task.head_modules:
        kwargs["modules_to_save"] = list(task.head_modules)
    return kwargs


class SVFitMethod(Method):
    def peft_config(self, task, options: MethodOptions):
        from .tuner import SVFitConfig

        return SVFitConfig(
            r=options.rank,
            threshold=options.threshold,
            information=options.information,
            parametrization=options.parametrization,
            save_bases=options.save_bases,
            **_common(task, options),
        )


class LoraMethod(Method):
    init: Union[bool, str] = True

    def peft_config(self, task, options: MethodOptions):
        from peft import LoraConfig

        r = 8 if options.rank is None else options.rank
        if not isinstance(r, int):
            raise ValueError(f"--rank for {self.name} must be an integer, got {r!r}")
        return LoraConfig(r=r, lora_alpha=r, init_lora_weights=self.init, **_common(task, options))


class PissaMethod(LoraMethod):
    """LoRA initialised from the top-r singular triplets. PiSSA writes the residual into the base weights, so the
    adapter is saved converted to a plain LoRA that applies to the untouched base model (rank 2r)."""

    init = "pissa"

    def apply(self, model, task, options):
        try:
            peft_model = super().apply(model, task, options)
        except ValueError as exc:
            if "Unknown initialization" not in str(exc):
                raise
            # PEFT implements PiSSA's SVD init for Linear layers only
            raise SVFitUserError(
                f"PEFT's PiSSA initialises Linear layers only, and task {task.name} targets other layers (e.g. "
                "Conv2d); pick Linear --targets or another method"
            ) from None
        init_dir = Path(tempfile.mkdtemp(prefix="svfit-pissa-init-"))
        config = peft_model.peft_config["default"]
        config.init_lora_weights = True  # the saved initial adapter must be plain LoRA for the conversion
        peft_model.save_pretrained(init_dir)
        config.init_lora_weights = "pissa"
        peft_model._svfit_pissa_init_dir = init_dir
        return peft_model

    def save(self, model, run_dir):
        dest = run_dir / ADAPTER_DIR
        init_dir = getattr(model, "_svfit_pissa_init_dir", None)
        if init_dir is None:
            raise RuntimeError("PiSSA model was not created by PissaMethod.apply: cannot convert it for saving")
        with warnings.catch_warnings():
            # PEFT warns that PiSSA mutates the base model; the conversion below is exactly its advice
            warnings.filterwarnings("ignore", message="PiSSA changes the base weights")
            model.save_pretrained(dest, path_initial_model_for_weight_conversion=str(init_dir))
        shutil.rmtree(init_dir, ignore_errors=True)
        # PEFT 0.21's conversion keeps only the LoRA tensors: put the trained head (modules_to_save) back
        from peft import get_peft_model_state_dict
        from safetensors.torch import load_file, save_file

        weights = dest / "adapter_model.safetensors"
        extra = {k: v for k, v in get_peft_model_state_dict(model).items() if "lora_" not in k}
        if extra:
            tensors = load_file(weights)
            tensors.update({k: v.detach().contiguous() for k, v in extra.items()})
            save_file(tensors, weights, metadata={"format": "pt"})
        return weights


class IA3Method(Method):
    def peft_config(self, task, options: MethodOptions):
        from peft import IA3Config

        return IA3Config(feedforward_modules=[], **_common(task, options))


class FullFineTuning(Method):
    def apply(self, model, task, options):
        model.requires_grad_(True)
        return model

    def save(self, model, run_dir):
        from safetensors.torch import save_model

        dest = run_dir / "model"
        dest.mkdir(parents=True, exist_ok=True)
        save_model(model, str(dest / FULL_MODEL_FILE))  # handles tied weights (e.g. SmolLM2's lm_head)
        return dest / FULL_MODEL_FILE

    def load(self, base, run_dir):
        from safetensors.torch import load_model

        load_model(base, str(self.weights_path(run_dir)))
        return base.eval()

    def weights_path(self, run_dir):
        return run_dir / "model" / FULL_MODEL_FILE


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        SVFitMethod("svfit", "SVFit: train only the top-r singular values of each target (default)"),
        LoraMethod("lora", "LoRA, rank 8 (alpha = rank)"),
        PissaMethod("pissa", "PiSSA: LoRA initialised from the principal singular triplets, rank 8"),
        IA3Method("ia3", "IA3: learned per-channel scaling vectors"),
        FullFineTuning("full", "full fine-tuning of every weight"),
    )
}
DEFAULT_METHOD = "svfit"


def get_method(name: str) -> Method:
    if name not in METHODS:
        from .errors import UnknownChoiceError

        raise UnknownChoiceError(f"unknown method {name!r}; choose one of: {', '.join(METHODS)}")
    return METHODS[name]
