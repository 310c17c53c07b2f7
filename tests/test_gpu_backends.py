"""The GPU backends: device and provider selection, TensorRT engine-cache keys, profiles and argument
checks (all on the CPU), and, marked ``gpu`` (skipped visibly without CUDA), torch on CUDA against the
CPU reference, ONNX Runtime's CUDA provider with IO binding, and TensorRT against ONNX Runtime."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
import torch

from explainrt import Explainer
from explainrt.errors import BackendUnavailableError, InvalidInputError, InvalidModelError
from explainrt.export.spec import RESOLVED_TARGETS_OUTPUT, TARGETS_INPUT, maps_output
from explainrt.runtime.base import parse_device
from explainrt.runtime.onnxruntime import CUDA_PROVIDER, OnnxRuntimeSession, onnxruntime_placement
from explainrt.runtime.tensorrt import BatchProfile, EngineKey, TensorRTSession, engine_key

HAS_CUDA = torch.cuda.is_available()
HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device (torch.cuda.is_available() is False)")

# --- device and provider selection ------------------------------------------------------------


@pytest.mark.parametrize("device, expected", [("cpu", ("cpu", 0)), ("cuda", ("cuda", 0)), ("cuda:3", ("cuda", 3))])
def test_parse_device(device: str, expected: tuple[str, int]) -> None:
    assert parse_device(device) == expected


@pytest.mark.parametrize("device", ["gpu", "cuda:x", "cpu:1", "", "cuda:-1"])
def test_parse_device_rejects(device: str) -> None:
    with pytest.raises(InvalidInputError, match="device must be 'cpu', 'cuda' or 'cuda:N'"):
        parse_device(device)


def test_onnxruntime_placement() -> None:
    assert onnxruntime_placement(None, None) == (None, 0)
    assert onnxruntime_placement(None, "cuda:1") == ([CUDA_PROVIDER, "CPUExecutionProvider"], 1)
    assert onnxruntime_placement(None, "cpu") == (["CPUExecutionProvider"], 0)
    assert onnxruntime_placement([CUDA_PROVIDER], "cuda") == ([CUDA_PROVIDER], 0)
    with pytest.raises(InvalidInputError, match="contradicts the first provider 'CPUExecutionProvider'"):
        onnxruntime_placement(["CPUExecutionProvider"], "cuda")


def test_cuda_provider_missing_names_onnxruntime_gpu(small_onnx: onnx.ModelProto) -> None:
    import onnxruntime as ort

    if CUDA_PROVIDER in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu is installed here")
    with pytest.raises(BackendUnavailableError, match="install onnxruntime-gpu"):
        Explainer(small_onnx, device="cuda")


def test_device_outputs_need_the_cuda_provider(small_onnx: onnx.ModelProto) -> None:
    with pytest.raises(InvalidInputError, match="device_outputs=True needs CUDAExecutionProvider"):
        OnnxRuntimeSession(small_onnx, ["CPUExecutionProvider"], device_outputs=True)


def test_backend_options_are_checked_per_backend(small_onnx: onnx.ModelProto) -> None:
    with pytest.raises(InvalidInputError, match=r"backend_options \['precision'\] are not options of backend 'onnxruntime'"):
        Explainer(small_onnx, backend_options={"precision": "fp16"})


def test_cpu_session_results_unchanged_by_explicit_cpu_device(small_onnx, small_batch) -> None:  # noqa: ANN001
    targets = np.array([[-1], [2], [-2]], dtype=np.int64)
    default = Explainer(small_onnx).session.run(small_batch, targets)
    explicit = Explainer(small_onnx, device="cpu").session.run(small_batch, targets)
    for a, b in zip(dataclasses.astuple(default), dataclasses.astuple(explicit)):
        for x, y in zip(a if isinstance(a, list) else [a], b if isinstance(b, list) else [b]):
            np.testing.assert_array_equal(x, y)


@pytest.mark.skipif(HAS_CUDA, reason="CUDA is available here")
def test_torch_on_cuda_without_cuda_is_a_clear_error(small_resnet) -> None:  # noqa: ANN001
    with pytest.raises(BackendUnavailableError, match="backend 'torch' on 'cuda' needs a PyTorch build with CUDA"):
        Explainer(small_resnet, target_layers=[small_resnet.layer4], backend="torch", device="cuda", input_size=(64, 64))


# --- TensorRT: cache keys, profiles and arguments, without TensorRT --------------------------------

KEY_FIELDS = dict(tensorrt_version="10.15.1", gpu_name="NVIDIA H200", compute_capability=(9, 0), precision="fp32",
                  profile=BatchProfile())


def test_engine_key_is_deterministic_and_names_its_parts() -> None:
    key = engine_key(b"model", **KEY_FIELDS)
    assert key == engine_key(b"model", **KEY_FIELDS)
    assert key.model_sha256 == hashlib.sha256(b"model").hexdigest()
    assert (key.tensorrt_version, key.gpu_name, key.compute_capability) == ("10.15.1", "NVIDIA H200", (9, 0))
    assert len(key.digest()) == 64
    assert key.filename() == f"{key.model_sha256[:16]}-sm90-fp32-{key.digest()[:16]}.engine"


@pytest.mark.parametrize("field, value", [
    ("tensorrt_version", "10.16.0"), ("gpu_name", "NVIDIA H100"), ("compute_capability", (8, 9)),
    ("precision", "fp16"), ("profile", BatchProfile(max_batch=64)), ("profile", BatchProfile(max_targets=8)),
])
def test_engine_key_changes_with_each_part(field: str, value: object) -> None:
    base = engine_key(b"model", **KEY_FIELDS)
    changed = engine_key(b"model", **{**KEY_FIELDS, field: value})
    assert changed.digest() != base.digest() and changed.filename() != base.filename()


def test_engine_key_changes_with_the_model_bytes() -> None:
    assert engine_key(b"model", **KEY_FIELDS).filename() != engine_key(b"model2", **KEY_FIELDS).filename()
    assert isinstance(engine_key(b"m", **KEY_FIELDS), EngineKey)


def test_engine_key_rejects_unknown_precision() -> None:
    with pytest.raises(InvalidInputError, match=r"precision must be one of \('fp32', 'fp16'\), got 'int8'"):
        engine_key(b"model", **{**KEY_FIELDS, "precision": "int8"})


@pytest.mark.parametrize("kwargs, message", [
    ({"min_batch": 0}, "min_batch must be an integer >= 1, got 0"),
    ({"max_targets": 1.5}, "max_targets must be an integer >= 1"),
    ({"opt_batch": 64}, "min_batch <= opt_batch <= max_batch"),
    ({"min_batch": 4, "opt_batch": 2}, "min_batch <= opt_batch <= max_batch"),
])
def test_batch_profile_validation(kwargs: dict, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        BatchProfile(**kwargs)


def test_profile_shapes_cover_the_batch_and_the_targets(small_onnx: onnx.ModelProto) -> None:
    shapes = BatchProfile(min_batch=1, opt_batch=4, max_batch=16, max_targets=3).shapes(small_onnx)
    assert shapes["input"] == ((1, 3, 64, 64), (4, 3, 64, 64), (16, 3, 64, 64))
    assert shapes[TARGETS_INPUT] == ((1, 1), (4, 1), (16, 3))
    assert set(shapes) == {"input", TARGETS_INPUT}


def test_profile_shapes_give_the_box_objectives_boxes_a_targets_axis() -> None:
    """A box-objective variant's explainrt.boxes [N, K, 6]: K ranges like the targets' (else TensorRT has no range)."""
    from onnx import TensorProto, helper

    from explainrt.export.spec import BOXES_INPUT

    graph = helper.make_graph([helper.make_node("Identity", ["image"], ["y"])], "boxes",
                              [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, 8, 8]),
                               helper.make_tensor_value_info(BOXES_INPUT, TensorProto.FLOAT, ["N", "K", 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, 8, 8])])
    shapes = BatchProfile(min_batch=1, opt_batch=4, max_batch=16, max_targets=3).shapes(helper.make_model(graph))
    assert shapes[BOXES_INPUT] == ((1, 1, 6), (4, 1, 6), (16, 3, 6))
    # the weighted box objective's boxes [N, K, B, 6]: B (boxes per target) ranges like K
    del graph.input[1:]
    graph.input.append(helper.make_tensor_value_info(BOXES_INPUT, TensorProto.FLOAT, ["N", "K", "B", 6]))
    shapes = BatchProfile(min_batch=1, opt_batch=4, max_batch=16, max_targets=3).shapes(helper.make_model(graph))
    assert shapes[BOXES_INPUT] == ((1, 1, 1, 6), (4, 1, 1, 6), (16, 3, 3, 6))


def test_profile_rejects_a_dynamic_spatial_size(small_onnx: onnx.ModelProto) -> None:
    model = copy.deepcopy(small_onnx)
    model.graph.input[0].type.tensor_type.shape.dim[2].dim_param = "height"
    with pytest.raises(InvalidModelError, match="input 'input' has a dynamic dimension 2 \\('height'\\)"):
        BatchProfile().shapes(model)


@pytest.mark.parametrize("kwargs, error, message", [
    ({"precision": "int8"}, InvalidInputError, "precision must be one of"),
    ({"device": "cpu"}, InvalidInputError, "backend 'tensorrt' runs on a CUDA device, not 'cpu'"),
    ({"profile": (1, 8, 32)}, InvalidInputError, "profile must be a BatchProfile"),
])
def test_tensorrt_session_checks_arguments_first(small_onnx, kwargs: dict, error: type, message: str) -> None:  # noqa: ANN001
    with pytest.raises(error, match=message):
        TensorRTSession(small_onnx, **kwargs)


@pytest.mark.skipif(HAS_TENSORRT and HAS_CUDA, reason="TensorRT and CUDA are available here")
def test_tensorrt_unavailable_names_what_to_install(small_onnx: onnx.ModelProto) -> None:
    with pytest.raises(BackendUnavailableError, match=r"backend 'tensorrt' needs .*pip install explainrt\[trt\].*CUDA"):
        TensorRTSession(small_onnx)
    with pytest.raises(BackendUnavailableError, match=r"'tensorrt'.*pip install explainrt\[trt\]"):
        Explainer(small_onnx, backend="tensorrt")


# --- on a CUDA device ---------------------------------------------------------------------------

TOLERANCE = 1e-4


def _relative(actual: np.ndarray, reference: np.ndarray) -> float:
    return float(np.abs(actual.astype(np.float64) - reference).max() / max(np.abs(reference).max(), 1e-12))


@pytest.fixture(scope="module")
def cuda_torch_explainer(small_resnet):  # noqa: ANN001, ANN201
    if not HAS_CUDA:
        pytest.skip("no CUDA device (torch.cuda.is_available() is False)")
    module = copy.deepcopy(small_resnet)  # the session moves its module to the GPU
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    return Explainer(module, target_layers=[module.layer4], backend="torch", device="cuda", input_size=(64, 64))


@pytest.mark.gpu
@pytest.mark.parametrize("objective", ["logit", "cross_entropy"])
def test_torch_cuda_session_matches_cpu(cuda_torch_explainer, small_torch_explainer, small_batch, objective) -> None:  # noqa: ANN001
    targets = np.array([[-1, 3], [2, -2], [0, -1]], dtype=np.int64)
    for call in ("run", "input_gradients"):
        gpu = getattr(cuda_torch_explainer.session, call)(small_batch, targets, objective)
        cpu = getattr(small_torch_explainer.session, call)(small_batch, targets, objective)
        np.testing.assert_array_equal(gpu.targets, cpu.targets)
        assert _relative(gpu.logits, cpu.logits) < TOLERANCE
        assert _relative(gpu.activations[0], cpu.activations[0]) < TOLERANCE
        assert _relative(gpu.gradients[0], cpu.gradients[0]) < TOLERANCE


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["gradcam", "gradcam++", "layercam"])
def test_torch_cuda_explanations_match_cpu(cuda_torch_explainer, small_torch_explainer, small_batch, method) -> None:  # noqa: ANN001
    gpu = cuda_torch_explainer.explain(small_batch, method=method)
    cpu = small_torch_explainer.explain(small_batch, method=method)
    np.testing.assert_array_equal(gpu.targets, cpu.targets)
    np.testing.assert_allclose(gpu.maps, cpu.maps, atol=1e-3)


@pytest.mark.gpu
def test_torch_cuda_logits_and_head_match_cpu(cuda_torch_explainer, small_torch_explainer, small_batch) -> None:  # noqa: ANN001
    assert _relative(cuda_torch_explainer.session.logits(small_batch), small_torch_explainer.session.logits(small_batch)) < TOLERANCE
    acts = small_torch_explainer.session.run(small_batch, np.full((3, 1), -1, np.int64)).activations[0]
    gpu = cuda_torch_explainer.session.head(0, acts * 0.5, small_batch)
    cpu = small_torch_explainer.session.head(0, acts * 0.5, small_batch)
    assert _relative(gpu, cpu) < TOLERANCE


@pytest.mark.gpu
@needs_cuda
def test_torch_cuda_session_accepts_device_inputs(cuda_torch_explainer, small_batch) -> None:  # noqa: ANN001
    targets = np.full((3, 1), -1, np.int64)
    from_host = cuda_torch_explainer.session.run(small_batch, targets)
    from_device = cuda_torch_explainer.session.run(torch.from_numpy(small_batch).cuda(), targets)
    np.testing.assert_array_equal(from_host.gradients[0], from_device.gradients[0])


def _cuda_provider() -> None:
    import onnxruntime as ort

    if not HAS_CUDA or CUDA_PROVIDER not in ort.get_available_providers():
        pytest.skip("needs onnxruntime-gpu (CUDAExecutionProvider) and a CUDA device")


@pytest.mark.gpu
def test_onnxruntime_cuda_io_binding_matches_cpu(small_onnx, small_explainer, small_batch) -> None:  # noqa: ANN001
    _cuda_provider()
    import cupy

    targets = np.array([[-1], [2], [-2]], dtype=np.int64)
    cpu = small_explainer.session.run(small_batch, targets)
    host = OnnxRuntimeSession(small_onnx, [CUDA_PROVIDER, "CPUExecutionProvider"]).run(small_batch, targets)
    device = OnnxRuntimeSession(small_onnx, [CUDA_PROVIDER, "CPUExecutionProvider"], device_outputs=True)
    on_device = device.run(cupy.asarray(small_batch), targets)
    assert isinstance(on_device.gradients[0], cupy.ndarray)
    for result in (host, on_device):
        gradients = cupy.asnumpy(result.gradients[0]) if result is on_device else result.gradients[0]
        assert _relative(gradients, cpu.gradients[0]) < 1e-3


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_TENSORRT, reason="tensorrt is not installed")
def test_tensorrt_session_matches_onnxruntime(small_onnx, small_explainer, small_batch, tmp_path) -> None:  # noqa: ANN001
    if not HAS_CUDA:
        pytest.skip("no CUDA device")
    targets = np.array([[-1, 1], [2, -2], [0, -1]], dtype=np.int64)
    session = TensorRTSession(small_onnx, profile=BatchProfile(opt_batch=4, max_batch=8), cache_dir=tmp_path)
    reference = small_explainer.session.run(small_batch, targets)
    result = session.run(small_batch, targets)
    np.testing.assert_array_equal(result.targets, reference.targets)
    assert _relative(result.gradients[0], reference.gradients[0]) < 1e-3
    assert len(list(tmp_path.glob("*.engine"))) == 1
    TensorRTSession(small_onnx, profile=BatchProfile(opt_batch=4, max_batch=8), cache_dir=tmp_path).run(small_batch, targets)
    assert len(list(tmp_path.glob("*.engine"))) == 1  # the second session read the cached engine


# --- TensorRT session logic on the CPU, with a stand-in for TensorRT ------------------------------
# The stand-in "builds" an engine whose serialized form is the ONNX model and "runs" it with ONNX
# Runtime, reading and writing the buffers at the addresses the session binds, so the session's
# own logic (variants, heads, batch chunking, output order and dtypes, the engine cache) runs here.


class _FakeContext:
    def __init__(self, engine: "_FakeEngine") -> None:
        self.engine, self.shapes, self.addresses, self.results = engine, {}, {}, None

    def set_input_shape(self, name: str, shape: tuple) -> bool:
        assert all(low <= d <= high for low, d, high in zip(self.engine.profile[name][0], shape, self.engine.profile[name][2]))
        self.shapes[name], self.results = tuple(shape), None
        return True

    def set_tensor_address(self, name: str, address: int) -> bool:
        self.addresses[name] = address
        if name in self.engine.inputs:
            self.results = None
        return True

    def _read(self, name: str) -> np.ndarray:
        import ctypes

        dtype = self.engine.get_tensor_dtype(name)
        count = int(np.prod(self.shapes[name]))
        raw = (ctypes.c_byte * (count * dtype.itemsize)).from_address(self.addresses[name])
        return np.frombuffer(raw, dtype=dtype).reshape(self.shapes[name]).copy()

    def get_tensor_shape(self, name: str) -> tuple:
        if self.results is None:
            feeds = {n: self._read(n) for n in self.engine.inputs}
            self.results = dict(zip(self.engine.outputs, self.engine.session.run(self.engine.outputs, feeds)))
        return self.results[name].shape

    def execute_async_v3(self, stream: int) -> bool:
        import ctypes

        for name in self.engine.outputs:
            value = np.ascontiguousarray(self.results[name])
            ctypes.memmove(self.addresses[name], value.ctypes.data, value.nbytes)
        return True


class _FakeEngine:
    def __init__(self, data: bytes) -> None:
        import onnxruntime as ort

        payload = json.loads(data[:data.index(b"\n")])
        self.profile = {name: [tuple(s) for s in shapes] for name, shapes in payload["profile"].items()}
        self.session = ort.InferenceSession(data[data.index(b"\n") + 1:], providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]
        types = {"tensor(float)": np.dtype(np.float32), "tensor(int64)": np.dtype(np.int64)}
        self.types = {v.name: types[v.type] for v in [*self.session.get_inputs(), *self.session.get_outputs()]}
        self.num_io_tensors = len(self.inputs) + len(self.outputs)

    def get_tensor_name(self, index: int) -> str:
        return [*self.inputs, *self.outputs][index]

    def get_tensor_mode(self, name: str) -> str:
        return "input" if name in self.inputs else "output"

    def get_tensor_dtype(self, name: str) -> np.dtype:
        return self.types[name]

    def create_execution_context(self) -> _FakeContext:
        return _FakeContext(self)


def _fake_tensorrt(builds: list[str]) -> SimpleNamespace:
    """TensorRT's Python names the session uses; an "engine" is the profile (JSON line) + the ONNX bytes."""

    class Logger:
        WARNING = 2

        def __init__(self, level: int) -> None: ...

    class Builder:
        def __init__(self, logger: Logger) -> None:
            self.shapes: dict = {}

        def create_network(self, flags: int) -> SimpleNamespace:
            return SimpleNamespace(data=None)

        def create_builder_config(self) -> SimpleNamespace:
            return SimpleNamespace(set_flag=lambda flag: None, add_optimization_profile=lambda profile: 0)

        def create_optimization_profile(self) -> SimpleNamespace:
            return SimpleNamespace(set_shape=lambda name, *shapes: self.shapes.__setitem__(name, shapes))

        def build_serialized_network(self, network: SimpleNamespace, config: SimpleNamespace) -> bytes:
            builds.append(network.data[:16].hex())
            return json.dumps({"profile": self.shapes}).encode() + b"\n" + network.data

    def parser(network: SimpleNamespace, logger: Logger) -> SimpleNamespace:
        return SimpleNamespace(parse=lambda data: setattr(network, "data", data) or True, num_errors=0)

    return SimpleNamespace(
        __version__="10.99.0-fake", Logger=Logger, Runtime=lambda logger: SimpleNamespace(deserialize_cuda_engine=_FakeEngine),
        Builder=Builder, OnnxParser=parser, BuilderFlag=SimpleNamespace(FP16="fp16"),
        TensorIOMode=SimpleNamespace(INPUT="input", OUTPUT="output"), nptype=lambda dtype: dtype,
    )


