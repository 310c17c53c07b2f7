"""The public API: Explainer / Explanation behaviour, and every bad input raising a specific error."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from conftest import CAT_CLASSES, ESPRESSO, SMALL_CLASSES, SMALL_SIZE
from onnx import TensorProto, helper

from explainrt import METHODS, Explainer, Prediction
from explainrt.errors import (
    BackendUnavailableError,
    ImageReadError,
    InvalidInputError,
    InvalidModelError,
    NoSpatialLayerError,
    UnknownLayerError,
    UnknownMethodError,
)
from explainrt.export.spec import ExplainableSpec
from explainrt.models.default import DEFAULT_PREPROCESSING, default_explainable_model


# -- the default model on the example images ---------------------------------------------------------
def test_default_model_recognises_the_examples(default_explanation) -> None:  # noqa: ANN001
    top = default_explanation.top_k(5)
    chelsea, coffee, _astronaut = top
    assert {p.index for p in chelsea[:3]} == CAT_CLASSES
    assert coffee[0].index == ESPRESSO and coffee[0].label == "espresso"
    assert all(isinstance(p, Prediction) and len(row) == 5 for row in top for p in row)
    probabilities = [p.probability for p in coffee]
    assert probabilities == sorted(probabilities, reverse=True) and 0.5 < probabilities[0] <= 1


def test_maps_are_float32_in_unit_range(default_explanation) -> None:  # noqa: ANN001
    maps = default_explanation.maps
    assert maps.shape == (3, 224, 224) and maps.dtype == np.float32
    assert np.isfinite(maps).all() and maps.min() >= 0 and maps.max() <= 1
    assert np.allclose(maps.max(axis=(1, 2)), 1) and np.allclose(maps.min(axis=(1, 2)), 0)
    assert default_explanation.method == "gradcam"
    assert default_explanation.logits.shape == (3, 1000)


def test_default_targets_are_the_top_class(default_explanation) -> None:  # noqa: ANN001
    np.testing.assert_array_equal(default_explanation.targets, default_explanation.logits.argmax(axis=1))


def test_timings_cover_every_stage(default_explanation) -> None:  # noqa: ANN001
    timings = default_explanation.timings
    # Grad-CAM's map head computes the maps inside the runtime call: no separate "method" stage
    # (the Python path's stages are checked in test_map_heads.py)
    assert {"preprocess", "runtime", "maps", "total"} <= set(timings)
    assert all(value >= 0 for value in timings.values())
    assert timings["total"] >= timings["runtime"]


def test_overlays_match_the_images(default_explanation) -> None:  # noqa: ANN001
    overlays = default_explanation.overlays()
    assert overlays.shape == (3, 224, 224, 3) and overlays.dtype == np.uint8
    assert default_explanation.images is not None and default_explanation.images.shape == (3, 224, 224, 3)


def test_negative_target_explains_the_kth_most_likely_class(default_explainer, example_images,  # noqa: ANN001
                                                            default_explanation) -> None:  # noqa: ANN001
    second = default_explainer.explain(list(example_images.values()), targets=-2)
    np.testing.assert_array_equal(second.targets, np.argsort(-second.logits, axis=1)[:, 1])
    assert not np.allclose(second.maps, default_explanation.maps)


def test_explicit_targets_per_image(default_explainer, example_images) -> None:  # noqa: ANN001
    wanted = [281, ESPRESSO, 0]
    explanation = default_explainer.explain(list(example_images.values()), targets=wanted)
    np.testing.assert_array_equal(explanation.targets, wanted)
    same_class = default_explainer.explain(list(example_images.values()), targets=ESPRESSO)
    np.testing.assert_array_equal(same_class.targets, [ESPRESSO] * 3)
    np.testing.assert_allclose(same_class.maps[1], explanation.maps[1], atol=1e-6)


def test_batch_size_does_not_change_the_maps(default_explainer, example_images,  # noqa: ANN001
                                             default_explanation) -> None:  # noqa: ANN001
    one_by_one = default_explainer.explain(list(example_images.values()), batch_size=1)
    np.testing.assert_allclose(one_by_one.maps, default_explanation.maps, atol=1e-5)
    np.testing.assert_array_equal(one_by_one.targets, default_explanation.targets)
    np.testing.assert_allclose(one_by_one.logits, default_explanation.logits, rtol=1e-4, atol=1e-4)


def test_image_files_and_arrays_give_the_same_maps(default_explainer, example_images, tmp_path: Path) -> None:  # noqa: ANN001
    from PIL import Image

    path = tmp_path / "coffee.png"
    Image.fromarray(example_images["coffee"]).save(path)
    from_file = default_explainer.explain(str(path))
    from_array = default_explainer.explain(example_images["coffee"])
    assert from_file.maps.shape == (1, 224, 224)
    np.testing.assert_array_equal(from_file.maps, from_array.maps)
    assert from_file.targets[0] == ESPRESSO


def test_saved_explainable_model_reloads_without_export(default_explainer, example_images,  # noqa: ANN001
                                                        default_explanation, tmp_path: Path,  # noqa: ANN001
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "explainable.onnx"
    onnx.save(default_explainable_model(), path)

    def no_export(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("an already explainable model must not be exported again")

    monkeypatch.setattr("explainrt.models.loading.make_explainable", no_export)
    monkeypatch.setattr("explainrt.export.torch_export.from_torch", no_export)
    reloaded = Explainer(path)
    assert reloaded.preprocessing == DEFAULT_PREPROCESSING
    assert reloaded.preprocessing.labels[ESPRESSO] == "espresso"
    again = reloaded.explain(list(example_images.values()))
    np.testing.assert_allclose(again.maps, default_explanation.maps, atol=1e-6)
    np.testing.assert_array_equal(again.targets, default_explanation.targets)


def test_explainable_model_interface(small_onnx) -> None:  # noqa: ANN001
    """The names other tools rely on."""
    inputs = {v.name for v in small_onnx.graph.input}
    outputs = [v.name for v in small_onnx.graph.output]
    assert "explainrt.targets" in inputs
    assert outputs[0] == "logits"
    assert {"explainrt.resolved_targets", "explainrt.activations.0", "explainrt.gradients.0"} <= set(outputs)
    spec = ExplainableSpec.from_model(small_onnx)
    assert spec.num_classes == SMALL_CLASSES and len(spec.target_layers) == 1


# -- the small ResNet-18 (random weights, preprocessed float input) --------------------------------
@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_gives_normalised_maps(small_explainer, small_batch, method: str) -> None:  # noqa: ANN001
    explanation = small_explainer.explain(small_batch, method=method, batch_size=64)
    assert explanation.maps.shape == (3, *SMALL_SIZE) and explanation.maps.dtype == np.float32
    assert np.isfinite(explanation.maps).all()
    assert explanation.maps.min() >= 0 and explanation.maps.max() <= 1
    assert explanation.method == method
    if method in MAY_BE_FLAT:
        return
    spreads = np.ptp(explanation.maps, axis=(1, 2))
    assert (spreads > 0.1).all(), f"{method}: a flat (or all-zero) map, max - min per image {spreads}"
    assert not np.allclose(explanation.maps[0], explanation.maps[1]), f"{method}: two different images, one map"


# Maps of the ReLU of opposing evidence: on this random ResNet-18 counterfactual-cam is all zero for
# all three images and contrast-cam for one (whether that is the model or the method is open).
MAY_BE_FLAT = {"counterfactual-cam", "contrast-cam"}


def test_methods_are_case_insensitive(small_explainer, small_batch) -> None:  # noqa: ANN001
    assert small_explainer.explain(small_batch, method="GradCAM").method == "gradcam"


def test_torch_tensor_input(small_explainer, small_batch) -> None:  # noqa: ANN001
    from_numpy = small_explainer.explain(small_batch)
    from_torch = small_explainer.explain(torch.from_numpy(small_batch))
    np.testing.assert_array_equal(from_torch.maps, from_numpy.maps)


def test_batch_size_one_equals_one_batch(small_explainer, small_batch) -> None:  # noqa: ANN001
    together = small_explainer.explain(small_batch, batch_size=3)
    apart = small_explainer.explain(small_batch, batch_size=1)
    np.testing.assert_allclose(apart.maps, together.maps, atol=1e-5)


@pytest.mark.parametrize("method", ["gradcam", "gradcam++", "xgradcam", "hirescam", "layercam"])
def test_onnxruntime_matches_the_torch_backend(small_torch_explainer, small_explainer, small_batch,  # noqa: ANN001
                                               method: str) -> None:
    expected = small_torch_explainer.explain(small_batch, method=method)
    got = small_explainer.explain(small_batch, method=method)
    np.testing.assert_array_equal(got.targets, expected.targets)
    np.testing.assert_allclose(got.logits, expected.logits, rtol=1e-4, atol=1e-4)
    assert np.abs(got.maps - expected.maps).max() <= 1e-4


# -- bad input ---------------------------------------------------------------------------------------
def test_wrong_channel_count(small_explainer, small_batch) -> None:  # noqa: ANN001
    with pytest.raises(InvalidInputError, match=r"shape \(3, 1, 64, 64\).*expects \[N, 3, 64, 64\]"):
        small_explainer.explain(small_batch[:, :1])


def test_wrong_spatial_size(small_explainer) -> None:  # noqa: ANN001
    with pytest.raises(InvalidInputError, match=r"shape \(1, 3, 32, 32\)"):
        small_explainer.explain(np.zeros((1, 3, 32, 32), dtype=np.float32))


def test_three_dimensional_float_array(small_explainer, small_batch) -> None:  # noqa: ANN001
    with pytest.raises(InvalidInputError, match=r"\[N, C, H, W\].*\(3, 64, 64\)"):
        small_explainer.explain(small_batch[0])


def test_empty_batch(small_explainer) -> None:  # noqa: ANN001
    with pytest.raises(InvalidInputError, match="N >= 1"):
        small_explainer.explain(np.zeros((0, 3, *SMALL_SIZE), dtype=np.float32))


def test_float64_images(small_explainer, small_batch) -> None:  # noqa: ANN001
    with pytest.raises(InvalidInputError, match="float32, got float64"):
        small_explainer.explain(small_batch.astype(np.float64))


def test_integer_images(default_explainer, example_images) -> None:  # noqa: ANN001
    with pytest.raises(InvalidInputError, match="uint8, got int64"):
        default_explainer.explain(example_images["coffee"].astype(np.int64))


def test_float_pixels_without_preprocessing_are_refused(default_explainer) -> None:  # noqa: ANN001
    with pytest.raises(InvalidInputError, match="float32, got float64"):
        default_explainer.explain(np.zeros((1, 3, 224, 224)))


def test_raw_images_need_stored_preprocessing(small_explainer, example_images) -> None:  # noqa: ANN001
    with pytest.raises(InvalidInputError, match="stores no preprocessing"):
        small_explainer.explain(example_images["coffee"])


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_pixels(small_explainer, small_batch, bad: float) -> None:  # noqa: ANN001
    images = small_batch.copy()
    images[2, 1, 5, 7] = bad
    with pytest.raises(InvalidInputError, match=r"NaN or inf.*image 2"):
        small_explainer.explain(images)


def test_huge_finite_pixels_are_not_mistaken_for_inf(small_explainer, small_batch) -> None:  # noqa: ANN001
    images = small_batch.copy()
    images[:, :, :4] = 3e38  # finite, but their float32 sum overflows
    assert small_explainer.explain(images).maps.shape == (3, 64, 64)


@pytest.mark.parametrize("target", [SMALL_CLASSES, 10_000, -SMALL_CLASSES - 1])
def test_class_index_out_of_range(small_explainer, small_batch, target: int) -> None:  # noqa: ANN001
    with pytest.raises(InvalidInputError, match=rf"target class {target} is out of range.*{SMALL_CLASSES} classes"):
        small_explainer.explain(small_batch, targets=target)


def test_class_index_out_of_range_on_the_default_model(default_explainer, example_images) -> None:  # noqa: ANN001
    with pytest.raises(InvalidInputError, match="target class 1000 is out of range"):
        default_explainer.explain(example_images["coffee"], targets=1000)
    with pytest.raises(InvalidInputError, match="target class -1001 is out of range"):
        default_explainer.explain(example_images["coffee"], targets=-1001)


def test_extreme_valid_targets(small_explainer, small_batch) -> None:  # noqa: ANN001
    last = small_explainer.explain(small_batch, targets=-SMALL_CLASSES)
    np.testing.assert_array_equal(last.targets, last.logits.argmin(axis=1))
    assert (small_explainer.explain(small_batch, targets=SMALL_CLASSES - 1).targets == SMALL_CLASSES - 1).all()


@pytest.mark.parametrize("targets", [[1, 2], [0.5, 1, 2], "cat"])
def test_malformed_targets(small_explainer, small_batch, targets: object) -> None:  # noqa: ANN001
    with pytest.raises(InvalidInputError, match="targets must be"):
        small_explainer.explain(small_batch, targets=targets)


def test_unknown_tensor_name(small_onnx) -> None:  # noqa: ANN001
    from explainrt.export.spec import original_model

    with pytest.raises(UnknownLayerError, match="'layer_four'"):
        Explainer(original_model(small_onnx), target_layers=["layer_four"])


def test_module_outside_the_model(small_resnet) -> None:  # noqa: ANN001
    with pytest.raises(UnknownLayerError, match="not a sub-module"):
        Explainer(small_resnet, target_layers=[torch.nn.ReLU()], input_size=SMALL_SIZE)


def _flat_model() -> onnx.ModelProto:
    """Flatten -> MatMul: a classifier with no spatial layer between the image and the logits."""
    image = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, 8, 8])
    logits = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])
    weight = helper.make_tensor("weight", TensorProto.FLOAT, [192, 10], np.ones(1920, dtype=np.float32))
    nodes = [helper.make_node("Flatten", ["image"], ["flat"]),
             helper.make_node("MatMul", ["flat", "weight"], ["logits"])]
    graph = helper.make_graph(nodes, "flat", [image], [logits], [weight])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_model_without_spatial_layers() -> None:
    with pytest.raises(NoSpatialLayerError, match="no rank-4 tensor with spatial size > 1"):
        Explainer(_flat_model())


@pytest.mark.parametrize("content", [b"this is not an ONNX model", b"", b"\x08\x07\x12\x03abc"])
def test_corrupt_onnx_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "model.onnx"
    path.write_bytes(content)
    with pytest.raises(InvalidModelError, match="model.onnx"):
        Explainer(path)


def test_missing_onnx_file(tmp_path: Path) -> None:
    with pytest.raises(InvalidModelError, match="not found"):
        Explainer(tmp_path / "absent.onnx")


def test_unreadable_image(default_explainer, tmp_path: Path) -> None:  # noqa: ANN001
    path = tmp_path / "broken.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n but then nothing")
    with pytest.raises(ImageReadError, match="broken.png"):
        default_explainer.explain([str(path)])
    with pytest.raises(ImageReadError, match="no such file"):
        default_explainer.explain([str(tmp_path / "absent.jpg")])


def test_unknown_method(small_explainer, small_batch) -> None:  # noqa: ANN001
    with pytest.raises(UnknownMethodError, match=r"unknown method 'gradcam\+\+\+'.*gradcam"):
        small_explainer.explain(small_batch, method="gradcam+++")


def test_unknown_method_option(small_explainer, small_batch) -> None:  # noqa: ANN001
    with pytest.raises(InvalidInputError, match=r"'gradcam' takes no option\(s\) window; it takes none"):
        small_explainer.explain(small_batch, method="gradcam", window=8)


def test_bad_batch_size(small_explainer, small_batch) -> None:  # noqa: ANN001
    with pytest.raises(InvalidInputError, match="batch_size must be an integer >= 1"):
        small_explainer.explain(small_batch, batch_size=0)


def test_unknown_backend(small_onnx) -> None:  # noqa: ANN001
    with pytest.raises(InvalidInputError, match="unknown backend 'jax'"):
        Explainer(small_onnx, backend="jax")


@pytest.mark.skipif("CUDAExecutionProvider" in onnxruntime.get_available_providers(),
                    reason="CUDA is available here: the provider is not missing")
def test_unavailable_provider(small_onnx) -> None:  # noqa: ANN001
    with pytest.raises(BackendUnavailableError, match="CUDAExecutionProvider"):
        Explainer(small_onnx, providers=["CUDAExecutionProvider"])


def test_tensorrt_backend_unavailable(small_onnx) -> None:  # noqa: ANN001
    with pytest.raises(BackendUnavailableError, match="TensorRT"):
        Explainer(small_onnx, backend="tensorrt")


def test_torch_backend_needs_a_torch_model(small_onnx) -> None:  # noqa: ANN001
    with pytest.raises(BackendUnavailableError, match="needs a torch.nn.Module"):
        Explainer(small_onnx, backend="torch")


def test_torch_backend_checks_its_target_layers(small_resnet) -> None:  # noqa: ANN001
    import torch

    from explainrt.errors import UnknownLayerError

    with pytest.raises(UnknownLayerError, match="is not a sub-module of the model"):
        Explainer(small_resnet, target_layers=[torch.nn.Conv2d(3, 3, 1)], backend="torch", input_size=(64, 64))
    with pytest.raises(UnknownLayerError, match="target layer 'fc' must output \\[N, C, h, w\\]"):
        Explainer(small_resnet, target_layers=[small_resnet.fc], backend="torch", input_size=(64, 64))


def test_torch_backend_explains_models_onnx_cannot_express(small_batch) -> None:  # noqa: ANN001
    """The reference backend needs no ONNX export: a model with an FFT (no VJP rule) still explains."""
    import torch

    class Spectral(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = torch.nn.Conv2d(3, 8, 3, padding=1)
            self.head = torch.nn.Linear(8, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            maps = torch.fft.ifft2(torch.fft.fft2(self.features(x))).real
            return self.head(maps.mean(dim=(2, 3)))

    torch.manual_seed(0)
    model = Spectral().eval()
    explanation = Explainer(model, target_layers=[model.features], backend="torch", input_size=(64, 64)).explain(small_batch)
    assert explanation.maps.shape == (3, 64, 64) and explanation.logits.shape == (3, 4)
    assert np.isfinite(explanation.maps).all() and explanation.maps.max() > 0


def test_list_of_preprocessed_images(small_explainer, small_batch) -> None:  # noqa: ANN001
    together = small_explainer.explain(small_batch).maps
    np.testing.assert_array_equal(small_explainer.explain(list(small_batch)).maps, together)
    np.testing.assert_array_equal(small_explainer.explain([torch.from_numpy(x) for x in small_batch]).maps, together)
    with pytest.raises(InvalidInputError, match=r"images have mixed sizes \[\(3, 32, 32\), \(3, 64, 64\)\]"):
        small_explainer.explain([small_batch[0], small_batch[1, :, :32, :32]], method="occlusion")


@pytest.mark.parametrize("signed", [False, True])
def test_blank_notes_read_every_map_exactly(signed: bool) -> None:
    """A map is blank when nothing of it shows: no positive value (signed maps) or no non-zero one, a single value
    anywhere counting (a negative one under a max of 0 on an unsigned map too); the maps of one image apart."""
    from types import SimpleNamespace

    from explainrt.explainer import _blank_notes

    method = SimpleNamespace(name="gradcam", signed=signed, blank_reason="")  # what the notes read of a Method
    maps = np.zeros((3, 2, 20, 30), np.float32)
    maps[0, 0, 3, 5] = 0.25
    maps[0, 1, 8, 16] = 1.0
    maps[1, 0, 11, 29] = -0.5  # negative: shows on an unsigned map only
    maps[2, 1] = -1.0
    notes = _blank_notes(method, maps)
    if signed:
        assert notes == (None, "the gradcam map of target(s) 0, 1 is all zero", "the gradcam map of target(s) 0, 1 is all zero")
    else:
        assert notes == (None, "the gradcam map of target(s) 1 is all zero", "the gradcam map of target(s) 0 is all zero")
    one = _blank_notes(method, maps[:, 0])
    assert one == (None, "the gradcam map is all zero" if signed else None, "the gradcam map is all zero")
    # normalised maps (a map head's, in [0, 1]): a max of 0 is a map of zeros, read once
    in_range = np.clip(maps, 0, 1)
    assert _blank_notes(method, in_range, normalized=True) == _blank_notes(method, in_range) == (
        None, "the gradcam map of target(s) 0, 1 is all zero", "the gradcam map of target(s) 0, 1 is all zero")
