"""Up-front checks of numeric hyper-parameters, shared by ``svfit train`` and ``svfit dreambooth``, and of the places
outputs will be written (``--out``, ``inspect --plot/--json``).

A value that cannot mean anything (NaN, infinity, a negative learning rate or weight decay) is refused before any
model or data is loaded, with one line naming the flag, rather than failing minutes later as a "diverged" run
that blames another flag, or running to the end on nonsense.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Optional

from .errors import SVFitUserError


def check_number(flag: str, value: Optional[float], *, minimum: Optional[float] = None, positive: bool = False,
                 maximum: Optional[float] = None, why: str = "") -> None:
    """Refuse ``value`` (None = unset, accepted) unless it is finite, > 0 with ``positive``, >= ``minimum`` and
    <= ``maximum``. ``flag`` is the option as the user typed it (``--lr``); ``why`` is appended to the message."""
    if value is None:
        return
    note = f" ({why})" if why else ""
    try:
        finite = math.isfinite(value)
    except TypeError:
        raise SVFitUserError(f"{flag} must be a number, got {value!r}") from None
    if not finite:
        raise SVFitUserError(f"{flag} must be a finite number, got {value}{note}")
    if positive and not value > 0:
        raise SVFitUserError(f"{flag} must be positive, got {value:g}{note}")
    if minimum is not None and value < minimum:
        raise SVFitUserError(f"{flag} must be >= {minimum:g}, got {value:g}{note}")
    if maximum is not None and value > maximum:
        raise SVFitUserError(f"{flag} must be <= {maximum:g}, got {value:g}{note}")


def check_optimizer(lr: Optional[float], weight_decay: Optional[float] = None, *, head_lr: Optional[float] = None,
                    epochs: Optional[float] = None, steps: Optional[int] = None) -> None:
    """The optimisation settings both commands share: learning rates > 0, weight decay >= 0, a positive length."""
    check_number("--lr", lr, positive=True)
    check_number("--head-lr", head_lr, positive=True)
    check_number("--weight-decay", weight_decay, minimum=0.0, why="a negative decay pushes the weights away from zero")
    check_number("--epochs", epochs, positive=True)
    check_number("--steps", steps, minimum=1)


def check_choice(flag: str, value: str, choices) -> None:
    if value not in choices:
        raise SVFitUserError(f"unknown {flag} {value!r}; choose one of: {', '.join(choices)}")


def nearest_existing(path: Path) -> Path:
    """``path`` or its nearest ancestor that exists: where writing ``path`` would create its first file or folder."""
    while not path.exists():
        path = path.parent
    return path


def write_error(directory: Path) -> Optional[str]:
    """Why a file cannot be created in ``directory`` (the OS's words), or None when it can. A real write, not
    ``os.access``: root passes access checks on read-only file systems."""
    try:
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as exc:
        return exc.strerror or str(exc)
    return None
