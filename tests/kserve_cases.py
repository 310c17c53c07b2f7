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

from test_serve_binary import parse_binary_response  # noqa: E402
from test_targets import _image, _TinyDetector, _TinySegmenter, assert_equal_to_one_target_calls  # noqa: E402

from explainrt.serve.kserve_model import ExplainrtModel  # noqa: E402
from explainrt.serve.protocol import ServeConfig  # noqa: E402
from explainrt.targets import Box, Class, Region, Similarity  # noqa: E402

HEADER = "Inference-Header-Content-Length"
TINY = 32


@pytest.fixture(scope="module")
def explainer(small_onnx):  # noqa: ANN001, ANN201
    """The small ResNet-18 with a preprocessing for raw 64x64 images."""
    from explainrt import Explainer
    from explainrt.preprocessing import Preprocessing

    return Explainer(small_onnx, preprocessing=Preprocessing(SMALL_SIZE, SMALL_SIZE[0], (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)))


@pytest.fixture(scope="module")
def tiny() -> dict:
    """test_targets.py's tiny segmenter ({"out": [N, 4, 32, 32]}) and YOLOv8-layout detector ([N, 6, 64])."""
    from explainrt import Explainer

    segmenter, detector = _TinySegmenter().eval(), _TinyDetector("yolov8").eval()
    return {"seg": Explainer(segmenter, [segmenter.features], input_size=(TINY, TINY)),
            "det": Explainer(detector, [detector.features], input_size=(TINY, TINY))}


@pytest.fixture(scope="module")
def client(explainer, tiny) -> Iterator[TestClient]:  # noqa: ANN001
    """kserve's V1 and V2 routes (and the error handlers its RESTServer registers for what the adapter raises: 400,
    503, any other exception 500) over its DataPlane and ModelRepository, holding the adapter."""
    from kserve.errors import (
        InvalidInput,
        ServerNotReady,
        generic_exception_handler,
        invalid_input_handler,
        server_not_ready_handler,
    )
    from kserve.protocol.dataplane import DataPlane
    from kserve.protocol.model_repository_extension import ModelRepositoryExtension
    from kserve.protocol.rest.v1_endpoints import register_v1_endpoints
    from kserve.protocol.rest.v2_endpoints import register_v2_endpoints

    repository = kserve.ModelRepository()
    for name, served in (("small", explainer), *tiny.items()):
        repository.update(ExplainrtModel(name, served))
    repository.update(ExplainrtModel("busy", explainer, ServeConfig(max_queue=0)))  # every request: queue full
    app = FastAPI()
    app.add_exception_handler(InvalidInput, invalid_input_handler)
    app.add_exception_handler(ServerNotReady, server_not_ready_handler)
    app.add_exception_handler(Exception, generic_exception_handler)
    dataplane = DataPlane(repository)
    register_v1_endpoints(app, dataplane, ModelRepositoryExtension(repository))
    register_v2_endpoints(app, dataplane, ModelRepositoryExtension(repository))
    with TestClient(app, raise_server_exceptions=False) as test_client:
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
    explained = client.post("/v1/models/small:explain", json={"instances": instances, "parameters": {
        "method": "layercam", "targets": [1, 2, 3], "return": ["map", "overlay"]}})
    assert explained.status_code == 200, explained.text
    reference = explainer.explain(images, method="layercam", targets=[1, 2, 3])
    items = explained.json()["explanations"]
    assert [item["target"]["index"] for item in items] == [1, 2, 3]
    np.testing.assert_allclose(np.array([item["map"] for item in items]), reference.maps, atol=1e-5)
    overlays = [np.asarray(Image.open(io.BytesIO(base64.b64decode(item["overlay"]["b64"])))) for item in items]
    np.testing.assert_array_equal(np.stack(overlays), reference.overlays())
    bad = client.post("/v1/models/small:explain", json={"instances": instances, "parameters": {"method": "nosuch"}})
    assert bad.status_code == 400 and "unknown method 'nosuch'" in bad.text


