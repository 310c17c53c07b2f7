"""The torch-free core: the shipped default model against PyTorch, and no torch import on ONNX paths.

``.ci/torch_free`` installs the wheel without extras into a fresh venv and explains there; these
tests check the same promises inside the dev environment (where torch is installed but must stay
unimported) and that each torch path names the extra that installs it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import onnx
import pytest
from onnx import TensorProto, numpy_helper

from explainrt import Explainer
from explainrt.errors import MissingDependencyError
from explainrt.export.spec import ExplainableSpec
from explainrt.models.default import (
    DEFAULT_PREPROCESSING,
    DEFAULT_TARGET_MODULE,
    default_explainable_model,
    default_model_origin,
)
from explainrt.optional import require
from explainrt.preprocessing import Preprocessing


@pytest.fixture(scope="module")
def shipped() -> onnx.ModelProto:
    return default_explainable_model()


def test_shipped_model_stores_its_preprocessing_labels_and_target(shipped: onnx.ModelProto) -> None:
    spec = ExplainableSpec.from_model(shipped)
    assert Preprocessing.from_json(spec.preprocessing) == DEFAULT_PREPROCESSING
    assert len(DEFAULT_PREPROCESSING.labels) == spec.num_classes == 1000
    assert len(spec.target_layers) == 1
    origin = default_model_origin(shipped)
    assert origin["target_module"] == DEFAULT_TARGET_MODULE
    stored = {numpy_helper.to_array(t).dtype.name for t in shipped.graph.initializer if t.data_type in
              (TensorProto.FLOAT, TensorProto.FLOAT16) and np.prod(t.dims) >= 64}
    assert stored == {origin["weights_dtype"]}
    # float16 weights only where they kept every map within the tolerance (tools/make_default_model.py)
    assert (origin["float16_map_difference"] <= origin["map_tolerance"]) == (origin["weights_dtype"] == "float16")


@pytest.mark.parametrize("method", ["gradcam", "gradcam++"])
def test_shipped_model_maps_equal_the_pytorch_models(method: str, shipped: onnx.ModelProto,
                                                     example_images: dict[str, np.ndarray]) -> None:
    """The shipped ONNX file on ONNX Runtime against the PyTorch module with hooks and autograd."""
    pytest.importorskip("efficientnet_lite_pytorch")
    origin = default_model_origin(shipped)
    tolerance = 1e-4 if origin["weights_dtype"] == "float32" else origin["map_tolerance"]
    images = list(example_images.values())
    onnx_explainer, torch_explainer = Explainer(shipped), _torch_default_explainer()
    for targets in (None, -2):
        ours = onnx_explainer.explain(images, method=method, targets=targets, progress=False)
        reference = torch_explainer.explain(images, method=method, targets=targets, progress=False)
        np.testing.assert_array_equal(ours.targets, reference.targets)
        np.testing.assert_allclose(ours.logits, reference.logits, atol=1e-3, rtol=1e-4)
        assert np.abs(ours.maps - reference.maps).max() <= tolerance


_TORCH_DEFAULT: list[Explainer] = []


def _torch_default_explainer() -> Explainer:
    if not _TORCH_DEFAULT:
        _TORCH_DEFAULT.append(Explainer(backend="torch"))
    return _TORCH_DEFAULT[0]


def _run(script: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True,
                          timeout=900, check=False)  # a hang guard, not a speed check


_TINY_ONNX = """
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w"),
               numpy_helper.from_array(rng.standard_normal((4, 5)).astype(np.float32), "fc")]
    nodes = [helper.make_node("Conv", ["image", "w"], ["conv"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["conv"], ["relu"]),
             helper.make_node("GlobalAveragePool", ["relu"], ["pooled"]),
             helper.make_node("Flatten", ["pooled"], ["flat"]),
             helper.make_node("MatMul", ["flat", "fc"], ["logits"])]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, 16, 16])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 5])], weights)
    tiny = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()
"""


def test_explaining_onnx_never_imports_torch() -> None:
    """The default model and a plain ONNX file, explained in a fresh interpreter: no torch module loaded."""
    result = _run(_TINY_ONNX + """
    import json, sys
    from explainrt import Explainer

    batch = rng.standard_normal((2, 3, 16, 16)).astype(np.float32)
    tiny_maps = Explainer(tiny).explain(batch, method="gradcam").maps
    default_maps = Explainer().explain(rng.integers(0, 256, (1, 40, 50, 3), dtype=np.uint8), method="layercam").maps
    loaded = sorted(name for name in sys.modules if name.split(".")[0] in ("torch", "torchvision", "onnxscript"))
    print(json.dumps({"shapes": [tiny_maps.shape, default_maps.shape], "torch_modules": loaded}))
    """)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report == {"shapes": [[2, 16, 16], [1, 224, 224]], "torch_modules": []}


def test_torch_paths_name_the_torch_extra() -> None:
    """With torch unimportable (a None entry in sys.modules), each torch path raises MissingDependencyError."""
    result = _run("""
    import json, sys
    sys.modules["torch"] = None
    import explainrt
    from explainrt.errors import MissingDependencyError

    def error(call):
        try:
            call()
        except MissingDependencyError as caught:
            return str(caught)
        return None

    print(json.dumps({
        "from_torch": error(lambda: explainrt.from_torch),
        "backend": error(lambda: explainrt.Explainer(backend="torch")),
        "torchvision": error(lambda: explainrt.Explainer("resnet18")),
    }))
    """)
    assert result.returncode == 0, result.stderr
    messages = json.loads(result.stdout.strip().splitlines()[-1])
    for path, message in messages.items():
        assert message is not None, f"{path}: no MissingDependencyError"
        assert "pip install 'explainrt[torch]'" in message and "needs torch" in message, (path, message)


def test_require_names_the_extra_of_a_missing_package() -> None:
    assert require("numpy", "anything") is np
    with pytest.raises(MissingDependencyError, match=r"DFF needs explainrt_no_such_package.*pip install "
                                                     r"'explainrt\[methods\]'") as caught:
        require("explainrt_no_such_package.sub", "DFF", "methods")
    assert isinstance(caught.value, ImportError)
    with pytest.raises(MissingDependencyError, match=r"pip install explainrt_no_such_package$"):
        require("explainrt_no_such_package", "a feature")


def test_missing_scikit_image_is_named_by_its_pip_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "skimage", None)
    monkeypatch.delitem(sys.modules, "skimage.segmentation", raising=False)
    with pytest.raises(MissingDependencyError, match=r"LIME needs scikit-image.*pip install 'explainrt\[methods\]'"):
        require("skimage.segmentation", "LIME")


def test_example_images_are_scikit_images(example_images: dict[str, np.ndarray]) -> None:
    """The shipped WebP files hold scikit-image's photos pixel for pixel (lossless)."""
    data = pytest.importorskip("skimage.data")
    for name, image in example_images.items():
        np.testing.assert_array_equal(image, getattr(data, name)())
