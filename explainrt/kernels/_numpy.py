"""NumPy reference kernels: the semantics every other backend is tested against.

Inputs arrive validated (float32, C-contiguous, shapes checked) from `explainrt.kernels`.
Resizing is separable and table driven: a per-axis table of neighbour indices and weights,
applied along width first and then height, in the same order and precision as OpenCV.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

CAM_EPS = 1e-7
"""Denominator guard of pytorch-grad-cam's `scale_cam_image`."""

MASK_EPS = 1e-8
"""Denominator guard of pytorch-grad-cam's `ScoreCAM.get_cam_weights`."""


class Axis(NamedTuple):
    """Interpolation table for one axis: out[i] = src[lo[i]] * w_lo[i] + src[hi[i]] * w_hi[i]."""

    lo: np.ndarray
    hi: np.ndarray
    w_lo: np.ndarray
    w_hi: np.ndarray


def half_pixel_axis(n_in: int, n_out: int) -> Axis:
    """Table of `cv2.resize(..., INTER_LINEAR)`: src = (dst + 0.5) * in / out - 0.5, clamped.

    Positions are computed in float64 and only the fractional weight is rounded to float32,
    as OpenCV 5 does for 2-D images (its path for 1-pixel-wide sources rounds the position
    to float32 first, which differs by a few float32 ulps of the position).
    """
    scale = 1.0 / (n_out / n_in)  # OpenCV inverts its inverse scale; keep the same rounding
    src = (np.arange(n_out, dtype=np.float64) + 0.5) * scale - 0.5
    lo_f = np.floor(src)
    frac = (src - lo_f).astype(np.float32)
    lo = lo_f.astype(np.intp)
    outside = (lo < 0) | (lo >= n_in - 1)
    frac[outside] = 0.0
    lo = np.clip(lo, 0, n_in - 1)
    hi = np.minimum(lo + 1, n_in - 1)
    return Axis(lo, hi, np.float32(1.0) - frac, frac)


def align_corners_axis(n_in: int, n_out: int) -> Axis:
    """Table of torch's bilinear upsampling with align_corners=True: src = dst * (in-1)/(out-1)."""
    scale = np.float32(n_in - 1) / np.float32(n_out - 1) if n_out > 1 else np.float32(0.0)
    src = scale * np.arange(n_out, dtype=np.float32)
    lo = np.minimum(src.astype(np.intp), n_in - 1)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = src - lo.astype(np.float32)
    return Axis(lo, hi, np.float32(1.0) - frac, frac)


def apply_axes(maps: np.ndarray, rows: Axis, cols: Axis) -> np.ndarray:
    """Resize the last two axes of `maps` with the given tables (width first, like OpenCV)."""
    across = maps.take(cols.lo, axis=-1) * cols.w_lo + maps.take(cols.hi, axis=-1) * cols.w_hi
    return (
        across.take(rows.lo, axis=-2) * rows.w_lo[:, None]
        + across.take(rows.hi, axis=-2) * rows.w_hi[:, None]
    )


def minmax_normalize(maps, eps: float):
    """Per-map (x - min) / (eps + max - min) over the last two axes, in the input's dtype.

    Written against the array API shared by NumPy and CuPy so both backends use it.
    """
    shifted = maps - maps.min(axis=(-2, -1), keepdims=True)
    return shifted / (shifted.max(axis=(-2, -1), keepdims=True) + maps.dtype.type(eps))


