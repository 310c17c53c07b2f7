"""Objectives other than a logit: the cross-entropy cotangent formed inside the graph."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torchvision

from explainrt.errors import InvalidInputError
from explainrt.export import TARGETS_INPUT, ExplainableSpec, gradients_output, make_explainable
from explainrt.export.spec import RESOLVED_TARGETS_OUTPUT
from explainrt.export.torch_export import export_torch


@pytest.fixture(scope="module")
def resnet18() -> tuple[torch.nn.Module, torch.Tensor, object, list[str]]:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    images = torch.randn(2, 3, 64, 64)
    proto, taps = export_torch(model, images, [model.layer4])
    return model, images, proto, taps


def test_cross_entropy_gradients_match_autograd(resnet18) -> None:
    model, images, proto, taps = resnet18
    explainable = make_explainable(proto, taps, logits="logits", objective="cross_entropy")
    assert ExplainableSpec.from_model(explainable).objective == "cross_entropy"
    session = ort.InferenceSession(explainable.SerializeToString(), providers=["CPUExecutionProvider"])
    targets = np.array([[3, -1], [5, -2]], dtype=np.int64)
    gradients, resolved = session.run([gradients_output(0), RESOLVED_TARGETS_OUTPUT],
                                      {"input": images.numpy(), TARGETS_INPUT: targets})
    captured = []
    handle = model.layer4.register_forward_hook(lambda _m, _i, out: captured.append(out))
    logits = model(images)
    handle.remove()
    for k in range(targets.shape[1]):
        loss = torch.nn.functional.cross_entropy(logits, torch.from_numpy(resolved[:, k]), reduction="sum")
        expected = torch.autograd.grad(loss, captured[0], retain_graph=True)[0].numpy()
        assert np.abs(gradients[:, k] - expected).max() <= 1e-4 * np.abs(expected).max()


def test_unknown_objective(resnet18) -> None:
    _, _, proto, taps = resnet18
    with pytest.raises(InvalidInputError, match="unknown objective 'hinge'"):
        make_explainable(proto, taps, logits="logits", objective="hinge")
