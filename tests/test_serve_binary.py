"""The Open Inference Protocol's binary tensor extension and compact map formats, in process.

Requests and responses are built and parsed by hand from the extension's definition
(``Inference-Header-Content-Length``, raw little-endian tensors in input/output order,
``binary_data_size``; BYTES elements as a 4-byte little-endian length and the bytes), and the maps
checked against the same Explainer run directly.
"""

from __future__ import annotations

import base64
import io
import json
import re
from collections.abc import Iterator

import numpy as np
import pytest
from conftest import SMALL_SIZE
from fastapi.testclient import TestClient
from PIL import Image

from explainrt import Explainer
from explainrt.overlay import overlay
from explainrt.preprocessing import Preprocessing
from explainrt.serve import codec
from explainrt.serve.app import create_app

HEADER = "Inference-Header-Content-Length"


@pytest.fixture(scope="module")
def raw_explainer(small_onnx) -> Explainer:  # noqa: ANN001
    """The small ResNet-18 with a preprocessing, so it takes raw UINT8 images (and draws overlays)."""
    preprocessing = Preprocessing(SMALL_SIZE, SMALL_SIZE[0], (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    return Explainer(small_onnx, preprocessing=preprocessing)


@pytest.fixture(scope="module")
def client(small_explainer, raw_explainer: Explainer) -> Iterator[TestClient]:  # noqa: ANN001
    with TestClient(create_app({"small": small_explainer, "raw": raw_explainer})) as test_client:
        yield test_client


def binary_request(header: dict, tensors: list[np.ndarray]) -> tuple[bytes, dict[str, str]]:
    """A body of the JSON header then the tensors' raw little-endian bytes, and its headers."""
    text = json.dumps(header).encode()
    return text + b"".join(np.ascontiguousarray(t).astype(t.dtype.newbyteorder("<")).tobytes() for t in tensors), {
        HEADER: str(len(text)), "Content-Type": "application/octet-stream"}


def parse_binary_response(body: bytes, length: int) -> dict[str, object]:
    """Outputs by name: arrays decoded from the binary part (a BYTES tensor as an object array of its elements,
    each sent as a 4-byte little-endian length then its bytes), or JSON data."""
    header = json.loads(body[:length])
    dtypes = {"FP32": "<f4", "FP16": "<f2", "UINT8": "u1", "INT64": "<i8"}
    offset, outputs = length, {}
    for output in header["outputs"]:
        size = output.get("parameters", {}).get("binary_data_size")
        if size is None:
            outputs[output["name"]] = np.reshape(output["data"], output["shape"])
            continue
        raw = body[offset:offset + size]
        offset += size
        if output["datatype"] == "BYTES":
            items, at = [], 0
            while at < len(raw):
                count = int.from_bytes(raw[at:at + 4], "little")
                items.append(raw[at + 4:at + 4 + count])
                at += 4 + count
            outputs[output["name"]] = np.array(items, dtype=object).reshape(output["shape"])
        else:
            outputs[output["name"]] = np.frombuffer(raw, dtype=dtypes[output["datatype"]]).reshape(output["shape"])
    assert offset == len(body)
    return outputs


def test_binary_request_and_response_with_compact_maps(client: TestClient, small_explainer, small_batch) -> None:  # noqa: ANN001
    targets = np.array([3, -1, 7], dtype=np.int64)
    reference = small_explainer.explain(small_batch, targets=targets)
    header = {"inputs": [
        {"name": "input", "shape": list(small_batch.shape), "datatype": "FP32",
         "parameters": {"binary_data_size": small_batch.nbytes}},
        {"name": "explainrt.targets", "shape": [3], "datatype": "INT64", "parameters": {"binary_data_size": 24}}],
        "parameters": {"method": "gradcam"}}
    for form, check in (("FP32", lambda m: np.testing.assert_allclose(m, reference.maps, atol=1e-6)),
                        ("FP16", lambda m: np.testing.assert_allclose(m, reference.maps, atol=1e-3)),
                        ("UINT8", lambda m: np.testing.assert_array_equal(m, np.round(reference.maps * 255))),
                        ("PNG", lambda m: np.testing.assert_array_equal(
                            np.stack([np.asarray(Image.open(io.BytesIO(item))) for item in m]),
                            np.round(reference.maps * 255)))):
        body, headers = binary_request({**header, "outputs": [
            {"name": "logits"}, {"name": "explainrt.maps", "parameters": {"binary_data": True, "format": form}},
            {"name": "explainrt.resolved_targets", "parameters": {"binary_data": True}}]}, [small_batch, targets])
        response = client.post("/v2/models/small/infer", content=body, headers=headers)
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == "application/octet-stream"
        outputs = parse_binary_response(response.content, int(response.headers[HEADER]))
        check(outputs["explainrt.maps"])
        np.testing.assert_array_equal(outputs["explainrt.resolved_targets"], reference.targets)
        np.testing.assert_allclose(outputs["logits"], reference.logits, rtol=1e-5, atol=1e-5)  # JSON, not binary
    assert len(outputs["explainrt.maps"]) == 3  # PNG: one per image
    # binary_data_output: every output binary; JSON requests still get JSON maps of the same values
    body, headers = binary_request({**header, "parameters": {"method": "gradcam", "binary_data_output": True}},
                                   [small_batch, targets])
    response = client.post("/v2/models/small/infer", content=body, headers=headers)
    outputs = parse_binary_response(response.content, int(response.headers[HEADER]))
    assert outputs["explainrt.maps"].shape == (3, *SMALL_SIZE) and outputs["logits"].dtype == np.float32
    plain = client.post("/v2/models/small/infer", json={"inputs": [
        {"name": "input", "shape": list(small_batch.shape), "datatype": "FP32", "data": small_batch.ravel().tolist()}],
        "outputs": [{"name": "explainrt.maps", "parameters": {"format": "UINT8"}}], "parameters": {"method": "gradcam"}})
    assert plain.headers["content-type"] == "application/json"
    maps = plain.json()["outputs"][0]
    assert maps["datatype"] == "UINT8"
    np.testing.assert_array_equal(np.reshape(maps["data"], maps["shape"]),
                                  np.round(small_explainer.explain(small_batch).maps * 255))


def test_bad_binary_requests(client: TestClient, small_batch) -> None:  # noqa: ANN001
    image = {"name": "input", "shape": list(small_batch.shape), "datatype": "FP32",
             "parameters": {"binary_data_size": small_batch.nbytes}}
    cases = [
        ({"inputs": [image]}, small_batch.tobytes()[:-4], "binary_data_size is .* but only .* bytes"),
        ({"inputs": [{**image, "parameters": {"binary_data_size": 12}}]}, small_batch.tobytes()[:12],
         "12 bytes of binary data, but FP32 \\[3, 3, 64, 64\\] takes 147456"),
        ({"inputs": [image]}, small_batch.tobytes() + b"xx", "binary_data_size parameters add up to 147456"),
        ({"inputs": [{**image, "data": [1.0]}]}, small_batch.tobytes(), "not both"),
        ({"inputs": [image], "outputs": [{"name": "logits", "parameters": {"format": "PNG"}}]},
         small_batch.tobytes(), "takes no format"),
        ({"inputs": [image], "outputs": [{"name": "explainrt.maps", "parameters": {"format": "JPEG"}}]},
         small_batch.tobytes(), "format must be one of FP32, FP16, UINT8, PNG, OVERLAY, got 'JPEG'"),
        ({"inputs": [image], "outputs": [{"name": "explainrt.maps", "parameters": {"format": ["PNG"]}}]},
         small_batch.tobytes(), "format must be one of .*, got \\['PNG'\\]"),
        ({"inputs": [image], "outputs": [{"name": "explainrt.maps", "parameters": {"format": "OVERLAY"}}],
          "parameters": {"method": "gradcam"}}, small_batch.tobytes(),
         ("format OVERLAY draws each map over its original image, but input 'input' is FP32 preprocessed data, "
          "which has none: send the images as UINT8 \\[N, H, W, 3\\]")),
        ({"inputs": [image], "outputs": [{"name": "explainrt.maps", "parameters": {"format": "UINT8"}}],
          "parameters": {"normalize": False}}, small_batch.tobytes(), "map format UINT8 holds maps scaled to"),
    ]
    for header, raw, message in cases:
        text = json.dumps(header).encode()
        response = client.post("/v2/models/small/infer", content=text + raw, headers={HEADER: str(len(text))})
        assert response.status_code == 400, (header, response.text)
        assert response.json()["type"] == "InvalidInputError"
        assert re.search(message, response.json()["error"]), response.json()["error"]
    response = client.post("/v2/models/small/infer", content=b"{}", headers={HEADER: "99"})
    assert response.status_code == 400 and "Inference-Header-Content-Length must be" in response.json()["error"]


def decode_pngs(items: list[bytes]) -> np.ndarray:
    """PNG bytes as one uint8 array, checking each is colour (RGB)."""
    images = [Image.open(io.BytesIO(item)) for item in items]
    assert all(image.mode == "RGB" for image in images)
    return np.stack([np.asarray(image) for image in images])


def test_overlay_maps_are_v1_overlays(client: TestClient, raw_explainer: Explainer) -> None:
    """Format OVERLAY returns, JSON and binary, exactly V1's overlay PNGs of the same images and method (and its
    captions), which are the overlay of the FP32 map on the preprocessed crop."""
    images = np.random.default_rng(1).integers(0, 256, (2, 72, 80, 3), dtype=np.uint8)
    tensor = {"name": "input", "shape": list(images.shape), "datatype": "UINT8"}
    for method, parameters in (("gradcam", {}), ("gradcam", {"caption": True}), ("layercam", {"normalize": False})):
        reference = raw_explainer.explain(list(images), method=method, normalize=parameters.get("normalize", True))
        expected = reference.overlays(captions=parameters.get("caption", False))
        v1 = client.post("/v1/models/raw:explain", json={
            "instances": [{"image": {"b64": base64.b64encode(codec.png_bytes(image)).decode()}} for image in images],
            "parameters": {"method": method, "return": ["overlay"], **parameters}})
        assert v1.status_code == 200, v1.text
        v1_overlays = decode_pngs([base64.b64decode(item["overlay"]["b64"]) for item in v1.json()["explanations"]])
        outputs = [{"name": "explainrt.maps", "parameters": {"format": "OVERLAY"}},
                   {"name": "explainrt.resolved_targets"}]
        plain = client.post("/v2/models/raw/infer", json={
            "inputs": [{**tensor, "data": images.ravel().tolist()}], "outputs": outputs,
            "parameters": {"method": method, **parameters}})
        assert plain.status_code == 200, plain.text
        maps = plain.json()["outputs"][0]
        assert (maps["datatype"], maps["shape"]) == ("BYTES", [2])
        json_overlays = decode_pngs([base64.b64decode(item) for item in maps["data"]])
        body, headers = binary_request({"inputs": [{**tensor, "parameters": {"binary_data_size": images.nbytes}}],
                                        "outputs": outputs, "parameters": {"method": method, "binary_data_output": True,
                                                                           **parameters}}, [images])
        response = client.post("/v2/models/raw/infer", content=body, headers=headers)
        assert response.status_code == 200, response.text
        binary = parse_binary_response(response.content, int(response.headers[HEADER]))
        assert expected.shape == (2, *SMALL_SIZE, 3)
        for got in (v1_overlays, json_overlays, decode_pngs(binary["explainrt.maps"])):
            np.testing.assert_array_equal(got, expected)
        np.testing.assert_array_equal(binary["explainrt.resolved_targets"], reference.targets)
        if not parameters:  # the overlay drawn independently from the map and the crop the explainer saw
            np.testing.assert_array_equal(expected, np.stack([overlay(crop, m) for crop, m in
                                                              zip(reference.images, reference.maps, strict=True)]))
        if parameters.get("caption"):  # the caption strip differs from the uncaptioned overlay
            assert (expected != raw_explainer.explain(list(images), method=method).overlays()).any()
    formats = client.get("/v2/models/raw").json()["parameters"]["maps_formats"]
    assert list(formats) == ["FP32", "FP16", "UINT8", "PNG", "OVERLAY"]
    assert "UINT8 image input only" in formats["OVERLAY"]
