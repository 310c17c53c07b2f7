"""Stand-ins for the detection and segmentation files README.md calls the user's (random weights, built
offline): a YOLOv8n from Ultralytics' yaml whose raw head predicts the README's boxes, and a small
segmentation network, both exported to plain ONNX as a user's would be."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

YOLO_SIZE = 320
"""The README's export: ``yolo export model=yolov8n.pt format=onnx imgsz=320`` (raw head [1, 84, 2100])."""
README_BOXES = (((40, 60, 200, 280), 0), ((200, 40, 300, 200), 2))
"""The README's boxes (xyxy in input pixels) and classes: a person and a car."""
SEG_SIZE, SEG_CLASSES = 256, 21


def yolov8n(boxes: Sequence[tuple[Sequence[float], int]] = README_BOXES, size: int = YOLO_SIZE) -> torch.nn.Module:
    """YOLOv8n (random weights, seeded) whose coarsest head levels each predict one of ``boxes``: the level's
    box regression is constant (every anchor predicts the box's size around its own centre, so the anchor
    at the box's centre predicts it exactly and its neighbours overlap it), and the box's class scores are
    scaled to unit spread around a logit of 2 (sigmoid about 0.9: detected, yet with a gradient)."""
    from PIL import Image
    from ultralytics.nn.tasks import DetectionModel
    from ultralytics.utils import patches

    Image.open = patches._image_open  # importing ultralytics replaced Pillow's own for the whole process
    torch.manual_seed(0)
    model = DetectionModel("yolov8n.yaml", verbose=False).eval()
    for module in model.modules():  # PyTorch's default init fades the signal over 22 blocks: class scores all 0.5
        if isinstance(module, torch.nn.Conv2d) and module.weight.requires_grad:
            torch.nn.init.normal_(module.weight, std=(2.7 / module.weight[0].numel()) ** 0.5)
    detect = next(module for module in model.modules() if type(module).__name__ == "Detect")
    detect.export, detect.format = True, "onnx"  # the raw head [N, 84, anchors], as exported
    classes = sorted({index for _, index in boxes})
    seen: list[torch.Tensor] = []
    hooks = [branch[-1].register_forward_hook(lambda _m, _i, out: seen.append(out[:, classes].detach()))
             for branch in detect.cv3]
    with torch.no_grad():
        model(torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(1)))
    for hook in hooks:
        hook.remove()
    for branch, logits in zip(detect.cv3, seen):
        for column, index in enumerate(classes):
            scale = 1 / float(logits[:, column].std())
            branch[-1].weight.data[index] *= scale
            branch[-1].bias.data[index] = 2.0 - float(logits[:, column].mean()) * scale
    for level, (box, _) in zip(range(len(detect.cv2) - 1, -1, -1), boxes):
        _predict_box(detect, level, box)
    return model


def _predict_box(detect: torch.nn.Module, level: int, box: Sequence[float]) -> None:
    """Make head level ``level`` predict ``box``'s distances (left, top, right, bottom) around every anchor:
    its last regression conv's weights zeroed, its bias the DFL bin logits of those distances."""
    stride = float(detect.stride[level])
    x1, y1, x2, y2 = box
    cx, cy = (int((x1 + x2) / 2 / stride) + 0.5) * stride, (int((y1 + y2) / 2 / stride) + 0.5) * stride
    bins = torch.full((4, detect.reg_max), -30.0)
    for side, distance in enumerate(((cx - x1) / stride, (cy - y1) / stride, (x2 - cx) / stride, (y2 - cy) / stride)):
        low = int(np.floor(distance))
        bins[side, low] = float(np.log(max(low + 1 - distance, 1e-9)))
        if distance > low:
            bins[side, low + 1] = float(np.log(distance - low))
    last = detect.cv2[level][-1]
    torch.nn.init.zeros_(last.weight)
    last.bias.data = bins.reshape(-1)


class TinySegmenter(torch.nn.Module):
    """[N, 3, H, W] -> scores [N, 21, H, W] (VOC's classes), as torchvision's segmenters return them."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.features = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, stride=4, padding=1), torch.nn.ReLU(),
                                            torch.nn.Conv2d(16, 32, 3, stride=2, padding=1), torch.nn.ReLU())
        self.classifier = torch.nn.Conv2d(32, SEG_CLASSES, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = self.classifier(self.features(x))
        return torch.nn.functional.interpolate(scores, size=x.shape[2:], mode="bilinear", align_corners=False)


def export(model: torch.nn.Module, path: Path, size: int, input_name: str, output_name: str) -> None:
    """``model`` as a plain ONNX file of input [N, 3, size, size] (dynamic batch), TorchScript exporter."""
    with warnings.catch_warnings():  # the TorchScript exporter's deprecation notice, tracer warnings
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.rand(1, 3, size, size),), str(path), dynamo=False, opset_version=17,
                          input_names=[input_name], output_names=[output_name],
                          dynamic_axes={input_name: {0: "N"}, output_name: {0: "N"}})
