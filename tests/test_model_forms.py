"""Models as they are deployed: fp16 and int8 (QDQ), dynamic sizes, static batches, channels-last and
uint8 inputs, PyTorch modules of any channel count and size. Maps are checked against the fp32 /
NCHW model's and against pytorch-grad-cam."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from explainrt import Explainer
from explainrt.errors import InvalidInputError, InvalidModelError
from explainrt.export.explainable import DEQUANTIZED_PREFIX
from explainrt.export.spec import original_model
from explainrt.runtime.onnxruntime import OnnxRuntimeSession

MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
INT8_MIN_CORRELATION = 0.98
"""int8 (QDQ, per-channel, 6 calibration images), its QDQ evaluated in float, vs fp32 Grad-CAM of the
default model: measured 0.994-0.999 per image; per-tensor quantization measured 0.93-0.97."""
INT8_KERNELS_MIN_CORRELATION = 0.9
"""The same model on ONNX Runtime's fused int8 kernels vs its QDQ evaluated in float: their rounding
depends on the CPU's int8 instructions (measured 0.994-0.999 on one machine; 0.950 against fp32 on
another), so this bound only says the explanation is the same picture."""


def _net(channels: int = 3, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(channels, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5)).eval()


def _images(shape: tuple[int, ...], seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _pgc(model: nn.Module, layer: nn.Module, images: np.ndarray, targets: np.ndarray) -> np.ndarray:
    with GradCAM(model=model, target_layers=[layer]) as cam:
        return cam(input_tensor=torch.from_numpy(images), targets=[ClassifierOutputTarget(int(t)) for t in targets])


def _export(module: nn.Module, example: torch.Tensor, path: Path, dynamic: dict[int, str] | None = None) -> str:
    axes = {"input": dynamic, "logits": {0: "N"}} if dynamic else None
    torch.onnx.export(module, (example,), str(path), dynamo=False, opset_version=17, input_names=["input"],
                      output_names=["logits"], dynamic_axes=axes)
    return str(path)


def _correlations(a: np.ndarray, b: np.ndarray) -> list[float]:
    return [float(np.corrcoef(x.ravel(), y.ravel())[0, 1]) for x, y in zip(a, b)]


# -- fp16 and int8: the trained default model -----------------------------------------------------------
@pytest.fixture(scope="module")
def default_fp32(default_explainer, example_images):  # noqa: ANN001, ANN201
    """The default model as plain fp32 ONNX, its preprocessing, the example images and their fp32 Grad-CAM."""
    plain = original_model(default_explainer.session.model)
    images = list(example_images.values())
    reference = Explainer(plain, preprocessing=default_explainer.preprocessing).explain(images)
    return plain, default_explainer.preprocessing, images, reference


@pytest.mark.parametrize("keep_io_types", [False, True], ids=["fp16-io", "mixed"])
def test_fp16_default_model_maps_match_fp32(default_fp32, keep_io_types: bool) -> None:  # noqa: ANN001
    from onnxconverter_common import float16

    plain, preprocessing, images, reference = default_fp32
    half = float16.convert_float_to_float16(plain, keep_io_types=keep_io_types)
    explainer = Explainer(half, preprocessing=preprocessing)
    assert explainer.input_form.dtype == ("float32" if keep_io_types else "float16")
    explained = explainer.explain(images)
    np.testing.assert_array_equal(explained.targets, reference.targets)
    assert min(_correlations(explained.maps, reference.maps)) >= 0.99
    assert explained.maps.dtype == np.float32 and explained.logits.dtype == np.float32
    batch, _ = explainer.prepare(images)
    if keep_io_types:  # float32 input: float16 batches are refused like any other type, naming the form
        with pytest.raises(InvalidInputError, match=r"must be float32, got float16.*\[N, 3, 224, 224\] float32"):
            explainer.explain(batch.astype(np.float16))
    else:  # fp16 input: preprocessed batches in either precision give the same maps
        as_half = explainer.explain(batch.astype(np.float16), targets=reference.targets).maps
        np.testing.assert_allclose(as_half, explainer.explain(batch, targets=reference.targets).maps, atol=2e-3)


def test_fp16_model_runs_every_method_close_to_fp32(tmp_path: Path) -> None:
    """Methods that feed the model's own tensors back (ablation heads, FGVis's references) feed them in fp16."""
    from onnxconverter_common import float16

    path = _export(_net(), torch.zeros(1, 3, 32, 32), tmp_path / "fp32.onnx", {0: "N"})
    fp32, fp16 = Explainer(path), Explainer(float16.convert_float_to_float16(onnx.load(path)))
    images = _images((2, 3, 32, 32))
    # FGVis optimises a mask over many steps, so fp16 rounding adds up: measured 0.91
    for method, bound in (("gradcam", 0.99), ("ablationcam", 0.99), ("dff", 0.99), ("saliency", 0.99), ("fgvis", 0.85)):
        half = fp16.explain(images.astype(np.float16), method=method, targets=[1, 2]).maps
        full = fp32.explain(images, method=method, targets=[1, 2]).maps
        assert min(_correlations(half, full)) >= bound, method


def test_int8_qdq_default_model_maps_match_fp32(default_fp32, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    """The QDQ model's maps match fp32's where its quantisation is evaluated in float (no graph optimisation:
    ONNX Runtime then runs each QuantizeLinear / DequantizeLinear as written, the same on every CPU), and
    stay the same picture on ONNX Runtime's fused int8 kernels (QLinearConv), whose rounding is the CPU's."""
    import onnxruntime
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    plain, preprocessing, images, reference = default_fp32
    batch, _ = preprocessing.prepare(images)
    calibration = np.ascontiguousarray(np.concatenate([batch, batch[:, :, :, ::-1]]))

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.feeds = iter([{"input": calibration[i:i + 1]} for i in range(len(calibration))])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.feeds, None)

    onnx.save(plain, tmp_path / "fp32.onnx")
    quantize_static(str(tmp_path / "fp32.onnx"), str(tmp_path / "int8.onnx"), Reader(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, per_channel=True)
    explainer = Explainer(str(tmp_path / "int8.onnx"), preprocessing=preprocessing)
    (layer,) = explainer.spec.target_layers  # the automatic layer: the head activation as dequantized
    producer = next(n for n in onnx.load(str(tmp_path / "int8.onnx")).graph.node if layer in n.output)
    assert producer.op_type == "DequantizeLinear"
    explained = explainer.explain(images, targets=reference.targets)

    class FloatQDQ(onnxruntime.SessionOptions):
        def __init__(self) -> None:
            super().__init__()
            self.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL

    with monkeypatch.context() as patch:
        patch.setattr(onnxruntime, "SessionOptions", FloatQDQ)
        simulated = Explainer(str(tmp_path / "int8.onnx"), preprocessing=preprocessing)
        in_float = simulated.explain(images, targets=reference.targets)
    assert min(_correlations(in_float.maps, reference.maps)) >= INT8_MIN_CORRELATION
    assert min(_correlations(explained.maps, in_float.maps)) >= INT8_KERNELS_MIN_CORRELATION

    # The gradient graph reads float copies of the quantized weights, not their per-call DequantizeLinear;
    # reading the DequantizeLinear outputs instead gives the same gradients.
    model = explainer.session.model
    constants = {t.name for t in model.graph.initializer}
    of_constants = {n.output[0] for n in model.graph.node
                    if n.op_type == "DequantizeLinear" and all(i in constants for i in n.input if i)}
    assert not [i for n in model.graph.node if n.name.startswith("explainrt/") for i in n.input if i in of_constants]
    folded = [t.name for t in model.graph.initializer if t.name.startswith(DEQUANTIZED_PREFIX)]
    assert folded and {name.removeprefix(DEQUANTIZED_PREFIX) for name in folded} <= of_constants
    unfolded = copy.deepcopy(model)
    for node in unfolded.graph.node:
        node.input[:] = [i.removeprefix(DEQUANTIZED_PREFIX) for i in node.input]
    kept = [t for t in unfolded.graph.initializer if not t.name.startswith(DEQUANTIZED_PREFIX)]
    del unfolded.graph.initializer[:]
    unfolded.graph.initializer.extend(kept)
    batch = explainer.prepare(images)[0]
    ours = explainer.session.run(batch, reference.targets[:, None])
    theirs = OnnxRuntimeSession(unfolded).run(batch, reference.targets[:, None])
    np.testing.assert_allclose(ours.gradients[0], theirs.gradients[0], rtol=1e-5, atol=1e-9)


# -- sizes and batches ------------------------------------------------------------------------------------
def test_dynamic_size_onnx_finds_its_layer_and_serves_every_size(tmp_path: Path) -> None:
    net = _net()
    path = _export(net, torch.zeros(1, 3, 32, 32), tmp_path / "dyn.onnx", {0: "N", 2: "H", 3: "W"})
    explainer = Explainer(path)
    for shape in ((2, 3, 32, 32), (1, 3, 40, 24), (3, 3, 17, 29)):
        images = _images(shape)
        explained = explainer.explain(images)
        assert explained.maps.shape == (shape[0], *shape[2:])
        np.testing.assert_allclose(explained.maps, _pgc(net, net[3], images, explained.targets), atol=1e-4)
    for size in ((24, 28), (20, 20)):  # gradients down to the image: a variant per size, as a static export's
        images = _images((2, 3, *size))
        static = Explainer(_export(net, torch.zeros(1, 3, *size), tmp_path / f"{size}.onnx", {0: "N"}))
        for method in ("saliency", "integrated-gradients"):
            np.testing.assert_allclose(explainer.explain(images, method=method, targets=[0, 4]).maps,
                                       static.explain(images, method=method, targets=[0, 4]).maps, atol=1e-5)


def test_module_is_exported_for_any_size_and_its_channels(tmp_path: Path) -> None:
    for channels in (1, 3, 4):
        net = _net(channels)
        explainer = Explainer(net, target_layers=[net[3]])
        for size in ((28, 28), (40, 24)):
            images = _images((2, channels, *size))
            explained = explainer.explain(images)
            np.testing.assert_allclose(explained.maps, _pgc(net, net[3], images, explained.targets), atol=1e-4)


def test_module_that_fixes_its_size_keeps_the_example_size_and_says_so() -> None:
    class Flattening(nn.Module):  # a Linear on the flattened map: only the example size works
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.act, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Linear(4 * 16 * 16, 5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.act(self.conv(x)).flatten(1))

    net = Flattening().eval()
    explainer = Explainer(net, target_layers=[net.act], input_size=(16, 16))
    assert explainer.explain(_images((1, 3, 16, 16))).maps.shape == (1, 16, 16)
    with pytest.raises(InvalidInputError, match=r"expects \[N, 3, 16, 16\] float32 \(H must be 16, got 20\)"):
        explainer.explain(_images((1, 3, 20, 20)))


@pytest.mark.parametrize("static_batch", [1, 2])
def test_static_batch_runs_in_chunks(tmp_path: Path, static_batch: int) -> None:
    net = _net()
    path = _export(net, torch.zeros(static_batch, 3, 32, 32), tmp_path / "static.onnx")
    explainer = Explainer(path)
    assert explainer.input_form.batch == static_batch
    images = _images((3, 3, 32, 32))
    for method in ("gradcam", "saliency", "occlusion"):
        explained = explainer.explain(images, method=method, targets=[0, 1, 2])
        assert explained.maps.shape == (3, 32, 32)
    explained = explainer.explain(images, targets=[0, 1, 2])
    np.testing.assert_allclose(explained.maps, _pgc(net, net[3], images, [0, 1, 2]), atol=1e-4)


# -- layouts and types of the image input ---------------------------------------------------------------
class _ChannelsLast(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.permute(0, 3, 1, 2))


def test_channels_last_model_maps_equal_the_nchw_models(tmp_path: Path) -> None:
    net = _net()
    nchw = Explainer(_export(net, torch.zeros(1, 3, 32, 32), tmp_path / "nchw.onnx", {0: "N"}))
    path = _export(_ChannelsLast(net), torch.zeros(1, 32, 32, 3), tmp_path / "nhwc.onnx", {0: "N"})
    images = _images((2, 3, 32, 32))
    reference = nchw.explain(images)
    for layout in (None, "nhwc"):
        explainer = Explainer(path, input_layout=layout)
        assert explainer.input_form.layout == "nhwc"
        explained = explainer.explain(images.transpose(0, 2, 3, 1))
        assert explained.maps.shape == (2, 32, 32)
        np.testing.assert_allclose(explained.maps, reference.maps, atol=1e-5)
        np.testing.assert_allclose(explained.logits, reference.logits, atol=1e-5)
    with pytest.raises(InvalidInputError, match=r"expects \[N, 32, 32, 3\] float32 \(channels-last\)"):
        explainer.explain(images)  # NCHW images for a channels-last model


def test_channels_last_with_dynamic_size(tmp_path: Path) -> None:
    net = _net()
    path = _export(_ChannelsLast(net), torch.zeros(1, 32, 32, 3), tmp_path / "nhwc.onnx", {0: "N", 1: "H", 2: "W"})
    explainer = Explainer(path)
    images = _images((2, 3, 24, 40))
    explained = explainer.explain(images.transpose(0, 2, 3, 1))
    np.testing.assert_allclose(explained.maps, _pgc(net, net[3], images, explained.targets), atol=1e-4)


class _BakedPreprocessing(nn.Module):
    """uint8 [N, H, W, 3] pixels in, ImageNet normalisation inside."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.register_buffer("mean", torch.from_numpy(MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.from_numpy(STD).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner((x.permute(0, 3, 1, 2).float() / 255 - self.mean) / self.std)


