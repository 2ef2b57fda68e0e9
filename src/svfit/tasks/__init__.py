"""The task registry: each task names a real pre-trained model, real data with a seeded split, and a metric."""

from __future__ import annotations

from typing import Optional

from ..errors import SVFitUserError, UnknownChoiceError
from .base import Prediction, Task, TaskDefaults

DEFAULT_TASK = "sentiment"


def _factories():
    # imported lazily: listing the tasks must not import every model family
    from .lm import LMSentiment
    from .text import sentiment, subjectivity
    from .vision import EfficientNetFashion, ViTFashion

    return {
        "sentiment": sentiment,
        "subjectivity": subjectivity,
        "vit-fashion": ViTFashion,
        "fashion": EfficientNetFashion,
        "lm-sentiment": LMSentiment,
    }


TASK_NAMES = ("sentiment", "subjectivity", "vit-fashion", "fashion", "lm-sentiment")


def get_task(name: str, model: Optional[str] = None) -> Task:
    """A fresh task instance. ``model`` replaces the task's bundled pre-trained model with a local directory or a
    Hugging Face Hub id (for users with hub access), where the task supports it."""
    factories = _factories()
    if name not in factories:
        raise UnknownChoiceError(f"unknown task {name!r}; choose one of: {', '.join(TASK_NAMES)}")
    task = factories[name]()
    if model is not None:
        if not task.supports_model_override:
            raise SVFitUserError(f"task {name!r} uses its own network definition; --model is not supported there")
        task.model_source = model
    return task


__all__ = ["DEFAULT_TASK", "Prediction", "TASK_NAMES", "Task", "TaskDefaults", "get_task"]
