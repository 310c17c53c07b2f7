"""CuPy kernels: the NumPy reference's semantics on a CUDA device; results stay on the device.

Perturbation kernels (apply masks, RISE and occlusion masks) are CUDA too; segment masks use
CuPy's indexing and score accumulation cuBLAS (float32 sgemm).

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

# --- perturbation masks ---------------------------------------------------------------------------

# image * m + baseline * (1 - m), one thread per output element of [B, C, H, W]; explicit
# rounding (no FMA) so the float32 result equals NumPy's.
APPLY_MASKS_SOURCE = r"""
extern "C" __global__ void apply_masks_f32(
    const float* image, const float* masks, const float* baseline, float* out,
    long long batch, long long channels, long long plane, long long per_channel, long long one_value)
{
    const long long total = batch * channels * plane;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)blockDim.x * gridDim.x) {
        const long long p = i % plane, c = (i / plane) % channels, b = i / (plane * channels);
        const float m = masks[per_channel ? i : b * plane + p];
        const float base = baseline[one_value ? 0 : c * plane + p];
        out[i] = __fadd_rn(__fmul_rn(image[c * plane + p], m), __fmul_rn(base, __fsub_rn(1.f, m)));
    }
}
"""

# Counter-based RISE masks, one thread per output pixel: the four grid cells it blends and the
# mask's shift are SplitMix64 draws (see _numpy.counter_uniform); double arithmetic with
# explicit rounding, rounded to float32 once, so the masks equal NumPy's and C++'s bit for bit.
RISE_MASKS_SOURCE = r"""
__device__ unsigned long long splitmix64(unsigned long long x) {
    unsigned long long z = x + 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

__device__ double counter_uniform(unsigned long long seed, unsigned long long index,
                                  unsigned long long slot) {
    const unsigned long long key = splitmix64(seed ^ splitmix64(index));
    return __dmul_rn((double)(splitmix64(key + slot) >> 11), 1.1102230246251565e-16);  // 2^-53
}

__device__ long long mirror(long long i, long long n) {
    if (n == 1) return 0;
    i = i < 0 ? -i : i;
    return i > n - 1 ? 2 * (n - 1) - i : i;
}

__device__ double rise_tap(double pos, long long grid, long long cell, long long* lo, long long* hi) {
    const double up = (double)((grid + 1) * cell);
    const double src = __dadd_rn(__ddiv_rn(__dmul_rn(__dadd_rn(pos, 0.5), (double)grid), up), -0.5);
    const double low = floor(src);
    *lo = mirror((long long)low, grid);
    *hi = mirror((long long)low + 1, grid);
    return __dadd_rn(src, -low);
}

__device__ double cell(unsigned long long seed, unsigned long long index, long long k, double p) {
    return counter_uniform(seed, index, (unsigned long long)k) < p ? 1.0 : 0.0;
}

extern "C" __global__ void rise_masks_f32(
    float* out, unsigned long long seed, long long first, long long count, long long grid,
    double p, long long out_h, long long out_w)
{
    const long long cell_h = (out_h + grid - 1) / grid, cell_w = (out_w + grid - 1) / grid;
    const long long cells = grid * grid, plane = out_h * out_w, total = count * plane;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)blockDim.x * gridDim.x) {
        const long long j = i / plane, y = (i % plane) / out_w, x = i % out_w;
        const unsigned long long index = (unsigned long long)(first + j);
        const double dy = floor(__dmul_rn(counter_uniform(seed, index, cells), (double)cell_h));
        const double dx = floor(__dmul_rn(counter_uniform(seed, index, cells + 1), (double)cell_w));
        long long r_lo, r_hi, c_lo, c_hi;
        const double fy = rise_tap(__dadd_rn((double)y, dy), grid, cell_h, &r_lo, &r_hi);
        const double fx = rise_tap(__dadd_rn((double)x, dx), grid, cell_w, &c_lo, &c_hi);
        const double wy = __dadd_rn(1.0, -fy), wx = __dadd_rn(1.0, -fx);
        const double top = __dadd_rn(__dmul_rn(cell(seed, index, r_lo * grid + c_lo, p), wx),
                                     __dmul_rn(cell(seed, index, r_lo * grid + c_hi, p), fx));
        const double bottom = __dadd_rn(__dmul_rn(cell(seed, index, r_hi * grid + c_lo, p), wx),
                                        __dmul_rn(cell(seed, index, r_hi * grid + c_hi, p), fx));
        out[i] = (float)__dadd_rn(__dmul_rn(top, wy), __dmul_rn(bottom, fy));
    }
}
"""

# Keep masks of Captum's occlusion windows: 0 where (c, y, x) lies in window first + j.
OCCLUSION_MASKS_SOURCE = r"""
extern "C" __global__ void occlusion_masks_f32(
    float* out, long long first, long long count, long long channels, long long height,
    long long width, long long win_c, long long win_h, long long win_w, long long step_c,
    long long step_h, long long step_w, long long pos_h, long long pos_w)
{
    const long long volume = channels * height * width, total = count * volume;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)blockDim.x * gridDim.x) {
        const long long k = first + i / volume, e = i % volume;
        const long long c = e / (height * width), y = (e / width) % height, x = e % width;
        const long long c0 = k / (pos_h * pos_w) * step_c, y0 = k / pos_w % pos_h * step_h;
        const long long x0 = k % pos_w * step_w;
        const bool inside = c >= c0 && c < c0 + win_c && y >= y0 && y < y0 + win_h &&
                            x >= x0 && x < x0 + win_w;
        out[i] = inside ? 0.f : 1.f;
    }
}
"""

PERTURBATION_KERNELS = ("apply_masks_f32", "rise_masks_f32", "occlusion_masks_f32")
"""Entry points of the perturbation kernels (segments use CuPy indexing, accumulation cuBLAS)."""

KERNEL_SOURCES: dict[str, str] = {
    "weighted_relu_f32": WEIGHTED_RELU_SOURCE,
    "resize_bilinear_f32": RESIZE_SOURCE,
    "apply_masks_f32": APPLY_MASKS_SOURCE,
    "rise_masks_f32": RISE_MASKS_SOURCE,
    "occlusion_masks_f32": OCCLUSION_MASKS_SOURCE,
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


def apply_masks(image: Any, masks: Any, baseline: Any) -> Any:
    """image * m + baseline * (1 - m) per mask: [B, C, H, W]."""
    cupy = load_cupy()
    channels, height, width = image.shape
    with image.device:
        out = cupy.empty((masks.shape[0], channels, height, width), dtype=cupy.float32)
        sizes = (masks.shape[0], channels, height * width, masks.ndim == 4, baseline.size == 1)
        _launch("apply_masks_f32", out.size, (image, masks, baseline, out, *map(np.int64, sizes)))
        return out


def segment_masks(segments: Any, on_off: Any) -> Any:
    """[B, H, W]: each pixel takes its segment's value in on_off [B, S]."""
    with on_off.device:
        return on_off[:, segments]


