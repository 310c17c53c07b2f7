"""Server fault cases, on the small ResNet-18 served in this process by uvicorn on a real socket:
a body that is not JSON (415), more images than the per-request limit (413), a full queue (503
with Retry-After), a client that disconnects while its explanation runs (the explanation is
cancelled and the worker moves on), and a corrupt model given to ``explainrt serve`` (one line,
exit status 2); and micro-batching of requests that queue behind a running explanation. Every wait is on an event (the explanation started, a response arrived); the
timeouts only keep a broken server from hanging the run.
"""

from __future__ import annotations

import json
import queue
import re
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from explainrt.errors import ExplanationCancelled
from explainrt.serve.app import ServeConfig, create_app
from explainrt.serve.codec import Limits

INFER = "/v2/models/small/infer"
PATIENCE = 120  # seconds before a wait counts as a hung server (never reached when it works)
# RISE with a million masks, two per runtime call: minutes of work, checked for cancellation between calls.
ENDLESS = {"method": "rise", "n_masks": 1_000_000, "max_batch": 2}


class Watched:
    """An Explainer whose explanations report when they start and how they end (the method's name, or "cancelled")."""

    def __init__(self, explainer: Any) -> None:
        self._explainer = explainer
        self.started = threading.Event()
        self.outcomes: queue.Queue[str] = queue.Queue()
        self.images_per_call: list[int] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._explainer, name)

    def explain(self, images: Any, *args: Any, **kwargs: Any) -> Any:
        self.images_per_call.append(len(images))
        self.started.set()
        try:
            explanation = self._explainer.explain(images, *args, **kwargs)
        except ExplanationCancelled:
            self.outcomes.put("cancelled")
            raise
        self.outcomes.put(kwargs["method"])
        return explanation


