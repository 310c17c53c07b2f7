"""Explainable torchvision models against torch.autograd, and a hand-built ONNX model against
finite differences.

Each torchvision model is exported once (tests/torchvision_zoo.py, random init under
``torch.manual_seed(0)``, eval mode; test_check_trt.py checks the same exports) with two target layers, the usual Grad-CAM one and an
earlier one whose gradient crosses the model's blocks, and run once with ONNX Runtime; the tests
then compare: target-layer gradients and activations with torch.autograd, the logits with torch,
the logits with those of the same export without the gradient graph (bit for bit, same session
options: the gradient graph must not keep ONNX Runtime from fusing the forward nodes), and the
resolved targets with torch's ranking. Batch-norm statistics and affine parameters, layer scales
and layer-norm parameters are randomised so that no layer is an identity at random init.

Errors are ``max |actual - reference| / max |reference|`` over the whole [N, K, C, h, w] tensor.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torchvision_zoo
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from explainrt.export import (
    RESOLVED_TARGETS_OUTPUT,
    TARGETS_INPUT,
    ExplainableSpec,
    activations_output,
    gradients_output,
    make_explainable,
)
from explainrt.export.torch_export import IMAGE_INPUT, LOGITS_OUTPUT

TOLERANCE = 1e-4
CLASSES = (1, 7, 999)  # the explicit half of the targets; the other half ranks (-1, -2, -1)


def session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def relative_error(actual: np.ndarray, reference: np.ndarray) -> float:
    return float(np.max(np.abs(actual.astype(np.float64) - reference)) / np.max(np.abs(reference)))


def ranked_targets(logits: np.ndarray, requested: np.ndarray) -> np.ndarray:
    """Targets < 0 as the (-t)-th most likely class, from a stable descending sort."""
    order = np.argsort(-logits, axis=1, kind="stable")
    rank = np.maximum(-requested - 1, 0)
    return np.where(requested < 0, np.take_along_axis(order, rank, axis=1), requested)


def requested_targets(batch: int) -> np.ndarray:
    return np.array([[CLASSES[n], -1 if n % 2 == 0 else -2] for n in range(batch)], dtype=np.int64)


@dataclass
class ZooRun:
    name: str
    spec: ExplainableSpec
    requested: np.ndarray
    outputs: dict[str, np.ndarray]  # explainable model's outputs
    plain_logits: np.ndarray  # the export without the gradient graph
    torch_logits: np.ndarray
    torch_activations: list[np.ndarray]
    torch_gradients: list[np.ndarray]  # [N, K, C, h, w] for the targets ONNX Runtime resolved


def _torch_reference(model: torch.nn.Module, modules: list[torch.nn.Module], images: torch.Tensor,
                     resolved: np.ndarray) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]:
    captured: dict[int, torch.Tensor] = {}

    def hook(index: int) -> Callable[..., torch.Tensor]:
        def capture(_module: torch.nn.Module, _inputs: object, output: torch.Tensor) -> torch.Tensor:
            captured[index] = output
            return output.clone()  # later in-place ops (densenet's final ReLU) must not change it

        return capture

    handles = [module.register_forward_hook(hook(i)) for i, module in enumerate(modules)]
    try:
        logits = model(images)
    finally:
        for handle in handles:
            handle.remove()
    activations = [captured[i] for i in range(len(modules))]
    per_seed = []
    for k in range(resolved.shape[1]):
        seed = torch.nn.functional.one_hot(torch.from_numpy(resolved[:, k]), logits.shape[1]).to(logits.dtype)
        per_seed.append(torch.autograd.grad(logits, activations, grad_outputs=seed, retain_graph=True))
    gradients = [torch.stack([g[i] for g in per_seed], dim=1).numpy() for i in range(len(modules))]
    return logits.detach().numpy(), [a.detach().numpy() for a in activations], gradients


@pytest.fixture(scope="module", params=torchvision_zoo.params(list(torchvision_zoo.ZOO)))
def zoo(request: pytest.FixtureRequest) -> ZooRun:
    exported = torchvision_zoo.export(request.param)
    model, images, modules = exported.model, exported.images, exported.modules
    requested = requested_targets(images.shape[0])
    feeds = {IMAGE_INPUT: images.numpy()}
    run = session(exported.explainable)
    names = [o.name for o in run.get_outputs()]
    outputs = dict(zip(names, run.run(names, {**feeds, TARGETS_INPUT: requested})))
    plain_logits = session(exported.plain).run([LOGITS_OUTPUT], feeds)[0]
    with torch.enable_grad():
        torch_logits, activations, gradients = _torch_reference(model, modules, images,
                                                                outputs[RESOLVED_TARGETS_OUTPUT])
    return ZooRun(request.param, ExplainableSpec.from_model(exported.explainable), requested, outputs, plain_logits,
                  torch_logits, activations, gradients)


def _check_targets(zoo: ZooRun, actual: list[np.ndarray], reference: list[np.ndarray], what: str) -> None:
    for index, (value, expected) in enumerate(zip(actual, reference)):
        assert value.shape == expected.shape
        error = relative_error(value, expected)
        print(f"{zoo.name} target {index}: {what} relative error {error:.2e}")
        assert error <= TOLERANCE, f"{zoo.name} target {index}: {what} relative error {error:.2e}"


def test_gradients_match_autograd(zoo: ZooRun) -> None:
    actual = [zoo.outputs[gradients_output(i)] for i in range(len(zoo.torch_gradients))]
    _check_targets(zoo, actual, zoo.torch_gradients, "gradient")


def test_activations_match_torch(zoo: ZooRun) -> None:
    actual = [zoo.outputs[activations_output(i)] for i in range(len(zoo.torch_activations))]
    _check_targets(zoo, actual, zoo.torch_activations, "activation")


def test_logits_match_torch(zoo: ZooRun) -> None:
    assert relative_error(zoo.outputs[LOGITS_OUTPUT], zoo.torch_logits) <= TOLERANCE


def test_logits_bit_identical_to_the_plain_export(zoo: ZooRun) -> None:
    assert np.array_equal(zoo.outputs[LOGITS_OUTPUT], zoo.plain_logits)


def test_resolved_targets_follow_the_ranking(zoo: ZooRun) -> None:
    resolved = zoo.outputs[RESOLVED_TARGETS_OUTPUT]
    np.testing.assert_array_equal(resolved, ranked_targets(zoo.torch_logits, zoo.requested))
    np.testing.assert_array_equal(resolved[:, 0], CLASSES[: len(resolved)])


def test_spec_describes_the_model(zoo: ZooRun) -> None:
    assert zoo.spec.image_input == IMAGE_INPUT and zoo.spec.logits == LOGITS_OUTPUT
    assert zoo.spec.num_classes == 1000
    assert len(zoo.spec.target_layers) == len(zoo.torch_gradients)


# --- a model built with onnx.helper: no PyTorch behind it ------------------------------------------
SIZE = 12
def _helper_model() -> onnx.ModelProto:
    """image [N, 3, 12, 12] -> Conv -> Relu -> Conv -> BatchNormalization -> Relu -> MaxPool
    -> GlobalAveragePool -> Flatten -> Gemm -> Softmax (float32, dynamic batch)."""
    generator = np.random.default_rng(3)

    def weight(name: str, *shape: int, low: float | None = None) -> onnx.TensorProto:
        value = generator.uniform(low, 1.5, shape) if low is not None else generator.standard_normal(shape) * 0.5
        return numpy_helper.from_array(value.astype(np.float32), name)

    nodes = [
        helper.make_node("Conv", ["image", "w1", "b1"], ["conv1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv1"], ["relu1"], name="relu1"),
        helper.make_node("Conv", ["relu1", "w2"], ["conv2"], name="conv2", pads=[1, 1, 1, 1], strides=[1, 1]),
        helper.make_node("BatchNormalization", ["conv2", "gamma", "beta", "mean", "var"], ["bn"], name="bn"),
        helper.make_node("Relu", ["bn"], ["relu2"], name="relu2"),
        helper.make_node("MaxPool", ["relu2"], ["pool"], name="pool", kernel_shape=[3, 3], strides=[2, 2],
                         pads=[1, 1, 1, 1]),
        helper.make_node("GlobalAveragePool", ["pool"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["scores"], name="fc", transB=1),
        helper.make_node("Softmax", ["scores"], ["probabilities"], name="softmax", axis=-1),
    ]
    initializers = [
        weight("w1", 4, 3, 3, 3), weight("b1", 4), weight("w2", 6, 4, 3, 3),
        weight("gamma", 6, low=0.5), weight("beta", 6), weight("mean", 6), weight("var", 6, low=0.5),
        weight("fc_w", 5, 6), weight("fc_b", 5),
    ]
    graph = helper.make_graph(nodes, "helper_cnn",
                              [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, SIZE, SIZE])],
                              [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 5])],
                              initializers)
    return onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))


def _float64(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same graph computing in float64 (weights converted, float32 types widened)."""
    wide = onnx.ModelProto.FromString(model.SerializeToString())
    for index, tensor in enumerate(wide.graph.initializer):
        if tensor.data_type == TensorProto.FLOAT:
            wide.graph.initializer[index].CopyFrom(numpy_helper.from_array(
                numpy_helper.to_array(tensor).astype(np.float64), tensor.name))
    for value in [*wide.graph.input, *wide.graph.output, *wide.graph.value_info]:
        if value.type.tensor_type.elem_type == TensorProto.FLOAT:
            value.type.tensor_type.elem_type = TensorProto.DOUBLE
    return wide


