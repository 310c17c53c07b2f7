"""Runtimes that run explainable models: the Session contract (``base``) and its backends.

``BACKENDS`` is the one table from a backend name to how its session is opened: what model
form it takes, its own settings, and a check that runs before any (slow) export.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import onnx

from explainrt.errors import InvalidInputError
from explainrt.runtime.base import Session
from explainrt.runtime.torch import ModuleSource


@dataclass(frozen=True)
class Backend:
    """One runtime: ``open(model, providers, device, **options) -> Session``."""

    name: str
    takes: str  # "onnx": an explainable ONNX model; "module": a ModuleSource (PyTorch module and target modules)
    options: tuple[str, ...]  # keyword settings of its session (``Explainer(backend_options=...)``)
    open: Callable[..., Session]
    check: Callable[[], None] = lambda: None  # fails early (before an export) when the backend cannot run here
    adds_heads: bool = False  # open(..., maps=methods) puts those map heads into the model's own runtime call


def _open_onnxruntime(model: onnx.ModelProto, providers: Sequence[str] | None, device: str | None,
                      **options: Any) -> Session:
    from explainrt.runtime.onnxruntime import OnnxRuntimeSession, onnxruntime_placement

    chosen, device_id = onnxruntime_placement(providers, device)
    return OnnxRuntimeSession(model, chosen, device_id, **options)


def _open_torch(source: ModuleSource, providers: Sequence[str] | None, device: str | None, **options: Any) -> Session:
    from explainrt.runtime.torch import TorchSession

    _no_providers("torch", providers)
    return TorchSession.probed(source, device or "cpu", **options)


def _open_tensorrt(model: onnx.ModelProto, providers: Sequence[str] | None, device: str | None,
                   **options: Any) -> Session:
    from explainrt.runtime.tensorrt import TensorRTSession

    _no_providers("tensorrt", providers)
    return TensorRTSession(model, device or "cuda", **options)


def _check_tensorrt() -> None:
    from explainrt.runtime.tensorrt import load_tensorrt

    load_tensorrt()


def _no_providers(backend: str, providers: Sequence[str] | None) -> None:
    if providers:
        raise InvalidInputError(f"providers are ONNX Runtime execution providers; backend {backend!r} takes none "
                                f"(got {list(providers)})")


BACKENDS: dict[str, Backend] = {backend.name: backend for backend in (
    Backend("onnxruntime", "onnx", ("device_outputs",), _open_onnxruntime, adds_heads=True),
    Backend("torch", "module", (), _open_torch),
    Backend("tensorrt", "onnx", ("precision", "profile", "cache_dir", "device_outputs"), _open_tensorrt,
            _check_tensorrt, adds_heads=True),
)}


def backend(name: str, options: dict[str, Any] | None = None) -> Backend:
    """The backend called ``name``, after checking its options and that it can run here."""
    if name not in BACKENDS:
        raise InvalidInputError(f"unknown backend {name!r}; choose one of {tuple(BACKENDS)}")
    chosen = BACKENDS[name]
    unknown = sorted(set(options or {}) - set(chosen.options))
    if unknown:
        raise InvalidInputError(f"backend_options {unknown} are not options of backend {name!r} "
                                f"(it takes {list(chosen.options)})")
    chosen.check()
    return chosen


__all__ = ["BACKENDS", "Backend", "ModuleSource", "Session", "backend"]
