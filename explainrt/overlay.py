"""Saliency heatmaps blended on images, and atomic PNG writing.

`overlay` reproduces pytorch-grad-cam's ``show_cam_on_image(..., use_rgb=True)`` without OpenCV:
the colour table is OpenCV's COLORMAP_JET, stored as data (its entries are rounded from
half-integers in float32, so no closed formula matches it exactly).
"""

from __future__ import annotations

import functools
import os
from importlib import resources
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from explainrt.errors import InvalidInputError
from explainrt.files import write_atomic

_COLORMAP_FILES = {"jet": "jet_colormap.txt"}

# Saliency values this far outside [0, 1] are a caller bug (an unnormalised map), not rounding.
_SALIENCY_TOLERANCE = 1e-3


@functools.cache
def _colormap_table(name: str) -> np.ndarray:
    """The uint8 [256, 3] RGB lookup table of colormap `name`."""
    resource = resources.files("explainrt").joinpath("data").joinpath(_COLORMAP_FILES[name])
    text = resource.read_text(encoding="ascii")
    table = np.array([line.split() for line in text.splitlines()], dtype=np.uint8)
    table.setflags(write=False)
    return table


def overlay(image: np.ndarray, saliency: np.ndarray, alpha: float = 0.5, colormap: str = "jet") -> np.ndarray:
    """Blend a colour-mapped saliency map on an RGB image; return uint8 [H, W, 3].

    `image` is uint8 [H, W, 3] RGB and `saliency` a float [H, W] map in [0, 1] of the same size
    (values within 1e-3 of the range are clipped). `alpha` is the heatmap's weight:
    ``alpha * heatmap + (1 - alpha) * image``, rescaled so its maximum is 255, exactly as
    pytorch-grad-cam's ``show_cam_on_image`` with ``image_weight = 1 - alpha``.
    """
    _check_rgb(image, "overlay image")
    saliency = np.asarray(saliency)
    if saliency.ndim != 2 or not np.issubdtype(saliency.dtype, np.floating):
        raise InvalidInputError(f"saliency must be a float [H, W] array, got {saliency.dtype} {saliency.shape}")
    if saliency.shape != image.shape[:2]:
        raise InvalidInputError(f"saliency shape {saliency.shape} does not match image size {image.shape[:2]}")
    if not np.isfinite(saliency).all():
        raise InvalidInputError("saliency contains NaN or infinite values")
    low, high = float(saliency.min()), float(saliency.max())
    if low < -_SALIENCY_TOLERANCE or high > 1 + _SALIENCY_TOLERANCE:
        raise InvalidInputError(f"saliency must lie in [0, 1], got values in [{low:.4g}, {high:.4g}]")
    if not 0.0 <= alpha <= 1.0:
        raise InvalidInputError(f"alpha must lie in [0, 1], got {alpha}")
    if colormap not in _COLORMAP_FILES:
        raise InvalidInputError(f"unknown colormap {colormap!r}; available: {sorted(_COLORMAP_FILES)}")

    # Same float32 arithmetic and truncating casts as show_cam_on_image, for identical pixels.
    indices = (np.float32(255) * np.clip(saliency, 0, 1).astype(np.float32)).astype(np.uint8)
    heatmap = _colormap_table(colormap)[indices].astype(np.float32) / np.float32(255)
    blended = np.float32(alpha) * heatmap + np.float32(1 - alpha) * (image.astype(np.float32) / np.float32(255))
    peak = blended.max()
    if peak == 0:
        return np.zeros_like(image)
    return (np.float32(255) * (blended / peak)).astype(np.uint8)


def caption(rgb: np.ndarray, text: str) -> np.ndarray:
    """``rgb`` with ``text`` in white on a black strip along its bottom edge, same size; uint8 [H, W, 3].

    The font scales with the image (a twentieth of its height, at least 10 px); text wider than
    the image is shortened with an ellipsis.
    """
    _check_rgb(rgb, "captioned image")
    image = Image.fromarray(rgb)
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=max(10, rgb.shape[0] // 20))
    shown = text
    while shown and draw.textlength(shown, font=font) > rgb.shape[1] - 6:
        shown = shown[:-2] + "\u2026" if len(shown) > 1 else ""
    left, top, right, bottom = draw.textbbox((0, 0), shown or " ", font=font)
    strip = min(rgb.shape[0], bottom - top + 6)
    draw.rectangle((0, rgb.shape[0] - strip, rgb.shape[1], rgb.shape[0]), fill=(0, 0, 0))
    draw.text((3, rgb.shape[0] - strip + 3 - top), shown, fill=(255, 255, 255), font=font)
    return np.asarray(image, dtype=np.uint8).copy()


def concept_colours(count: int) -> np.ndarray:
    """``count`` evenly spaced hues at full saturation and value: float32 RGB [count, 3] in [0, 1]."""
    hsv = np.full((1, count, 3), 255, dtype=np.uint8)
    hsv[0, :, 0] = (np.arange(count) * 256 // max(count, 1)).astype(np.uint8)
    return np.asarray(Image.fromarray(hsv, mode="HSV").convert("RGB"), dtype=np.float32)[0] / np.float32(255)


def concept_overlay(image: np.ndarray, concept_maps: np.ndarray, alpha: float = 0.7) -> np.ndarray:
    """One colour per concept (DFF): each pixel takes its strongest concept's colour, as bright as
    that concept's map there, blended as ``alpha * colours + (1 - alpha) * image``; uint8 [H, W, 3]."""
    _check_rgb(image, "overlay image")
    maps = np.asarray(concept_maps, dtype=np.float32)
    if maps.ndim != 3 or maps.shape[1:] != image.shape[:2]:
        raise InvalidInputError(f"concept maps must be [k, H, W] with H, W = {image.shape[:2]}, got {maps.shape}")
    if not 0.0 <= alpha <= 1.0:
        raise InvalidInputError(f"alpha must lie in [0, 1], got {alpha}")
    strongest = maps.argmax(axis=0)
    strength = np.clip(np.take_along_axis(maps, strongest[None], axis=0)[0], 0, 1)
    colours = concept_colours(maps.shape[0])[strongest] * strength[..., None]
    blended = np.float32(alpha) * colours + np.float32(1 - alpha) * (image.astype(np.float32) / np.float32(255))
    return (np.float32(255) * np.clip(blended, 0, 1)).astype(np.uint8)


def save_png(path: str | os.PathLike, rgb: np.ndarray) -> Path:
    """Write a uint8 [H, W, 3] RGB image as PNG atomically; return the path.

    The image goes to a temporary file beside `path` that is renamed over it only once
    complete, so an interrupted or failed run never leaves a truncated PNG behind.
    """
    _check_rgb(rgb, "PNG image")
    return write_atomic(path, lambda file: Image.fromarray(rgb).save(file, format="PNG"))


def _check_rgb(array: np.ndarray, what: str) -> None:
    """Raise InvalidInputError unless `array` is a non-empty uint8 [H, W, 3] array."""
    if not isinstance(array, np.ndarray) or array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        described = f"{array.dtype} {array.shape}" if isinstance(array, np.ndarray) else type(array).__name__
        raise InvalidInputError(f"{what} must be a uint8 [H, W, 3] RGB array, got {described}")
    if array.size == 0:
        raise InvalidInputError(f"{what} is empty (shape {array.shape})")
