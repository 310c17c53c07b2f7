"""The torchvision models that several test files export, built and exported once per test process.

test_zoo_gradients.py compares each export with torch.autograd; test_check_trt.py checks the same
exports for TensorRT support. ``export(name)`` builds the model (random init under
``torch.manual_seed(0)``, randomised normalisation parameters, eval mode) and exports it with its
two target layers; the small models both files use are kept for the process (where both files run
on one xdist worker, each is exported once), the others are built afresh each time.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import onnx
import pytest
import torch
import torchvision

from explainrt.export import make_explainable
from explainrt.export.torch_export import LOGITS_OUTPUT, export_torch


@dataclass(frozen=True)
class Zoo:
    build: Callable[[], torch.nn.Module]
    targets: Callable[[torch.nn.Module], list[torch.nn.Module]]
    size: int = 64
    batch: int = 3


# The usual Grad-CAM layer first, then an earlier one whose gradient crosses the model's blocks
# (residual Add/ReLU, depthwise convs, squeeze-excitation, hard-swish, layer norm, GELU, dense
# concatenations...). At 64 pixels the last feature maps are 2x2.
ZOO = {
    "resnet18": Zoo(torchvision.models.resnet18, lambda m: [m.layer4, m.layer3]),
    "resnet50": Zoo(torchvision.models.resnet50, lambda m: [m.layer4, m.layer3]),
    # its AdaptiveAvgPool2d(7) needs a 7x7 feature map: 224 pixels; batch 2 keeps it fast.
    # features[-2] is the last ReLU: its gradient crosses the final MaxPool and the classifier.
    "vgg16": Zoo(torchvision.models.vgg16, lambda m: [m.features, m.features[-2]], size=224, batch=2),
    "mobilenet_v2": Zoo(torchvision.models.mobilenet_v2, lambda m: [m.features, m.features[13]]),
    "mobilenet_v3_large": Zoo(torchvision.models.mobilenet_v3_large, lambda m: [m.features, m.features[12]]),
    "efficientnet_b0": Zoo(torchvision.models.efficientnet_b0, lambda m: [m.features, m.features[5]]),
    "densenet121": Zoo(torchvision.models.densenet121, lambda m: [m.features, m.features.transition3]),
    "convnext_tiny": Zoo(torchvision.models.convnext_tiny, lambda m: [m.features, m.features[5]]),
}
SLOW = {"resnet50", "vgg16", "densenet121", "convnext_tiny", "efficientnet_b0"}
SHARED = {"resnet18", "mobilenet_v3_large", "efficientnet_b0", "convnext_tiny"}
"""Exported by both test files: kept once built."""


def params(names: list[str]) -> list:
    """``pytest.param`` per model name, marked ``slow`` where it is."""
    return [pytest.param(name, marks=[pytest.mark.slow] if name in SLOW else []) for name in names]


def randomised(model: torch.nn.Module) -> torch.nn.Module:
    """Random, non-trivial normalisation parameters and layer scales (seeded)."""
    generator = torch.Generator().manual_seed(1)

    def uniform(t: torch.Tensor, low: float, high: float) -> torch.Tensor:
        return torch.rand(t.shape, generator=generator) * (high - low) + low

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.running_mean.copy_(uniform(module.running_mean, -0.1, 0.1))
                module.running_var.copy_(uniform(module.running_var, 0.5, 1.5))
            if isinstance(module, (torch.nn.modules.batchnorm._BatchNorm, torch.nn.LayerNorm)):
                module.weight.copy_(uniform(module.weight, 0.5, 1.5))
                module.bias.copy_(uniform(module.bias, -0.1, 0.1))
        for name, parameter in model.named_parameters():
            if name.endswith("layer_scale"):  # convnext: 1e-6 at init would mute every block
                parameter.copy_(uniform(parameter, 0.2, 1.0))
    return model


@dataclass(frozen=True)
class Exported:
    """A zoo model, its images, its two target modules, its plain export and its explainable export."""

    name: str
    model: torch.nn.Module
    images: torch.Tensor
    modules: list[torch.nn.Module]
    plain: onnx.ModelProto
    explainable: onnx.ModelProto


def export(name: str) -> Exported:
    """``name`` exported as from_torch does (export_torch, then make_explainable), the plain export kept too."""
    return _kept(name) if name in SHARED else _export(name)


@functools.cache
def _kept(name: str) -> Exported:
    return _export(name)


def _export(name: str) -> Exported:
    entry = ZOO[name]
    torch.manual_seed(0)
    model = randomised(entry.build()).eval()
    images = torch.randn(entry.batch, 3, entry.size, entry.size, generator=torch.Generator().manual_seed(2))
    modules = entry.targets(model)
    plain, taps = export_torch(model, images, modules)
    return Exported(name, model, images, modules, plain, make_explainable(plain, taps, logits=LOGITS_OUTPUT))
