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
