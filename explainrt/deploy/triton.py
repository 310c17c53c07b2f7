"""A Triton Inference Server model repository for an explainable ONNX model.

``write_triton_repository(model, DIR)`` writes ``DIR/<name>/config.pbtxt`` and
``DIR/<name>/1/model.onnx``: Triton's ONNX Runtime backend then serves the explanation outputs
(``explainrt.activations.<i>``, ``explainrt.gradients.<i>``, ``explainrt.resolved_targets``, and
with ``maps`` the heatmaps ``explainrt.maps.<method>`` [K, H, W] per image, computed in the graph)
beside the logits, with dynamic batching. The config is built as Triton's own ``ModelConfig``
protobuf message (the schema shipped in ``tritonclient``), so a misspelt field cannot get in, and
it is parsed back from the written text before the repository is moved into place.

Dims exclude the batch axis when ``max_batch_size > 0`` (Triton's convention) and use -1 for
dynamic sizes; ``explainrt.targets`` is ``[-1]`` (K targets per image). Triton batches requests
only when their non-batch shapes agree, so requests asking for the same number of targets K
share a runtime call.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import onnx
from onnx import TensorProto

from explainrt.errors import BackendUnavailableError, InvalidInputError, InvalidModelError
from explainrt.export.explainable import make_explainable
from explainrt.export.heads import add_map_heads
from explainrt.export.spec import METADATA_KEY, ExplainableSpec, ModelSource, is_explainable, load_model

log = logging.getLogger(__name__)

CONFIG_FILE = "config.pbtxt"
MODEL_FILE = "model.onnx"
PLATFORM = "onnxruntime_onnx"
INSTANCE_KINDS = {"cpu": "KIND_CPU", "gpu": "KIND_GPU", "auto": "KIND_AUTO"}
DEFAULT_MAX_BATCH_SIZE = 16
DEFAULT_MAX_QUEUE_DELAY_US = 5000

_DATA_TYPES = {
    TensorProto.FLOAT: "TYPE_FP32",
    TensorProto.FLOAT16: "TYPE_FP16",
    TensorProto.BFLOAT16: "TYPE_BF16",
    TensorProto.DOUBLE: "TYPE_FP64",
    TensorProto.INT8: "TYPE_INT8",
    TensorProto.INT16: "TYPE_INT16",
    TensorProto.INT32: "TYPE_INT32",
    TensorProto.INT64: "TYPE_INT64",
    TensorProto.UINT8: "TYPE_UINT8",
    TensorProto.UINT16: "TYPE_UINT16",
    TensorProto.UINT32: "TYPE_UINT32",
    TensorProto.UINT64: "TYPE_UINT64",
    TensorProto.BOOL: "TYPE_BOOL",
    TensorProto.STRING: "TYPE_STRING",
}
"""ONNX element type -> Triton DataType name."""

_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def model_config_schema() -> Any:
    """Triton's ``model_config_pb2`` module (from ``tritonclient[grpc]``)."""
    try:
        from tritonclient.grpc import model_config_pb2
    except (ImportError, RuntimeError) as error:  # tritonclient raises RuntimeError without grpcio
        raise BackendUnavailableError("Triton export needs Triton's model config schema: "
                                      f"pip install 'tritonclient[grpc]' ({error})") from error
    return model_config_pb2


