"""The default model: EfficientNet-Lite0 with ImageNet weights, shipped as an explainable ONNX file.

``explainrt/data/efficientnet_lite0.onnx`` carries the gradient graph of its Grad-CAM target
layer, its preprocessing and labels (explainrt's metadata) and a note of its origin
(``DEFAULT_MODEL_METADATA``), so explaining with it needs neither PyTorch nor a download.
``tools/make_default_model.py`` regenerates it from the PyTorch weights (``explainrt[torch]``);
``explainrt.models.default_torch`` builds the PyTorch module itself (the torch backend).
"""

from __future__ import annotations

import functools
import json
import logging
import os
from importlib import resources
from pathlib import Path

import numpy as np
import onnx

from explainrt.errors import InvalidModelError
from explainrt.export.spec import load_model
from explainrt.models.labels import imagenet_labels
from explainrt.overlay import save_png
from explainrt.preprocessing import Preprocessing, load_image

logger = logging.getLogger(__name__)

DEFAULT_TARGET_MODULE = "_head_activation"
"""Grad-CAM target: the ReLU6 after the 1x1 conv head, [N, 1280, 7, 7] at 224x224, before pooling."""

DEFAULT_MODEL_FILE = "efficientnet_lite0.onnx"
"""The shipped explainable model, in the package's ``data`` folder."""

DEFAULT_MODEL_METADATA = "explainrt.default_model"
"""Metadata key of the shipped model's origin (JSON: architecture, weights, target module, weight dtype)."""

EXAMPLE_NAMES = ("chelsea", "coffee", "astronaut")
"""The example photos (scikit-image's, shipped losslessly as WebP in ``data/examples``)."""

# The weights were converted from TensorFlow's EfficientNet-Lite checkpoints, whose builder
# normalises with MEAN_RGB = 127 and STDDEV_RGB = 128 (on 0-255 pixels) and evaluates on the centre
# 224/(224 + 32) of the image. The package's own demo uses torchvision's ImageNet mean/std
# instead; its first batch norm's running statistics match the TensorFlow normalisation.
DEFAULT_PREPROCESSING = Preprocessing(
    input_size=(224, 224),
    resize_shorter=256,
    mean=(127 / 255,) * 3,
    std=(128 / 255,) * 3,
    labels=imagenet_labels(),
)


def _data_file(*parts: str) -> Path:
    path = Path(str(resources.files("explainrt").joinpath("data", *parts)))
    if not path.is_file():
        raise InvalidModelError(f"explainrt's installation lacks {path}: reinstall explainrt "
                                "(or run tools/make_default_model.py in a source checkout)")
    return path


def example_images() -> dict[str, np.ndarray]:
    """Three uint8 RGB images from scikit-image's data set: a cat, a cup of coffee, an astronaut."""
    return {name: load_image(_data_file("examples", f"{name}.webp")) for name in EXAMPLE_NAMES}


def write_example_images(directory: str | os.PathLike) -> list[Path]:
    """Save example_images() as ``<name>.png`` in `directory` (created if needed); return the paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    return [save_png(directory / f"{name}.png", image) for name, image in example_images().items()]


@functools.cache
def _shipped_bytes() -> bytes:
    return _data_file(DEFAULT_MODEL_FILE).read_bytes()


def default_explainable_model() -> onnx.ModelProto:
    """The shipped default model as explainable ONNX (a fresh copy each call)."""
    return load_model(_shipped_bytes())


def default_model_origin(model: onnx.ModelProto) -> dict[str, str]:
    """The origin note tools/make_default_model.py stores in the shipped model's metadata."""
    for prop in model.metadata_props:
        if prop.key == DEFAULT_MODEL_METADATA:
            return json.loads(prop.value)
    raise InvalidModelError(f"the model has no {DEFAULT_MODEL_METADATA!r} metadata: it is not explainrt's default model")