def weighted_relu(activations: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """ReLU(sum_c weights * activations) as pytorch-grad-cam computes it; [N, h, w]."""
    if weights.ndim == 2:
        weights = weights[:, :, None, None]
    cam = (weights * activations).sum(axis=1)
    return cam.clip(min=0)


def cam_maps(activations: np.ndarray, weights: np.ndarray, out_h: int, out_w: int,
             normalize: bool = True) -> np.ndarray:
    """Weighted sum, ReLU, `scale_cam_image` normalisation (if asked), then cv2-compatible resize."""
    cams = weighted_relu(activations, weights)
    return resize_bilinear(minmax_normalize(cams, CAM_EPS) if normalize else cams, out_h, out_w)


def resize_bilinear(maps: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Resize [N, h, w] maps like `cv2.resize(m, (out_w, out_h), interpolation=INTER_LINEAR)`."""
    h, w = maps.shape[-2:]
    return apply_axes(maps, half_pixel_axis(h, out_h), half_pixel_axis(w, out_w))


def normalize_minmax(maps: np.ndarray) -> np.ndarray:
    """`scale_cam_image`'s per-map normalisation without resizing."""
    return minmax_normalize(maps, CAM_EPS)


def channel_masks(activations: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Score-CAM masks: align-corners bilinear upsampling, then per-channel min-max scaling."""
    h, w = activations.shape[-2:]
    upsampled = apply_axes(activations, align_corners_axis(h, out_h), align_corners_axis(w, out_w))
    return minmax_normalize(upsampled, MASK_EPS)


# --- perturbation masks: apply, segments, accumulate, RISE, occlusion ---------------------------

_GOLDEN_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_MIX_1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX_2 = np.uint64(0x94D049BB133111EB)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """Steele et al.'s SplitMix64 finaliser of x + golden gamma, element-wise on uint64 (wrapping)."""
    with np.errstate(over="ignore"):  # wrapping modulo 2^64 is the point (0-d inputs would warn)
        z = np.asarray(x, dtype=np.uint64) + _GOLDEN_GAMMA
        z = (z ^ (z >> np.uint64(30))) * _MIX_1
        z = (z ^ (z >> np.uint64(27))) * _MIX_2
        return z ^ (z >> np.uint64(31))


def counter_uniform(seed: int, index: np.ndarray, slot: np.ndarray) -> np.ndarray:
    """Uniform [0, 1) doubles that depend only on (seed, index, slot): a counter-based stream.

    u = top 53 bits of splitmix64(splitmix64(seed ^ splitmix64(index)) + slot) / 2^53; the C++
    and CUDA kernels compute the same bits, so masks agree across backends.
    """
    index = np.asarray(index, dtype=np.uint64)
    key = splitmix64(np.uint64(seed) ^ splitmix64(index))
    bits = splitmix64(key + np.asarray(slot, dtype=np.uint64))
    return (bits >> np.uint64(11)).astype(np.float64) * 2.0**-53


def apply_masks(image: np.ndarray, masks: np.ndarray, baseline: np.ndarray) -> np.ndarray:
    """image * m + baseline * (1 - m) per mask: [B, C, H, W] from [C, H, W], [B, (C,) H, W] masks.

    `baseline` is [1] (one value) or [C, H, W]. The float32 expression is evaluated as written
    (Captum's ablation formula with m = 1 - its mask; image * m exactly when baseline is 0).
    """
    m = masks[:, None] if masks.ndim == 3 else masks
    base = baseline.reshape(()) if baseline.size == 1 else baseline
    return image * m + base * (np.float32(1.0) - m)


def segment_masks(segments: np.ndarray, on_off: np.ndarray) -> np.ndarray:
    """[B, H, W]: each pixel takes its segment's value in on_off [B, S] (segments [H, W] int)."""
    return on_off[:, segments]


def accumulate_scores(scores: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """sum_b scores[b, t] * masks[b] -> [T, H, W] as one float32 GEMM (BLAS sgemm)."""
    batch, height, width = masks.shape
    return (scores.T @ masks.reshape(batch, height * width)).reshape(-1, height, width)


def _mirror(index: np.ndarray, size: int) -> np.ndarray:
    """Reflect an out-of-range index about the edge pixel centres (ndimage 'mirror', skimage 'reflect')."""
    if size == 1:
        return np.zeros_like(index)
    index = np.abs(index)
    return np.where(index > size - 1, 2 * (size - 1) - index, index)


def _rise_axis(shifts: np.ndarray, grid: int, cell: int, size: int):
    """Per-mask lo/hi cells and weights of output pixels 0..size-1 shifted by `shifts` [count]."""
    up = (grid + 1) * cell
    pos = np.arange(size, dtype=np.float64)[None, :] + shifts[:, None]
    src = (pos + 0.5) * grid / up - 0.5
    lo_f = np.floor(src)
    frac = src - lo_f
    lo = lo_f.astype(np.int64)
    return _mirror(lo, grid), _mirror(lo + 1, grid), 1.0 - frac, frac


def rise_grids(seed: int, first: int, count: int, grid: int, p: float):
    """Binary grids [count, s, s] (cell kept iff u < p) and shifts (dy, dx) [count] of masks first.."""
    index = np.arange(first, first + count, dtype=np.uint64)[:, None]
    slots = np.arange(grid * grid + 2, dtype=np.uint64)[None, :]
    u = counter_uniform(seed, index, slots)
    cells = (u[:, : grid * grid] < p).astype(np.float64).reshape(count, grid, grid)
    return cells, u[:, grid * grid], u[:, grid * grid + 1]


def rise_masks(seed: int, first: int, count: int, grid: int, p: float, out_h: int,
               out_w: int) -> np.ndarray:
    """RISE masks first..first+count-1 [count, H, W] (Petsiuk et al. 2018, the reference code).

    Grid s x s of cells kept with probability p, upsampled bilinearly (half-pixel centres,
    mirrored edges: skimage.transform.resize(order=1, mode='reflect')) to
    ((s+1) ceil(H/s), (s+1) ceil(W/s)), and cropped at a random shift (dy < ceil(H/s),
    dx < ceil(W/s)). Interpolation in float64, rounded to float32 once.
    """
    cell_h, cell_w = -(-out_h // grid), -(-out_w // grid)
    cells, u_y, u_x = rise_grids(seed, first, count, grid, p)
    shift_y, shift_x = np.floor(u_y * cell_h), np.floor(u_x * cell_w)
    row_lo, row_hi, row_wlo, row_whi = _rise_axis(shift_y, grid, cell_h, out_h)
    col_lo, col_hi, col_wlo, col_whi = _rise_axis(shift_x, grid, cell_w, out_w)
    across = (np.take_along_axis(cells, col_lo[:, None, :], axis=2) * col_wlo[:, None, :]
              + np.take_along_axis(cells, col_hi[:, None, :], axis=2) * col_whi[:, None, :])  # [count, s, W]
    masks = (np.take_along_axis(across, row_lo[:, :, None], axis=1) * row_wlo[:, :, None]
             + np.take_along_axis(across, row_hi[:, :, None], axis=1) * row_whi[:, :, None])
    return masks.astype(np.float32)


def occlusion_masks(shape: tuple[int, int, int], window: tuple[int, int, int],
                    stride: tuple[int, int, int], positions: tuple[int, int, int], first: int,
                    count: int) -> np.ndarray:
    """Keep masks [count, C, H, W] of windows first..first+count-1: 0 inside the window, 1 outside.

    Window k sits at offset unravel(k, positions) * stride (last axis fastest) and is cropped at
    the image edge, as Captum's Occlusion places them.
    """
    index = np.unravel_index(np.arange(first, first + count), positions)
    inside = [
        (np.arange(size)[None, :] >= (start * step)[:, None])
        & (np.arange(size)[None, :] < (start * step + span)[:, None])
        for size, span, step, start in zip(shape, window, stride, index)
    ]
    occluded = inside[0][:, :, None, None] & inside[1][:, None, :, None] & inside[2][:, None, None, :]
    return (~occluded).astype(np.float32)
