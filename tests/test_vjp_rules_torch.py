"""VJP rules on the graphs torch.onnx.export makes, against torch.autograd of the same module.

test_vjp_rules.py checks each rule against finite differences of the ONNX operator; here the
operators come as torch exports them (F.interpolate's Resize attributes, nn.GroupNorm's
InstanceNormalization decomposition, F.normalize's ReduceL2/ReduceL1 + Div, ...) and the
reference is torch's own gradient. Also: the straight-through rules on a QDQ model made by
onnxruntime.quantization, the refusals (QOperator models, detection post-processing), shape-only
paths (F.interpolate(size=x.shape[-2:])) through make_explainable, and Upsample models of old
opsets through make_explainable's opset upgrade.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from gradcheck import forward_model, gradient_model, gradients, normal, relative_error, rng, session, torch_gradients
from onnx import TensorProto, helper, numpy_helper

from explainrt.errors import InvalidModelError, UnsupportedOperatorError
from explainrt.export.explainable import make_explainable
from explainrt.export.spec import TARGETS_INPUT, gradients_output
from explainrt.export.torch_export import from_torch

F32 = np.float32


class Lambda(torch.nn.Module):
    def __init__(self, f: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.f = f

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.f(x)


def export(module: torch.nn.Module, x: np.ndarray, dynamo: bool, opset: int = 18) -> onnx.ModelProto:
    """``module`` as torch.onnx.export makes it (input "x" with a dynamic batch, output "y"), shapes inferred."""
    buffer = io.BytesIO()
    example = (torch.from_numpy(x),)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            program = torch.onnx.export(module, example, dynamo=True, opset_version=opset, input_names=["x"],
                                        output_names=["y"], dynamic_shapes=({0: torch.export.Dim("N", min=1)},),
                                        verbose=False)
            program.save(buffer)
        else:
            torch.onnx.export(module, example, buffer, dynamo=False, opset_version=opset, input_names=["x"],
                              output_names=["y"], dynamic_axes={"x": {0: "N"}})
    return onnx.shape_inference.infer_shapes(onnx.load_from_string(buffer.getvalue()), data_prop=True)


def check_against_torch(module: torch.nn.Module, x: np.ndarray, dynamo: bool, op: str | None = None,
                        tolerance: float = 1e-5) -> onnx.ModelProto:
    """The gradient graph of the exported ``module`` against torch.autograd, for two random seeds."""
    module.eval()
    model = export(module, x, dynamo)
    if op is not None:
        assert op in {n.op_type for n in model.graph.node}, [n.op_type for n in model.graph.node]
    y = session(model).run(["y"], {"x": x})[0]
    with torch.no_grad():
        np.testing.assert_allclose(y, module(torch.from_numpy(x)).numpy(), rtol=1e-4, atol=1e-5)
    seeds = rng(8).standard_normal((2, *y.shape)).astype(F32)
    actual = gradients(model, {"x": x}, ["x"], "y", seeds)["x"]
    expected = torch_gradients(lambda x: module(x), {"x": x}, seeds)["x"]
    assert relative_error(actual, expected) <= tolerance
    return model


def resize_attributes(model: onnx.ModelProto) -> dict[str, object]:
    (resize,) = [n for n in model.graph.node if n.op_type == "Resize"]
    return {a.name: helper.get_attribute_value(a) for a in resize.attribute}


# --- Resize: F.interpolate ---------------------------------------------------------------------------
INTERPOLATE = {  # id: (F.interpolate arguments, what torch exports: (mode, coordinate_transformation_mode))
    "nearest-scale2": ({"scale_factor": 2, "mode": "nearest"}, (b"nearest", b"asymmetric")),
    "nearest-size-up": ({"size": (7, 9), "mode": "nearest"}, (b"nearest", b"asymmetric")),
    "nearest-size-down": ({"size": (3, 2), "mode": "nearest"}, (b"nearest", b"asymmetric")),
    "bilinear-scale2": ({"scale_factor": 2, "mode": "bilinear", "align_corners": False}, (b"linear", b"half_pixel")),
    "bilinear-size-down": ({"size": (3, 7), "mode": "bilinear", "align_corners": False}, (b"linear", b"half_pixel")),
    "bilinear-align_corners-scale2": ({"scale_factor": 2, "mode": "bilinear", "align_corners": True},
                                      (b"linear", b"align_corners")),
    "bilinear-align_corners-size": ({"size": (3, 7), "mode": "bilinear", "align_corners": True},
                                    (b"linear", b"align_corners")),
    "bicubic-scale2": ({"scale_factor": 2, "mode": "bicubic", "align_corners": False}, (b"cubic", b"half_pixel")),
    "bicubic-size-down": ({"size": (3, 3), "mode": "bicubic", "align_corners": False}, (b"cubic", b"half_pixel")),
    "bicubic-align_corners-size": ({"size": (7, 9), "mode": "bicubic", "align_corners": True},
                                   (b"cubic", b"align_corners")),
}


# the dynamo exporter takes seconds per export: a subset (its Resize attributes are TorchScript's, plus defaults)
DYNAMO_INTERPOLATE = ("bilinear-size-down",)


@pytest.mark.parametrize("kwargs, exported, dynamo", [
    pytest.param(*arguments, dynamo, id=f"{name}-{'dynamo' if dynamo else 'torchscript'}")
    for name, arguments in INTERPOLATE.items() for dynamo in (False, True) if not dynamo or name in DYNAMO_INTERPOLATE])
def test_interpolate_matches_torch(kwargs: dict[str, object], exported: tuple[bytes, bytes], dynamo: bool) -> None:
    x = normal([2, 3, 4, 5], F32)
    model = check_against_torch(Lambda(lambda x: F.interpolate(x, **kwargs)), x, dynamo, "Resize")  # type: ignore[arg-type]
    attrs = resize_attributes(model)
    assert (attrs["mode"], attrs["coordinate_transformation_mode"]) == exported
    assert attrs.get("nearest_mode", b"floor") == b"floor" and attrs.get("cubic_coeff_a", -0.75) == -0.75


@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
def test_antialiased_interpolate_matches_torch(mode: str) -> None:
    """Only the dynamo exporter exports antialias (Resize antialias=1, exclude_outside=1)."""
    x = normal([2, 3, 8, 7], F32)
    model = check_against_torch(Lambda(lambda x: F.interpolate(x, size=(3, 4), mode=mode, antialias=True)), x, True,
                                "Resize")
    attrs = resize_attributes(model)
    assert attrs["antialias"] == 1 and attrs["exclude_outside"] == 1


def test_upsample_module_and_trilinear_match_torch() -> None:
    check_against_torch(torch.nn.Upsample(scale_factor=(1.5, 2), mode="bilinear"), normal([2, 3, 4, 5], F32), False)
    check_against_torch(Lambda(lambda x: F.interpolate(x, scale_factor=2, mode="trilinear")),
                        normal([1, 2, 3, 4, 2], F32), False, "Resize")


# --- other operators as torch exports them ------------------------------------------------------------
def _seeded(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator))
    return module


MODULES = {  # id: (module, input shape, the operator it exports)
    "conv-transpose-stride2-output_padding-groups": (
        lambda: torch.nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2), [2, 4, 3, 5],
        "ConvTranspose"),
    "conv-transpose-dilation-stride3": (
        lambda: torch.nn.ConvTranspose2d(4, 3, (2, 3), stride=(3, 2), padding=(1, 0), output_padding=(2, 1),
                                         dilation=(2, 1)), [2, 4, 3, 4], "ConvTranspose"),
    "conv-transpose-1d": (lambda: torch.nn.ConvTranspose1d(3, 2, 4, stride=2, padding=1), [2, 3, 5], "ConvTranspose"),
    # stride 1: the input gradient is a Conv with the flipped weight
    "conv-stride1-dilation-groups": (lambda: torch.nn.Conv2d(4, 6, 3, padding=(2, 1), dilation=(2, 1), groups=2),
                                     [2, 4, 6, 5], "Conv"),
    "conv-depthwise-same-even-kernel": (lambda: torch.nn.Conv2d(4, 8, (3, 2), padding="same", groups=4),
                                        [2, 4, 5, 6], "Conv"),
    "conv-pads-wider-than-kernel": (lambda: torch.nn.Conv2d(3, 2, (1, 2), padding=(2, 3)), [2, 3, 4, 3], "Conv"),
    "conv1d-stride1-dilation": (lambda: torch.nn.Conv1d(3, 2, 3, padding=3, dilation=2), [2, 3, 7], "Conv"),
    "conv3d-stride1": (lambda: torch.nn.Conv3d(2, 4, (3, 1, 2), padding=(1, 0, 1)), [2, 2, 4, 3, 5], "Conv"),
    "group-norm": (lambda: torch.nn.GroupNorm(2, 4), [2, 4, 3, 5], "InstanceNormalization"),
    "group-norm-one-group": (lambda: torch.nn.GroupNorm(1, 3), [2, 3, 4, 4], "InstanceNormalization"),
    "instance-norm": (lambda: torch.nn.InstanceNorm2d(4, affine=True), [2, 4, 3, 5], "InstanceNormalization"),
    "pixel-shuffle": (lambda: torch.nn.PixelShuffle(2), [2, 8, 3, 2], "DepthToSpace"),
    "pixel-unshuffle": (lambda: torch.nn.PixelUnshuffle(2), [2, 2, 4, 6], "Transpose"),
    "normalize-p2": (lambda: Lambda(lambda x: F.normalize(x, dim=1)), [2, 4, 3, 2], "ReduceL2"),
    "normalize-p1": (lambda: Lambda(lambda x: F.normalize(x, p=1, dim=1)), [2, 4, 3, 2], "ReduceL1"),
    "repeat": (lambda: Lambda(lambda x: x.repeat(1, 2, 1, 3) * 2), [2, 3, 2, 2], "Tile"),
    "gather": (lambda: Lambda(lambda x: torch.gather(x, 2, torch.tensor([[[0, 2], [1, 1], [2, 0]]]).expand(2, 3, 2)) * 2),
               [2, 3, 4], "GatherElements"),
    # only the dynamo exporter exports a size the input does not divide (index pairs, some taken twice)
    "adaptive-avg-pool-up": (lambda: torch.nn.AdaptiveAvgPool2d((7, 7)), [2, 3, 2, 3], "GatherND"),
}


DYNAMO_MODULES = ("conv-transpose-stride2-output_padding-groups", "group-norm", "adaptive-avg-pool-up")
DYNAMO_ONLY = ("adaptive-avg-pool-up",)


@pytest.mark.parametrize("make, shape, op, dynamo", [
    pytest.param(*arguments, dynamo, id=f"{name}-{'dynamo' if dynamo else 'torchscript'}")
    for name, arguments in MODULES.items() for dynamo in (False, True)
    if (not dynamo and name not in DYNAMO_ONLY) or (dynamo and name in DYNAMO_MODULES)])
def test_exported_module_matches_torch(make: Callable[[], torch.nn.Module], shape: list[int], op: str,
                                       dynamo: bool) -> None:
    check_against_torch(_seeded(make()), normal(shape, F32, 1), dynamo, op, tolerance=2e-5)


def test_group_normalization_operator_matches_torch() -> None:
    """The GroupNormalization operator of opset 21 (torch exports a decomposition instead; ONNX shape
    inference cannot type its output, so the model states it) is F.group_norm."""
    x = normal([2, 4, 3, 5], F32)
    groups, eps = 2, 1e-3
    scale, bias = normal([4], F32, 1), normal([4], F32, 2)
    node = helper.make_node("GroupNormalization", ["x", "s", "b"], ["y"], num_groups=groups, epsilon=eps)
    graph = helper.make_graph([node], "group_norm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(x.shape))],
                              [numpy_helper.from_array(scale, "s"), numpy_helper.from_array(bias, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10

    def reference(x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x, groups, torch.from_numpy(scale), torch.from_numpy(bias), eps)

    y = session(model).run(["y"], {"x": x})[0]
    np.testing.assert_allclose(y, reference(torch.from_numpy(x)).numpy(), rtol=1e-4, atol=1e-5)
    seeds = rng(8).standard_normal((2, *y.shape)).astype(F32)
    actual = gradients(model, {"x": x}, ["x"], "y", seeds)["x"]
    assert relative_error(actual, torch_gradients(reference, {"x": x}, seeds)["x"]) <= 2e-5


# --- shape-only paths: F.interpolate(size=x.shape[-2:]) ---------------------------------------------------
class Segmenter(torch.nn.Module):
    """Features at half resolution, resized back to the image size read from the input's shape."""

    def __init__(self) -> None:
        super().__init__()
        self.down = torch.nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.mix = torch.nn.Conv2d(4, 4, 3, padding=1)
        self.head = torch.nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = F.interpolate(torch.relu(self.down(x)), size=x.shape[-2:], mode="bilinear", align_corners=False)
        return self.head(torch.relu(self.mix(features)).mean((2, 3)))