def test_v2_infer_binary_maps(client: TestClient, explainer, small_batch) -> None:  # noqa: ANN001
    """Open Inference Protocol through kserve, binary tensors both ways, maps as UINT8."""
    header = {"inputs": [{"name": "input", "shape": list(small_batch.shape), "datatype": "FP32",
                          "parameters": {"binary_data_size": small_batch.nbytes}}],
              "outputs": [{"name": "logits", "parameters": {"binary_data": True}},
                          {"name": "explainrt.maps", "parameters": {"format": "UINT8", "binary_data": True}},
                          {"name": "explainrt.resolved_targets", "parameters": {"binary_data": True}}],
              "parameters": {"method": "gradcam"}}
    text = json.dumps(header).encode()
    response = client.post("/v2/models/small/infer", content=text + small_batch.tobytes(),
                           headers={HEADER: str(len(text)), "Content-Type": "application/octet-stream"})
    outputs = _binary_outputs(response)
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


def _binary_outputs(response) -> dict[str, np.ndarray]:  # noqa: ANN001
    """The outputs of a V2 answer with binary tensors (``parse_binary_response``)."""
    assert response.status_code == 200, response.text
    return parse_binary_response(response.content, int(response.headers[HEADER]))


def _tensor(name: str, batch: np.ndarray) -> dict:
    return {"name": name, "shape": list(batch.shape), "datatype": "FP32", "data": batch.ravel().tolist()}


def _outputs(response) -> dict[str, np.ndarray]:  # noqa: ANN001
    assert response.status_code == 200, response.text
    return {o["name"]: np.reshape(o["data"], o["shape"]) for o in response.json()["outputs"]}


