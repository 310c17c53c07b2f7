"""Ablation-CAM's default mode against an independent PyTorch implementation (issue 17).

explainrt re-runs only the part of the model after the target layer (``session.head``: an ONNX
sub-graph, or the torch backend's head) on a batch of copies of the layer's activations, one
channel set to ``ablation_values`` (0 when the layer's minimum is 0, as after a ReLU; else that
minimum - 1e7). The reference here runs the whole torch model once per channel with a forward
hook that writes the ablation value into channel k of the target module's output; the score drop
w_k = (y - y_k) / y (Desai & Ramaswamy, WACV 2020), map = ReLU(sum_k w_k A_k), torch's bilinear
upsampling (half-pixel, as cv2's INTER_LINEAR), and for normalised maps pytorch-grad-cam's final
min-max scaling of the upsampled map, (x - min) / (max - min + 1e-7). None of explainrt's head
extraction, batching of copies or map kernels is on that path. (compat's pytorch-grad-cam mode,
whose ablation value falls with each copy's batch position, is checked in tests/test_compat.py.)
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from explainrt import Explainer, from_torch

SIZE = (32, 32)
TOLERANCE = 1e-4  # relative to the largest reference value


def tiny_net() -> torch.nn.Sequential:
    """A random CNN whose layer 3 ends in a ReLU (ablation value 0) and whose layer 4, a Conv feeding
    the pooling directly, has negative outputs (ablation value min - 1e7)."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 16, 3, stride=2, padding=1),
        torch.nn.ReLU(), torch.nn.Conv2d(16, 12, 3, stride=2, padding=1),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(12, 6)).eval()


def ablation_cam_reference(model: torch.nn.Module, layer: torch.nn.Module, images: np.ndarray,
                           normalize: bool) -> tuple[np.ndarray, np.ndarray]:
    """(maps [n, H, W], ablation values [n]) of Ablation-CAM with the default ablation value, by hooks."""
    inputs = torch.from_numpy(images)
    captured: list[torch.Tensor] = []
    handle = layer.register_forward_hook(lambda _m, _i, out: captured.append(out.detach().clone()))
    with torch.no_grad():
        logits = model(inputs)
    handle.remove()
    activations, targets = captured[0], logits.argmax(dim=1)
    maps, values = [], []
    for image in range(len(images)):
        acts = activations[image]
        lowest = float(acts.min())
        value = 0.0 if lowest == 0 else lowest - 1e7
        channels = acts.shape[0]

        def ablate(_m: torch.nn.Module, _i: tuple, out: torch.Tensor, value: float = value) -> torch.Tensor:
            out = out.clone()  # copy k of the batch: channel k ablated
            out[torch.arange(out.shape[0]), torch.arange(out.shape[0])] = value
            return out

        handle = layer.register_forward_hook(ablate)
        with torch.no_grad():
            ablated = model(inputs[image : image + 1].expand(channels, -1, -1, -1))[:, targets[image]]
        handle.remove()
        score = logits[image, targets[image]]
        weights = (score - ablated) / score
        cam = F.relu((weights[:, None, None] * acts).sum(dim=0))
        cam = F.interpolate(cam[None, None], size=images.shape[2:], mode="bilinear", align_corners=False)[0, 0]
        if normalize:
            cam = cam - cam.min()
            cam = cam / (cam.max() + 1e-7)
        maps.append(cam)
        values.append(value)
    return torch.stack(maps).numpy(), np.array(values)


@pytest.fixture(scope="module")
def net() -> torch.nn.Sequential:
    return tiny_net()


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
@pytest.mark.parametrize(("index", "zero_value"), [(3, True), (4, False)])
@pytest.mark.parametrize("normalize", [False, True])
def test_ablation_cam_default_mode_matches_hooks(net: torch.nn.Sequential, backend: str, index: int, zero_value: bool,
                                                 normalize: bool) -> None:
    layer = net[index]
    if backend == "onnxruntime":
        explainer = Explainer(from_torch(net, torch.zeros(1, 3, *SIZE), [layer]))
    else:
        explainer = Explainer(net, target_layers=[layer], backend="torch", input_size=SIZE)
    images = np.random.default_rng(1).standard_normal((3, 3, *SIZE)).astype(np.float32)
    got = explainer.explain(images, method="ablationcam", normalize=normalize, batch_size=5)
    want, values = ablation_cam_reference(net, layer, images, normalize)
    assert (values == 0).all() if zero_value else (values < -1e6).all()  # both branches of the default value
    assert (want.max(axis=(1, 2)) > 0).all() and (want.std(axis=(1, 2)) > 0).all()  # maps that can differ
    error = float(np.abs(got.maps - want).max() / np.abs(want).max())
    print(f"ablation-cam default mode ({backend}, layer {index}, normalize={normalize}): {error:.2e}")
    assert error < TOLERANCE