def test_sizes_from_the_input_shape_are_constants_torchscript() -> None:
    """TorchScript spells the sizes Shape -> Gather -> Unsqueeze -> Concat -> Slice -> Cast -> Concat;
    none of it is on the gradient's path."""
    model = check_against_torch(_seeded(Segmenter(), 3), normal([2, 3, 8, 10], F32), False, "Resize", tolerance=2e-5)
    (resize,) = [n for n in model.graph.node if n.op_type == "Resize"]
    assert resize.input[3] and not resize.input[2]  # sizes, computed from the input's shape
    assert {"Shape", "Concat"} <= {n.op_type for n in model.graph.node}


def test_sizes_from_the_input_shape_through_make_explainable() -> None:
    """from_torch (dynamo: Shape -> Concat -> Resize sizes) and make_explainable, against torch.autograd of
    the target logit w.r.t. the first convolution's output."""
    module = _seeded(Segmenter(), 4).eval()
    image = normal([2, 3, 8, 10], F32, 5)
    proto = from_torch(module, torch.from_numpy(image), target_layers=[module.down])
    targets = np.array([[1, 3], [4, 0]], np.int64)
    explained = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    image_input = explained.get_inputs()[0].name
    ours = explained.run([gradients_output(0)], {image_input: image, TARGETS_INPUT: targets})[0]

    captured: list[torch.Tensor] = []
    handle = module.down.register_forward_hook(lambda _m, _i, out: captured.append(out.retain_grad() or out))
    logits = module(torch.from_numpy(image))
    handle.remove()
    for k in range(targets.shape[1]):
        captured[0].grad = None
        logits.gather(1, torch.from_numpy(targets[:, k:k + 1])).sum().backward(retain_graph=True)
        assert relative_error(ours[:, k], captured[0].grad.numpy()) <= 1e-5  # type: ignore[union-attr]


