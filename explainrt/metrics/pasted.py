"""A seeded data set with known object boxes: photos from scikit-image pasted onto textures.

Each sample pastes one object (the cat of ``chelsea`` or the espresso cup of ``coffee``, cropped
with a hand-chosen box) at a random scale and position onto a random crop of a scikit-image
texture or scene that holds no such object, and records the pasted rectangle as the object's
box. The ImageNet classes of each object are known, so an ImageNet classifier (the default
EfficientNet-Lite0) can be scored with the pointing games. Objects stay inside the central
7/8 of the image, which a torchvision-style centre crop (224 of 256) keeps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from explainrt.errors import InvalidInputError
from explainrt.optional import require
from explainrt.preprocessing import Preprocessing
from explainrt.validation import checked_int

Box = tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels, x1 and y1 exclusive


@dataclass(frozen=True)
class PastedObject:
    """An object photo: the scikit-image picture, the object's box in it, and its ImageNet classes."""

    name: str
    picture: str
    box: Box
    classes: tuple[int, ...]


OBJECTS = (
    PastedObject("cat", "chelsea", (20, 0, 420, 300), (281, 282, 285)),  # tabby, tiger cat, Egyptian cat
    PastedObject("cup", "coffee", (70, 10, 490, 395), (967, 968)),  # espresso, cup
)
BACKGROUNDS = ("grass", "gravel", "brick", "moon", "hubble_deep_field", "immunohistochemistry")
MARGIN = 1 / 16
"""Share of each side kept free of objects (what a 224-of-256 centre crop removes)."""


@dataclass(frozen=True)
class PastedSample:
    """One image (uint8 [size, size, 3]) with the pasted object's box and classes."""

    name: str
    image: np.ndarray
    box: Box
    classes: tuple[int, ...]
    background: str


def _rgb(picture: str) -> np.ndarray:
    pixels = getattr(require("skimage.data", "the pasted data set's photos", "metrics"), picture)()
    return np.repeat(pixels[:, :, None], 3, axis=2) if pixels.ndim == 2 else pixels[:, :, :3]


def pasted_dataset(count: int = 12, size: int = 256, seed: int = 0,
                   scale: tuple[float, float] = (0.45, 0.75)) -> list[PastedSample]:
    """``count`` samples alternating the objects; the object's longer side is ``scale`` of ``size``."""
    checked_int("count", count)
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 32:
        raise InvalidInputError(f"size must be an integer >= 32, got {size!r}")
    low, high = scale
    if not 0 < low <= high <= 1 - 2 * MARGIN:
        raise InvalidInputError(f"scale must be (low, high) with 0 < low <= high <= {1 - 2 * MARGIN}, got {scale!r}")
    rng = np.random.default_rng(seed)
    margin = math.ceil(size * MARGIN)
    samples = []
    for index in range(count):
        thing = OBJECTS[index % len(OBJECTS)]
        background_name = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
        background = _rgb(background_name)
        side = int(rng.integers(min(background.shape[:2]) // 2, min(background.shape[:2]) + 1))
        top = int(rng.integers(background.shape[0] - side + 1))
        left = int(rng.integers(background.shape[1] - side + 1))
        canvas = Image.fromarray(background[top : top + side, left : left + side]).resize((size, size), Image.BILINEAR)
        x0, y0, x1, y1 = thing.box
        crop = Image.fromarray(_rgb(thing.picture)[y0:y1, x0:x1])
        longer = rng.uniform(low, high) * size
        ratio = longer / max(crop.size)
        width, height = max(1, round(crop.width * ratio)), max(1, round(crop.height * ratio))
        left = int(rng.integers(margin, size - margin - width + 1))
        top = int(rng.integers(margin, size - margin - height + 1))
        canvas.paste(crop.resize((width, height), Image.BILINEAR), (left, top))
        samples.append(PastedSample(f"pasted-{index:03d}-{thing.name}", np.asarray(canvas), (left, top, left + width, top + height),
                                    thing.classes, background_name))
    return samples


def input_box(box: Box, image_hw: tuple[int, int], preprocessing: Preprocessing) -> Box:
    """``box`` in an image of size ``image_hw`` mapped to model-input pixels by the preprocessing's
    resize and centre crop (torchvision's geometry, as ``Preprocessing.prepare``), clipped to the input."""
    height, width = image_hw
    input_h, input_w = preprocessing.input_size
    if preprocessing.resize_shorter is None:
        new_w, new_h, top, left = input_w, input_h, 0, 0
    else:
        short, long = sorted((width, height))
        new_long = int(preprocessing.resize_shorter * long / short)
        new_w, new_h = (preprocessing.resize_shorter, new_long) if width <= height else (new_long, preprocessing.resize_shorter)
        top, left = int(round((new_h - input_h) / 2.0)), int(round((new_w - input_w) / 2.0))
    sx, sy = new_w / width, new_h / height
    x0, y0, x1, y1 = box
    mapped = (math.floor(x0 * sx) - left, math.floor(y0 * sy) - top, math.ceil(x1 * sx) - left, math.ceil(y1 * sy) - top)
    return (min(max(mapped[0], 0), input_w), min(max(mapped[1], 0), input_h),
            min(max(mapped[2], 0), input_w), min(max(mapped[3], 0), input_h))
