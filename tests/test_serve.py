"""``explainrt serve`` as a real process on loopback, exercised over HTTP: KServe V1, V2, metrics, bad input.

Answers are checked against the same model run in this process (predictions, maps, the explainable
model's activations and gradients), so what is tested is the server's decoding, batching and
encoding, not the methods themselves (their own tests check those against references).
"""

from __future__ import annotations

import base64
import io
import os
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import onnx
import pytest
from PIL import Image

from explainrt.serve.launcher import ServerProcess

CAT_LABELS = {"tabby", "tiger cat", "Egyptian cat"}
SERVER_ARGUMENTS = ["--max-batch", "8"]  # batching itself: test_serve_faults (event-based, no time window)


def png_b64(image: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def decode_png(text: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(text))))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The server with the default model (the shipped ONNX file)."""
    log = tmp_path_factory.mktemp("serve") / "server.log"
    with ServerProcess(SERVER_ARGUMENTS, env=dict(os.environ), log_path=log) as process:
        yield process
        assert process.alive(), Path(log).read_text()[-2000:]


@pytest.fixture(scope="module")
def http(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=180) as client:
        yield client


def explain(http: httpx.Client, images: list[np.ndarray], **parameters: object) -> httpx.Response:
    return http.post("/v1/models/default:explain",
                     json={"instances": [{"image": {"b64": png_b64(image)}} for image in images], "parameters": parameters})


# -- discovery and health ----------------------------------------------------------------------------
def test_models_health_and_metadata(http: httpx.Client, default_explainer) -> None:  # noqa: ANN001
    assert http.get("/v1/models").json() == {"models": ["default"]}
    assert http.get("/v1/models/default").json() == {"name": "default", "ready": True}
    assert http.get("/v2/health/live").json() == {"live": True}
    assert http.get("/v2/health/ready").json() == {"ready": True}
    metadata = http.get("/v2/models/default").json()
    spec = default_explainer.spec
    assert metadata["name"] == "default"
    assert metadata["inputs"][0] == {"name": spec.image_input, "datatype": "FP32", "shape": [-1, 3, 224, 224]}
    names = [output["name"] for output in metadata["outputs"]]
    assert names == [spec.logits, "explainrt.maps", "explainrt.resolved_targets", "explainrt.objective",
                     "explainrt.activations.0", "explainrt.gradients.0"]
    assert metadata["outputs"][0]["shape"] == [-1, 1000]
    methods = {m["name"]: m for m in http.get("/api/methods").json()["methods"]}
    from explainrt.methods import METHODS

    assert set(methods) == set(METHODS)
    for name, method in methods.items():
        assert method["options"] == [o.describe() for o in METHODS[name].options]
    n_masks = methods["rise"]["options"][0]
    assert list(n_masks)[0] == "name"
    assert (n_masks["name"], n_masks["type"], n_masks["default"], n_masks["minimum"]) == ("n_masks", "int", 500, 1)
    assert methods["rise"]["options"][0]["help"].startswith("number of random masks (500: seconds on a CPU")


# -- KServe V1 -----------------------------------------------------------------------------------------
def test_predict_matches_the_model(http: httpx.Client, default_explainer, example_images) -> None:  # noqa: ANN001
    images = [example_images["chelsea"], example_images["coffee"]]
    response = http.post("/v1/models/default:predict", json={
        "instances": [{"image": {"b64": png_b64(images[0])}}, images[1].tolist()], "parameters": {"top_k": 3}})
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    logits = default_explainer.predict(images)
    for prediction, row in zip(predictions, logits, strict=True):
        expected = np.argsort(-row)[:3].tolist()
        assert [p["index"] for p in prediction["top_k"]] == expected
        assert prediction["index"] == expected[0]
        probabilities = np.exp(row - row.max()) / np.exp(row - row.max()).sum()
        assert prediction["probability"] == pytest.approx(probabilities[expected[0]], abs=1e-4)
    assert predictions[0]["label"] in CAT_LABELS
    assert predictions[1]["label"] == "espresso"


FAMILIES = [
    ("gradcam", {}),  # gradient-weighted CAM
    ("eigencam", {}),  # gradient-free CAM
    ("contrast-cam", {"contrast": 285}),  # targeted
    ("dff", {"n_concepts": 3}),  # concept factorisation
    ("saliency", {}),  # input gradients
    ("occlusion", {"window": [56, 56], "stride": [56, 56]}),  # perturbation
    ("rise", {"n_masks": 48, "seed": 3}),  # random masks
]


@pytest.mark.parametrize(("method", "options"), FAMILIES, ids=[name for name, _ in FAMILIES])
def test_explain_each_family_matches_in_process(http: httpx.Client, default_explainer, example_images,  # noqa: ANN001
                                                method: str, options: dict) -> None:
    image = example_images["coffee"] if method == "contrast-cam" else example_images["chelsea"]
    response = explain(http, [image], method=method, **options, **{"return": ["overlay", "map"]})
    assert response.status_code == 200, response.text
    body = response.json()
    reference = default_explainer.explain([image], method=method, progress=False, **options)
    (item,) = body["explanations"]
    assert item["method"] == method
    assert item["target"]["index"] == int(reference.targets[0])
    served_map = np.asarray(item["map"], dtype=np.float32)
    assert served_map.shape == reference.maps.shape[1:] == (224, 224)
    np.testing.assert_allclose(served_map, reference.maps[0], atol=2e-4)
    overlay = decode_png(item["overlay"]["b64"])
    assert overlay.shape == (224, 224, 3)
    assert np.abs(overlay.astype(int) - reference.overlays()[0].astype(int)).mean() < 1.0
    assert body["timings"]["total"] > 0 and body["timings"]["batch_images"] >= 1


def test_captioned_overlays_and_a_note_for_an_all_zero_map(http: httpx.Client, default_explainer,  # noqa: ANN001
                                                           example_images) -> None:
    image = example_images["chelsea"]
    response = explain(http, [image], method="counterfactual-cam", caption=True)
    assert response.status_code == 200, response.text
    (item,) = response.json()["explanations"]
    reference = default_explainer.explain([image], method="counterfactual-cam", progress=False)
    assert item["note"] == reference.notes[0] and "all zero: Counterfactual-CAM shows" in item["note"]
    captioned = decode_png(item["overlay"]["b64"])
    assert np.abs(captioned.astype(int) - reference.overlays(captions=True)[0].astype(int)).mean() < 1.0
    plain = explain(http, [image], method="gradcam").json()["explanations"][0]
    assert "note" not in plain
    assert (decode_png(plain["overlay"]["b64"])[200:] != captioned[200:]).any()
    refused = explain(http, [image], method="gradcam", caption="yes")
    assert refused.status_code == 400 and "parameter caption must be true or false" in refused.json()["error"]


def test_explain_targets_per_instance_and_raw_map_only(http: httpx.Client, default_explainer, example_images) -> None:  # noqa: ANN001
    images = [example_images["chelsea"], example_images["astronaut"]]
    response = explain(http, images, targets=[285, -2], **{"return": "map"}, normalize=False)
    assert response.status_code == 200, response.text
    items = response.json()["explanations"]
    reference = default_explainer.explain(images, targets=[285, -2], normalize=False)
    assert [item["target"]["index"] for item in items] == reference.targets.tolist()
    assert items[0]["target"]["label"] == "Egyptian cat"
    assert all("overlay" not in item for item in items)
    for item, expected in zip(items, reference.maps, strict=True):
        np.testing.assert_allclose(np.asarray(item["map"]), expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_concurrent_requests_each_get_their_own_answer(http: httpx.Client, default_explainer, example_images) -> None:  # noqa: ANN001
    names = ["chelsea", "coffee", "astronaut"] * 2
    targets = [-1, -2, 5, 281, -1, 999]

    def one(index: int) -> httpx.Response:
        return explain(http, [example_images[names[index]]], targets=targets[index], **{"return": "map"})

    with ThreadPoolExecutor(len(names)) as pool:
        responses = list(pool.map(one, range(len(names))))
    reference = default_explainer.explain([example_images[n] for n in names], targets=targets)
    for response, expected_map, expected_target in zip(responses, reference.maps, reference.targets, strict=True):
        assert response.status_code == 200, response.text
        (item,) = response.json()["explanations"]
        assert item["target"]["index"] == int(expected_target)
        np.testing.assert_allclose(np.asarray(item["map"]), expected_map, atol=2e-4)


def test_one_bad_request_in_a_batch_fails_alone(http: httpx.Client, example_images) -> None:  # noqa: ANN001
    """Contrast class 282 is chelsea's own prediction (an error) but a valid contrast for the others."""
    names = ["chelsea", "coffee", "astronaut", "coffee"]

    def one(name: str) -> httpx.Response:
        return explain(http, [example_images[name]], method="contrast-cam", contrast=282)

    with ThreadPoolExecutor(len(names)) as pool:
        responses = list(pool.map(one, names))
    assert responses[0].status_code == 400
    assert "contrast class" in responses[0].json()["error"]
    assert [r.status_code for r in responses[1:]] == [200, 200, 200]