# --- Upsample of old opsets: upgraded to Resize by make_explainable ---------------------------------------
def _upsample_classifier(mode: str, op: str = "Upsample", opset: int = 9,
                         scales: tuple[float, ...] = (1, 1, 2, 2)) -> onnx.ModelProto:
    """An old-opset classifier: Conv -> Relu ("features") -> Upsample (or Resize-10) -> Conv ->
    GlobalAveragePool -> Gemm."""
    nodes = [
        helper.make_node("Conv", ["image", "w1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["features"]),
        helper.make_node(op, ["features", "scales"], ["up"], mode=mode),
        helper.make_node("Conv", ["up", "w2"], ["c2"], strides=[2, 2]),
        helper.make_node("GlobalAveragePool", ["c2"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"]),
        helper.make_node("Gemm", ["flat", "w3", "b3"], ["logits"], transB=1),
    ]
    weights = {"w1": normal([4, 3, 3, 3], F32, 1), "w2": normal([4, 4, 3, 3], F32, 2), "w3": normal([5, 4], F32, 3), "b3": normal([5], F32, 5),
               "scales": np.array(scales, F32)}
    graph = helper.make_graph(nodes, "upsampler", [helper.make_tensor_value_info("image", TensorProto.FLOAT,
                                                                                  ["N", 3, 6, 6])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 5])],
                              [numpy_helper.from_array(v, k) for k, v in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 7
    return model


@pytest.mark.parametrize("op, opset, mode, scales", [
    ("Upsample", 9, "nearest", (1, 1, 3, 1.2)), ("Upsample", 9, "linear", (1, 1, 1.5, 2.5)),
    ("Resize", 10, "nearest", (1, 1, 1.2, 1.7)), ("Resize", 10, "nearest", (1, 1, 0.6, 0.8)),
    ("Resize", 10, "linear", (1, 1, 0.7, 1.5)),
], ids=["upsample9-nearest", "upsample9-linear", "resize10-nearest-up", "resize10-nearest-down", "resize10-linear"])
def test_old_resizes_keep_their_coordinates_through_the_upgrade(op: str, opset: int, mode: str,
                                                                 scales: tuple[float, ...]) -> None:
    """The version converter's Resize would read half_pixel coordinates (and round_prefer_floor): without
    make_explainable's attributes these upgrades change the logits by O(1)."""
    model = _upsample_classifier(mode, op, opset, scales)
    image = normal([2, 3, 6, 6], F32, 4)
    original = session(model).run(["logits"], {"image": image})[0]
    explained = make_explainable(model, target_layers=["features"], logits="logits")
    upgraded = ort.InferenceSession(explained.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        ["logits"], {"image": image, TARGETS_INPUT: np.zeros((2, 1), np.int64)})[0]
    np.testing.assert_allclose(upgraded, original, rtol=1e-5, atol=1e-6)


def test_old_nearest_resize_scaling_up_and_down_is_refused() -> None:
    """Resize-10's nearest rounds down along axes scaled up and up along axes scaled down: no one
    nearest_mode of opset 11 says both."""
    with pytest.raises(InvalidModelError, match="scales some axes up and others down"):
        make_explainable(_upsample_classifier("nearest", "Resize", 10, (1, 1, 2, 0.5)), target_layers=["features"],
                         logits="logits")


@pytest.mark.parametrize("mode", ["nearest", "linear"])
def test_upsample_of_opset9_through_make_explainable(mode: str) -> None:
    """The version converter makes Upsample a Resize; make_explainable keeps its asymmetric coordinates
    (and floor rounding), so the explainable model's logits are the original's, and its gradient at the
    features is the transposed interpolation of the one at the upsampled tensor: for nearest x2, the
    sum over each 2x2 block, which torch's nearest upsampling gives too."""
    model = _upsample_classifier(mode)
    image = normal([2, 3, 6, 6], F32, 4)
    original = session(model).run(["logits"], {"image": image})[0]
    explained = make_explainable(model, target_layers=["features"], logits="logits")
    targets = np.array([[2], [0]], np.int64)
    outputs = ort.InferenceSession(explained.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        ["logits", gradients_output(0)], {"image": image, TARGETS_INPUT: targets})
    np.testing.assert_allclose(outputs[0], original, rtol=1e-6)
    attrs = resize_attributes(explained)
    assert attrs["mode"] == mode.encode() and attrs["coordinate_transformation_mode"] == b"asymmetric"

    weights = {t.name: torch.from_numpy(numpy_helper.to_array(t).copy()) for t in model.graph.initializer}
    features = torch.relu(F.conv2d(torch.from_numpy(image), weights["w1"], padding=1)).requires_grad_(True)
    if mode == "nearest":
        up = F.interpolate(features, scale_factor=2, mode="nearest")
    else:  # asymmetric bilinear: input coordinate x / 2, the last row and column repeat the edge
        index = torch.arange(12) / 2
        low, frac = index.floor().long(), index - index.floor()
        high = (low + 1).clamp(max=5)
        rows = features[:, :, low] * (1 - frac)[:, None] + features[:, :, high] * frac[:, None]
        up = rows[..., low] * (1 - frac) + rows[..., high] * frac
    logits = F.conv2d(up, weights["w2"], stride=2).mean((2, 3)) @ weights["w3"].T + weights["b3"]
    np.testing.assert_allclose(logits.detach().numpy(), original, rtol=1e-4, atol=1e-5)
    logits.gather(1, torch.from_numpy(targets)).sum().backward()
    assert relative_error(outputs[1][:, 0], features.grad.numpy()) <= 1e-5  # type: ignore[union-attr]


# --- int8 QDQ models: the straight-through estimator ------------------------------------------------------
class SmallConvNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.c2 = torch.nn.Conv2d(4, 4, 3, stride=2)
        self.fc = torch.nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.c2(torch.relu(self.c1(x)))).mean((2, 3)))


@pytest.fixture(scope="module")
def quantized(tmp_path_factory: pytest.TempPathFactory) -> dict[str, onnx.ModelProto]:
    """A float model and its int8 versions by onnxruntime.quantization.quantize_static (per-channel weights)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    class Images(CalibrationDataReader):
        def __init__(self) -> None:
            self.images = iter([{"x": normal([1, 3, 8, 8], F32, seed)} for seed in range(8)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.images, None)

    folder = tmp_path_factory.mktemp("quantized")
    float_model = export(_seeded(SmallConvNet(), 6).eval(), normal([2, 3, 8, 8], F32), False, opset=13)
    onnx.save(float_model, folder / "float.onnx")
    models = {"float": float_model}
    for name, form in (("qdq", QuantFormat.QDQ), ("qoperator", QuantFormat.QOperator)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantize_static(folder / "float.onnx", folder / f"{name}.onnx", Images(), quant_format=form, per_channel=True)
        models[name] = onnx.shape_inference.infer_shapes(onnx.load(folder / f"{name}.onnx"), data_prop=True)
    return models


INT_RANGES = {torch.int8: (-128, 127), torch.uint8: (0, 255)}
FLOAT_QDQ = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
"""The QDQ models' sessions: with its optimiser on, ONNX Runtime fuses DequantizeLinear -> Conv ->
QuantizeLinear into QLinearConv, whose fixed-point requantisation rounds by the CPU's int8 kernel (seen:
1 LSB apart from float rounding on one machine, a flipped ReLU mask and a 0.24 relative gradient error
on it); without it each QuantizeLinear / DequantizeLinear is evaluated in float, as torch's simulation
does, so these tests check the gradient rule, not a CPU's int8 rounding."""


def straight_through_in_torch(model: onnx.ModelProto, x: torch.Tensor,
                              tap: tuple[str, dict[str, torch.Tensor]] | None = None) -> torch.Tensor:
    """The QDQ model evaluated by torch, each QuantizeLinear with the clipped straight-through estimator
    (rounding's gradient taken as 1, clipping's as it is): quantization-aware training's convention.
    ``tap`` = (tensor name, dict): that tensor is kept in the dict, retaining its gradient."""
    values = {t.name: torch.from_numpy(numpy_helper.to_array(t).copy()) for t in model.graph.initializer}
    values[model.graph.input[0].name] = x
    for node in model.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        args = [values[name] for name in node.input if name]
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            value, scale, zero = args[0], args[1], args[2].float()
            if scale.dim() == 1 and value.dim() > 1:  # per axis
                shape = [-1 if axis == attrs.get("axis", 1) % value.dim() else 1 for axis in range(value.dim())]
                scale, zero = scale.reshape(shape), zero.reshape(shape)
            if node.op_type == "QuantizeLinear":
                clipped = (value / scale + zero).clamp(*INT_RANGES[args[2].dtype])
                out = clipped + (torch.round(clipped) - clipped).detach()
            else:
                out = (value.float() - zero) * scale
        elif node.op_type == "Conv":
            out = F.conv2d(args[0], args[1], args[2], stride=attrs["strides"], padding=attrs["pads"][:2],
                           dilation=attrs["dilations"], groups=attrs["group"])
        elif node.op_type == "ReduceMean":
            out = args[0].mean(dim=tuple(attrs["axes"]), keepdim=bool(attrs.get("keepdims", 1)))
        elif node.op_type == "Gemm":
            out = args[0] @ (args[1].T if attrs.get("transB") else args[1]) + args[2]
        else:
            raise AssertionError(f"no torch evaluation of {node.op_type}")
        if tap is not None and node.output[0] == tap[0]:
            out.retain_grad()
            tap[1][tap[0]] = out
        values[node.output[0]] = out
    return values[model.graph.output[0].name]


def test_qdq_model_gradient_is_the_straight_through_estimator(quantized: dict[str, onnx.ModelProto]) -> None:
    """quantize_static's QDQ model (int8 activations, per-channel int8 weights): the gradient w.r.t. the
    image equals torch's straight-through estimator of the same graph, and is close to the float model's."""
    model, float_model = quantized["qdq"], quantized["float"]
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in model.graph.node}
    x = np.concatenate([normal([1, 3, 8, 8], F32, seed) for seed in (0, 1)])  # calibration images: none clipped
    y = session(model, FLOAT_QDQ).run(["y"], {"x": x})[0]
    np.testing.assert_allclose(straight_through_in_torch(model, torch.from_numpy(x)).detach().numpy(), y, atol=1e-5)
    seeds = rng(8).standard_normal((2, *y.shape)).astype(F32)
    ours = gradients(model, {"x": x}, ["x"], "y", seeds, FLOAT_QDQ)["x"]
    reference = torch_gradients(lambda x: straight_through_in_torch(model, x), {"x": x}, seeds)["x"]
    assert relative_error(ours, reference) <= 1e-5
    float_gradient = gradients(float_model, {"x": x}, ["x"], "y", seeds)["x"]
    assert np.corrcoef(ours.reshape(-1), float_gradient.reshape(-1))[0, 1] > 0.999  # measured: 0.99998
    assert 1e-4 < relative_error(ours, float_gradient) < 0.03  # close (measured: 0.006), not equal


