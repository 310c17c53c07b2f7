"""The explanation methods, by name: ``METHODS`` and ``get_method``; their options table for README.md.

Each family lives in its own module and registers its methods here; the pipeline and the
interfaces (CLI, server) know methods only through this registry, and their options only
through the declarations (``explainrt.methods.options``).
"""

from __future__ import annotations

from pathlib import Path

from explainrt.errors import UnknownMethodError
from explainrt.methods.base import Attribution, AttributionRequest, Method, add_timings
from explainrt.methods.cam import CAM_METHODS, CamMethod, CamTerms, LayerContext, ablation_values, principal_projection
from explainrt.methods.dff import DFF_METHODS
from explainrt.methods.fgvis import FGVIS_METHODS
from explainrt.methods.gradients import GRADIENT_METHODS
from explainrt.methods.options import Option, markdown_table, option_help, parse_text_options, replace_table
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


def options_table() -> str:
    """README.md's Markdown table of every registered method and its options (types, defaults, ranges)."""
    return markdown_table(METHODS.values())


def sync_readme(path: str | Path = "README.md") -> bool:
    """Rewrite the method table between the markers of README.md at ``path``; whether it changed."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    updated = replace_table(text, options_table())
    if updated != text:
        path.write_text(updated, encoding="utf-8")
    return updated != text


__all__ = ["METHODS", "Attribution", "AttributionRequest", "CamMethod", "CamTerms", "LayerContext", "Method",
           "Option", "ablation_values", "add_timings", "get_method", "option_help", "options_table", "parse_text_options",
           "principal_projection", "sync_readme"]