# -- Open Inference Protocol (V2) ----------------------------------------------------------------------
def v2_image(image: np.ndarray) -> dict:
    return {"name": "input", "shape": [1, *image.shape], "datatype": "UINT8", "data": image.ravel().tolist()}


def test_v2_infer_prediction_explanation_and_layer_tensors(http: httpx.Client, default_explainer, example_images) -> None:  # noqa: ANN001
    image = np.asarray(Image.fromarray(example_images["chelsea"]).resize((150, 100)))
    logits_name = default_explainer.spec.logits

    plain = http.post("/v2/models/default/infer", json={"id": "a", "inputs": [v2_image(image)]}).json()
    assert plain["id"] == "a" and [o["name"] for o in plain["outputs"]] == [logits_name]
    np.testing.assert_allclose(plain["outputs"][0]["data"], default_explainer.predict([image])[0], rtol=1e-4, atol=1e-4)

    targets = {"name": "explainrt.targets", "shape": [1], "datatype": "INT64", "data": [285]}
    explained = http.post("/v2/models/default/infer", json={
        "inputs": [v2_image(image), targets], "parameters": {"method": "gradcam"}})
    assert explained.status_code == 200, explained.text
    outputs = {o["name"]: o for o in explained.json()["outputs"]}
    reference = default_explainer.explain([image], targets=[285])
    assert outputs["explainrt.maps"]["shape"] == [1, 224, 224] and outputs["explainrt.maps"]["datatype"] == "FP32"
    np.testing.assert_allclose(np.reshape(outputs["explainrt.maps"]["data"], (1, 224, 224)), reference.maps, atol=2e-4)
    assert outputs["explainrt.resolved_targets"]["data"] == [285]

    batch, _ = default_explainer.prepare([image])
    run = default_explainer.session.run(batch, np.array([[-1]]))
    layers = http.post("/v2/models/default/infer", json={
        "inputs": [{"name": "input", "shape": list(batch.shape), "datatype": "FP32", "data": batch.ravel().tolist()}],
        "outputs": [{"name": "explainrt.activations.0"}, {"name": "explainrt.gradients.0"}]})
    assert layers.status_code == 200, layers.text
    activations, gradients = layers.json()["outputs"]
    assert activations["shape"] == list(run.activations[0].shape) == [1, 1280, 7, 7]
    assert gradients["shape"] == list(run.gradients[0].shape)
    np.testing.assert_allclose(np.reshape(activations["data"], activations["shape"]), run.activations[0], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.reshape(gradients["data"], gradients["shape"]), run.gradients[0], rtol=1e-3, atol=1e-6)