@pytest.mark.parametrize("zero_type, axis", [(np.uint8, 1), (np.int8, -1), (np.int8, None)],
                         ids=["uint8-per-axis", "int8-per-last-axis", "int8-per-tensor"])
def test_quantize_dequantize_passes_gradient_inside_the_range(zero_type: type, axis: int | None) -> None:
    """Q -> DQ: g where scale (qmin - zero) <= x <= scale (qmax - zero), 0 outside (clipped)."""
    x = normal([2, 3, 4], F32) * 3
    size = 1 if axis is None else x.shape[axis]
    scale = np.linspace(0.01, 0.03, size).astype(F32)
    zero = np.arange(size).astype(zero_type) * (40 if zero_type == np.uint8 else 30) + (100 if zero_type == np.uint8
                                                                                         else -20)
    attrs = {} if axis is None else {"axis": axis}
    if axis is None:
        scale, zero = scale.reshape(()), zero.reshape(())
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], **attrs),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], **attrs)]
    model = forward_model(nodes, {"x": x}, "y", constants={"s": scale, "z": zero})
    seeds = rng(8).standard_normal((2, *x.shape)).astype(F32)
    ours = gradients(model, {"x": x}, ["x"], "y", seeds)["x"]
    low, high = np.iinfo(zero_type).min, np.iinfo(zero_type).max
    shape = [-1 if a == (axis or 0) % x.ndim else 1 for a in range(x.ndim)] if axis is not None else []
    s, z = scale.reshape(shape).astype(np.float64), zero.reshape(shape).astype(np.float64)
    inside = (x >= s * (low - z)) & (x <= s * (high - z))
    assert 0 < inside.mean() < 1  # both sides of the range are exercised
    np.testing.assert_allclose(ours, np.where(inside, seeds, 0), rtol=1e-6, atol=1e-7)


