"""The one load step (``explainrt.models.load``) and the backend table (``explainrt.runtime``)."""

from __future__ import annotations

import onnx
import pytest

from explainrt import Explainer, runtime
from explainrt.errors import BackendUnavailableError, InvalidInputError, InvalidModelError, UnknownLayerError
from explainrt.export.spec import ExplainableSpec, original_model
from explainrt.models import Outputs, PreprocessingOverrides, load
from explainrt.models.loading import IMAGENET_MEAN, IMAGENET_STD
from explainrt.preprocessing import Preprocessing


def test_the_backend_table_names_every_backend_and_checks_options() -> None:
    assert set(runtime.BACKENDS) == {"onnxruntime", "torch", "tensorrt"}
    assert runtime.backend("onnxruntime", {"device_outputs": False}).takes == "onnx"
    assert runtime.backend("torch").takes == "module"
    with pytest.raises(InvalidInputError, match="unknown backend 'nope'; choose one of"):
        runtime.backend("nope")
    with pytest.raises(InvalidInputError, match=r"backend_options \['precision'\] are not options of backend "
                                                "'onnxruntime'"):
        runtime.backend("onnxruntime", {"precision": "fp16"})


def test_torch_backend_takes_no_execution_providers(small_resnet) -> None:  # noqa: ANN001
    with pytest.raises(InvalidInputError, match="backend 'torch' takes none"):
        Explainer(small_resnet, [small_resnet.layer4], backend="torch", providers=["CPUExecutionProvider"],
                  input_size=(64, 64))


def test_an_explainable_model_is_loaded_as_it_is(small_onnx) -> None:  # noqa: ANN001
    loaded = load(small_onnx)
    assert loaded.explainable.SerializeToString() == small_onnx.SerializeToString()
    assert loaded.module is None and loaded.preprocessing is None  # the API never invents preprocessing


def test_the_command_line_falls_back_to_imagenet_preprocessing(small_onnx) -> None:  # noqa: ANN001
    loaded = load(original_model(small_onnx), overrides=PreprocessingOverrides())
    assert loaded.preprocessing == Preprocessing(input_size=(64, 64), resize_shorter=73, mean=IMAGENET_MEAN,
                                                 std=IMAGENET_STD, labels=None)
    stored = ExplainableSpec.from_model(loaded.explainable).preprocessing
    assert Preprocessing.from_json(stored) == loaded.preprocessing
    overridden = load(small_onnx, overrides=PreprocessingOverrides(input_size=(64, 64), mean=(0.5, 0.5, 0.5)))
    assert overridden.preprocessing.mean == (0.5, 0.5, 0.5) and overridden.preprocessing.std == IMAGENET_STD


def test_arguments_that_do_not_fit_the_model_are_refused(small_onnx, tmp_path) -> None:  # noqa: ANN001
    with pytest.raises(InvalidInputError, match="needs --weights FILE"):
        load("resnet18")
    with pytest.raises(InvalidInputError, match="weights apply to a torchvision architecture name"):
        load(small_onnx, weights=tmp_path / "weights.pt")
    with pytest.raises(InvalidInputError, match="output names an ONNX output by its name or index, got 0.5"):
        load(original_model(small_onnx), outputs=Outputs(output=0.5))
    assert ExplainableSpec.from_model(load(original_model(small_onnx), outputs=Outputs(output=0)).explainable).logits \
        == small_onnx.graph.output[0].name
    with pytest.raises(UnknownLayerError, match="output index 3 is out of range: the model has 1 outputs"):
        load(original_model(small_onnx), outputs=Outputs(output=3))
    with pytest.raises(BackendUnavailableError, match="needs a torch.nn.Module"):
        load(small_onnx, backend="torch")
    with pytest.raises(InvalidModelError, match="neither an ONNX file nor a torchvision architecture; did you mean "
                                                "'resnet18'"):
        load("resnet_18", weights=tmp_path / "weights.pt")


def test_module_targets_by_dotted_name_with_suggestions(small_resnet) -> None:  # noqa: ANN001
    from explainrt.errors import UnknownLayerError

    by_name = load(small_resnet, ["layer4"], input_size=(64, 64))
    by_module = load(small_resnet, [small_resnet.layer4], input_size=(64, 64))
    assert ExplainableSpec.from_model(by_name.explainable).layouts == ExplainableSpec.from_model(
        by_module.explainable).layouts
    assert isinstance(by_name.explainable, onnx.ModelProto)
    with pytest.raises(UnknownLayerError, match="the model has no module 'layer5': did you mean 'layer4'"):
        load(small_resnet, ["layer5"], input_size=(64, 64))
    with pytest.raises(UnknownLayerError, match="no module 'nonexistent': its top-level modules are 'conv1', 'bn1'"):
        load(small_resnet, ["nonexistent"], input_size=(64, 64))