def _cpu_torch() -> SimpleNamespace:
    cuda = SimpleNamespace(current_stream=lambda device: SimpleNamespace(cuda_stream=0),
                           get_device_properties=lambda device: SimpleNamespace(name="Fake GPU", major=9, minor=0))
    return SimpleNamespace(device=lambda *args: torch.device("cpu"), empty=torch.empty, from_numpy=torch.from_numpy,
                           from_dlpack=torch.from_dlpack, cat=torch.cat, Tensor=torch.Tensor, cuda=cuda)


@pytest.fixture
def fake_tensorrt(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    from explainrt.runtime import tensorrt as tensorrt_session

    builds: list[str] = []
    fake = _fake_tensorrt(builds)
    monkeypatch.setattr(tensorrt_session, "load_tensorrt", lambda: (fake, _cpu_torch()))
    return builds


def test_tensorrt_session_logic_with_a_stand_in(fake_tensorrt, small_onnx, small_explainer, small_batch, tmp_path) -> None:  # noqa: ANN001
    profile = BatchProfile(min_batch=1, opt_batch=2, max_batch=2, max_targets=2)  # 3 images: two chunks
    session = TensorRTSession(small_onnx, profile=profile, cache_dir=tmp_path)
    targets = np.array([[-1, 1], [2, -2], [0, -1]], dtype=np.int64)
    reference = small_explainer.session
    for call in ("run", "input_gradients"):
        for objective in ("logit", "cross_entropy"):
            ours, theirs = (getattr(s, call)(small_batch, targets, objective) for s in (session, reference))
            np.testing.assert_array_equal(ours.targets, theirs.targets)
            for a, b in zip([ours.logits, *ours.activations, *ours.gradients], [theirs.logits, *theirs.activations, *theirs.gradients]):
                np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(session.logits(small_batch), reference.logits(small_batch), rtol=1e-5, atol=1e-6)
    acts = reference.run(small_batch, targets[:, :1]).activations[0]
    np.testing.assert_allclose(session.head(0, acts * 0.5, small_batch), reference.head(0, acts * 0.5, small_batch),
                               rtol=1e-5, atol=1e-6)
    assert len(fake_tensorrt) == 6  # 4 variants, the plain model, one head: each built once
    assert len(list(tmp_path.glob("*-sm90-fp32-*.engine"))) == 6
    again = TensorRTSession(small_onnx, profile=profile, cache_dir=tmp_path)
    np.testing.assert_array_equal(again.run(small_batch, targets).gradients[0], session.run(small_batch, targets).gradients[0])
    assert len(fake_tensorrt) == 6  # the second session read the cached engine
    with pytest.raises(InvalidInputError, match=r"K <= max_targets=2"):
        session.run(small_batch, np.zeros((3, 3), np.int64))
    with pytest.raises(InvalidInputError, match="layer must be 0..0, got 1"):
        session.head(1, acts, small_batch)


def test_tensorrt_runs_a_static_batch_model_in_chunks_as_onnxruntime_does(fake_tensorrt: list[str], tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch-2 export: the engine's profile fixes the batch at 2 on every input, and 3 images run as two calls
    of 2 (the last padded), through the chunking ONNX Runtime uses; results equal ONNX Runtime's."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten(), torch.nn.Linear(4, 3)).eval()
    torch.onnx.export(net, (torch.zeros(2, 3, 8, 8),), str(tmp_path / "static.onnx"), dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["logits"])
    reference = Explainer(str(tmp_path / "static.onnx"))
    model = reference.session.model
    shapes = BatchProfile(opt_batch=4, max_batch=8).shapes(model)
    assert shapes["input"] == ((2, 3, 8, 8),) * 3 and [s[0] for s in shapes[TARGETS_INPUT]] == [2, 2, 2]
    session = TensorRTSession(model, profile=BatchProfile(opt_batch=4, max_batch=8, max_targets=2), cache_dir=tmp_path)
    images = np.random.default_rng(0).standard_normal((3, 3, 8, 8)).astype(np.float32)
    targets = np.array([[0, 1], [2, -1], [1, 0]], dtype=np.int64)
    calls: list[int] = []  # the rows of each engine call
    from explainrt.runtime import tensorrt as tensorrt_session

    engine_call = tensorrt_session._Engine.__call__
    monkeypatch.setattr(tensorrt_session._Engine, "__call__",
                        lambda engine, feeds: calls.append(feeds["input"].shape[0]) or engine_call(engine, feeds))
    with torch.no_grad():
        expected = net(torch.from_numpy(images)).numpy()
    for ours, theirs in ((session.run(images, targets), reference.session.run(images, targets)),
                         (session.input_gradients(images, targets), reference.session.input_gradients(images, targets))):
        np.testing.assert_array_equal(ours.targets, theirs.targets)
        np.testing.assert_allclose(ours.logits, expected, rtol=1e-5, atol=1e-6)
        for a, b in zip([*ours.activations, *ours.gradients], [*theirs.activations, *theirs.gradients]):
            assert a.shape[0] == 3
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(session.logits(images), expected, rtol=1e-5, atol=1e-6)
    maps = session.maps(images, targets, "gradcam")
    np.testing.assert_allclose(maps.maps, reference.session.maps(images, targets, "gradcam").maps, rtol=1e-5, atol=1e-6)
    assert calls == [2, 2] * 5  # run, input_gradients, logits, and for maps the model and its head alone: 2 + 2 each


def test_tensorrt_map_heads_run_alone_on_the_models_outputs(fake_tensorrt, small_onnx, small_explainer, small_batch,  # noqa: ANN001
                                                           tmp_path) -> None:  # noqa: ANN001
    """A method whose head the model lacks: its head alone is an engine (no weights), run on the variant's
    activations and gradients, chunked like the model, K targets per image; maps equal ONNX Runtime's."""
    profile = BatchProfile(min_batch=1, opt_batch=2, max_batch=2, max_targets=2)  # 3 images: two chunks
    session = TensorRTSession(small_onnx, profile=profile, cache_dir=tmp_path)
    targets = np.array([[-1, 1], [2, -2], [0, -1]], dtype=np.int64)
    for method in ("gradcam", "layercam", "contrast-cam"):  # contrast-cam weighs the cross-entropy variant
        ours, theirs = session.maps(small_batch, targets, method), small_explainer.session.maps(small_batch, targets, method)
        assert ours.maps.shape == (3, 2, *small_batch.shape[2:]) and np.ptp(ours.maps) > 0
        np.testing.assert_array_equal(ours.targets, theirs.targets)
        for field in ("logits", "maps"):
            np.testing.assert_allclose(getattr(ours, field), getattr(theirs, field), rtol=1e-5, atol=1e-6)
    engines = list(tmp_path.glob("*.engine"))  # the model, its cross-entropy variant, three heads
    weights = sum(init.ByteSize() for init in small_onnx.graph.initializer)
    heads = [path for path in engines if path.stat().st_size < weights / 100]
    assert len(engines) == len(fake_tensorrt) == 5 and len(heads) == 3


def test_tensorrt_explainer_runs_grad_cams_head_in_the_models_engine(fake_tensorrt, small_onnx, small_explainer,  # noqa: ANN001
                                                                      small_batch, tmp_path, monkeypatch) -> None:  # noqa: ANN001
    """As on ONNX Runtime, the Explainer's TensorRT session puts Grad-CAM's head into the model's own engine: one
    call per chunk returning only the logits, the resolved targets and the maps (no trip of the activations and
    gradients to the host and into an engine of the head alone), with the full class ranking (TensorRT's TopK
    wants a constant depth); maps equal ONNX Runtime's. A method whose head is not in the call runs it alone."""
    from explainrt.runtime import tensorrt as tensorrt_session

    calls: list[tuple[int, tuple[str, ...]]] = []  # rows and outputs of each engine call
    engine_call = tensorrt_session._Engine.__call__
    monkeypatch.setattr(tensorrt_session._Engine, "__call__", lambda engine, feeds: calls.append(
        (next(iter(feeds.values())).shape[0], tuple(engine.outputs))) or engine_call(engine, feeds))
    profile = BatchProfile(min_batch=1, opt_batch=2, max_batch=2, max_targets=2)  # 3 images: two chunks
    explainer = Explainer(small_onnx, backend="tensorrt", backend_options={"profile": profile, "cache_dir": str(tmp_path)})
    assert explainer.session.main_maps == ("gradcam",)
    targets = [[-1, 1], [2, -2], [0, -1]]
    for method in ("gradcam", "layercam"):
        calls.clear()
        ours, theirs = (e.explain(small_batch, method=method, targets=targets) for e in (explainer, small_explainer))
        np.testing.assert_array_equal(ours.targets, theirs.targets)
        np.testing.assert_allclose(ours.maps, theirs.maps, rtol=1e-5, atol=1e-5)
        assert np.ptp(ours.maps) > 0.5
        if method == "gradcam":
            assert [rows for rows, _ in calls] == [2, 1]
            assert all(set(outputs) == {small_explainer.spec.logits, RESOLVED_TARGETS_OUTPUT, maps_output("gradcam")}
                       for _, outputs in calls)
        else:  # the full model's engine, then the head alone, per chunk
            assert [rows for rows, _ in calls] == [2, 1, 2, 1]
    built = [onnx.load_from_string(path.read_bytes().split(b"\n", 1)[1]) for path in tmp_path.glob("*.engine")]
    main = next(m for m in built if any(o.name == maps_output("gradcam") for o in m.graph.output))
    assert not any(o.name.startswith("explainrt.gradients") for o in main.graph.output)
    assert not any(n.name.startswith("explainrt/targets/depth") for n in main.graph.node)  # shallow_target_ranking's


def test_tensorrt_defended_gradients_are_a_clear_error(fake_tensorrt, small_onnx, small_batch, tmp_path) -> None:  # noqa: ANN001
    session = TensorRTSession(small_onnx, cache_dir=tmp_path)
    with pytest.raises(BackendUnavailableError, match="not built for the TensorRT backend yet"):
        session.defended_input_gradients(small_batch, np.zeros((3, 1), np.int64))


class _HostArrayAsDevice:
    """A host array behind ``__cuda_array_interface__`` (and ``shape``, as CuPy arrays and torch tensors
    have): drives the IO-binding path on the CPU."""

    def __init__(self, array: np.ndarray) -> None:
        self.array = np.ascontiguousarray(array)
        self.shape = self.array.shape
        self.__cuda_array_interface__ = {"shape": self.array.shape, "typestr": self.array.dtype.str, "strides": None,
                                         "data": (self.array.ctypes.data, False), "version": 3}


def test_io_binding_path_matches_plain_run(small_onnx, small_explainer, small_batch) -> None:  # noqa: ANN001
    """The CUDA provider's IO-binding code, with ONNX Runtime's CPU device standing in for CUDA."""
    session = OnnxRuntimeSession(small_onnx)
    session.on_cuda, session.io_device = True, "cpu"
    targets = np.array([[-1, 1], [2, -2], [0, -1]], dtype=np.int64)
    reference = small_explainer.session.run(small_batch, targets)
    for images in (small_batch, _HostArrayAsDevice(small_batch)):  # copied from the host / bound in place
        result = session.run(images, targets)
        for ours, theirs in zip([result.logits, result.targets, *result.activations, *result.gradients],
                                [reference.logits, reference.targets, *reference.activations, *reference.gradients]):
            np.testing.assert_array_equal(ours, theirs)
    np.testing.assert_array_equal(session.logits(_HostArrayAsDevice(small_batch)), small_explainer.session.logits(small_batch))
    strided = _HostArrayAsDevice(small_batch)
    strided.__cuda_array_interface__["strides"] = (4, 4, 4, 4)
    strided.flags = SimpleNamespace(c_contiguous=False)
    with pytest.raises(InvalidInputError, match="the CUDA array for 'input' must be C-contiguous"):
        session.run(strided, targets)
