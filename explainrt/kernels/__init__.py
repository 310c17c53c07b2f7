"""Array kernels every explanation method shares: CAM fusion, resizing, normalisation, masks.

All functions take floating-point arrays (converted to float32, C-contiguous) and return float32.
`backend` chooses the implementation: "numpy" (the reference), "cpp" (compiled OpenMP module),
"cupy" (CUDA; results stay on the device) or "auto": cupy when an input lives on a CUDA device,
else cpp when it is compiled, else numpy. A backend asked for by name that cannot run raises
BackendUnavailableError; nothing falls back silently.
"""

from __future__ import annotations

import functools
import importlib
from types import ModuleType
from typing import Any, Callable, Literal, NamedTuple

import numpy as np

from explainrt.errors import BackendUnavailableError, InvalidInputError
from explainrt.kernels import _cupy, _numpy

__all__ = [
    "BACKENDS",
    "Backend",
    "available_backends",
    "cam_maps",
    "channel_masks",
    "normalize_minmax",
    "resize_bilinear",
]

Backend = Literal["auto", "numpy", "cpp", "cupy"]
BACKENDS: tuple[str, ...] = ("numpy", "cpp", "cupy")


class _Impl(NamedTuple):
    """A backend's kernels and how to turn a caller's array into one it accepts."""

    kernels: Any
    xp: ModuleType
    asarray: Callable[[Any], Any]


@functools.cache
def _probe(name: str) -> _Impl | str:
    """The backend, or why it cannot run here (cached: availability is fixed per process)."""
    if name == "numpy":
        return _Impl(_numpy, np, np.asarray)
    if name == "cpp":
        try:
            kernels = importlib.import_module("explainrt.kernels._cpu")
        except ImportError as exc:
            return (
                "backend 'cpp' needs the compiled module explainrt.kernels._cpu, which does not "
                f"import ({exc}); build it with `pip install -e . --no-build-isolation`"
            )
        return _Impl(kernels, np, np.asarray)
    try:
        cupy = _cupy.load_cupy()
    except BackendUnavailableError as exc:
        return str(exc)
    return _Impl(_cupy, cupy, _cupy.asarray)


def available_backends() -> list[str]:
    """Names of the backends that can run in this process, in `BACKENDS` order."""
    return [name for name in BACKENDS if isinstance(_probe(name), _Impl)]


def _select(backend: str, *arrays: Any) -> _Impl:
    """Resolve `backend` ("auto" included) for these inputs, or raise saying what is missing."""
    if backend == "auto":
        if any(_cupy.is_device_array(a) for a in arrays):
            backend = "cupy"
        else:
            backend = "cpp" if isinstance(_probe("cpp"), _Impl) else "numpy"
    elif backend not in BACKENDS:
        raise InvalidInputError(
            f"backend must be one of 'auto', {', '.join(map(repr, BACKENDS))}; got {backend!r}"
        )
    impl = _probe(backend)
    if isinstance(impl, str):
        raise BackendUnavailableError(impl)
    return impl


def _as_float32(name: str, x: Any, impl: _Impl) -> Any:
    """`x` as a C-contiguous float32 array of the backend; non-floating dtypes are rejected."""
    if impl.xp is np and _cupy.is_device_array(x):
        raise InvalidInputError(
            f"{name} is on a CUDA device; use backend='cupy' or 'auto', or copy it to the host"
        )
    try:
        arr = impl.asarray(x)
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"{name} cannot be read as an array: {exc}") from exc
    if arr.dtype.kind != "f":
        raise InvalidInputError(
            f"{name} must be a floating-point array; got dtype {arr.dtype} "
            f"with shape {tuple(arr.shape)}"
        )
    return impl.xp.ascontiguousarray(arr, dtype=impl.xp.float32)


def _check_maps(name: str, arr: Any, layout: str) -> None:
    """Require rank len(layout) and non-empty dimensions after the batch one."""
    if arr.ndim != len(layout.split(",")) or 0 in arr.shape[1:]:
        raise InvalidInputError(
            f"{name} must be a [{layout}] array with non-empty dimensions after N; "
            f"got shape {tuple(arr.shape)}"
        )


def _check_out_hw(out_hw: Any) -> tuple[int, int]:
    """`out_hw` as two positive ints (H, W)."""
    try:
        height, width = out_hw
    except (TypeError, ValueError):
        raise InvalidInputError(f"out_hw must be a pair (H, W); got {out_hw!r}") from None
    for size in (height, width):
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size <= 0:
            raise InvalidInputError(f"out_hw must be two positive integers (H, W); got {out_hw!r}")
    return int(height), int(width)


def cam_maps(
    activations: Any, weights: Any, out_hw: tuple[int, int], *, normalize: bool = True,
    backend: Backend = "auto",
) -> Any:
    """Grad-CAM-family saliency: ReLU(sum_c weights * activations), min-max scaled, resized.

    `activations` is [N, C, h, w]; `weights` is [N, C] (one weight per channel, Grad-CAM) or
    [N, C, h, w] (per pixel, HiResCAM / LayerCAM). Normalisation is pytorch-grad-cam's
    `scale_cam_image` and resizing is cv2's INTER_LINEAR, so results match that library.
    Returns [N, H, W] for `out_hw` = (H, W); `normalize=False` skips the min-max scaling (raw maps).
    """
    impl = _select(backend, activations, weights)
    acts = _as_float32("activations", activations, impl)
    wts = _as_float32("weights", weights, impl)
    _check_maps("activations", acts, "N, C, h, w")
    expected = {2: acts.shape[:2], 4: acts.shape}.get(wts.ndim)
    if wts.shape != expected:
        raise InvalidInputError(
            f"weights must be [N, C] or [N, C, h, w] matching activations {tuple(acts.shape)}; "
            f"got shape {tuple(wts.shape)}"
        )
    return impl.kernels.cam_maps(acts, wts, *_check_out_hw(out_hw), bool(normalize))


def resize_bilinear(maps: Any, out_hw: tuple[int, int], *, backend: Backend = "auto") -> Any:
    """Resize [N, h, w] maps to [N, H, W] like `cv2.resize(m, (W, H), cv2.INTER_LINEAR)` per map."""
    impl = _select(backend, maps)
    arr = _as_float32("maps", maps, impl)
    _check_maps("maps", arr, "N, h, w")
    return impl.kernels.resize_bilinear(arr, *_check_out_hw(out_hw))


def normalize_minmax(maps: Any, *, backend: Backend = "auto") -> Any:
    """Scale each [H, W] map of [N, H, W] to [0, 1) like pytorch-grad-cam's `scale_cam_image`."""
    impl = _select(backend, maps)
    arr = _as_float32("maps", maps, impl)
    _check_maps("maps", arr, "N, H, W")
    return impl.kernels.normalize_minmax(arr)


def channel_masks(activations: Any, out_hw: tuple[int, int], *, backend: Backend = "auto") -> Any:
    """Score-CAM masks [N, C, H, W]: each activation channel upsampled and scaled to [0, 1].

    Upsampling is bilinear with align_corners=True (torch's UpsamplingBilinear2d), then
    (x - min) / (max - min + 1e-8) per channel, as pytorch-grad-cam's ScoreCAM builds them.
    """
    impl = _select(backend, activations)
    acts = _as_float32("activations", activations, impl)
    _check_maps("activations", acts, "N, C, h, w")
    return impl.kernels.channel_masks(acts, *_check_out_hw(out_hw))
