"""The explanation methods, by name: ``METHODS`` and ``get_method``.

Each family lives in its own module and registers its methods here; the pipeline and the
interfaces (CLI, server) know methods only through this registry.
"""

from __future__ import annotations

from explainrt.errors import UnknownMethodError
from explainrt.methods.base import Attribution, AttributionRequest, Method
from explainrt.methods.cam import CAM_METHODS, CamMethod, CamTerms, LayerContext, ablation_values, principal_projection
from explainrt.methods.dff import DFF_METHODS
from explainrt.methods.fgvis import FGVIS_METHODS
from explainrt.methods.gradients import GRADIENT_METHODS
from explainrt.methods.perturbation import PERTURBATION_METHODS
from explainrt.methods.surrogate import SURROGATE_METHODS
from explainrt.methods.targeted import TARGETED_METHODS

METHODS: dict[str, Method] = {m.name: m for m in (*CAM_METHODS, *TARGETED_METHODS, *DFF_METHODS, *GRADIENT_METHODS, *PERTURBATION_METHODS, *SURROGATE_METHODS, *FGVIS_METHODS)}


def get_method(name: str) -> Method:
    """The registered method called ``name`` (case-insensitive)."""
    try:
        return METHODS[name.lower()]
    except KeyError:
        raise UnknownMethodError(f"unknown method {name!r}; known: {', '.join(METHODS)}") from None


__all__ = ["METHODS", "Attribution", "AttributionRequest", "CamMethod", "CamTerms", "LayerContext", "Method",
           "ablation_values", "get_method", "principal_projection"]