def accumulate_scores(scores: Any, masks: Any) -> Any:
    """sum_b scores[b, t] * masks[b] -> [T, H, W] as one cuBLAS sgemm."""
    batch, height, width = masks.shape
    with masks.device:
        return (scores.T @ masks.reshape(batch, height * width)).reshape(-1, height, width)


def rise_masks(seed: int, first: int, count: int, grid: int, p: float, out_h: int, out_w: int) -> Any:
    """Counter-based RISE masks [count, H, W] on the current device (equal to NumPy's)."""
    cupy = load_cupy()
    out = cupy.empty((count, out_h, out_w), dtype=cupy.float32)
    sizes = (first, count, grid)
    _launch("rise_masks_f32", out.size, (out, np.uint64(seed), *map(np.int64, sizes), np.float64(p),
                                         np.int64(out_h), np.int64(out_w)))
    return out


def occlusion_masks(shape: tuple[int, int, int], window: tuple[int, int, int], stride: tuple[int, int, int],
                    positions: tuple[int, int, int], first: int, count: int) -> Any:
    """Keep masks [count, C, H, W] of Captum's occlusion windows on the current device."""
    cupy = load_cupy()
    out = cupy.empty((count, *shape), dtype=cupy.float32)
    sizes = (first, count, *shape, *window, *stride, *positions[1:])
    _launch("occlusion_masks_f32", out.size, (out, *map(np.int64, sizes)))
    return out
