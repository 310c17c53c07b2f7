"""Checks of user-given numbers shared by every layer: integers in a range, class indices."""

from __future__ import annotations

from typing import Any

import numpy as np

from explainrt.errors import InvalidInputError


def checked_int(name: str, value: Any, lowest: int = 1, highest: int | None = None) -> int:
    """``value`` as an int in ``lowest``..``highest`` (no upper bound when None), else an error naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lowest or (
            highest is not None and value > highest):
        bound = f">= {lowest}" if highest is None else f"in {lowest}..{highest}"
        raise InvalidInputError(f"{name} must be an integer {bound}, got {value!r}")
    return int(value)


def check_class_range(values: Any, classes: int, what: str = "target class") -> None:
    """Raise InvalidInputError naming the first class index outside -classes..classes-1 (-k: k-th most likely)."""
    values = np.asarray(values)
    bad = (values >= classes) | (values < -classes)
    if bad.any():
        raise InvalidInputError(f"{what} {int(values[bad][0])} is out of range for a model with {classes} classes "
                                f"(use 0..{classes - 1}, or -k for the k-th most likely)")
