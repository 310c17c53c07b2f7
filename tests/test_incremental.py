"""Exact incremental inference (Krypton-style occlusion): the graph analysis, the plans, the logits, the method."""

from __future__ import annotations

import io

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from explainrt import Explainer, kernels
from explainrt.errors import InvalidInputError
from explainrt.export.locality import LocalFront
from explainrt.runtime.incremental import IncrementalModel, changed_boxes, incremental_forward


class Branchy(nn.Module):
    """Every local operator kind the analysis knows: strided, dilated and grouped convolutions,
    max and average pooling, a strided residual shortcut, a channel concatenation."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 5, stride=2, padding=2)
        self.pool = nn.MaxPool2d(3, stride=2, padding=1)
        self.dilated = nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=2)
        self.down = nn.Conv2d(8, 12, 3, stride=2, padding=1)
        self.shortcut = nn.Conv2d(8, 12, 1, stride=2)
        self.left = nn.Conv2d(12, 6, (1, 3), padding=(0, 1))
        self.right = nn.AvgPool2d(3, stride=1, padding=1)
        self.head = nn.Linear(18, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.leaky_relu(self.pool(self.stem(x)), 0.1)
        x = x + nn.functional.hardswish(self.dilated(x))
        x = nn.functional.leaky_relu(self.down(x) + self.shortcut(x), 0.1)
        x = torch.cat([self.left(x), self.right(x)], dim=1)
        return self.head(x.mean(dim=(2, 3)))


def _onnx(module: nn.Module, size: tuple[int, int]) -> onnx.ModelProto:
    buffer = io.BytesIO()
    torch.onnx.export(module.eval(), torch.zeros(1, 3, *size), buffer, input_names=["image"], output_names=["logits"],
                      dynamic_axes={"image": {0: "n"}}, dynamo=False)
    return onnx.load_from_string(buffer.getvalue())


@pytest.fixture(scope="module")
def branchy() -> onnx.ModelProto:
    torch.manual_seed(0)
    return _onnx(Branchy(), (37, 41))


def _tensor_values(model: onnx.ModelProto, names: list[str], images: np.ndarray) -> list[np.ndarray]:
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.extend(onnx.helper.make_empty_tensor_value_info(name) for name in names)
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(names, {"image": images})


def test_the_front_covers_every_local_operator_and_finds_the_cuts(branchy) -> None:
    front = LocalFront.of(branchy, "image")
    kinds = {branchy.graph.node[node.index].op_type for node in front.nodes}
    assert {"Conv", "MaxPool", "AveragePool", "Add", "Concat", "LeakyRelu"} <= kinds
    assert front.cuts[0] == "image" and len(front.cuts) >= 4
    ops_after = [node.op_type for node in branchy.graph.node[front.nodes[-1].index + 1 :] if node.op_type != "Constant"]
    assert ops_after[0] in {"ReduceMean", "GlobalAveragePool"}  # the front ends at the first global operator


@pytest.mark.parametrize("box", [(0, 5, 0, 7), (10, 19, 13, 20), (30, 37, 35, 41), (0, 37, 20, 21)])
def test_changed_intervals_are_exactly_where_the_activations_change(branchy, box) -> None:
    """Forward interval arithmetic against the truth: perturb the box, see which positions move."""
    front = LocalFront.of(branchy, "image")
    sizes = front.sizes(37, 41)
    names = [node.output for node in front.nodes]
    image = np.random.default_rng(1).standard_normal((1, 3, 37, 41)).astype(np.float32)
    changed = image.copy()
    y0, y1, x0, x1 = box
    changed[:, :, y0:y1, x0:x1] += np.random.default_rng(2).standard_normal((3, y1 - y0, x1 - x0)).astype(np.float32)
    before, after = _tensor_values(branchy, names, image), _tensor_values(branchy, names, changed)
    reach = [front.changed(axis, np.array([start]), np.array([end]), sizes, names[-1])
             for axis, (start, end) in enumerate([(y0, y1), (x0, x1)])]
    for name, old, new in zip(names, before, after):
        assert old.shape[2:] == sizes[name]
        moved = np.abs(new - old).max(axis=(0, 1)) > 1e-6
        rows, cols = np.flatnonzero(moved.any(axis=1)), np.flatnonzero(moved.any(axis=0))
        predicted = [(int(reach[axis][name][0][0]), int(reach[axis][name][1][0])) for axis in (0, 1)]
        assert predicted == [(rows.min(), rows.max() + 1), (cols.min(), cols.max() + 1)], name


def test_stages_compose_to_the_full_model(branchy) -> None:
    front = LocalFront.of(branchy, "image")
    image = np.random.default_rng(3).standard_normal((2, 3, 37, 41)).astype(np.float32)
    current = image
    for start, end in zip(front.cuts, front.cuts[1:]):
        stage = ort.InferenceSession(front.stage_model(start, end).SerializeToString(), providers=["CPUExecutionProvider"])
        current = stage.run(None, {start: current})[0]
        np.testing.assert_allclose(current, _tensor_values(branchy, [end], image)[0], rtol=1e-5, atol=1e-5)
    suffix = ort.InferenceSession(front.stage_model(front.cuts[-1], None, ["logits"]).SerializeToString(),
                                  providers=["CPUExecutionProvider"])
    full = ort.InferenceSession(branchy.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(suffix.run(None, {front.cuts[-1]: current})[0], full.run(None, {"image": image})[0],
                               rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def branchy_explainer(branchy) -> Explainer:
    from explainrt import make_explainable

    return Explainer(make_explainable(branchy))


def _masked_copies(image: np.ndarray, boxes: list[tuple[int, int, int, int]], channels: bool = False):
    masks = np.ones((len(boxes), image.shape[0] if channels else 1, *image.shape[1:]), dtype=np.float32)
    for k, (y0, y1, x0, x1) in enumerate(boxes):
        masks[k, : 1 + k % image.shape[0] if channels else 1, y0:y1, x0:x1] = 0
    masks = masks if channels else masks[:, 0]
    return kernels.apply_masks(image, masks, 0.5), masks


@pytest.mark.parametrize("channels", [False, True])
def test_incremental_logits_equal_full_inference_anywhere_in_the_image(branchy_explainer, channels) -> None:
    session = branchy_explainer.session
    image = np.random.default_rng(4).standard_normal((3, 37, 41)).astype(np.float32)
    forward = incremental_forward(session, image, (6, 7), required=True)
    assert len(forward.plan.stages) >= 1 and forward.plan.fraction < 1
    boxes = [(0, 6, 0, 7), (31, 37, 34, 41), (15, 21, 0, 7), (0, 6, 20, 27), (12, 15, 9, 16), (36, 37, 40, 41),
             (20, 26, 30, 37)]
    copies, masks = _masked_copies(image, boxes, channels)
    expected = session.logits(copies)
    np.testing.assert_allclose(forward(copies, masks), expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def test_incremental_logits_equal_full_inference_on_resnet18(small_explainer, small_batch) -> None:
    session = small_explainer.session
    for image in small_batch:
        forward = incremental_forward(session, image, (8, 8), required=True)
        assert forward.plan.fraction < 1  # at 64 x 64 an 8 x 8 box soon reaches everything: ~10 % saved
        boxes = [(y, y + 8, x, x + 8) for y in (0, 20, 56) for x in (0, 28, 56)]
        copies, masks = _masked_copies(image, boxes)
        expected = session.logits(copies)
        np.testing.assert_allclose(forward(copies, masks), expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def test_incremental_logits_on_the_default_model(default_explainer) -> None:
    """EfficientNet-Lite0 (depthwise convolutions, ReLU6) at 224 x 224."""
    session = default_explainer.session
    image = np.random.default_rng(5).standard_normal((3, 224, 224)).astype(np.float32)
    forward = incremental_forward(session, image, (32, 32), required=True)
    assert forward.plan.fraction < 0.85
    copies, masks = _masked_copies(image, [(0, 32, 0, 32), (96, 128, 160, 192), (192, 224, 112, 144)])
    expected = session.logits(copies)
    np.testing.assert_allclose(forward(copies, masks), expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


@pytest.mark.parametrize("options", [{"window": (8, 8), "stride": (4, 4)},
                                     {"window": (12, 10), "stride": (6, 5), "baseline": "blur"},
                                     {"window": (2, 8, 8), "stride": (1, 8, 8), "baseline": 0.3}])
def test_occlusion_maps_do_not_depend_on_incremental_inference(small_explainer, small_batch, options) -> None:
    full = small_explainer.explain(small_batch, method="occlusion", normalize=False, incremental=False, **options)
    fast = small_explainer.explain(small_batch, method="occlusion", normalize=False, incremental=True, **options)
    np.testing.assert_array_equal(full.targets, fast.targets)
    scale = np.abs(full.logits).max()  # a map is a difference of logits: compare at the logits' scale
    assert np.abs(full.maps - fast.maps).max() <= 1e-5 * scale
    assert fast.timings["runtime"] > 0 and fast.timings["method"] > 0


def test_no_plan_when_the_box_is_the_whole_image(small_explainer) -> None:
    assert IncrementalModel.of(small_explainer.session).plan((64, 64), (64, 64)) is None
    image = np.zeros((3, 64, 64), dtype=np.float32)
    assert incremental_forward(small_explainer.session, image, (64, 64)) is None
    with pytest.raises(InvalidInputError, match="incremental inference is not possible"):
        incremental_forward(small_explainer.session, image, (64, 64), required=True)


def test_incremental_needs_a_backend_that_runs_submodels(small_torch_explainer, small_batch) -> None:
    with pytest.raises(InvalidInputError, match="incremental inference is not possible.*sub-models"):
        small_torch_explainer.explain(small_batch[:1], method="occlusion", window=(8, 8), incremental=True)
    auto = small_torch_explainer.explain(small_batch[:1], method="occlusion", window=(8, 8), normalize=False)
    assert auto.maps.shape == (1, 64, 64)  # "auto" falls back to full forward passes


class Centred(nn.Module):
    """Subtracts the image mean first: no operator of the model is local to a box."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x - x.mean(dim=(1, 2, 3), keepdim=True)).mean(dim=(2, 3))


