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

from explainrt.errors import UnsupportedOperatorError
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
    "nearest-scale2": (dict(scale_factor=2, mode="nearest"), (b"nearest", b"asymmetric")),
    "nearest-size-up": (dict(size=(7, 9), mode="nearest"), (b"nearest", b"asymmetric")),
    "nearest-size-down": (dict(size=(3, 2), mode="nearest"), (b"nearest", b"asymmetric")),
    "bilinear-scale2": (dict(scale_factor=2, mode="bilinear", align_corners=False), (b"linear", b"half_pixel")),
    "bilinear-size-down": (dict(size=(3, 7), mode="bilinear", align_corners=False), (b"linear", b"half_pixel")),
    "bilinear-align_corners-scale2": (dict(scale_factor=2, mode="bilinear", align_corners=True),
                                      (b"linear", b"align_corners")),
    "bilinear-align_corners-size": (dict(size=(3, 7), mode="bilinear", align_corners=True),
                                    (b"linear", b"align_corners")),
    "bicubic-scale2": (dict(scale_factor=2, mode="bicubic", align_corners=False), (b"cubic", b"half_pixel")),
    "bicubic-size-down": (dict(size=(3, 3), mode="bicubic", align_corners=False), (b"cubic", b"half_pixel")),
    "bicubic-align_corners-size": (dict(size=(7, 9), mode="bicubic", align_corners=True),
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
    "group-norm": (lambda: torch.nn.GroupNorm(2, 4), [2, 4, 3, 5], "InstanceNormalization"),
    "group-norm-one-group": (lambda: torch.nn.GroupNorm(1, 3), [2, 3, 4, 4], "InstanceNormalization"),
    "instance-norm": (lambda: torch.nn.InstanceNorm2d(4, affine=True), [2, 4, 3, 5], "InstanceNormalization"),
    "pixel-shuffle": (lambda: torch.nn.PixelShuffle(2), [2, 8, 3, 2], "DepthToSpace"),
    "pixel-unshuffle": (lambda: torch.nn.PixelUnshuffle(2), [2, 2, 4, 6], "Transpose"),
    "normalize-p2": (lambda: Lambda(lambda x: F.normalize(x, dim=1)), [2, 4, 3, 2], "ReduceL2"),
    "normalize-p1": (lambda: Lambda(lambda x: F.normalize(x, p=1, dim=1)), [2, 4, 3, 2], "ReduceL1"),
    "repeat": (lambda: Lambda(lambda x: x.repeat(1, 2, 1, 3) * 2), [2, 3, 2, 2], "Tile"),
}


DYNAMO_MODULES = ("conv-transpose-stride2-output_padding-groups", "group-norm")


@pytest.mark.parametrize("make, shape, op, dynamo", [
    pytest.param(*arguments, dynamo, id=f"{name}-{'dynamo' if dynamo else 'torchscript'}")
    for name, arguments in MODULES.items() for dynamo in (False, True) if not dynamo or name in DYNAMO_MODULES])
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
def _upsample_classifier(mode: str) -> onnx.ModelProto:
    """An opset-9 classifier: Conv -> Relu ("features") -> Upsample x2 -> Conv -> GlobalAveragePool -> Gemm."""
    nodes = [
        helper.make_node("Conv", ["image", "w1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["features"]),
        helper.make_node("Upsample", ["features", "scales"], ["up"], mode=mode),
        helper.make_node("Conv", ["up", "w2"], ["c2"], strides=[2, 2]),
        helper.make_node("GlobalAveragePool", ["c2"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"]),
        helper.make_node("Gemm", ["flat", "w3", "b3"], ["logits"], transB=1),
    ]
    weights = {"w1": normal([4, 3, 3, 3], F32, 1), "w2": normal([4, 4, 3, 3], F32, 2), "w3": normal([5, 4], F32, 3), "b3": normal([5], F32, 5),
               "scales": np.array([1, 1, 2, 2], F32)}
    graph = helper.make_graph(nodes, "upsampler", [helper.make_tensor_value_info("image", TensorProto.FLOAT,
                                                                                  ["N", 3, 6, 6])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 5])],
                              [numpy_helper.from_array(v, k) for k, v in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)])
    model.ir_version = 7
    return model


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
    assert mode in str(resize_attributes(explained)["mode"]) and resize_attributes(explained)[
        "coordinate_transformation_mode"] == b"asymmetric"

    weights = {t.name: torch.from_numpy(numpy_helper.to_array(t)) for t in model.graph.initializer}
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
