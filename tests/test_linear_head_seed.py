"""The gathered-row seed of a final linear layer equals the generic reverse pass."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from explainrt.export import TARGETS_INPUT, gradients_output, make_explainable


def _model(trans_b: int, alpha: float, identity_after: bool) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((5, 4) if trans_b else (4, 5)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["image", "w_conv"], ["features"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("GlobalAveragePool", ["features"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"]),
        helper.make_node("Gemm", ["flat", "w_fc", "b_fc"], ["scores" if identity_after else "logits"],
                         transB=trans_b, alpha=alpha),
    ]
    if identity_after:  # hides the Gemm from the peephole: the generic one-hot path runs
        nodes.append(helper.make_node("Identity", ["scores"], ["logits"]))
    graph = helper.make_graph(
        nodes, "linear_head",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, 6, 6])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 5])],
        [numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w_conv"),
         numpy_helper.from_array(weight, "w_fc"),
         numpy_helper.from_array(rng.standard_normal(5).astype(np.float32), "b_fc")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _gradients(model: onnx.ModelProto) -> np.ndarray:
    session = ort.InferenceSession(make_explainable(model).SerializeToString(), providers=["CPUExecutionProvider"])
    image = np.random.default_rng(1).standard_normal((2, 3, 6, 6)).astype(np.float32)
    targets = np.array([[0, -1, 4], [3, -2, 1]], dtype=np.int64)
    return session.run([gradients_output(0)], {"image": image, TARGETS_INPUT: targets})[0]


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("alpha", [1.0, 2.5])
def test_gathered_seed_matches_generic_pass(trans_b: int, alpha: float) -> None:
    peephole = make_explainable(_model(trans_b, alpha, identity_after=False))
    assert any(n.op_type == "Gather" and n.name.startswith("explainrt/grad/seed") for n in peephole.graph.node)
    fast, generic = _gradients(_model(trans_b, alpha, False)), _gradients(_model(trans_b, alpha, True))
    assert fast.shape == (2, 3, 4, 6, 6)
    np.testing.assert_allclose(fast, generic, rtol=1e-5, atol=1e-6)