@contextmanager
def serving(explainer: Any, config: ServeConfig) -> Iterator[str]:
    """``explainer`` served as "small" by uvicorn on a thread; yields the base URL. The socket listens
    before the server starts, so a request sent at once waits in the backlog instead of failing."""
    import uvicorn

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    server = uvicorn.Server(uvicorn.Config(create_app({"small": explainer}, config), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(PATIENCE)
        listener.close()


def v2_body(explainer: Any, count: int, *, seed: int = 0, **parameters: Any) -> dict[str, Any]:
    images = np.random.default_rng(seed).standard_normal((count, 3, 64, 64)).astype(np.float32)
    return {"inputs": [{"name": explainer.spec.image_input, "shape": list(images.shape), "datatype": "FP32",
                        "data": images.ravel().tolist()}], "parameters": parameters}


def send_without_reading(url: str, path: str, body: dict[str, Any]) -> socket.socket:
    """POST ``body`` on a raw connection and return it unread (closing it is the client going away)."""
    payload = json.dumps(body).encode()
    host, port = url.removeprefix("http://").split(":")
    connection = socket.create_connection((host, int(port)))
    connection.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                       f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
    return connection


def test_a_client_that_goes_away_cancels_its_running_explanation_and_the_worker_moves_on(small_explainer) -> None:  # noqa: ANN001
    watched = Watched(small_explainer)
    with serving(watched, ServeConfig(max_batch=2, max_wait=0.0)) as url, httpx.Client(base_url=url, timeout=PATIENCE) as http:
        leaving = send_without_reading(url, INFER, v2_body(small_explainer, 1, **ENDLESS))
        assert watched.started.wait(PATIENCE)
        leaving.close()
        assert watched.outcomes.get(timeout=PATIENCE) == "cancelled"  # RISE stopped between its runtime calls
        response = http.post(INFER, json=v2_body(small_explainer, 2, method="gradcam"))
        assert response.status_code == 200, response.text
        assert watched.outcomes.get(timeout=PATIENCE) == "gradcam"
        maps = next(o for o in response.json()["outputs"] if o["name"] == "explainrt.maps")
        assert maps["shape"] == [2, 64, 64] and np.ptp(maps["data"]) > 0
        metrics = http.get("/metrics").text
        assert 'status="499"' in metrics  # the abandoned request is counted as a client that closed it


def test_a_full_queue_is_503_with_retry_after_and_the_queued_request_is_served(small_explainer) -> None:  # noqa: ANN001
    watched = Watched(small_explainer)
    config = ServeConfig(max_batch=1, max_wait=0.0, max_queue=1)
    with serving(watched, config) as url, httpx.Client(base_url=url, timeout=PATIENCE) as http, \
            ThreadPoolExecutor(2) as pool:
        running = send_without_reading(url, INFER, v2_body(small_explainer, 1, **ENDLESS))
        assert watched.started.wait(PATIENCE)  # the worker is busy: later requests queue
        requests = [pool.submit(http.post, INFER, json=v2_body(small_explainer, 1, method="gradcam")) for _ in range(2)]
        done, _ = wait(requests, timeout=PATIENCE, return_when=FIRST_COMPLETED)
        refused = next(iter(done)).result()  # one image fits in the queue; the other request is refused at once
        assert refused.status_code == 503, refused.text
        assert "1 images queued (limit 1); retry later" in refused.json()["error"]
        assert int(refused.headers["Retry-After"]) >= 1
        running.close()  # the running RISE is cancelled, so the queued request runs next
        assert sorted(request.result(timeout=PATIENCE).status_code for request in requests) == [200, 503]
        assert watched.outcomes.get(timeout=PATIENCE) == "cancelled"
        assert watched.outcomes.get(timeout=PATIENCE) == "gradcam"


def queued_images(http: httpx.Client) -> float:
    """The served model's queue depth, as /metrics reports it."""
    return float(re.search(r'^explainrt_queue_depth\{model="small"\} (\S+)$', http.get("/metrics").text, re.M)[1])


def test_requests_queued_behind_a_running_explanation_share_one_runtime_call(small_explainer) -> None:  # noqa: ANN001
    """Batching without a wall-clock window (max_wait 0): four Grad-CAM requests queue while RISE runs;
    once RISE is cancelled they are one batch, one explain() call, and each answer is its own image's."""
    watched = Watched(small_explainer)
    with serving(watched, ServeConfig(max_batch=8, max_wait=0.0)) as url, \
            httpx.Client(base_url=url, timeout=PATIENCE) as http, ThreadPoolExecutor(4) as pool:
        running = send_without_reading(url, INFER, v2_body(small_explainer, 1, **ENDLESS))
        assert watched.started.wait(PATIENCE)
        bodies = [v2_body(small_explainer, 1, seed=seed, method="gradcam") for seed in range(4)]
        requests = [pool.submit(http.post, INFER, json=body) for body in bodies]
        deadline = time.monotonic() + PATIENCE
        while queued_images(http) < 4:  # every request has arrived (each answer needs the worker)
            assert not any(request.done() for request in requests) and time.monotonic() < deadline
            time.sleep(0.01)
        running.close()
        responses = [request.result(timeout=PATIENCE) for request in requests]
        assert watched.outcomes.get(timeout=PATIENCE) == "cancelled"
        assert watched.outcomes.get(timeout=PATIENCE) == "gradcam"
        assert watched.images_per_call == [1, 4]  # RISE's image, then the four requests in one call
    for body, response in zip(bodies, responses, strict=True):
        assert response.status_code == 200, response.text
        images = np.asarray(body["inputs"][0]["data"], np.float32).reshape(body["inputs"][0]["shape"])
        maps = next(o for o in response.json()["outputs"] if o["name"] == "explainrt.maps")
        expected = small_explainer.explain(images, method="gradcam").maps
        np.testing.assert_allclose(np.asarray(maps["data"]).reshape(maps["shape"]), expected, atol=1e-5)


@pytest.mark.parametrize(("content_type", "accepted"), [
    ("text/plain", False), ("application/x-www-form-urlencoded", False), ("image/png", False),
    ("multipart/form-data; boundary=x", False), ("application/json; charset=utf-8", True),
    ("application/vnd.api+json", True), (None, True),
])
def test_a_body_that_is_not_json_is_415(small_explainer, content_type: str | None, accepted: bool) -> None:  # noqa: ANN001
    with serving(small_explainer, ServeConfig()) as url, httpx.Client(base_url=url, timeout=PATIENCE) as http:
        headers = {"Content-Type": content_type} if content_type else {}
        content = json.dumps(v2_body(small_explainer, 1)).encode()
        response = http.post(INFER, content=content, headers=headers)
        if accepted:
            assert response.status_code == 200, response.text
        else:
            assert response.status_code == 415, response.text
            assert response.json()["error"].startswith(f"request body has Content-Type {content_type.split(';')[0]!r}; "
                                                       "send JSON with Content-Type: application/json")
        assert http.post(INFER, json=v2_body(small_explainer, 1)).status_code == 200  # and it keeps serving


def test_more_images_than_the_per_request_limit_is_413_naming_the_limit(small_explainer) -> None:  # noqa: ANN001
    config = ServeConfig(limits=Limits(max_instances=2))
    with serving(small_explainer, config) as url, httpx.Client(base_url=url, timeout=PATIENCE) as http:
        response = http.post(INFER, json=v2_body(small_explainer, 3, method="gradcam"))
        assert response.status_code == 413
        assert response.json()["error"] == "3 images exceed the limit of 2 per request (--max-images)"
        response = http.post("/v1/models/small:predict", json={"instances": [[[[0, 0, 0]]]] * 3})
        assert response.status_code == 413
        assert response.json()["error"] == "3 images exceed the limit of 2 per request (--max-images)"
        assert http.post(INFER, json=v2_body(small_explainer, 2, method="gradcam")).status_code == 200


@pytest.mark.parametrize("content", [b"", b"\x08\x07\x12\x03abc", b"not an ONNX model at all"])
def test_serve_with_a_corrupt_model_is_one_line_and_status_2(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                             content: bytes) -> None:
    from explainrt.cli import main

    model = tmp_path / "broken.onnx"
    model.write_bytes(content)
    assert main(["serve", "--port", "0", "--model", str(model)]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("explainrt: error: ") and "broken.onnx" in lines[0], captured.err
    assert "Traceback" not in captured.err and "explainrt: serving" not in captured.out
