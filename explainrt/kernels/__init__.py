"""Array kernels every explanation method shares: CAM fusion, resizing, normalisation, masks.

Perturbation kernels (occlusion, RISE, LIME / KernelSHAP, Score-CAM) make, apply and accumulate
masks batch by batch, so memory does not grow with the number of perturbations:

- ``apply_masks(image [C,H,W], masks [B,H,W] | [B,C,H,W], baseline float | [C,H,W]) -> [B,C,H,W]``
- ``segment_masks(segments [H,W] int, on_off [B,S]) -> [B,H,W]``
- ``accumulate_scores(scores [B,T], masks [B,H,W]) -> [T,H,W]`` (a GEMM)
- ``rise_masks(seed, first, count, grid, p, out_hw) -> [count,H,W]`` (counter-based)
- ``occlusion_grid(shape, window, stride) -> OcclusionGrid(window, stride, positions)`` and
  ``occlusion_masks(shape, window, stride, first, count) -> [count,C,H,W]`` keep masks

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
    "accumulate_scores",
    "apply_masks",
    "available_backends",
    "cam_maps",
    "channel_masks",
    "normalize_minmax",
    "OcclusionGrid",
    "occlusion_grid",
    "occlusion_masks",
    "resize_bilinear",
    "resize_matrix",
    "rise_masks",
    "segment_masks",
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


def resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    """cv2's INTER_LINEAR resize of one axis from ``n_in`` to ``n_out`` pixels as a matrix, float32
    [n_out, n_in]: ``matrix @ x`` resizes x along its first axis as ``resize_bilinear`` does (two
    non-zero weights per row, the same table), so a graph can resize with two MatMuls."""
    table = _numpy.half_pixel_axis(_check_int("n_in", n_in, 1), _check_int("n_out", n_out, 1))
    matrix = np.zeros((n_out, n_in), dtype=np.float32)
    rows = np.arange(n_out)
    np.add.at(matrix, (rows, table.lo), table.w_lo)
    np.add.at(matrix, (rows, table.hi), table.w_hi)
    return matrix


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


# --- perturbation masks ------------------------------------------------------------------------


def _check_int(name: str, value: Any, lowest: int, highest: int | None = None) -> int:
    """`value` as an int in [lowest, highest], or an error naming the parameter."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lowest or (
            highest is not None and value > highest):
        bound = f">= {lowest}" if highest is None else f"in [{lowest}, {highest}]"
        raise InvalidInputError(f"{name} must be an integer {bound}; got {value!r}")
    return int(value)


def _check_triple(name: str, value: Any, channels: int) -> tuple[int, int, int]:
    """A window or stride as (c, h, w): an int (same on h and w, all channels), (h, w) or (c, h, w)."""
    items = (value, value) if isinstance(value, (int, np.integer)) and not isinstance(value, bool) else value
    try:
        items = tuple(items)
    except TypeError:
        raise InvalidInputError(f"{name} must be an int, (h, w) or (c, h, w); got {value!r}") from None
    if len(items) == 2:
        items = (channels, *items)
    if len(items) != 3:
        raise InvalidInputError(f"{name} must be an int, (h, w) or (c, h, w); got {value!r}")
    for item in items:
        _check_int(f"{name} {value!r}: every size", item, 1)
    return tuple(int(i) for i in items)  # type: ignore[return-value]


def apply_masks(image: Any, masks: Any, baseline: Any = 0.0, *, backend: Backend = "auto") -> Any:
    """Perturbed copies [B, C, H, W] = image * m + baseline * (1 - m), one per mask.

    `image` is [C, H, W]; `masks` [B, H, W] (same mask on every channel) or [B, C, H, W], 1 keeps
    the image and 0 shows the baseline; `baseline` a number or a [C, H, W] array (e.g. a blurred
    image). The float32 expression is evaluated as written on every backend.
    """
    impl = _select(backend, image, masks, baseline)
    img = _as_float32("image", image, impl)
    msk = _as_float32("masks", masks, impl)
    base = _as_float32("baseline", baseline, impl)
    if img.ndim != 3 or 0 in img.shape:
        raise InvalidInputError(f"image must be a non-empty [C, H, W] array; got shape {tuple(img.shape)}")
    if msk.ndim not in (3, 4) or msk.shape[-2:] != img.shape[1:] or (msk.ndim == 4 and msk.shape[1] != img.shape[0]):
        raise InvalidInputError(
            f"masks must be [B, H, W] or [B, C, H, W] matching image {tuple(img.shape)}; got shape {tuple(msk.shape)}"
        )
    if base.size != 1 and base.shape != img.shape:
        raise InvalidInputError(
            f"baseline must be a number or a [C, H, W] array shaped like image {tuple(img.shape)}; "
            f"got shape {tuple(base.shape)}"
        )
    return impl.kernels.apply_masks(img, msk, base.reshape(1) if base.size == 1 else base)