# -- metrics -------------------------------------------------------------------------------------------
def test_metrics_count_requests_latency_batches_and_queue(http: httpx.Client, example_images) -> None:  # noqa: ANN001
    assert explain(http, [example_images["coffee"]]).status_code == 200
    text = http.get("/metrics").text
    assert 'explainrt_requests_total{endpoint="/v1/models/{name}:explain",status="200"}' in text
    assert 'explainrt_request_latency_seconds_bucket{endpoint="/v1/models/{name}:explain",le="0.5"}' in text
    assert 'explainrt_batch_size_count{kind="explain",model="default"}' in text
    assert 'explainrt_queue_depth{model="default"} 0.0' in text


# -- bad input -----------------------------------------------------------------------------------------
def truncated_jpeg(image: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG")
    return base64.b64encode(buffer.getvalue()[: buffer.tell() // 2]).decode("ascii")


def huge_png() -> str:
    """A 10000 x 5000 = 50-megapixel PNG (small once compressed: it is all black)."""
    buffer = io.BytesIO()
    Image.new("L", (10000, 5000)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


PIXEL = [[[0, 0, 0]]]
BAD_REQUESTS = {
    "corrupt base64": ("/v1/models/default:predict", {"json": {"instances": [{"image": {"b64": "not*base64!"}}]}},
                       400, "not valid base64"),
    "not an image": ("/v1/models/default:predict",
                     {"json": {"instances": [{"image": {"b64": base64.b64encode(b"hello world").decode()}}]}},
                     400, "not a readable PNG or JPEG"),
    "50 megapixels": ("/v1/models/default:predict", {"json": {"instances": [{"image": {"b64": "HUGE"}}]}},
                      413, "50000000 pixels exceeds the limit of 16777216"),
    "unknown model": ("/v1/models/resnet:predict", {"json": {"instances": [PIXEL]}}, 404, "unknown model 'resnet'"),
    "unknown model v2": ("/v2/models/resnet/infer", {"json": {"inputs": []}}, 404, "unknown model 'resnet'"),
    "unknown method": ("/v1/models/default:explain", {"json": {"instances": [PIXEL], "parameters": {"method": "magic"}}},
                       400, "unknown method 'magic'"),
    "unknown option": ("/v1/models/default:explain", {"json": {"instances": [PIXEL], "parameters": {"bogus": 1}}},
                       400, "takes no option(s) bogus"),
    "bad option value": ("/v1/models/default:explain",
                         {"json": {"instances": [PIXEL], "parameters": {"method": "rise", "n_masks": 0}}},
                         400, "method 'rise': n_masks must be an integer >= 1, got 0"),
    "target out of range": ("/v1/models/default:explain", {"json": {"instances": [PIXEL], "parameters": {"targets": [1000]}}},
                            400, "target class 1000 is out of range"),
    "targets count": ("/v1/models/default:explain", {"json": {"instances": [PIXEL], "parameters": {"targets": [1, 2]}}},
                      400, "one per instance"),
    "empty body": ("/v1/models/default:predict", {"content": b""}, 400, "empty request body"),
    "no instances": ("/v1/models/default:predict", {"json": {"instances": []}}, 400, '"instances"'),
    "json garbage": ("/v1/models/default:predict", {"content": b"{nope" + b"x" * 4096}, 400, "not valid JSON"),
    "binary garbage": ("/v1/models/default:predict", {"content": np.random.default_rng(0).bytes(4096)}, 400,
                       "request body is not"),
    "json nested deeply": ("/v1/models/default:predict", {"content": b"[" * 200_000}, 400, "nested too deeply"),
    "10 MB of garbage": ("/v1/models/default:predict", {"content": os.urandom(10 * 2**20)}, 413,
                         "exceeds the limit of 8388608 bytes"),
    "10 MB chunked": ("/v1/models/default:predict", {"content": "CHUNKED"}, 413, "exceeds the limit of 8388608 bytes"),
    "pixel floats": ("/v1/models/default:predict", {"json": {"instances": [[[[0.5, 0.5, 0.5]]]]}}, 400,
                     "integers in 0..255"),
    "pixel shape": ("/v1/models/default:predict", {"json": {"instances": [[[0, 0, 0, 0]]]}}, 400, "shape [H][W][3]"),
    "v2 wrong dtype": ("/v2/models/default/infer",
                       {"json": {"inputs": [{"name": "input", "shape": [1, 2, 2, 3], "datatype": "FP16", "data": [0] * 12}]}},
                       400, "datatype 'FP16' is not supported"),
    "v2 wrong shape": ("/v2/models/default/infer",
                       {"json": {"inputs": [{"name": "input", "shape": [1, 3, 100, 100], "datatype": "FP32",
                                             "data": [0.0] * 30000}]}}, 400, "FP32 input must be [N, 3, 224, 224]"),
    "v2 data count": ("/v2/models/default/infer",
                      {"json": {"inputs": [{"name": "input", "shape": [1, 2, 2, 3], "datatype": "UINT8", "data": [0] * 11}]}},
                      400, "data has 11 values but shape [1, 2, 2, 3] needs 12"),
    "v2 float as uint8": ("/v2/models/default/infer",
                          {"json": {"inputs": [{"name": "input", "shape": [1, 1, 1, 3], "datatype": "UINT8",
                                                "data": [0.5, 1, 2]}]}}, 400, "needs integers"),
    "v2 unknown input": ("/v2/models/default/infer",
                         {"json": {"inputs": [{"name": "pixels", "shape": [1, 1, 1, 3], "datatype": "UINT8", "data": [0] * 3}]}},
                         400, "unknown input(s) ['pixels']"),
    "v2 unknown output": ("/v2/models/default/infer",
                          {"json": {"inputs": [{"name": "input", "shape": [1, 1, 1, 3], "datatype": "UINT8", "data": [0] * 3}],
                                    "outputs": [{"name": "explainrt.gradients.7"}]}}, 400, "unknown output(s)"),
}


def _chunks(total: int) -> Iterator[bytes]:
    block = b"x" * 2**20
    for _ in range(total // len(block)):
        yield block


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_input_gets_a_4xx_naming_the_problem(server: ServerProcess, http: httpx.Client, example_images, case: str) -> None:  # noqa: ANN001
    path, request, status, phrase = BAD_REQUESTS[case]
    if request.get("json", {}).get("instances") == [{"image": {"b64": "HUGE"}}]:
        request = {"json": {"instances": [{"image": {"b64": huge_png()}}]}}
    if request.get("content") == "CHUNKED":
        request = {"content": _chunks(10 * 2**20)}
    response = http.post(path, **request)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    assert phrase in response.json()["error"]
    # ... and the server keeps serving
    assert http.get("/v2/health/live").status_code == 200
    assert server.alive()


def test_truncated_jpeg_is_refused_and_serving_goes_on(http: httpx.Client, example_images) -> None:  # noqa: ANN001
    response = http.post("/v1/models/default:explain",
                         json={"instances": [{"image": {"b64": truncated_jpeg(example_images["chelsea"])}}]})
    assert response.status_code == 400
    assert "truncated" in response.json()["error"]
    assert explain(http, [example_images["chelsea"]]).status_code == 200


# -- several models, from ONNX files -------------------------------------------------------------------
def test_serves_onnx_files_by_stem(small_onnx, small_explainer, small_batch, tmp_path: Path) -> None:  # noqa: ANN001
    """Two explainable ONNX files (no stored preprocessing): served by file stem, FP32 V2 tensors only."""
    for stem in ("resnet_a", "resnet_b"):
        (tmp_path / f"{stem}.onnx").write_bytes(small_onnx.SerializeToString())
    arguments = ["--model", str(tmp_path / "resnet_a.onnx"), "--model", str(tmp_path / "resnet_b.onnx")]
    with ServerProcess(arguments, env=dict(os.environ), log_path=tmp_path / "server.log") as server, \
            httpx.Client(base_url=server.url, timeout=120) as http:
        assert http.get("/v1/models").json() == {"models": ["resnet_a", "resnet_b"]}
        tensor = {"name": small_explainer.spec.image_input, "shape": list(small_batch.shape), "datatype": "FP32",
                  "data": small_batch.ravel().tolist()}
        response = http.post("/v2/models/resnet_b/infer", json={"inputs": [tensor], "parameters": {"method": "gradcam"}})
        assert response.status_code == 200, response.text
        outputs = {o["name"]: o for o in response.json()["outputs"]}
        reference = small_explainer.explain(small_batch)
        np.testing.assert_allclose(np.reshape(outputs["explainrt.maps"]["data"], (3, 64, 64)), reference.maps, atol=2e-4)
        raw = http.post("/v1/models/resnet_a:predict", json={"instances": [PIXEL]})
        assert raw.status_code == 400 and "stores no preprocessing" in raw.json()["error"]


def test_v2_channels_last_model_takes_tensors_in_its_own_layout(tmp_path: Path) -> None:
    """A channels-last model (its layout given by --input-layout): the metadata declares [-1, 4, 4, 3]; FP32
    [N, H, W, C] tensors are explained as the Explainer explains them; [N, C, H, W] tensors get a 400 naming the form."""
    from conftest import ambiguous_nhwc_model

    from explainrt import Explainer

    path = tmp_path / "keras.onnx"
    ambiguous_nhwc_model(path)
    reference = Explainer(str(path), input_layout="nhwc")
    batch = np.random.default_rng(3).standard_normal((2, 4, 4, 3)).astype(np.float32)
    arguments = ["--model", str(path), "--input-layout", "nhwc"]
    with ServerProcess(arguments, env=dict(os.environ), log_path=tmp_path / "server.log") as server, \
            httpx.Client(base_url=server.url, timeout=120) as http:
        metadata = http.get("/v2/models/keras").json()
        assert metadata["inputs"][0] == {"name": "image", "datatype": "FP32", "shape": [-1, 4, 4, 3]}
        assert metadata["parameters"]["input_layout"] == "nhwc"
        assert {o["name"]: o["shape"] for o in metadata["outputs"]}["explainrt.maps"] == [-1, 4, 4]

        def infer(tensor: np.ndarray) -> httpx.Response:
            body = {"inputs": [{"name": "image", "shape": list(tensor.shape), "datatype": "FP32",
                                "data": tensor.ravel().tolist()},
                               {"name": "explainrt.targets", "shape": [2], "datatype": "INT64", "data": [1, 3]}],
                    "parameters": {"method": "gradcam"}}
            return http.post("/v2/models/keras/infer", json=body)

        response = infer(batch)
        assert response.status_code == 200, response.text
        outputs = {o["name"]: o for o in response.json()["outputs"]}
        expected = reference.explain(batch, targets=[1, 3])
        assert outputs["explainrt.maps"]["shape"] == [2, 4, 4]
        np.testing.assert_allclose(np.reshape(outputs["explainrt.maps"]["data"], (2, 4, 4)), expected.maps, atol=1e-5)
        np.testing.assert_allclose(np.reshape(outputs["logits"]["data"], (2, 5)), expected.logits, rtol=1e-5, atol=1e-5)
        wrong = infer(np.ascontiguousarray(batch.transpose(0, 3, 1, 2)))  # [N, C, H, W] for a channels-last model
        assert wrong.status_code == 400
        assert wrong.json()["error"] == ("input 'image' has shape [2, 3, 4, 4]; FP32 input must be [N, 4, 4, 3] "
                                         "(channels-last)")


def test_cli_refuses_two_models_with_one_name(small_onnx, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:  # noqa: ANN001
    from explainrt.cli import main

    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "net.onnx").write_bytes(small_onnx.SerializeToString())
    status = main(["serve", "--model", str(tmp_path / "a" / "net.onnx"), "--model", str(tmp_path / "b" / "net.onnx")])
    assert status == 2
    assert "two --model files are named 'net'" in capsys.readouterr().err


def test_serve_start_up_errors_are_one_line_and_status_2(capsys: pytest.CaptureFixture[str]) -> None:
    import socket

    from explainrt.cli import main

    assert main(["serve", "--port", "99999"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("explainrt: error: --port must be a TCP port in 0..65535") and "Traceback" not in err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        assert main(["serve", "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"explainrt: error: cannot listen on 127.0.0.1:{port}:") and "Traceback" not in err


def test_serve_says_where_it_listens_and_when_it_is_ready(small_onnx, tmp_path: Path) -> None:  # noqa: ANN001
    import subprocess
    import sys

    model = tmp_path / "small.onnx"
    onnx.save(small_onnx, model)
    server = subprocess.Popen([sys.executable, "-m", "explainrt.cli", "serve", "--port", "0", "--model", str(model)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        serving = server.stdout.readline()
        ready = server.stdout.readline()
        match = re.match(r"explainrt: serving small on (http://127\.0\.0\.1:(\d+)/) ", serving)
        assert match, serving
        assert ready.strip() == f"explainrt: ready at {match[1]}"
        assert int(match[2]) > 0
        assert httpx.get(f"{match[1]}v2/health/ready", timeout=30).json() == {"ready": True}
    finally:
        server.terminate()
        server.wait(timeout=60)


def test_a_get_on_a_verb_says_to_post_and_bad_base64_names_no_object(http: httpx.Client) -> None:
    response = http.get("/v1/models/default:explain")
    assert response.status_code == 405
    assert "'explain' takes a POST" in response.json()["error"]
    response = http.post("/v1/models/default:predict", json={"instances": [{"image": {"b64": "bm90IGFuIGltYWdl"}}]})
    assert response.status_code == 400
    assert "BytesIO" not in response.json()["error"] and "the data" in response.json()["error"]
