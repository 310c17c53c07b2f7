"""CuPy kernels: the NumPy reference's semantics on a CUDA device; results stay on the device.

CuPy is imported only when a function runs, so this module (and its CUDA sources, which the
tests compile with nvcc) loads on machines without it. Inputs arrive validated as contiguous
float32 CuPy arrays from `explainrt.kernels`. Resize tables come from the NumPy reference and
min-max scaling reuses its array-API helper, so only the two loops below are CUDA code.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from explainrt.errors import BackendUnavailableError
from explainrt.kernels._numpy import (
    CAM_EPS,
    MASK_EPS,
    Axis,
    align_corners_axis,
    half_pixel_axis,
    minmax_normalize,
)

_DLPACK_CUDA_DEVICES = (2, 13)  # kDLCUDA, kDLCUDAManaged
_THREADS = 256
_MAX_BLOCKS = 4096  # grid-stride loops cover larger outputs

# ReLU(sum_c w * a) per (map, pixel); channel-sequential with explicit rounding (no FMA) so the
# sum matches NumPy's float32 .sum(axis=1). Consecutive threads read consecutive pixels.
WEIGHTED_RELU_SOURCE = r"""
extern "C" __global__ void weighted_relu_f32(
    const float* acts, const float* weights, float* cams,
    long long n_maps, long long channels, long long plane, long long per_pixel)
{
    const long long total = n_maps * plane;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)blockDim.x * gridDim.x) {
        const long long n = i / plane, p = i % plane;
        const float* a = acts + n * channels * plane + p;
        float sum = 0.f;
        for (long long c = 0; c < channels; ++c) {
            const float w = per_pixel ? weights[(n * channels + c) * plane + p]
                                      : weights[n * channels + c];
            sum = __fadd_rn(sum, __fmul_rn(w, a[c * plane]));
        }
        cams[i] = fmaxf(sum, 0.f);
    }
}
"""

# Table-driven separable bilinear resize, one thread per output pixel; width is blended
# before height, as OpenCV and the NumPy reference do.
RESIZE_SOURCE = r"""
extern "C" __global__ void resize_bilinear_f32(
    const float* src, float* dst, long long n_planes,
    long long in_h, long long in_w, long long out_h, long long out_w,
    const long long* row_lo, const long long* row_hi, const float* row_wlo, const float* row_whi,
    const long long* col_lo, const long long* col_hi, const float* col_wlo, const float* col_whi)
{
    const long long total = n_planes * out_h * out_w;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)blockDim.x * gridDim.x) {
        const long long x = i % out_w, t = i / out_w, y = t % out_h, plane = t / out_h;
        const float* top = src + (plane * in_h + row_lo[y]) * in_w;
        const float* bottom = src + (plane * in_h + row_hi[y]) * in_w;
        const float t_val = __fadd_rn(__fmul_rn(top[col_lo[x]], col_wlo[x]),
                                      __fmul_rn(top[col_hi[x]], col_whi[x]));
        const float b_val = __fadd_rn(__fmul_rn(bottom[col_lo[x]], col_wlo[x]),
                                      __fmul_rn(bottom[col_hi[x]], col_whi[x]));
        dst[i] = __fadd_rn(__fmul_rn(t_val, row_wlo[y]), __fmul_rn(b_val, row_whi[y]));
    }
}
"""

KERNEL_SOURCES: dict[str, str] = {
    "weighted_relu_f32": WEIGHTED_RELU_SOURCE,
    "resize_bilinear_f32": RESIZE_SOURCE,
}
"""Entry point name -> CUDA source defining it as `extern "C" __global__`."""


@functools.cache
def load_cupy() -> Any:
    """Import CuPy and check that a CUDA device is visible, or say what is missing."""
    try:
        import cupy
    except ImportError as exc:
        raise BackendUnavailableError(
            f"backend 'cupy' needs the cupy package (pip install cupy-cuda12x): {exc}"
        ) from exc
    try:
        devices = cupy.cuda.runtime.getDeviceCount()
    except cupy.cuda.runtime.CUDARuntimeError as exc:
        raise BackendUnavailableError(f"backend 'cupy' found no usable CUDA device: {exc}") from exc
    if devices == 0:
        raise BackendUnavailableError("backend 'cupy' found no CUDA device")
    return cupy


def is_device_array(x: Any) -> bool:
    """Whether `x` lives in CUDA memory (CuPy, torch.cuda, anything exporting a CUDA buffer)."""
    if hasattr(x, "__cuda_array_interface__"):
        return True
    dlpack_device = getattr(x, "__dlpack_device__", None)
    return dlpack_device is not None and dlpack_device()[0] in _DLPACK_CUDA_DEVICES


def asarray(x: Any) -> Any:
    """`x` as a CuPy array: host arrays are copied over, CUDA buffers are shared without a copy."""
    cupy = load_cupy()
    if is_device_array(x) and not hasattr(x, "__cuda_array_interface__"):
        return cupy.from_dlpack(x)
    return cupy.asarray(x)


@functools.cache
def _kernel(name: str) -> Any:
    """The compiled RawKernel for an entry point of KERNEL_SOURCES (compiled once per process)."""
    return load_cupy().RawKernel(KERNEL_SOURCES[name], name)


def _launch(name: str, total: int, args: tuple) -> None:
    """Run a grid-stride kernel over `total` elements."""
    if total:
        blocks = min((total + _THREADS - 1) // _THREADS, _MAX_BLOCKS)
        _kernel(name)((blocks,), (_THREADS,), args)


def _resize(maps: Any, rows: Axis, cols: Axis) -> Any:
    """Resize [P, h, w] maps with host-built axis tables; returns [P, H, W]."""
    cupy = load_cupy()
    planes, h, w = maps.shape
    out = cupy.empty((planes, rows.lo.size, cols.lo.size), dtype=cupy.float32)
    tables = [cupy.asarray(column) for column in (*rows, *cols)]  # int64 indices, f32 weights
    sizes = (planes, h, w, rows.lo.size, cols.lo.size)
    _launch("resize_bilinear_f32", out.size, (maps, out, *map(np.int64, sizes), *tables))
    return out


def cam_maps(activations: Any, weights: Any, out_h: int, out_w: int, normalize: bool = True) -> Any:
    """Weighted sum and ReLU (CUDA), `scale_cam_image` normalisation if asked, cv2-compatible resize."""
    cupy = load_cupy()
    n, c, h, w = activations.shape
    with activations.device:
        cams = cupy.empty((n, h, w), dtype=cupy.float32)
        sizes = (n, c, h * w, weights.ndim == 4)
        _launch("weighted_relu_f32", cams.size, (activations, weights, cams, *map(np.int64, sizes)))
        if normalize:
            cams = minmax_normalize(cams, CAM_EPS)
        return _resize(cams, half_pixel_axis(h, out_h), half_pixel_axis(w, out_w))


def resize_bilinear(maps: Any, out_h: int, out_w: int) -> Any:
    """Resize [N, h, w] maps like `cv2.resize(..., INTER_LINEAR)`."""
    h, w = maps.shape[1:]
    with maps.device:
        return _resize(maps, half_pixel_axis(h, out_h), half_pixel_axis(w, out_w))


def normalize_minmax(maps: Any) -> Any:
    """`scale_cam_image`'s per-map normalisation."""
    with maps.device:
        return minmax_normalize(maps, CAM_EPS)


def channel_masks(activations: Any, out_h: int, out_w: int) -> Any:
    """Score-CAM masks: align-corners bilinear upsampling, then per-channel min-max scaling."""
    n, c, h, w = activations.shape
    with activations.device:
        planes = activations.reshape(n * c, h, w)
        upsampled = _resize(planes, align_corners_axis(h, out_h), align_corners_axis(w, out_w))
        return minmax_normalize(upsampled.reshape(n, c, out_h, out_w), MASK_EPS)