def segment_masks(segments: Any, on_off: Any, *, backend: Backend = "auto") -> Any:
    """Masks [B, H, W] from a segmentation: pixel (y, x) of mask b is on_off[b, segments[y, x]].

    `segments` is an integer [H, W] array of labels 0..S-1 (scikit-image's SLIC / quickshift
    output) and `on_off` [B, S] (usually 0/1 samples of LIME or KernelSHAP).
    """
    impl = _select(backend, segments, on_off)
    states = _as_float32("on_off", on_off, impl)
    labels = impl.asarray(segments)
    if labels.dtype.kind not in "iu":
        raise InvalidInputError(f"segments must be an integer [H, W] array of labels; got dtype {labels.dtype}")
    if labels.ndim != 2 or 0 in labels.shape:
        raise InvalidInputError(f"segments must be a non-empty [H, W] array; got shape {tuple(labels.shape)}")
    if states.ndim != 2 or states.shape[1] == 0:
        raise InvalidInputError(f"on_off must be a [B, S] array with S >= 1; got shape {tuple(states.shape)}")
    lowest, highest = int(labels.min()), int(labels.max())
    if lowest < 0 or highest >= states.shape[1]:
        raise InvalidInputError(
            f"segments labels must lie in 0..{states.shape[1] - 1} (on_off has S={states.shape[1]} columns); "
            f"got labels {lowest}..{highest}"
        )
    return impl.kernels.segment_masks(impl.xp.ascontiguousarray(labels, dtype=impl.xp.int32), states)


def accumulate_scores(scores: Any, masks: Any, *, backend: Backend = "auto") -> Any:
    """Score-weighted mask sums [T, H, W] = sum_b scores[b, t] * masks[b], as one GEMM.

    Float32 in and out: NumPy and CuPy call BLAS sgemm (float32 accumulation), C++ accumulates
    each output in float64 and rounds once. Callers summing many batches keep a float64 total.
    """
    impl = _select(backend, scores, masks)
    weights = _as_float32("scores", scores, impl)
    msk = _as_float32("masks", masks, impl)
    if msk.ndim != 3 or 0 in msk.shape[1:]:
        raise InvalidInputError(f"masks must be a [B, H, W] array; got shape {tuple(msk.shape)}")
    if weights.ndim != 2 or weights.shape[0] != msk.shape[0]:
        raise InvalidInputError(
            f"scores must be [B, T] with B={msk.shape[0]} rows like masks; got shape {tuple(weights.shape)}"
        )
    return impl.kernels.accumulate_scores(weights, msk)


def rise_masks(seed: int, first: int, count: int, grid: int, p: float, out_hw: tuple[int, int], *,
               backend: Backend = "auto") -> Any:
    """RISE masks number first .. first+count-1, [count, H, W] float32 (Petsiuk et al. 2018).

    Mask i depends only on (seed, i): a binary grid x grid of cells kept with probability p,
    upsampled bilinearly to ((grid+1) ceil(H/grid), (grid+1) ceil(W/grid)) as the RISE reference
    code does (skimage resize, order=1, mode='reflect') and cropped to H x W at a random shift.
    The randomness is SplitMix64 of (seed, i, cell), so every backend makes the same masks and a
    run can generate them batch by batch without storing them.
    """
    impl = _select(backend)
    seed = _check_int("seed", seed, 0, 2**64 - 1)
    first = _check_int("first", first, 0)
    count = _check_int("count", count, 0)
    grid = _check_int("grid", grid, 1)
    if isinstance(p, bool) or not isinstance(p, (int, float, np.floating, np.integer)) or not 0.0 < p < 1.0:
        raise InvalidInputError(f"p (the probability of keeping a cell) must be in (0, 1); got {p!r}")
    return impl.kernels.rise_masks(seed, first, count, grid, float(p), *_check_out_hw(out_hw))


class OcclusionGrid(NamedTuple):
    """Where Captum's Occlusion puts its windows: sizes and strides (c, h, w), positions per axis."""

    window: tuple[int, int, int]
    stride: tuple[int, int, int]
    positions: tuple[int, int, int]  # ceil((size - window) / stride) + 1 per axis

    @property
    def total(self) -> int:
        """Number of windows."""
        return self.positions[0] * self.positions[1] * self.positions[2]


def occlusion_grid(shape: tuple[int, int, int], window: Any, stride: Any) -> OcclusionGrid:
    """The windows of Captum's Occlusion over an image of (C, H, W) = `shape`, validated.

    `window` and `stride` are an int (h = w, all channels), (h, w) (all channels at once) or
    (c, h, w). Raises if the window is larger than the image or the stride exceeds the window
    (pixels between windows would never be occluded).
    """
    shape = _check_triple("shape", shape, 1)
    window = _check_triple("window", window, shape[0])
    stride = _check_triple("stride", stride, shape[0])
    if any(span > size for span, size in zip(window, shape)):
        raise InvalidInputError(f"window (c, h, w) = {window} is larger than the image (C, H, W) = {shape}")
    if any(step > span for step, span in zip(stride, window)):
        raise InvalidInputError(
            f"stride (c, h, w) = {stride} must not exceed window {window}: "
            "pixels between windows would never be occluded"
        )
    positions = tuple(-(-(size - span) // step) + 1 for size, span, step in zip(shape, window, stride))
    return OcclusionGrid(window, stride, positions)  # type: ignore[arg-type]


def occlusion_masks(shape: tuple[int, int, int], window: Any, stride: Any, first: int, count: int, *,
                    backend: Backend = "auto") -> Any:
    """Keep masks [count, C, H, W] (0 in the window, 1 elsewhere) of windows first .. first+count-1.

    Windows are numbered row-major over `occlusion_grid(...).positions` (width fastest) and
    placed at index * stride, cropped at the image edge, as Captum's Occlusion does; feed the
    masks to `apply_masks` and 1 - masks to `accumulate_scores`.
    """
    impl = _select(backend)
    grid = occlusion_grid(shape, window, stride)
    first = _check_int(f"first (of {grid.total} windows)", first, 0, grid.total)
    count = _check_int(f"count (of {grid.total} windows from {first})", count, 0, grid.total - first)
    return impl.kernels.occlusion_masks(_check_triple("shape", shape, 1), grid.window, grid.stride, grid.positions,
                                        first, count)
