"""Session variants: loss objectives and input gradients, ONNX Runtime against the torch reference."""

from __future__ import annotations

import numpy as np
import pytest

from explainrt.errors import InvalidInputError


@pytest.mark.parametrize("objective", ["logit", "cross_entropy"])
def test_input_gradients_match_autograd(small_explainer, small_torch_explainer, small_batch, objective) -> None:  # noqa: ANN001
    targets = np.array([[-1, 3], [2, -2], [0, -1]], dtype=np.int64)
    onnx_result = small_explainer.session.input_gradients(small_batch, targets, objective)
    torch_result = small_torch_explainer.session.input_gradients(small_batch, targets, objective)
    np.testing.assert_array_equal(onnx_result.targets, torch_result.targets)
    assert onnx_result.gradients[0].shape == (3, 2, 3, 64, 64)
    scale = np.abs(torch_result.gradients[0]).max()
    np.testing.assert_allclose(onnx_result.gradients[0], torch_result.gradients[0], atol=1e-4 * scale)
    np.testing.assert_array_equal(onnx_result.activations[0], small_batch)


def test_layer_gradients_of_a_loss_match_autograd(small_explainer, small_torch_explainer, small_batch) -> None:  # noqa: ANN001
    targets = np.array([[4], [5], [-3]], dtype=np.int64)
    onnx_result = small_explainer.session.run(small_batch, targets, "cross_entropy")
    torch_result = small_torch_explainer.session.run(small_batch, targets, "cross_entropy")
    scale = np.abs(torch_result.gradients[0]).max()
    np.testing.assert_allclose(onnx_result.gradients[0], torch_result.gradients[0], atol=1e-4 * scale)


def test_unknown_objective(small_explainer, small_torch_explainer, small_batch) -> None:  # noqa: ANN001
    targets = np.zeros((3, 1), dtype=np.int64)
    for session in (small_explainer.session, small_torch_explainer.session):
        with pytest.raises(InvalidInputError, match="unknown objective 'hinge'"):
            session.run(small_batch, targets, "hinge")