# --- refusals: a clear error naming the operator and what to do instead ---------------------------------
def test_qoperator_model_is_refused_with_the_qdq_hint(quantized: dict[str, onnx.ModelProto]) -> None:
    """By the gradient driver (QLinearConv reached through uint8 tensors) and by make_explainable, whose
    layer search would find no float layer."""
    with pytest.raises(UnsupportedOperatorError, match=r"QLinearConv.*QDQ.*quant_format=QuantFormat\.QDQ"):
        gradient_model(quantized["qoperator"], ["x"], "y")
    with pytest.raises(UnsupportedOperatorError, match=r"'Q(LinearConv|Gemm)'.*quant_format=QuantFormat\.QDQ"):
        make_explainable(quantized["qoperator"], logits="y")


def test_qdq_model_through_make_explainable(quantized: dict[str, onnx.ModelProto]) -> None:
    """The automatic layer of the QDQ model and its gradient: the straight-through estimator in torch."""
    model = quantized["qdq"]
    explained = make_explainable(model, logits="y")
    x = np.concatenate([normal([1, 3, 8, 8], F32, seed) for seed in (2, 3)])
    targets = np.array([[1], [4]], np.int64)
    ours = session(explained, FLOAT_QDQ).run([gradients_output(0)], {"x": x, TARGETS_INPUT: targets})[0][:, 0]
    (layer,) = [v for v in model.graph.node if v.op_type == "Conv"][1].output  # the last feature map
    captured: dict[str, torch.Tensor] = {}
    logits = straight_through_in_torch(model, torch.from_numpy(x).requires_grad_(True), tap=(layer, captured))
    logits.gather(1, torch.from_numpy(targets)).sum().backward()
    assert relative_error(ours, captured[layer].grad.numpy()) <= 1e-5  # type: ignore[union-attr]


