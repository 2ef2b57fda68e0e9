"""The task registry: each task names a real pre-trained model, real data with a seeded split, and a metric."""

from __future__ import annotations

from .base import Prediction, Task, TaskDefaults

DEFAULT_TASK = "sentiment"


def _registry() -> dict[str, Task]:
    # imported lazily: building the registry must not import every model family
    from .lm import LM_SENTIMENT
    from .text import SENTIMENT, SUBJECTIVITY
    from .vision import FASHION, VIT_FASHION

    return {t.name: t for t in (SENTIMENT, SUBJECTIVITY, VIT_FASHION, FASHION, LM_SENTIMENT)}


TASK_NAMES = ("sentiment", "subjectivity", "vit-fashion", "fashion", "lm-sentiment")


def get_task(name: str) -> Task:
    tasks = _registry()
    if name not in tasks:
        raise KeyError(f"unknown task {name!r}; choose one of: {', '.join(TASK_NAMES)}")
    return tasks[name]


__all__ = ["DEFAULT_TASK", "Prediction", "TASK_NAMES", "Task", "TaskDefaults", "get_task"]