def write_triton_repository(
    model: ModelSource,
    directory: str | os.PathLike,
    name: str = "explainrt",
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
    preferred_batch_sizes: Sequence[int] | None = None,
    max_queue_delay_us: int = DEFAULT_MAX_QUEUE_DELAY_US,
    instance_count: int = 1,
    instance_kind: str = "cpu",
    force: bool = False,
    maps: str | Sequence[str] = (),
    maps_only: bool = False,
    maps_dtype: str = "float32",
) -> Path:
    """Write ``directory/name/{config.pbtxt, 1/model.onnx}``; return the model folder.

    ``model``: an explainable ONNX model (a plain one is made explainable with the auto target
    layer). ``max_batch_size`` 0 turns batching off (dims then include the batch axis);
    ``preferred_batch_sizes`` default to half and all of ``max_batch_size``. ``instance_kind``:
    "cpu", "gpu" or "auto". An existing non-empty ``directory/name`` is replaced only with
    ``force``; the new folder is assembled beside it and renamed into place, so a failure
    leaves the repository as it was. ``maps``, ``maps_only``, ``maps_dtype``: map heads added to the
    model (``explainrt.export.heads.add_map_heads``), so Triton returns heatmaps.
    """
    target = check_triton_target(directory, name, max_batch_size, preferred_batch_sizes, max_queue_delay_us,
                                 instance_count, instance_kind, force)
    proto = load_model(model)
    if not is_explainable(proto):
        log.info("the model is not explainable yet: making it explainable (auto target layer)")
        proto = make_explainable(proto)
    if maps:
        proto = add_map_heads(proto, maps, maps_only, maps_dtype)
    elif maps_only:
        raise InvalidInputError("maps_only=True needs maps: name the methods whose maps the model returns")
    config = triton_config(proto, name, max_batch_size, preferred_batch_sizes, max_queue_delay_us,
                           instance_count, instance_kind)
    text = _text_format().MessageToString(config)
    serialized = proto.SerializeToString()

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{name}.{uuid.uuid4().hex}.tmp")
    try:
        (staging / "1").mkdir(parents=True)
        (staging / CONFIG_FILE).write_text(text)
        (staging / "1" / MODEL_FILE).write_bytes(serialized)
        if read_triton_config(staging / CONFIG_FILE) != config:
            raise InvalidModelError(f"{CONFIG_FILE} does not parse back to the ModelConfig it was written from")
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("wrote Triton model %r to %s", name, target)
    return target


def check_triton_target(directory: str | os.PathLike, name: str, max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
                        preferred_batch_sizes: Sequence[int] | None = None,
                        max_queue_delay_us: int = DEFAULT_MAX_QUEUE_DELAY_US, instance_count: int = 1,
                        instance_kind: str = "cpu", force: bool = False) -> Path:
    """Check the settings, the schema's availability and the model folder before any (slow) export;
    return the model folder ``directory/name``."""
    _check_settings(name, max_batch_size, preferred_batch_sizes, max_queue_delay_us, instance_count, instance_kind)
    model_config_schema()
    target = Path(directory) / name
    if target.exists() and not target.is_dir():
        raise InvalidInputError(f"Triton model folder {str(target)!r} exists and is not a folder")
    if target.is_dir() and any(target.iterdir()) and not force:
        raise InvalidInputError(f"Triton model folder {str(target)!r} exists and is not empty "
                                "(use force=True / --force to replace it)")
    return target


