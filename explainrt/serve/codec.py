"""Request decoding for the server: JSON bodies, image instances, V2 tensors, and the limits on each.

Everything a client sends is checked here before it reaches a model, so a bad request is an
``InvalidInputError`` (400) or ``RequestTooLargeError`` (413) naming the problem, never a crash
in a worker. Limits are checked before work: the body size from its length header (and while it
streams in), an encoded image's pixel count from its header before its pixels are decompressed.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from explainrt.errors import ImageReadError, InvalidInputError, RequestTooLargeError
from explainrt.methods import get_method
from explainrt.preprocessing import load_image

DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024
DEFAULT_MAX_PIXELS = 4096 * 4096

V2_DATATYPES = {"UINT8": np.uint8, "FP32": np.float32, "INT64": np.int64, "INT32": np.int32}
"""Datatypes of the tensors a request may carry."""
V2_OUTPUT_DATATYPES = {**V2_DATATYPES, "FP16": np.float16}
"""Datatypes of the tensors a response may carry (FP16 maps)."""
HEADER_LENGTH = "Inference-Header-Content-Length"
"""The Open Inference Protocol's binary tensor extension: the JSON part's length; raw tensors follow it."""
BINARY_CONTENT_TYPE = "application/octet-stream"
MAP_FORMATS = ("FP32", "FP16", "UINT8", "PNG")
"""How maps may be returned: float32, float16, uint8 round(255 x map), or one 8-bit grayscale PNG per map (BYTES)."""
OVERLAY_FORMAT = "OVERLAY"
V2_MAP_FORMATS = {"FP32": "FP32 [N, (K,) H, W]", "FP16": "FP16 [N, (K,) H, W]",
                  "UINT8": "UINT8 [N, (K,) H, W]: round(255 x map)",
                  "PNG": "BYTES [N, (K)]: one 8-bit grayscale PNG per map",
                  OVERLAY_FORMAT: "BYTES [N, (K)]: one colour PNG per map, drawn over its image as V1's overlay "
                                  '(UINT8 image input only; "caption": true captions it)'}
"""The server's V2 map formats (output parameter ``format``) and what each returns: ``MAP_FORMATS`` and OVERLAY,
which needs the original images (UINT8 input) and is drawn as V1's ``"return": ["overlay"]`` draws it. K: with K
targets per instance."""


@dataclass(frozen=True)
class Limits:
    """What one request may carry."""

    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_instances: int = 64  # images per request (--max-images)


async def read_json(content_length: str | None, chunks: AsyncIterator[bytes], limits: Limits) -> Any:
    """The request body parsed as JSON, refusing oversized bodies before reading (or while reading) them."""
    return parse_json(await read_body(content_length, chunks, limits))


async def read_v2(content_length: str | None, header_length: str | None, chunks: AsyncIterator[bytes],
                  limits: Limits) -> tuple[Any, bytes]:
    """An Open Inference Protocol body: its JSON part and, with ``Inference-Header-Content-Length``, the
    binary tensor data after it."""
    body = await read_body(content_length, chunks, limits)
    if header_length is None:
        return parse_json(body), b""
    if not header_length.isdigit() or int(header_length) > len(body):
        raise InvalidInputError(f"{HEADER_LENGTH} must be the JSON part's length in bytes, at most the body's "
                                f"{len(body)}; got {header_length!r}")
    return parse_json(body[:int(header_length)]), body[int(header_length):]


async def read_body(content_length: str | None, chunks: AsyncIterator[bytes], limits: Limits) -> bytes:
    """The raw request body, refusing oversized bodies before reading (or while reading) them."""
    if content_length is not None and content_length.isdigit() and int(content_length) > limits.max_body_bytes:
        raise RequestTooLargeError(f"request body of {int(content_length)} bytes exceeds the limit of "
                                   f"{limits.max_body_bytes} bytes (--max-body-mb)")
    body = bytearray()
    async for chunk in chunks:
        body += chunk
        if len(body) > limits.max_body_bytes:
            raise RequestTooLargeError(f"request body exceeds the limit of {limits.max_body_bytes} bytes (--max-body-mb)")
    return bytes(body)


def parse_json(body: bytes) -> Any:
    """Parse a JSON body; empty, non-UTF-8, malformed and absurdly nested bodies are InvalidInputError."""
    if not body.strip():
        raise InvalidInputError("empty request body: expected a JSON object")
    try:
        return json.loads(body)
    except UnicodeDecodeError as error:
        raise InvalidInputError(f"request body is not UTF-8 text: {error}") from None
    except json.JSONDecodeError as error:
        raise InvalidInputError(f"request body is not valid JSON: {error.msg} at line {error.lineno} "
                                f"column {error.colno}") from None
    except RecursionError:
        raise InvalidInputError("request body is not valid JSON: nested too deeply") from None


def json_object(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidInputError(f"{what} must be a JSON object, got {_json_type(value)}")
    return value


def decode_instances(body: Any, limits: Limits) -> list[np.ndarray]:
    """The images of a KServe V1 body ``{"instances": [...]}`` as uint8 [H, W, 3] arrays."""
    instances = json_object(body, "the request body").get("instances")
    if not isinstance(instances, list) or not instances:
        raise InvalidInputError('the request body needs "instances": a non-empty list of images '
                                '({"image": {"b64": ...}} or [H][W][3] uint8 arrays)')
    if len(instances) > limits.max_instances:
        raise RequestTooLargeError(f"{len(instances)} images exceed the limit of {limits.max_instances} per request "
                                   "(--max-images)")
    images = []
    for index, instance in enumerate(instances):
        try:
            images.append(decode_instance(instance, limits))
        except InvalidInputError as error:
            raise type(error)(f"instance {index}: {error}") from None
    return images


def decode_instance(instance: Any, limits: Limits) -> np.ndarray:
    """One V1 instance: ``{"image": {"b64": ...}}``, ``{"b64": ...}`` or a nested [H][W][3] uint8 array."""
    if isinstance(instance, dict):
        image = instance.get("image", instance)
        if not isinstance(image, dict) or not isinstance(image.get("b64"), str):
            raise InvalidInputError('an instance object must be {"image": {"b64": "<base64 PNG or JPEG>"}}')
        return decode_b64_image(image["b64"], limits)
    if isinstance(instance, list):
        return decode_pixel_array(instance, limits)
    raise InvalidInputError(f'an instance must be {{"image": {{"b64": ...}}}} or an [H][W][3] uint8 array, '
                            f"got {_json_type(instance)}")


def decode_b64_image(text: str, limits: Limits) -> np.ndarray:
    """A base64 PNG or JPEG (a ``data:`` URL prefix is allowed) as uint8 RGB, within the pixel limit."""
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as error:
        raise InvalidInputError(f"image.b64 is not valid base64: {error}") from None
    if not data:
        raise ImageReadError("image.b64 is empty")
    buffer = io.BytesIO(data)
    try:
        with Image.open(buffer) as probe:
            width, height = probe.size
    except Exception as error:  # PIL raises many types for unreadable data; load_image names them too
        reason = str(error).replace(repr(buffer), "the data")  # PIL names an in-memory file by its object repr
        raise ImageReadError(f"image.b64 is not a readable PNG or JPEG image: {reason}") from None
    check_pixels(height, width, limits)
    return load_image(data, max_pixels=limits.max_pixels)


def decode_pixel_array(rows: list[Any], limits: Limits) -> np.ndarray:
    """A nested [H][W][3] list of integers in 0..255 as uint8, within the pixel limit."""
    height = len(rows)
    width = len(rows[0]) if height and isinstance(rows[0], list) else 0
    check_pixels(height, width, limits)
    try:
        pixels = np.asarray(rows)
    except ValueError as error:  # ragged nesting
        raise InvalidInputError(f"the pixel array is ragged: {error}") from None
    if pixels.ndim != 3 or pixels.shape[2] != 3 or 0 in pixels.shape:
        raise InvalidInputError(f"a pixel array must have shape [H][W][3], got {list(pixels.shape)}")
    return to_uint8(pixels, "the pixel array")


def check_pixels(height: int, width: int, limits: Limits) -> None:
    if height * width > limits.max_pixels:
        raise RequestTooLargeError(f"image of {width}x{height} = {width * height} pixels exceeds the limit of "
                                   f"{limits.max_pixels} pixels (--max-pixels)")


def to_uint8(values: np.ndarray, what: str) -> np.ndarray:
    """Integers in 0..255 as uint8; anything else (floats, booleans, strings, out of range) is refused."""
    if values.dtype == np.uint8:
        return values
    if values.dtype.kind not in "iu":
        raise InvalidInputError(f"{what} must hold integers in 0..255, got {_numpy_kind(values)}")
    if values.size and (values.min() < 0 or values.max() > 255):
        raise InvalidInputError(f"{what} must hold integers in 0..255, got values in [{values.min()}, {values.max()}]")
    return values.astype(np.uint8)


@dataclass(frozen=True)
class V2Tensor:
    name: str
    datatype: str
    array: np.ndarray


def decode_v2_inputs(body: Any, limits: Limits, binary: bytes = b"") -> dict[str, V2Tensor]:
    """The ``inputs`` of an Open Inference Protocol request, by name, with shape and datatype checked.

    An input with parameter ``binary_data_size`` takes that many bytes of ``binary`` (the data after
    the JSON part, in input order) as its raw little-endian values instead of ``data``.
    """
    inputs = json_object(body, "the request body").get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise InvalidInputError('the request body needs "inputs": a non-empty list of tensors '
                                '{"name", "shape", "datatype", "data"}')
    tensors: dict[str, V2Tensor] = {}
    offset = 0
    for index, item in enumerate(inputs):
        tensor, offset = _v2_tensor(json_object(item, f"inputs[{index}]"), index, limits, binary, offset)
        if tensor.name in tensors:
            raise InvalidInputError(f"input {tensor.name!r} is given twice")
        tensors[tensor.name] = tensor
    if offset != len(binary):
        raise InvalidInputError(f"the body carries {len(binary)} bytes of binary tensor data, but the inputs' "
                                f"binary_data_size parameters add up to {offset}")
    return tensors


def _binary_size(item: dict[str, Any], name: str) -> int | None:
    parameters = item.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise InvalidInputError(f"input {name!r}: parameters must be an object")
    size = parameters.get("binary_data_size")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 0):
        raise InvalidInputError(f"input {name!r}: binary_data_size must be a byte count, got {size!r}")
    return size


def _v2_tensor(item: dict[str, Any], index: int, limits: Limits, binary: bytes, offset: int) -> tuple[V2Tensor, int]:
    name, shape, datatype, data = (item.get(key) for key in ("name", "shape", "datatype", "data"))
    if not isinstance(name, str) or not name:
        raise InvalidInputError(f"inputs[{index}] needs a \"name\" string")
    if datatype not in V2_DATATYPES:
        raise InvalidInputError(f"input {name!r}: datatype {datatype!r} is not supported; use one of "
                                f"{', '.join(V2_DATATYPES)}")
    if (not isinstance(shape, list) or not shape
            or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)):
        raise InvalidInputError(f"input {name!r}: shape must be a list of positive integers, got {shape!r}")
    count = math.prod(shape)
    if count > limits.max_pixels * 3 * limits.max_instances:
        raise RequestTooLargeError(f"input {name!r}: shape {shape} holds {count} values, over the server's limit")
    size = _binary_size(item, name)
    if size is not None and data is not None:
        raise InvalidInputError(f"input {name!r}: give \"data\" or parameter binary_data_size, not both")
    if size is not None:
        return V2Tensor(name, datatype, _raw_tensor(name, datatype, shape, binary[offset:offset + size], size)), offset + size
    if not isinstance(data, list):
        raise InvalidInputError(f"input {name!r}: data must be a (flat or nested) list of numbers")
    try:
        values = np.asarray(data)
    except ValueError as error:
        raise InvalidInputError(f"input {name!r}: data is ragged: {error}") from None
    if values.size != count:
        raise InvalidInputError(f"input {name!r}: data has {values.size} values but shape {shape} needs {count}")
    if values.dtype.kind not in "iuf" or values.dtype == np.bool_:
        raise InvalidInputError(f"input {name!r}: data must be numbers, got {_numpy_kind(values)}")
    if datatype == "FP32":
        array = values.astype(np.float32)
    elif values.dtype.kind == "f":
        raise InvalidInputError(f"input {name!r}: datatype {datatype} needs integers, got floating-point data")
    elif datatype == "UINT8":
        array = to_uint8(values, f"input {name!r}")
    else:
        array = values.astype(V2_DATATYPES[datatype])
    return V2Tensor(name, datatype, array.reshape(shape)), offset


def _raw_tensor(name: str, datatype: str, shape: list[int], raw: bytes, size: int) -> np.ndarray:
    """Raw little-endian values of a binary input, their byte count checked against shape and datatype."""
    dtype = np.dtype(V2_DATATYPES[datatype]).newbyteorder("<")
    if len(raw) != size:
        raise InvalidInputError(f"input {name!r}: binary_data_size is {size} but only {len(raw)} bytes of binary "
                                "data are left in the body")
    if size != math.prod(shape) * dtype.itemsize:
        raise InvalidInputError(f"input {name!r}: {size} bytes of binary data, but {datatype} {shape} takes "
                                f"{math.prod(shape) * dtype.itemsize}")
    return np.frombuffer(raw, dtype=dtype).astype(V2_DATATYPES[datatype]).reshape(shape)


def v2_output(name: str, array: np.ndarray, binary: bool = False) -> tuple[dict[str, Any], bytes]:
    """One Open Inference Protocol output tensor: row-major flat ``data`` in JSON, or with ``binary`` its raw
    little-endian bytes (returned) and parameter ``binary_data_size``. Object arrays of bytes are BYTES tensors
    (base64 strings in JSON; each element 4-byte little-endian length then its bytes in binary)."""
    if array.dtype == object:
        if binary:
            raw = b"".join(len(item).to_bytes(4, "little") + item for item in array.ravel())
            return _binary_tensor(name, "BYTES", array.shape, raw)
        data = [base64.b64encode(item).decode("ascii") for item in array.ravel()]
        return {"name": name, "datatype": "BYTES", "shape": list(array.shape), "data": data}, b""
    array, datatype = v2_datatype(array)
    if binary:
        return _binary_tensor(name, datatype, array.shape, np.ascontiguousarray(array, array.dtype.newbyteorder("<")).tobytes())
    return {"name": name, "datatype": datatype, "shape": list(array.shape), "data": array.ravel().tolist()}, b""


def v2_datatype(array: np.ndarray) -> tuple[np.ndarray, str]:
    """A numeric output array and its V2 datatype (``V2_OUTPUT_DATATYPES``; other dtypes become FP32)."""
    datatype = {np.dtype(t): n for n, t in V2_OUTPUT_DATATYPES.items()}.get(array.dtype)
    return (array, datatype) if datatype is not None else (array.astype(np.float32), "FP32")


def _binary_tensor(name: str, datatype: str, shape: tuple[int, ...], raw: bytes) -> tuple[dict[str, Any], bytes]:
    return {"name": name, "datatype": datatype, "shape": list(shape), "parameters": {"binary_data_size": len(raw)}}, raw


def encode_maps(maps: np.ndarray, form: str, normalized: bool) -> np.ndarray:
    """Maps [N, H, W] in a ``MAP_FORMATS`` form: FP32, FP16, UINT8 round(255 x map), or PNG (an object array
    of one 8-bit grayscale PNG per map). UINT8 and PNG need normalised maps."""
    if form not in MAP_FORMATS:
        raise InvalidInputError(f"map format must be one of {', '.join(MAP_FORMATS)}; got {form!r}")
    if form == "FP32":
        return maps.astype(np.float32, copy=False)
    if form == "FP16":
        return maps.astype(np.float16)
    if not normalized:
        raise InvalidInputError(f"map format {form} holds maps scaled to [0, 1]: drop \"normalize\": false")
    quantized = np.round(np.clip(maps, 0, 1) * 255).astype(np.uint8)
    if form == "UINT8":
        return quantized
    return encode_pngs(quantized)


def encode_pngs(images: np.ndarray) -> np.ndarray:
    """One PNG per image of ``images`` (uint8 [N, H, W] grayscale or [N, H, W, 3] RGB), as an object array of
    bytes: a V2 BYTES tensor [N]."""
    encoded = np.empty(len(images), dtype=object)
    for index, image in enumerate(images):  # one by one: a list would pass through a fixed-width bytes array
        encoded[index] = png_bytes(image)
    return encoded


def png_bytes(image: np.ndarray) -> bytes:
    """A uint8 [H, W] grayscale or [H, W, 3] RGB image as PNG bytes (fast compression)."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def png_b64(rgb: np.ndarray) -> str:
    """A uint8 [H, W, 3] image as base64 PNG text."""
    return base64.b64encode(png_bytes(rgb)).decode("ascii")


def _json_type(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number")


def _numpy_kind(values: np.ndarray) -> str:
    return {"f": "floating-point values", "b": "booleans", "U": "strings", "O": "mixed values"}.get(
        values.dtype.kind, str(values.dtype))


def method_parameters(parameters: dict[str, Any], reserved: Sequence[str]) -> tuple[str, dict[str, Any], bool]:
    """The method (checked against the registry), its options (checked against its declarations), and ``normalize``.

    ``reserved`` names the parameters the front-end reads itself; every other one is an option of
    the method. The options are returned as given (JSON values, which key the batcher's jobs); the
    pipeline validates them again into the values the method reads.
    """
    name = parameters.get("method", "gradcam")
    if not isinstance(name, str):
        raise InvalidInputError(f"parameter method must be a method name, got {name!r}")
    method = get_method(name)
    options = {key: value for key, value in parameters.items() if key not in reserved}
    method.check_options(options)
    normalize = parameters.get("normalize", True)
    if not isinstance(normalize, bool):
        raise InvalidInputError(f"parameter normalize must be true or false, got {normalize!r}")
    return method.name, options, normalize
