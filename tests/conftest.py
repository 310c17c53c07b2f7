"""Shared fixtures: a private model cache, the default Explainer, a small random ResNet-18 and the
torchvision exports several test files compare.

The cache variable is set when this file is imported, before any test can export or build
anything, so test runs never write to ~/.cache/explainrt. Under pytest-xdist the controller makes
the folder and its workers inherit it (the cache writes atomically, so two workers writing at once
leave one whole file); the controller removes it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

_SHARED = "EXPLAINRT_TEST_CACHE"  # set by the process that made the folder; xdist workers inherit it
_OWNER = not ("PYTEST_XDIST_WORKER" in os.environ and os.environ.get(_SHARED))
if _OWNER:
    os.environ[_SHARED] = tempfile.mkdtemp(prefix="explainrt-test-cache-")
_CACHE = Path(os.environ[_SHARED])
os.environ["EXPLAINRT_CACHE"] = str(_CACHE)


def _one_thread_per_worker() -> None:
    """Under pytest-xdist every ONNX Runtime session and torch compute with one intra-op thread: two
    workers with a two-thread pool each on two cores spin-wait and preempt each other."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # read by torch when a test file first imports it
    import onnxruntime

    opened = onnxruntime.InferenceSession.__init__

    def one_thread(self, path_or_bytes, sess_options=None, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        options = sess_options if sess_options is not None else onnxruntime.SessionOptions()
        if options.intra_op_num_threads == 0:
            options.intra_op_num_threads = 1
        opened(self, path_or_bytes, options, *args, **kwargs)

    onnxruntime.InferenceSession.__init__ = one_thread


if "PYTEST_XDIST_WORKER" in os.environ:
    _one_thread_per_worker()

SMALL_SIZE = (64, 64)
SMALL_CLASSES = 10
CAT_CLASSES = {281, 282, 285}  # tabby, tiger cat, Egyptian cat: chelsea's top 3
ESPRESSO = 967  # coffee's top 1


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _OWNER:
        shutil.rmtree(_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def model_cache() -> Path:
    """The EXPLAINRT_CACHE folder of this test session."""
    return _CACHE


@pytest.fixture(scope="session")
def default_explainer(model_cache: Path):
    """The shipped EfficientNet-Lite0 (explainrt/data/efficientnet_lite0.onnx) on ONNX Runtime."""
    from explainrt import Explainer

    return Explainer()


@pytest.fixture(scope="session")
def example_images() -> dict[str, np.ndarray]:
    """chelsea, coffee and astronaut (scikit-image's photos, shipped with explainrt), uint8 RGB."""
    from explainrt.models.default import example_images

    return example_images()


@pytest.fixture(scope="session")
def default_explanation(default_explainer, example_images):
    """Grad-CAM of the default model on the three example images."""
    return default_explainer.explain(list(example_images.values()), method="gradcam")


@pytest.fixture(scope="session")
def small_resnet():
    """A random (seeded) torchvision ResNet-18 with 10 classes, in eval mode."""
    import torch
    from torchvision.models import resnet18

    torch.manual_seed(0)
    return resnet18(num_classes=SMALL_CLASSES).eval()


@pytest.fixture(scope="session")
def small_onnx(small_resnet):
    """The small ResNet-18 as an explainable ONNX model (target layer4, 64x64 input, no preprocessing)."""
    import torch

    from explainrt import from_torch

    return from_torch(small_resnet, torch.zeros(1, 3, *SMALL_SIZE), [small_resnet.layer4])


@pytest.fixture(scope="session")
def small_explainer(small_onnx):
    """The small ResNet-18 on ONNX Runtime; takes preprocessed float32 [N, 3, 64, 64] batches."""
    from explainrt import Explainer

    return Explainer(small_onnx)


@pytest.fixture(scope="session")
def small_torch_explainer(small_resnet):
    """The same ResNet-18 on the torch reference backend (hooks and autograd)."""
    from explainrt import Explainer

    return Explainer(small_resnet, target_layers=[small_resnet.layer4], backend="torch", input_size=SMALL_SIZE)


@pytest.fixture(scope="session")
def small_batch() -> np.ndarray:
    """A preprocessed-looking float32 batch [3, 3, 64, 64]."""
    return np.random.default_rng(0).standard_normal((3, 3, *SMALL_SIZE)).astype(np.float32)


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A temporary current directory."""
    monkeypatch.chdir(tmp_path)
    yield tmp_path


@pytest.fixture(scope="session")
def biased_resnet():
    """A random ResNet-18 (10 classes) whose batch norms have random statistics and biases, so that,
    unlike ``small_resnet``, it is not positively homogeneous (input-gradient methods need that)."""
    import torch
    from torchvision.models import resnet18

    torch.manual_seed(0)
    model = resnet18(num_classes=SMALL_CLASSES).eval()
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                for tensor, low, high in ((module.running_mean, -0.2, 0.2), (module.running_var, 0.5, 1.5),
                                          (module.weight, 0.5, 1.5), (module.bias, -0.2, 0.2)):
                    tensor.copy_(torch.rand(tensor.shape, generator=generator) * (high - low) + low)
    return model


@pytest.fixture(scope="session")
def biased_onnx(biased_resnet):
    """``biased_resnet`` as an explainable ONNX model (target layer4, 64x64 input)."""
    import torch

    from explainrt import from_torch

    return from_torch(biased_resnet, torch.zeros(1, 3, *SMALL_SIZE), [biased_resnet.layer4])


@pytest.fixture(scope="session")
def biased_explainers(biased_onnx, biased_resnet):
    """``biased_resnet`` on ONNX Runtime and on the torch reference backend, by backend name."""
    from explainrt import Explainer

    return {"onnxruntime": Explainer(biased_onnx),
            "torch": Explainer(biased_resnet, target_layers=[biased_resnet.layer4], backend="torch", input_size=SMALL_SIZE)}


@pytest.fixture
def cupy():
    """The cupy module, or a visible skip where no CUDA device exists."""
    from explainrt import kernels

    if "cupy" not in kernels.available_backends():
        pytest.skip("no CUDA device")
    import cupy

    return cupy


def ambiguous_nhwc_model(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A channels-last [N, 4, 4, 3] model whose graph (a MatMul over the channels) and sizes (4 and 3 are both
    channel counts) do not tell its layout: logits = mean_hw(relu(x @ w1)) @ w2. Returns w1, w2."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w1, w2 = rng.standard_normal((3, 8)).astype(np.float32), rng.standard_normal((8, 5)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["image", "w1"], ["features"]), helper.make_node("Relu", ["features"], ["act"]),
             helper.make_node("ReduceMean", ["act", "axes"], ["pooled"], keepdims=0),
             helper.make_node("MatMul", ["pooled", "w2"], ["logits"])]
    graph = helper.make_graph(nodes, "nhwc", [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 4, 4, 3])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 5])],
                              [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2"),
                               numpy_helper.from_array(np.array([1, 2], np.int64), "axes")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    return w1, w2
