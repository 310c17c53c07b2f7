"""What the zoo run (``pytest -m zoo tests/test_zoo.py``, bench/results/zoo.md) found, each on a small model.

- torchvision's MaxViT: ONNX shape inference loses the batch symbol of the window
  un-partitioning's Reshape, so its last block looked like no sound target layer; the exporter's
  own shapes of the target modules are now kept. Its attention is written as ``torch.einsum``:
  a layer before the last block needs the Einsum gradient.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pytorch_grad_cam import GradCAM as ReferenceGradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget as ReferenceTarget

from explainrt import Explainer, make_explainable
from explainrt.export.spec import ExplainableSpec
from explainrt.export.torch_export import export_torch


def _randomized(model: torch.nn.Module) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    return model.eval()


@pytest.fixture(scope="module")
def maxvit() -> torch.nn.Module:
    from torchvision.models.maxvit import MaxVit

    return _randomized(MaxVit(input_size=(32, 32), stem_channels=8, partition_size=2, block_channels=[16, 32],
                              block_layers=[1, 1], head_dim=8, stochastic_depth_prob=0.0, num_classes=10))


def test_maxvit_last_block_keeps_its_batch_axis(maxvit: torch.nn.Module) -> None:
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    plain, taps = export_torch(maxvit, images, [maxvit.blocks[-1]])
    shapes = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in plain.graph.value_info}
    assert shapes[taps[0]] == ["N", 32, 4, 4]
    for chosen in ([taps[0]], "auto"):
        spec = ExplainableSpec.from_model(make_explainable(plain, chosen))
        assert spec.layouts == ({"kind": "nchw", "grid": [4, 4], "channels": 32, "prefix_tokens": 0},)


@pytest.mark.parametrize("block", [0, -1])
def test_maxvit_grad_cam_equals_pytorch_grad_cam(maxvit: torch.nn.Module, block: int) -> None:
    """Block 0's gradient crosses the last block's einsum attention."""
    images = np.random.default_rng(2).standard_normal((2, 3, 32, 32)).astype(np.float32)
    layer = maxvit.blocks[block]
    with ReferenceGradCAM(model=maxvit, target_layers=[layer]) as cam:
        reference = cam(input_tensor=torch.from_numpy(images), targets=[ReferenceTarget(1), ReferenceTarget(7)])
    assert reference.std() > 0.05
    maps = Explainer(maxvit, [layer], input_size=(32, 32)).explain(images, targets=[1, 7]).maps
    np.testing.assert_allclose(maps, reference, atol=1e-4)
