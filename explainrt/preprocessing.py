"""Image decoding and model input preparation.

Every image source (path, encoded bytes, PIL image, uint8 array) is decoded once into a uint8
RGB array; `Preprocessing` then resizes, centre-crops and normalises a batch the way
torchvision's ``Resize -> CenterCrop -> ToTensor -> Normalize`` does on PIL images, and keeps
the cropped RGB images so saliency maps can be laid over exactly the pixels the model saw.
"""

from __future__ import annotations

import io
import json
import math
import os
import struct
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from explainrt.errors import ImageReadError, InvalidInputError, InvalidModelError

ImageSource = str | os.PathLike | bytes | Image.Image | np.ndarray

DEFAULT_MAX_PIXELS = 50_000_000
"""Images with more pixels than this are refused before decoding (decompression-bomb guard)."""

_RESAMPLING = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
}

# Exceptions PIL raises for unreadable data: most are OSError, but some plugins raise the others.
_DECODE_ERRORS = (OSError, ValueError, EOFError, SyntaxError, struct.error, Image.DecompressionBombError)


def load_image(source: ImageSource, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode `source` into a uint8 [H, W, 3] RGB array.

    Files and bytes are decoded with PIL, EXIF orientation applied, and grayscale, 16-bit,
    RGBA, CMYK and palette images converted to RGB (alpha is dropped). uint8 arrays must be
    [H, W, 3] RGB or [H, W] grayscale; float arrays are refused because their scale is unknown
    (pass already-normalised tensors to ``Explainer.explain`` instead). Decoded sources with
    more than `max_pixels` pixels raise ImageReadError before their pixels are decompressed.
    """
    if isinstance(source, np.ndarray):
        return _array_to_rgb(source)
    if isinstance(source, Image.Image):
        return _decode(source, "<PIL.Image>", max_pixels)
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        name = f"<{len(data)} bytes>"
        if not data:
            raise ImageReadError(f"cannot read image {name}: the buffer is empty")
        return _open_and_decode(io.BytesIO(data), name, max_pixels)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            reason = "it is not a regular file" if path.exists() else "no such file"
            raise ImageReadError(f"cannot read image {str(path)!r}: {reason}")
        return _open_and_decode(path, repr(str(path)), max_pixels)
    raise InvalidInputError(
        f"unsupported image source of type {type(source).__name__}: expected a path, bytes, "
        "a PIL image or a uint8 numpy array"
    )


def _open_and_decode(file: Path | io.BytesIO, name: str, max_pixels: int) -> np.ndarray:
    """Open an encoded image with PIL and decode it, turning every PIL failure into ImageReadError."""
    try:
        image = Image.open(file)
    except _DECODE_ERRORS as exc:
        reason = str(exc).replace(repr(file), "the data")  # PIL names an in-memory file by its object repr
        raise ImageReadError(f"cannot read image {name}: {reason}") from exc
    with image:
        return _decode(image, name, max_pixels)


def _decode(image: Image.Image, name: str, max_pixels: int) -> np.ndarray:
    """Check the pixel count from the header, then decode, orient and convert to RGB."""
    width, height = image.size
    if width * height > max_pixels:
        raise ImageReadError(
            f"cannot read image {name}: {width}x{height} = {width * height} pixels exceeds the "
            f"limit of {max_pixels} (possible decompression bomb)"
        )
    if image.mode == "F":
        raise ImageReadError(f"cannot read image {name}: 32-bit float pixels have no 0-255 scale")
    try:
        image.load()
        image = ImageOps.exif_transpose(image)
        if image.mode.startswith("I;16"):
            # 16-bit grayscale: PIL's convert("RGB") would clip everything above 255 to white.
            gray = (np.asarray(image, dtype=np.int64).clip(0, 65535) >> 8).astype(np.uint8)
            return np.repeat(gray[:, :, None], 3, axis=2)
        return np.array(image.convert("RGB"), dtype=np.uint8)
    except _DECODE_ERRORS as exc:
        raise ImageReadError(f"cannot read image {name}: {exc}") from exc


def _array_to_rgb(array: np.ndarray) -> np.ndarray:
    """Validate a uint8 [H, W] or [H, W, 3] array and return a contiguous RGB copy."""
    if np.issubdtype(array.dtype, np.floating):
        raise InvalidInputError(
            f"float image arrays ({array.dtype}) are not accepted because their scale is unknown: "
            "pass uint8 RGB pixels, or give preprocessed float tensors to Explainer.explain"
        )
    if array.dtype != np.uint8:
        raise InvalidInputError(f"image arrays must be uint8, got {array.dtype}")
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] != 3:
        raise InvalidInputError(f"image arrays must be [H, W, 3] RGB or [H, W] grayscale, got shape {array.shape}")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise InvalidInputError(f"image array is empty (shape {array.shape})")
    return np.array(array, dtype=np.uint8, order="C", copy=True)


@dataclass(frozen=True)
class Preprocessing:
    """How raw images become model input: resize, centre-crop, scale to [0, 1], normalise.

    `input_size` is the (H, W) fed to the model. With `resize_shorter` set, the shorter image
    side is first resized to it (aspect kept) and the centre `input_size` region cropped, as in
    torchvision's ``Resize(resize_shorter) -> CenterCrop(input_size)``; with None the image is
    resized straight to `input_size`. `mean` and `std` apply per RGB channel to pixels in [0, 1].
    Invalid fields raise InvalidModelError: this object describes what a model expects and is
    stored as JSON in ONNX model metadata.
    """

    input_size: tuple[int, int]
    resize_shorter: int | None
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    labels: tuple[str, ...] | None = None
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        """Validate every field and normalise sequences to tuples (so instances hash)."""
        input_size = _int_tuple("input_size", self.input_size, 2)
        object.__setattr__(self, "input_size", input_size)
        if self.resize_shorter is not None:
            (resize_shorter,) = _int_tuple("resize_shorter", (self.resize_shorter,), 1)
            if resize_shorter < max(input_size):
                raise InvalidModelError(
                    f"preprocessing: resize_shorter ({resize_shorter}) must be at least the larger "
                    f"side of input_size {input_size} so the centre crop fits"
                )
        object.__setattr__(self, "mean", _float_triple("mean", self.mean))
        std = _float_triple("std", self.std)
        if min(std) <= 0:
            raise InvalidModelError(f"preprocessing: std values must be positive, got {std}")
        object.__setattr__(self, "std", std)
        if self.labels is not None:
            if isinstance(self.labels, str) or not all(isinstance(label, str) for label in self.labels):
                raise InvalidModelError("preprocessing: labels must be a list of strings or null")
            object.__setattr__(self, "labels", tuple(self.labels))
        if self.interpolation not in _RESAMPLING:
            raise InvalidModelError(
                f"preprocessing: interpolation {self.interpolation!r} is not one of {sorted(_RESAMPLING)}"
            )

    def to_json(self) -> str:
        """Serialise to the JSON stored in ONNX model metadata."""
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Preprocessing:
        """Parse and validate `to_json` output; anything malformed raises InvalidModelError."""
        try:
            data = json.loads(text)
        except (TypeError, ValueError) as exc:
            raise InvalidModelError(f"preprocessing metadata is not valid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise InvalidModelError(f"preprocessing metadata must be a JSON object, got {type(data).__name__}")
        names = {field.name for field in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise InvalidModelError(f"preprocessing metadata has unknown fields {unknown}")
        missing = sorted(name for name in ("input_size", "resize_shorter", "mean", "std") if name not in data)
        if missing:
            raise InvalidModelError(f"preprocessing metadata lacks required fields {missing}")
        return cls(**data)

    def prepare(self, images: Sequence[ImageSource]) -> tuple[np.ndarray, np.ndarray]:
        """Load, resize and crop `images`; return (float32 NCHW model input, uint8 [N, H, W, 3] crops)."""
        if isinstance(images, (str, bytes, os.PathLike, Image.Image)) or (
            isinstance(images, np.ndarray) and images.ndim != 4
        ):
            raise InvalidInputError("prepare() takes a sequence of images; wrap a single image in a list")
        if len(images) == 0:
            raise InvalidInputError("prepare() needs at least one image")
        crops = np.stack([self._resize_and_crop(load_image(image)) for image in images])
        mean = np.asarray(self.mean, dtype=np.float32)
        std = np.asarray(self.std, dtype=np.float32)
        batch = (crops.astype(np.float32) / np.float32(255) - mean) / std
        return np.ascontiguousarray(batch.transpose(0, 3, 1, 2)), crops

    def _resize_and_crop(self, rgb: np.ndarray) -> np.ndarray:
        """Resize (and centre-crop) one RGB image to `input_size`, matching torchvision on PIL images."""
        height, width = self.input_size
        resample = _RESAMPLING[self.interpolation]
        image = Image.fromarray(rgb)
        if self.resize_shorter is None:
            return np.asarray(image.resize((width, height), resample))
        # torchvision's Resize(int): shorter side to `resize_shorter`, longer side truncated.
        short, long = sorted(image.size)
        new_long = int(self.resize_shorter * long / short)
        if image.width <= image.height:
            new_size = (self.resize_shorter, new_long)
        else:
            new_size = (new_long, self.resize_shorter)
        resized = np.asarray(image.resize(new_size, resample))
        # torchvision's CenterCrop rounds the offsets.
        top = int(round((resized.shape[0] - height) / 2.0))
        left = int(round((resized.shape[1] - width) / 2.0))
        return resized[top : top + height, left : left + width]


def _int_tuple(name: str, value: Any, length: int) -> tuple[int, ...]:
    """`value` as a tuple of `length` positive ints, else InvalidModelError."""
    if (
        isinstance(value, (str, bytes))
        or not isinstance(value, Sequence)
        or len(value) != length
        or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > 0 for v in value)
    ):
        raise InvalidModelError(f"preprocessing: {name} must be {length} positive integer(s), got {value!r}")
    return tuple(int(v) for v in value)


def _float_triple(name: str, value: Any) -> tuple[float, float, float]:
    """`value` as a tuple of three finite floats, else InvalidModelError."""
    if (
        isinstance(value, (str, bytes))
        or not isinstance(value, Sequence)
        or len(value) != 3
        or not all(isinstance(v, (int, float, np.number)) and not isinstance(v, bool) for v in value)
        or not all(math.isfinite(v) for v in value)
    ):
        raise InvalidModelError(f"preprocessing: {name} must be three finite numbers, got {value!r}")
    return tuple(float(v) for v in value)
