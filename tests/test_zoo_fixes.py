"""What the zoo run (``pytest -m zoo tests/test_zoo.py``, bench/results/zoo.md) found, each on a small model.

- torchvision's MaxViT: ONNX shape inference loses the batch symbol of the window
  un-partitioning's Reshape, so its last block looked like no sound target layer; the exporter's
  own shapes of the target modules are now kept. Its attention is written as ``torch.einsum``:
  a layer before the last block needs the Einsum gradient.
- A window-partitioned tensor ``[N, windows, pixels, C]`` can have the shape of a channels-last
  map (``[N, 4, 4, C]``: 4 windows of 4 pixels); the automatic layer took MaxViT's attention norm
  for one, a silently wrong map. Axes are now labelled with the image axes they come from
  (``explainrt.export.axes``), and a grid whose axes are not the image's rows and columns is no
  target layer.
- VGG at an input smaller than 224 (64 x 64: a 2 x 2 map before ``AdaptiveAvgPool2d((7, 7))``): torch's
  exporter writes the upsampling average as GatherND over index pairs, some taken twice; it had no
  gradient rule (now ScatterElements with reduction 'add' on the indexed axes merged into one).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pytorch_grad_cam import GradCAM as ReferenceGradCAM
from pytorch_grad_cam.utils.model_targets import (
    ClassifierOutputTarget as ReferenceTarget,
)

from explainrt import Explainer, make_explainable
from explainrt.deploy.trt_support import check_tensorrt_support
from explainrt.errors import InvalidInputError, UnknownLayerError
from explainrt.export import axes
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


def test_a_window_partition_shaped_like_a_feature_map_is_no_target_layer(maxvit: torch.nn.Module) -> None:
    """MaxViT's window-attention norm sees [N, 4 windows, 4 pixels, 32]: the shape of a 4x4 channels-last map."""
    norm = maxvit.blocks[-1].layers[0].layers.window_attention.attn_layer[0]
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    plain, taps = export_torch(maxvit, images, [norm, maxvit.blocks[-1]])
    shapes = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in plain.graph.value_info}
    assert shapes[taps[0]] == ["N", 4, 4, 32]
    with pytest.raises(UnknownLayerError, match="not the image's rows and columns \\(rows from H/W, columns from H/W"):
        make_explainable(plain, [taps[0]])
    automatic = ExplainableSpec.from_model(make_explainable(plain, "auto"))
    assert automatic.target_layers == (taps[1],)


def _atoms(labels: axes.Labels) -> list[list[tuple[str, int | None]]]:
    return [[(atom.origin, atom.size) for atom in label] for label in labels]


def test_axis_labels_follow_reshapes_and_transposes() -> None:
    image = (axes.fresh("N", None), axes.fresh("", 16), axes.fresh("H", 8), axes.fresh("W", 8))
    windows = axes.reshaped(image, ("N", 16, 4, 2, 4, 2))  # rows and columns split into (window, pixel)
    assert windows is not None
    assert _atoms(windows) == [[("N", None)], [("", 16)], [("H", 4)], [("H", 2)], [("W", 4)], [("W", 2)]]
    partitioned = axes.reshaped(tuple(windows[p] for p in (0, 2, 4, 3, 5, 1)), ("N", 16, 4, 16))
    assert partitioned is not None and [axes.origin_of(label) for label in partitioned] == ["N", None, None, ""]
    back = axes.reshaped(tuple(partitioned[p] for p in (0, 3, 1, 2)), ("N", 16, 4, 4, 2, 2))
    assert back is not None
    restored = axes.reshaped(tuple(back[p] for p in (0, 1, 2, 4, 3, 5)), ("N", 16, 8, 8))
    assert restored == image  # the parts of each axis, back in order, are that axis again
    folded = axes.reshaped(tuple(windows[p] for p in (0, 2, 4, 3, 5, 1)), ("M", 4, 16))  # windows into the batch
    assert folded is not None and _atoms(folded)[0] == [("N", None), ("H", 4), ("W", 4)]
    assert axes.reshaped(image, ("N", 16, 3, 0)) is None  # sizes that do not line up: unknown, not guessed


def test_adaptive_pooling_that_upsamples_matches_pytorch_grad_cam() -> None:
    """A VGG-shaped classifier at 16 x 16: 2 x 2 features pooled up to 7 x 7 (GatherND) before the linear head;
    Grad-CAM at the last convolution equals pytorch-grad-cam's, the input gradient torch.autograd's."""
    torch.manual_seed(0)
    features = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
                                   torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(4))
    model = torch.nn.Sequential(features, torch.nn.AdaptiveAvgPool2d((7, 7)), torch.nn.Flatten(),
                                torch.nn.Linear(16 * 49, 5)).eval()
    images = np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)
    explainer = Explainer(model, [features[3]], input_size=(16, 16))
    assert "GatherND" in {node.op_type for node in explainer.session.model.graph.node}
    assert not list(check_tensorrt_support(explainer.session.model))  # ScatterElements adds; ScatterND would not
    ours = explainer.explain(images, method="gradcam", targets=[1, 4])
    with ReferenceGradCAM(model=model, target_layers=[features[3]]) as cam:
        reference = cam(torch.from_numpy(images), targets=[ReferenceTarget(1), ReferenceTarget(4)])
    assert reference.std() > 0.1
    np.testing.assert_allclose(ours.maps.reshape(reference.shape), reference, atol=1e-5)
    x = torch.from_numpy(images).requires_grad_(True)
    model(x)[[0, 1], [1, 4]].sum().backward()
    saliency = explainer.explain(images, method="saliency", targets=[1, 4], normalize=False, abs=False)
    expected = x.grad.numpy().sum(axis=1)
    assert np.abs(saliency.maps.reshape(expected.shape) - expected).max() <= 1e-5 * np.abs(expected).max()