def _post_processed(post: list[onnx.NodeProto], output: str) -> onnx.ModelProto:
    """A head ("scores" [1, 1, 6] = sigmoid(logits), boxes [1, 6, 4]) followed by ``post``."""
    head = [helper.make_node("Sigmoid", ["logits"], ["scores"])]
    feeds = {"logits": normal([1, 1, 6], F32), "boxes": np.sort(normal([1, 6, 4], F32, 1), axis=-1)}
    return forward_model(head + post, feeds, output)


@pytest.mark.parametrize("post, output", [
    ([helper.make_node("NonMaxSuppression", ["boxes", "scores", "k", "iou"], ["kept"], name="nms"),
      helper.make_node("Gather", ["kept", "two"], ["index"], axis=1),
      helper.make_node("Reshape", ["scores", "flat"], ["flat_scores"]),
      helper.make_node("Gather", ["flat_scores", "index"], ["y"])], "y"),
    ([helper.make_node("TopK", ["scores", "k"], ["y", "indices"], name="top")], "y"),
], ids=["non-maximum-suppression", "top-k"])
def test_detection_post_processing_is_refused(post: list[onnx.NodeProto], output: str) -> None:
    """The gradient of a post-NMS output: refused, naming the operator and saying to explain the raw
    head output; NonMaxSuppression is found though only integer indices leave it."""
    for value, name in ((np.array([3], np.int64), "k"), (np.array([0.5], F32), "iou"), (np.array(2, np.int64), "two"),
                        (np.array([-1], np.int64), "flat")):
        post.insert(0, helper.make_node("Constant", [], [name], value=numpy_helper.from_array(value, name)))
    model = _post_processed(post, output)
    with pytest.raises(UnsupportedOperatorError, match=r"(NonMaxSuppression|TopK).*raw head output"):
        gradient_model(model, ["logits"], output)