def triton_config(model: onnx.ModelProto, name: str, max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
                  preferred_batch_sizes: Sequence[int] | None = None,
                  max_queue_delay_us: int = DEFAULT_MAX_QUEUE_DELAY_US, instance_count: int = 1,
                  instance_kind: str = "cpu") -> Any:
    """The ``inference.ModelConfig`` message serving the explainable ``model`` on ONNX Runtime."""
    _check_settings(name, max_batch_size, preferred_batch_sizes, max_queue_delay_us, instance_count, instance_kind)
    schema = model_config_schema()
    spec = ExplainableSpec.from_model(model)
    config = schema.ModelConfig(name=name, platform=PLATFORM, max_batch_size=max_batch_size)
    initializers = {tensor.name for tensor in model.graph.initializer}
    for value in model.graph.input:
        if value.name not in initializers:
            config.input.append(schema.ModelInput(**_tensor_fields(value, max_batch_size, schema)))
    for value in model.graph.output:
        config.output.append(schema.ModelOutput(**_tensor_fields(value, max_batch_size, schema)))
    if max_batch_size > 0:
        preferred = preferred_batch_sizes or sorted({max(1, max_batch_size // 2), max_batch_size})
        config.dynamic_batching.preferred_batch_size.extend(preferred)
        config.dynamic_batching.max_queue_delay_microseconds = max_queue_delay_us
    config.instance_group.append(schema.ModelInstanceGroup(
        count=instance_count, kind=schema.ModelInstanceGroup.Kind.Value(INSTANCE_KINDS[instance_kind])))
    config.parameters[METADATA_KEY].string_value = spec.to_json()  # what clients need to preprocess
    return config


def read_triton_config(path: str | os.PathLike) -> Any:
    """Parse a ``config.pbtxt`` into an ``inference.ModelConfig`` message."""
    return read_triton_config_text(Path(path).read_text())


def read_triton_config_text(text: str) -> Any:
    """Parse ModelConfig text format; a malformed config raises InvalidModelError."""
    schema = model_config_schema()
    text_format = _text_format()
    try:
        return text_format.Parse(text, schema.ModelConfig())
    except text_format.ParseError as error:
        raise InvalidModelError(f"invalid Triton model config: {error}") from error


def _text_format() -> Any:
    from google.protobuf import text_format

    return text_format


def _tensor_fields(value: onnx.ValueInfoProto, max_batch_size: int, schema: Any) -> dict[str, Any]:
    """name, data_type and dims (without the batch axis when batching) of one graph input or output."""
    tensor = value.type.tensor_type
    if tensor.elem_type not in _DATA_TYPES:
        raise InvalidModelError(f"tensor {value.name!r} has ONNX element type "
                                f"{TensorProto.DataType.Name(tensor.elem_type)}, which Triton cannot carry")
    if not tensor.HasField("shape"):
        raise InvalidModelError(f"tensor {value.name!r} has no shape in the ONNX model: Triton needs its rank")
    dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim]
    if max_batch_size > 0:
        if not dims:
            raise InvalidModelError(f"tensor {value.name!r} is a scalar: it has no batch axis for max_batch_size "
                                    f"{max_batch_size} (use max_batch_size 0)")
        if dims[0] != -1:
            raise InvalidModelError(f"tensor {value.name!r} has a fixed batch size {dims[0]}: export the model with "
                                    "a dynamic batch axis, or use max_batch_size 0")
        dims = dims[1:]
    data_type = schema.DataType.Value(_DATA_TYPES[tensor.elem_type])
    return {"name": value.name, "data_type": data_type, "dims": dims}


def _check_settings(name: str, max_batch_size: int, preferred_batch_sizes: Sequence[int] | None,
                    max_queue_delay_us: int, instance_count: int, instance_kind: str) -> None:
    if not isinstance(name, str) or not _MODEL_NAME.fullmatch(name):
        raise InvalidInputError(f"Triton model name {name!r} must be letters, digits, '_', '.' or '-' "
                                "(and not start with '.' or '-')")
    if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size < 0:
        raise InvalidInputError(f"max_batch_size must be an integer >= 0 (0: no batching), got {max_batch_size!r}")
    if preferred_batch_sizes is not None:
        if max_batch_size == 0:
            raise InvalidInputError("preferred_batch_sizes need batching: max_batch_size is 0")
        bad = [size for size in preferred_batch_sizes if not 1 <= size <= max_batch_size]
        if bad or not preferred_batch_sizes:
            raise InvalidInputError(f"preferred_batch_sizes must be 1..max_batch_size ({max_batch_size}), "
                                    f"got {list(preferred_batch_sizes)}")
    if isinstance(max_queue_delay_us, bool) or not isinstance(max_queue_delay_us, int) or max_queue_delay_us < 0:
        raise InvalidInputError(f"max_queue_delay_us must be an integer >= 0, got {max_queue_delay_us!r}")
    if isinstance(instance_count, bool) or not isinstance(instance_count, int) or instance_count < 1:
        raise InvalidInputError(f"instance_count must be an integer >= 1, got {instance_count!r}")
    if instance_kind not in INSTANCE_KINDS:
        raise InvalidInputError(f"instance_kind must be one of {sorted(INSTANCE_KINDS)}, got {instance_kind!r}")