def test_pointwise_convolution_after_the_target_keeps_a_dynamic_image_size() -> None:
    """A SqueezeNet-shaped classifier (a 1x1 stride-1 convolution after the target layer) given without input_size:
    exported with a dynamic image size (its Conv gradient needs no static size), it explains images of two other
    sizes, equal to pytorch-grad-cam's maps."""
    torch.manual_seed(0)
    features = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2, padding=1), torch.nn.ReLU(),
                                   torch.nn.Conv2d(8, 12, 3, stride=2, padding=1), torch.nn.ReLU())
    model = torch.nn.Sequential(features, torch.nn.Conv2d(12, 5, 1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten()).eval()
    explainer = Explainer(model, [features[2]])
    assert not any(isinstance(size, int) for size in explainer.session.input_shape[2:])  # symbolic: any size
    for seed, size in enumerate([(48, 64), (40, 40)]):
        images = np.random.default_rng(seed).standard_normal((2, 3, *size)).astype(np.float32)
        ours = explainer.explain(images, method="gradcam", targets=[1, 3])
        with ReferenceGradCAM(model=model, target_layers=[features[2]]) as cam:
            reference = cam(torch.from_numpy(images), targets=[ReferenceTarget(1), ReferenceTarget(3)])
        assert reference.std() > 0.1
        np.testing.assert_allclose(ours.maps.reshape(reference.shape), reference, atol=1e-5)


def test_adaptive_pool_exported_for_one_size_falls_back_to_that_size(caplog: pytest.LogCaptureFixture) -> None:
    """A VGG-shaped classifier whose features are 7 x 7 at 224 x 224, given without input_size: torch's dynamic
    export writes AdaptiveAvgPool2d((7, 7)) as a fixed 1 x 1 AveragePool, a graph of that one size; the export is
    redone at 224 x 224 (said in the log), explains as pytorch-grad-cam does, and refuses another size clearly."""
    torch.manual_seed(0)
    features = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, stride=4, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
                                   torch.nn.Conv2d(4, 8, 3, stride=2, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2))
    model = torch.nn.Sequential(features, torch.nn.AdaptiveAvgPool2d((7, 7)), torch.nn.Flatten(),
                                torch.nn.Linear(8 * 49, 5)).eval()
    with caplog.at_level("INFO", logger="explainrt"):
        explainer = Explainer(model, [features[3]])
    assert tuple(explainer.session.input_shape)[2:] == (224, 224)
    assert "exported at 224x224" in caplog.text and "AveragePool" in caplog.text
    images = np.random.default_rng(0).standard_normal((2, 3, 224, 224)).astype(np.float32)
    ours = explainer.explain(images, method="gradcam", targets=[0, 2])
    with ReferenceGradCAM(model=model, target_layers=[features[3]]) as cam:
        reference = cam(torch.from_numpy(images), targets=[ReferenceTarget(0), ReferenceTarget(2)])
    assert reference.std() > 0.05
    np.testing.assert_allclose(ours.maps.reshape(reference.shape), reference, atol=1e-5)
    with pytest.raises(InvalidInputError, match="224"):
        explainer.explain(images[:, :, :200, :200])


class _SpaceToDepth(torch.nn.Module):
    """YOLOv5's Focus: the four pixel phases of each 2 x 2 block stacked as channels (strided slices)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x[..., ::2, ::2], x[..., 1::2, ::2], x[..., ::2, 1::2], x[..., 1::2, 1::2]], 1)


def test_strided_slice_after_the_target_falls_back_to_a_fixed_size(caplog: pytest.LogCaptureFixture) -> None:
    """A strided Slice along a dynamic image axis places its gradient by that axis' size: without input_size the
    export is redone at 224 x 224 (said in the log) instead of refusing the model, and explains as pytorch-grad-cam
    does."""
    torch.manual_seed(0)
    stem = torch.nn.Conv2d(3, 4, 3, stride=4, padding=1)
    model = torch.nn.Sequential(stem, torch.nn.ReLU(), _SpaceToDepth(), torch.nn.Conv2d(16, 5, 1),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()).eval()
    with caplog.at_level("INFO", logger="explainrt"):
        explainer = Explainer(model, [stem])
    assert tuple(explainer.session.input_shape)[2:] == (224, 224)
    assert "exported at 224x224" in caplog.text and "Slice" in caplog.text
    images = np.random.default_rng(0).standard_normal((2, 3, 224, 224)).astype(np.float32)
    ours = explainer.explain(images, method="gradcam", targets=[0, 3])
    with ReferenceGradCAM(model=model, target_layers=[stem]) as cam:
        reference = cam(torch.from_numpy(images), targets=[ReferenceTarget(0), ReferenceTarget(3)])
    assert reference.std() > 0.05
    np.testing.assert_allclose(ours.maps.reshape(reference.shape), reference, atol=1e-5)
