"""Class names shipped with explainrt (no PyTorch needed to read them)."""

from __future__ import annotations

import functools
from importlib import resources


@functools.cache
def imagenet_labels() -> tuple[str, ...]:
    """The 1000 ImageNet-1k class names, in class-index order."""
    text = resources.files("explainrt").joinpath("data").joinpath("imagenet_labels.txt")
    return tuple(text.read_text(encoding="utf-8").splitlines())