def test_uint8_model_takes_pixels_unchanged(tmp_path: Path) -> None:
    net = _net()
    path = _export(_BakedPreprocessing(net), torch.zeros(1, 32, 32, 3, dtype=torch.uint8), tmp_path / "u8.onnx",
                   {0: "N"})
    explainer = Explainer(path)
    assert (explainer.input_form.dtype, explainer.input_form.layout) == ("uint8", "nhwc")
    pixels = np.random.default_rng(2).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    explained = explainer.explain(pixels)
    normalised = ((pixels.astype(np.float32) / 255 - MEAN) / STD).transpose(0, 3, 1, 2).copy()
    np.testing.assert_allclose(explained.maps, _pgc(net, net[3], normalised, explained.targets), atol=1e-4)
    np.testing.assert_array_equal(explained.images, pixels)  # overlays on the very pixels
    from PIL import Image

    as_files = explainer.explain([Image.fromarray(p) for p in pixels])  # resized to 32 x 32: unchanged
    np.testing.assert_allclose(as_files.maps, explained.maps, atol=1e-6)
    with pytest.raises(InvalidInputError, match=r"takes \[N, 32, 32, 3\] uint8 \(channels-last\) pixels"):
        explainer.explain(pixels, method="saliency")


def test_mismatched_forms_are_clear_errors(tmp_path: Path) -> None:
    net = _net()
    static = Explainer(_export(net, torch.zeros(1, 3, 32, 32), tmp_path / "static.onnx", {0: "N"}))
    cases = [
        (_images((1, 1, 32, 32)), r"C must be 3, got 1"),
        (_images((1, 3, 30, 32)), r"H must be 32, got 30"),
        (_images((3, 32, 32)), r"must have shape \[N, C, H, W\] with N >= 1, got \(3, 32, 32\)"),
        (np.zeros((1, 3, 32, 32), dtype=np.int64), r"images must be float32, got int64"),
    ]
    for images, message in cases:
        with pytest.raises(InvalidInputError, match=message) as error:
            static.explain(images)
        assert "[N, 3, 32, 32] float32" in str(error.value)
    with pytest.raises(InvalidInputError, match="input_layout must be one of"):
        Explainer(_export(net, torch.zeros(1, 3, 32, 32), tmp_path / "again.onnx"), input_layout="chw")


def test_ambiguous_input_layout_asks_for_input_layout(tmp_path: Path) -> None:
    class Pooled(nn.Module):  # no convolution: nothing tells [N, 3, 3, 3] apart
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(x * 2).mean((2, 3))

    path = _export(Pooled().eval(), torch.zeros(1, 3, 3, 3), tmp_path / "cube.onnx", {0: "N"})
    with pytest.raises(InvalidModelError, match="give input_layout='nchw' or 'nhwc'"):
        Explainer(path)


def test_dynamic_size_layer_is_the_static_models(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    net = _net()
    path = _export(net, torch.zeros(1, 3, 32, 32), tmp_path / "dyn.onnx", {0: "N", 2: "H", 3: "W"})
    with caplog.at_level(logging.INFO, logger="explainrt"):
        explainer = Explainer(path)
    assert "target layers found at 224x224" in caplog.text
    static = Explainer(_export(net, torch.zeros(1, 3, 32, 32), tmp_path / "static.onnx", {0: "N"}))
    assert explainer.spec.target_layers == static.spec.target_layers
