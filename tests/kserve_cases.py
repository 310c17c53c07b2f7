"""The KServe adapter served by kserve's own DataPlane and REST endpoints (V1 and V2), in process.

Run by ``test_kserve.py`` in a Python process of its own: kserve's and tritonclient's gRPC modules
define the same protobuf symbols (``inference.ServerLiveRequest``), which one process cannot load
both of, and the Triton export tests load tritonclient's.
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator

import numpy as np
import pytest
from conftest import SMALL_SIZE
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image

kserve = pytest.importorskip("kserve", reason="the kserve extra is not installed (pip install 'explainrt[kserve]')")

from explainrt.serve.kserve_model import ExplainrtModel  # noqa: E402

HEADER = "Inference-Header-Content-Length"


@pytest.fixture(scope="module")
def explainer(small_onnx):  # noqa: ANN001, ANN201
    """The small ResNet-18 with a preprocessing for raw 64x64 images."""
    from explainrt import Explainer
    from explainrt.preprocessing import Preprocessing

    return Explainer(small_onnx, preprocessing=Preprocessing(SMALL_SIZE, SMALL_SIZE[0], (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)))


@pytest.fixture(scope="module")
def client(explainer) -> Iterator[TestClient]:  # noqa: ANN001
    """kserve's V1 and V2 routes (and its error handlers) over its DataPlane and ModelRepository, holding the adapter."""
    from kserve.errors import InvalidInput, invalid_input_handler
    from kserve.protocol.dataplane import DataPlane
    from kserve.protocol.model_repository_extension import ModelRepositoryExtension
    from kserve.protocol.rest.v1_endpoints import register_v1_endpoints
    from kserve.protocol.rest.v2_endpoints import register_v2_endpoints

    repository = kserve.ModelRepository()
    repository.update(ExplainrtModel("small", explainer))
    app = FastAPI()
    app.add_exception_handler(InvalidInput, invalid_input_handler)
    dataplane = DataPlane(repository)
    register_v1_endpoints(app, dataplane, ModelRepositoryExtension(repository))
    register_v2_endpoints(app, dataplane, ModelRepositoryExtension(repository))
    with TestClient(app) as test_client:
        yield test_client


def pixels(batch: np.ndarray) -> list:
    """Raw UINT8 [H, W, 3] images made from a float batch (what a client sends)."""
    return [np.clip((image.transpose(1, 2, 0) + 3) * 40, 0, 255).astype(np.uint8) for image in batch]


def test_v1_predict_and_explain(client: TestClient, explainer, small_batch) -> None:  # noqa: ANN001
    images = pixels(small_batch)
    instances = [{"image": {"b64": _png_b64(image)}} for image in images]
    predicted = client.post("/v1/models/small:predict", json={"instances": instances})
    assert predicted.status_code == 200, predicted.text
    logits = explainer.predict(images)
    assert [p["index"] for p in predicted.json()["predictions"]] == logits.argmax(axis=1).tolist()
    explained = client.post("/v1/models/small:explain", json={"instances": instances,
                                                              "parameters": {"method": "layercam", "targets": [1, 2, 3]}})
    assert explained.status_code == 200, explained.text
    reference = explainer.explain(images, method="layercam", targets=[1, 2, 3])
    items = explained.json()["explanations"]
    assert [item["target"]["index"] for item in items] == [1, 2, 3]
    np.testing.assert_allclose(np.array([item["map"] for item in items]), reference.maps, atol=1e-6)
    as_png = client.post("/v1/models/small:explain", json={"instances": instances[:1],
                                                           "parameters": {"maps_format": "PNG"}}).json()
    decoded = np.asarray(Image.open(io.BytesIO(base64.b64decode(as_png["explanations"][0]["map"]))))
    np.testing.assert_array_equal(decoded, np.round(explainer.explain(images[:1]).maps[0] * 255))
    bad = client.post("/v1/models/small:explain", json={"instances": instances, "parameters": {"method": "nosuch"}})
    assert bad.status_code == 400 and "unknown method 'nosuch'" in bad.text


def test_v2_infer_binary_maps(client: TestClient, explainer, small_batch) -> None:  # noqa: ANN001
    """Open Inference Protocol through kserve, binary tensors both ways, maps as UINT8."""
    header = {"inputs": [{"name": "input", "shape": list(small_batch.shape), "datatype": "FP32",
                          "parameters": {"binary_data_size": small_batch.nbytes}}],
              "parameters": {"method": "gradcam", "maps_format": "UINT8", "binary_data_output": True}}
    text = json.dumps(header).encode()
    response = client.post("/v2/models/small/infer", content=text + small_batch.tobytes(),
                           headers={HEADER: str(len(text)), "Content-Type": "application/octet-stream"})
    assert response.status_code == 200, response.text
    length = int(response.headers[HEADER])
    outputs, offset = {}, length
    for output in json.loads(response.content[:length])["outputs"]:
        size = output["parameters"]["binary_data_size"]
        dtype = {"FP32": "<f4", "UINT8": "u1", "INT64": "<i8"}[output["datatype"]]
        outputs[output["name"]] = np.frombuffer(response.content[offset:offset + size], dtype).reshape(output["shape"])
        offset += size
    reference = explainer.explain(small_batch)
    assert outputs["explainrt.maps"].shape == (3, *SMALL_SIZE)
    np.testing.assert_array_equal(outputs["explainrt.maps"], np.round(reference.maps * 255))
    np.testing.assert_array_equal(outputs["explainrt.resolved_targets"], reference.targets)
    np.testing.assert_allclose(outputs["logits"], reference.logits, rtol=1e-5, atol=1e-5)
    plain = client.post("/v2/models/small/infer", json={"inputs": [
        {"name": "input", "shape": list(small_batch.shape), "datatype": "FP32", "data": small_batch.ravel().tolist()}]})
    assert [o["name"] for o in plain.json()["outputs"]] == ["logits"]


def _png_b64(image: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")