def test_k_targets_as_explainrt_serve_takes_them(client: TestClient, explainer, tiny) -> None:  # noqa: ANN001
    """explainrt serve's target forms through kserve: K per instance (objects, text forms, class indices) on V1
    ``:explain`` and V2 ``infer`` (parameters.targets as JSON text, as the protocol's scalar parameters carry it,
    or as JSON in a binary request's header), region / box / similarity targets, each of the K maps equal to the
    one-target call's."""
    seg, det = tiny["seg"], tiny["det"]
    rng = np.random.default_rng(0)
    pictures = [rng.integers(0, 255, (TINY, TINY, 3), dtype=np.uint8) for _ in range(2)]
    instances = [{"image": {"b64": _png_b64(picture)}} for picture in pictures]
    mask = np.zeros((TINY, TINY), np.float32)
    mask[4:20, 8:28] = 1.0
    region = {"kind": "region", "class": 2, "mask": mask.tolist()}
    rows, objects = [[region, "class:1"], [3, region]], [[Region(2, mask), Class(1)], [Class(3), Region(2, mask)]]
    response = client.post("/v1/models/seg:explain", json={"instances": instances, "parameters": {
        "targets": rows, "return": "map"}})
    assert response.status_code == 200, response.text
    assert_equal_to_one_target_calls(response.json()["explanations"], seg, pictures, objects)

    batch = _image((1, 3, TINY, TINY), seed=16)  # boxes around the detector's most confident predictions
    head = np.asarray(det.predict(batch))[0]
    boxes = []
    for c in (1, 0):
        cx, cy, w, h = head[:4, int(np.argmax(head[4 + c]))]
        boxes.append(np.clip([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 0, TINY).tolist())
    given = [[f"box:{','.join(map(str, boxes[0]))}:1:0.4", {"kind": "box", "xyxy": boxes[1], "class": 0, "iou": 0.4}]]
    answer = _outputs(client.post("/v2/models/det/infer", json={"inputs": [_tensor("input", batch)], "parameters": {
        "method": "gradcam", "targets": json.dumps(given)}}))
    assert answer["explainrt.maps"].shape == (1, 2, TINY, TINY)
    for k, target in enumerate([Box(boxes[0], 1, iou=0.4), Box(boxes[1], 0, iou=0.4)]):
        one = det.explain(batch, method="gradcam", targets=target)
        np.testing.assert_allclose(answer["explainrt.maps"][:, k], one.maps, atol=1e-5)
        np.testing.assert_allclose(answer["explainrt.objective"][:, k], one.logits[:, 0], rtol=1e-5)
        assert answer["explainrt.resolved_targets"][:, k].tolist() == one.targets.tolist()

    images = pixels(np.random.default_rng(1).standard_normal((2, 3, 64, 64)).astype(np.float32))
    concept = rng.normal(size=explainer.spec.num_classes).astype(np.float32)
    header = {"inputs": [{"name": "input", "shape": [2, 64, 64, 3], "datatype": "UINT8",
                          "parameters": {"binary_data_size": 2 * 64 * 64 * 3}}],
              "parameters": {"method": "gradcam",
                             "targets": [[{"kind": "similarity", "vector": concept.tolist()}, 3]] * 2}}
    text = json.dumps(header).encode()
    response = client.post("/v2/models/small/infer", content=text + np.stack(images).tobytes(),
                           headers={HEADER: str(len(text)), "Content-Type": "application/octet-stream"})
    answer = _outputs(response)
    for k, target in enumerate([Similarity(concept), Class(3)]):
        one = explainer.explain(images, method="gradcam", targets=target)
        np.testing.assert_allclose(answer["explainrt.maps"][:, k], one.maps, atol=1e-5)
        objective = one.logits[:, 0] if k == 0 else one.logits[:, 3]  # a Class alone: the class-index path
        np.testing.assert_allclose(answer["explainrt.objective"][:, k], objective, rtol=1e-4, atol=1e-5)
    header["outputs"] = [{"name": "explainrt.maps", "parameters": {"format": "PNG", "binary_data": True}}]
    text = json.dumps(header).encode()
    pngs = _binary_outputs(client.post("/v2/models/small/infer", content=text + np.stack(images).tobytes(),
                                       headers={HEADER: str(len(text)), "Content-Type": "application/octet-stream"}))
    assert pngs["explainrt.maps"].shape == (2, 2)  # BYTES [N, K]: one grayscale PNG per map
    decoded = np.array([[np.asarray(Image.open(io.BytesIO(png))) for png in row] for row in pngs["explainrt.maps"]])
    np.testing.assert_array_equal(decoded, np.round(answer["explainrt.maps"] * 255))


def test_bad_targets_are_400s_naming_the_problem(client: TestClient) -> None:
    """Bad targets (and the rest of explainrt serve's refusals) are KServe's 400 InvalidInput with explainrt's
    message, whether found while reading the request or when the forward pass shows it (a box no prediction
    overlaps), on V1 and V2; a full queue is a 503."""
    rng = np.random.default_rng(2)
    instances = [{"image": {"b64": _png_b64(rng.integers(0, 255, (TINY, TINY, 3), dtype=np.uint8))}} for _ in range(2)]
    batch = _image((2, 3, TINY, TINY), seed=3)
    v1 = [("seg", [[1, 2], [3]], "all of one length K"),
          ("seg", [[1, 2], 3], "not both"),
          ("seg", [[1, 9], [1, 2]], "target class 9 is out of range"),
          ("seg", {"kind": "hexagon"}, "unknown target kind 'hexagon'"),
          ("seg", "region:/etc/passwd:2", "reads a file"),
          ("seg", [["box:1,1,5,5:0", 1]] * 2, "Box needs a raw detector output"),
          ("det", [[{"kind": "box", "xyxy": [1, 1, 40, 40], "class": 0}, 1]] * 2, "outside the 32x32 image"),
          ("det", "box:0,0,1,1:0:0.99", "no prediction overlaps")]
    for name, given, message in v1:
        refused = client.post(f"/v1/models/{name}:explain", json={"instances": instances,
                                                                  "parameters": {"targets": given}})
        assert refused.status_code == 400 and message in refused.json()["error"], (given, refused.text)
    targets = {"name": "explainrt.targets", "shape": [2, 2], "datatype": "INT64", "data": [1, 2, 3, 0]}
    v2 = [({"targets": "box:0,0,1,1:0:0.99"}, [], "det", "no prediction overlaps"),
          ({"targets": '[[1, 2], [3'}, [], "seg", "not valid JSON text"),
          ({"targets": "class:1"}, [targets], "seg", "not both"),
          ({}, [{**targets, "data": [1, 2, 3, 9]}], "seg", "target class 9 is out of range"),
          ({}, [{**targets, "shape": [1, 4]}], "seg", "[2, K] (K classes per image)")]
    for parameters, extra, name, message in v2:
        refused = client.post(f"/v2/models/{name}/infer", json={
            "inputs": [_tensor("input", batch), *extra], "parameters": {"method": "gradcam", **parameters}})
        assert refused.status_code == 400 and message in refused.json()["error"], (parameters, refused.text)
    busy = client.post("/v1/models/busy:explain", json={"instances": instances})
    assert busy.status_code == 503 and "images queued (limit 0); retry later" in busy.json()["error"], busy.text


def _conforms(shape: tuple[int, ...], declared: list[int]) -> bool:
    """Whether an answer's tensor shape is one its metadata declares (-1: any size)."""
    return len(shape) == len(declared) and all(d in (-1, s) for s, d in zip(shape, declared, strict=True))


def test_v2_metadata_declares_the_answers_shapes(client: TestClient, tiny) -> None:  # noqa: ANN001
    """kserve's V2 metadata of the adapter: the tensors as explainrt serve declares them (kserve's metadata has no
    parameters for explainrt serve's ``k_target_shapes``); a one-target answer's tensors have the declared shapes
    (-1: any size), and with K targets per instance the layer outputs keep theirs, gradients [N, K, C, h, w]."""
    seg = tiny["seg"]
    metadata = client.get("/v2/models/seg").json()
    declared = {tensor["name"]: tensor["shape"] for tensor in metadata["outputs"]}
    assert declared == {seg.spec.logits: [-1, 4, TINY, TINY], "explainrt.maps": [-1, TINY, TINY],
                        "explainrt.resolved_targets": [-1], "explainrt.objective": [-1],
                        "explainrt.activations.0": [-1] * 4, "explainrt.gradients.0": [-1] * 5}
    assert {tensor["name"]: tensor["shape"] for tensor in metadata["inputs"]} == {
        seg.spec.image_input: [-1, 3, TINY, TINY], "explainrt.targets": [-1]}
    batch = _image((2, 3, TINY, TINY), seed=4)
    region = json.dumps({"kind": "region", "class": 1, "mask": np.ones((TINY, TINY)).tolist()})
    one = _outputs(client.post("/v2/models/seg/infer", json={"inputs": [_tensor("input", batch)], "parameters": {
        "method": "gradcam", "targets": region}}))
    layers = _outputs(client.post("/v2/models/seg/infer", json={"inputs": [_tensor("input", batch)], "outputs": [
        {"name": seg.spec.logits}, {"name": "explainrt.activations.0"}, {"name": "explainrt.gradients.0"}]}))
    assert set(one) == {seg.spec.logits, "explainrt.maps", "explainrt.resolved_targets", "explainrt.objective"}
    for name, array in {**one, **layers}.items():
        assert _conforms(array.shape, declared[name]), (name, array.shape, declared[name])
    k_targets = {"name": "explainrt.targets", "shape": [2, 3], "datatype": "INT64", "data": [1, 2, 3, 0, -1, 2]}
    many = _outputs(client.post("/v2/models/seg/infer", json={"inputs": [_tensor("input", batch), k_targets],
                                                              "outputs": [{"name": name} for name in layers]}))
    for name, array in many.items():
        assert _conforms(array.shape, declared[name]), (name, array.shape, declared[name])
    assert many["explainrt.gradients.0"].shape[:2] == (2, 3)