def test_incremental_needs_a_local_front(small_batch) -> None:
    explainer = Explainer(_onnx(Centred(), (16, 16)))
    images = small_batch[:1, :, :16, :16]
    with pytest.raises(InvalidInputError, match="incremental inference is not possible.*no spatially local front"):
        explainer.explain(images, method="occlusion", window=(4, 4), incremental=True)
    auto = explainer.explain(images, method="occlusion", window=(4, 4), normalize=False)
    off = explainer.explain(images, method="occlusion", window=(4, 4), normalize=False, incremental=False)
    np.testing.assert_array_equal(auto.maps, off.maps)


@pytest.mark.parametrize("value", ["yes", 1, None, [True]])
def test_bad_incremental_option_is_named(small_explainer, small_batch, value) -> None:
    with pytest.raises(InvalidInputError, match="method 'occlusion': incremental must be one of 'auto', True, False, got"):
        small_explainer.explain(small_batch[:1], method="occlusion", incremental=value)


def test_changed_boxes_of_masks() -> None:
    masks = np.ones((3, 2, 6, 7), dtype=np.float32)
    masks[0, 1, 2:4, 3:7] = 0
    masks[1, :, 0, 0] = 0.5
    boxes = changed_boxes(masks)
    np.testing.assert_array_equal(boxes, [[2, 4, 3, 7], [0, 1, 0, 1], [0, 1, 0, 1]])
    np.testing.assert_array_equal(changed_boxes(masks[:, 1]), [[2, 4, 3, 7], [0, 1, 0, 1], [0, 1, 0, 1]])
