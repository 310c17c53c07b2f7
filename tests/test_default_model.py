"""The default EfficientNet-Lite0: real ImageNet weights, preprocessing, labels, examples."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CAT_CLASSES, ESPRESSO
from efficientnet_lite_pytorch import EfficientNet

from explainrt.errors import UnknownLayerError
from explainrt.models.default import (
    DEFAULT_PREPROCESSING,
    DEFAULT_TARGET_MODULE,
    example_images,
    imagenet_labels,
    write_example_images,
)
from explainrt.models.default_torch import (
    default_target_module,
    load_default_torch_model,
)
from explainrt.preprocessing import Preprocessing, load_image


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    """One model construction (real weights) for the whole module."""
    return load_default_torch_model()


@pytest.fixture(scope="module")
def examples() -> dict[str, np.ndarray]:
    return example_images()


@pytest.fixture(scope="module")
def logits(model: torch.nn.Module, examples: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    batch, _ = DEFAULT_PREPROCESSING.prepare(list(examples.values()))
    with torch.no_grad():
        return dict(zip(examples, model(torch.from_numpy(batch))))


def test_model_is_in_eval_mode(model: torch.nn.Module) -> None:
    assert not model.training


def test_chelsea_is_a_cat(logits: dict[str, torch.Tensor]) -> None:
    top3 = logits["chelsea"].topk(3).indices.tolist()
    assert top3[0] in CAT_CLASSES
    assert set(top3) == CAT_CLASSES


def test_coffee_is_espresso(logits: dict[str, torch.Tensor]) -> None:
    probabilities = logits["coffee"].softmax(0)
    assert int(probabilities.argmax()) == ESPRESSO
    assert float(probabilities[ESPRESSO]) > 0.5


def test_head_override_computes_the_library_forward(model: torch.nn.Module) -> None:
    inputs = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model.extract_features(inputs), EfficientNet.extract_features(model, inputs))


def test_target_module_runs_once_with_a_spatial_output(model: torch.nn.Module) -> None:
    shapes = []
    handle = default_target_module(model).register_forward_hook(lambda *args: shapes.append(args[2].shape))
    try:
        with torch.no_grad():
            model(torch.zeros(2, 3, *DEFAULT_PREPROCESSING.input_size))
    finally:
        handle.remove()
    assert shapes == [torch.Size([2, 1280, 7, 7])]
    assert default_target_module(model) is model.get_submodule(DEFAULT_TARGET_MODULE)


def test_target_module_missing_is_unknown_layer() -> None:
    with pytest.raises(UnknownLayerError, match=DEFAULT_TARGET_MODULE):
        default_target_module(torch.nn.Linear(2, 2))


def test_labels() -> None:
    labels = imagenet_labels()
    assert len(labels) == 1000 and len(set(labels)) == 1000
    assert labels[ESPRESSO] == "espresso" and labels[285] == "Egyptian cat" and labels[0] == "tench"
    assert DEFAULT_PREPROCESSING.labels == labels


def test_default_preprocessing_round_trips_json() -> None:
    assert Preprocessing.from_json(DEFAULT_PREPROCESSING.to_json()) == DEFAULT_PREPROCESSING
    assert DEFAULT_PREPROCESSING.input_size == (224, 224)


def test_example_images(examples: dict[str, np.ndarray]) -> None:
    assert list(examples) == ["chelsea", "coffee", "astronaut"]
    for image in examples.values():
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3


def test_write_example_images(tmp_path: Path, examples: dict[str, np.ndarray]) -> None:
    paths = write_example_images(tmp_path / "examples")
    assert [path.name for path in paths] == ["chelsea.png", "coffee.png", "astronaut.png"]
    for path, image in zip(paths, examples.values()):
        np.testing.assert_array_equal(load_image(path), image)
