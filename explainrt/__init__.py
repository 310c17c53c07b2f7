"""explainrt: inference-time explanations computed inside the ONNX graph.

``Explainer(model).explain(images, method="gradcam")`` explains a classifier's predictions on
ONNX Runtime (or PyTorch, as the reference); ``make_explainable`` / ``from_torch`` rewrite a model
so that it also returns its target layers' activations and their gradients.
"""


from explainrt.explainer import Explainer, Explanation, Prediction  # noqa: E402
from explainrt.export import make_explainable  # noqa: E402
from explainrt.methods import METHODS  # noqa: E402
from explainrt.version import __version__


def __getattr__(name: str) -> object:
    """``from_torch`` imports PyTorch: load it only when asked for."""
    if name == "from_torch":
        from explainrt.export.torch_export import from_torch

        return from_torch
    raise AttributeError(f"module 'explainrt' has no attribute {name!r}")


__all__ = ["METHODS", "Explainer", "Explanation", "Prediction", "__version__", "from_torch", "make_explainable"]