def _finite_differences(head: onnx.ModelProto, head_input: str, activation: np.ndarray, classes: np.ndarray,
                        step: float = 1e-5) -> np.ndarray:
    """Central differences of ``scores[n, classes[n, k]]`` w.r.t. every element of ``activation``.

    The head runs in float64 on ONNX's reference evaluator (ONNX Runtime has no float64 Conv or
    GlobalAveragePool), so neither float32 rounding nor the kernels under test enter the
    reference. All perturbed copies of an image run as one batch.
    """
    evaluator = ReferenceEvaluator(_float64(head))
    n_images, size = activation.shape[0], activation[0].size
    reference = np.zeros((n_images, classes.shape[1], size))
    for n in range(n_images):
        base = np.repeat(activation[n : n + 1].reshape(1, -1).astype(np.float64), 2 * size, axis=0)
        base[np.arange(size), np.arange(size)] += step
        base[size + np.arange(size), np.arange(size)] -= step
        scores = evaluator.run(None, {head_input: base.reshape(-1, *activation.shape[1:])})[0][:, classes[n]]
        reference[n] = ((scores[:size] - scores[size:]) / (2 * step)).T
    return reference.reshape(n_images, classes.shape[1], *activation.shape[1:])


@pytest.mark.parametrize("target", ["auto", "relu1", "conv1"])
def test_helper_built_model_matches_finite_differences(target: str) -> None:
    model = _helper_model()
    explainable = make_explainable(model) if target == "auto" else make_explainable(model, [target])
    spec = ExplainableSpec.from_model(explainable)
    assert spec.logits == "scores"  # the Softmax is stepped over
    assert spec.target_layers == (("pool",) if target == "auto" else (target,))
    layer = spec.target_layers[0]

    images = np.random.default_rng(4).standard_normal((3, 3, SIZE, SIZE)).astype(np.float32)
    requested = np.array([[2, -1], [0, -2], [4, -1]], dtype=np.int64)
    run = session(explainable)
    names = [o.name for o in run.get_outputs()]
    outputs = dict(zip(names, run.run(names, {"image": images, TARGETS_INPUT: requested})))

    plain = session(model).run(["probabilities"], {"image": images})[0]
    assert np.array_equal(outputs["probabilities"], plain)
    scores = session(onnx.utils.Extractor(model).extract_model(["image"], ["scores"])).run(None, {"image": images})[0]
    resolved = outputs[RESOLVED_TARGETS_OUTPUT]
    np.testing.assert_array_equal(resolved, ranked_targets(scores, requested))

    activation = outputs[activations_output(0)]
    head = onnx.utils.Extractor(model).extract_model([layer], ["scores"])
    reference = _finite_differences(head, layer, activation, resolved)
    actual = outputs[gradients_output(0)]
    assert actual.shape == reference.shape
    error = relative_error(actual, reference)
    assert error <= TOLERANCE, f"relative error {error:.2e}"
