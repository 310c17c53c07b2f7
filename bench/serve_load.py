"""Bounded load test of ``explainrt serve`` on loopback: latency percentiles, batching, memory.

Starts the server as a child process, sends ``--requests`` :explain requests (chelsea as PNG)
from ``--clients`` concurrent clients, then stops: it reports errors, latency percentiles,
throughput, the mean batch size the server formed (from /metrics), and the server's resident
memory over the first and the last 100 requests. ``--out`` writes the table as Markdown.

``--payloads N`` adds the payload comparison: one 224x224 explanation (chelsea as a UINT8
[1, 224, 224, 3] image, Grad-CAM map back) sent N times in sequence over the Open Inference
Protocol, as JSON and with the binary tensor extension (maps FP32, FP16, UINT8, PNG, or OVERLAY colour
PNGs): request and response bytes, p50 / p99 latency. ``--no-load`` runs only that.

    python bench/serve_load.py --clients 32 --requests 500 --payloads 200 --out bench/results/serve.md
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from explainrt.serve.launcher import ServerProcess

MEMORY_WINDOW = 100  # requests at the start and at the end whose resident memory is compared


@dataclass
class LoadResult:
    clients: int
    requests: int
    method: str
    seconds: float
    latencies: list[float] = field(default_factory=list)  # seconds, successful requests
    errors: list[str] = field(default_factory=list)
    rss: list[int] = field(default_factory=list)  # server RSS after each completed request, in order
    batches: int = 0
    batched_images: int = 0
    load_average: float = 0.0  # the machine's 1-minute load average when the run started

    @property
    def mean_batch(self) -> float:
        return self.batched_images / self.batches if self.batches else 0.0

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies, q)) if self.latencies else float("nan")

    def memory_window(self) -> tuple[float, float]:
        """Mean RSS (bytes) over the first and over the last MEMORY_WINDOW completed requests; with fewer
        than twice that many, over the first and the second half, so the two windows never overlap."""
        if len(self.rss) < 2:
            raise ValueError(f"comparing memory needs at least 2 samples, got {len(self.rss)}")
        window = min(MEMORY_WINDOW, len(self.rss) // 2)
        return statistics.fmean(self.rss[:window]), statistics.fmean(self.rss[-window:])

    @property
    def memory_change(self) -> float:
        first, last = self.memory_window()
        return last / first - 1


def chelsea_png_b64() -> str:
    from skimage import data

    buffer = io.BytesIO()
    Image.fromarray(data.chelsea()).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def batch_totals(metrics_text: str, kind: str = "explain") -> tuple[float, float]:
    """(batches, images) so far, from the explainrt_batch_size histogram of ``kind``."""
    totals = {}
    for suffix in ("count", "sum"):
        pattern = rf'^explainrt_batch_size_{suffix}{{[^}}]*kind="{kind}"[^}}]*}} (\S+)$'
        totals[suffix] = sum(float(m) for m in re.findall(pattern, metrics_text, flags=re.MULTILINE))
    return totals["count"], totals["sum"]


async def _load(url: str, rss: Callable[[], int], clients: int, requests: int, body: dict) -> LoadResult:
    result = LoadResult(clients, requests, body["parameters"]["method"], 0.0)
    remaining = iter(range(requests))
    path = "/v1/models/default:explain"

    async def client(http: httpx.AsyncClient) -> None:
        for _ in remaining:  # shared iterator: the clients together send exactly `requests`
            tick = time.perf_counter()
            try:
                response = await http.post(path, json=body)
                if response.status_code == 200 and response.json()["explanations"][0]["overlay"]["b64"]:
                    result.latencies.append(time.perf_counter() - tick)
                else:
                    result.errors.append(f"HTTP {response.status_code}: {response.text[:200]}")
            except httpx.HTTPError as error:
                result.errors.append(f"{type(error).__name__}: {error}")
            result.rss.append(rss())

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:
        before = batch_totals((await http.get("/metrics")).text)
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        result.seconds = time.perf_counter() - start
        after = batch_totals((await http.get("/metrics")).text)
    result.batches = int(after[0] - before[0])
    result.batched_images = int(after[1] - before[1])
    return result


def run_load(server: ServerProcess, clients: int, requests: int, method: str = "gradcam", warmup_rounds: int = 3) -> LoadResult:
    """Send ``requests`` explain requests from ``clients`` concurrent clients to a running server.

    A concurrent warm-up (``warmup_rounds`` requests per client, not counted) first lets the
    runtime build its sessions and grow its memory pools to the batch sizes the load produces.
    """
    body = {"instances": [{"image": {"b64": chelsea_png_b64()}}], "parameters": {"method": method, "return": ["overlay"]}}
    warmup = asyncio.run(_load(server.url, server.rss_bytes, clients, clients * warmup_rounds, body))
    if warmup.errors:
        raise RuntimeError(f"the warm-up failed: {warmup.errors[0]}")
    load_average = os.getloadavg()[0]
    result = asyncio.run(_load(server.url, server.rss_bytes, clients, requests, body))
    result.load_average = load_average
    return result


HEADER = "Inference-Header-Content-Length"
PAYLOAD_CASES = (("JSON", False, "FP32"), ("binary", True, "FP32"), ("binary", True, "FP16"),
                 ("binary", True, "UINT8"), ("binary", True, "PNG"), ("binary", True, "OVERLAY"))
"""(encoding, binary tensors, map format) per row of the payload comparison."""


@dataclass
class PayloadRow:
    encoding: str
    map_format: str
    request_bytes: int
    response_bytes: int
    latencies: list[float]

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies, q))


def chelsea_224() -> np.ndarray:
    """Chelsea centre-cropped and resized to a UINT8 [1, 224, 224, 3] batch."""
    from skimage import data

    image = Image.fromarray(data.chelsea())
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    return np.asarray(image.crop((left, top, left + side, top + side)).resize((224, 224)))[None]


def payload_request(image: np.ndarray, binary: bool, map_format: str) -> tuple[bytes, dict[str, str]]:
    """A V2 request for one Grad-CAM map: JSON data, or the image as raw bytes after the JSON header."""
    tensor: dict = {"name": "input", "shape": list(image.shape), "datatype": "UINT8"}
    if binary:
        tensor["parameters"] = {"binary_data_size": image.nbytes}
    else:
        tensor["data"] = image.ravel().tolist()
    header = {"inputs": [tensor], "parameters": {"method": "gradcam"},
              "outputs": [{"name": "explainrt.maps", "parameters": {"binary_data": binary, "format": map_format}}]}
    text = json.dumps(header).encode()
    if not binary:
        return text, {"Content-Type": "application/json"}
    return text + image.tobytes(), {"Content-Type": "application/octet-stream", HEADER: str(len(text))}


def run_payloads(server: ServerProcess, runs: int) -> list[PayloadRow]:
    """Each payload case ``runs`` times in sequence (after 3 untimed requests), one client."""
    image = chelsea_224()
    rows = []
    with httpx.Client(base_url=server.url, timeout=120) as http:
        for encoding, binary, map_format in PAYLOAD_CASES:
            body, headers = payload_request(image, binary, map_format)
            row = PayloadRow(encoding, map_format, len(body), 0, [])
            for index in range(runs + 3):
                tick = time.perf_counter()
                response = http.post("/v2/models/default/infer", content=body, headers=headers)
                elapsed = time.perf_counter() - tick
                if response.status_code != 200:
                    raise RuntimeError(f"{encoding} {map_format}: HTTP {response.status_code}: {response.text[:200]}")
                if binary != (HEADER in response.headers):
                    raise RuntimeError(f"{encoding} {map_format}: the response's encoding is not the one asked for")
                row.response_bytes = len(response.content)
                if index >= 3:
                    row.latencies.append(elapsed)
            rows.append(row)
    return rows


def payload_markdown(rows: list[PayloadRow]) -> str:
    lines = ["| encoding | maps | request bytes | response bytes | p50 ms | p99 ms |", "|---|---|---:|---:|---:|---:|"]
    lines += [f"| {r.encoding} | {r.map_format} | {r.request_bytes:,} | {r.response_bytes:,} | "
              f"{r.percentile(50) * 1000:.1f} | {r.percentile(99) * 1000:.1f} |" for r in rows]
    runs = len(rows[0].latencies)
    return (f"## Payloads: one 224x224 Grad-CAM explanation over the Open Inference Protocol\n\n"
            f"UINT8 [1, 224, 224, 3] image in, `explainrt.maps` [1, 224, 224] out; {runs} sequential requests per "
            f"row, one client (after 3 untimed). JSON: data as JSON numbers; binary: the binary tensor extension "
            f"(raw little-endian tensors after the JSON header), maps as FP32, FP16, UINT8 (round(255 x map)) or "
            f"one 8-bit grayscale PNG, or OVERLAY (one colour PNG: the map drawn over the image, as V1's overlay)."
            f"\n\n" + "\n".join(lines) + "\n")


def markdown(result: LoadResult, server_arguments: list[str]) -> str:
    first, last = result.memory_window()
    rows = [
        ("clients x requests", f"{result.clients} x {result.requests} (`{result.method}` :explain, chelsea 451x300 PNG, overlay returned)"),
        ("errors", f"{len(result.errors)}"),
        ("wall time", f"{result.seconds:.1f} s"),
        ("throughput", f"{len(result.latencies) / result.seconds:.1f} requests/s"),
        ("latency p50 / p90 / p99 / max", " / ".join(f"{result.percentile(q) * 1000:.0f} ms" for q in (50, 90, 99, 100))),
        ("batches formed (server /metrics)", f"{result.batches} for {result.batched_images} images"),
        ("mean batch size", f"{result.mean_batch:.2f}"),
        (f"server RSS, mean of first / last {MEMORY_WINDOW} requests", f"{first / 2**20:.0f} MiB / {last / 2**20:.0f} MiB "
                                                                     f"({result.memory_change:+.1%})"),
    ]
    table = "\n".join(f"| {name} | {value} |" for name, value in rows)
    return (f"# explainrt serve: load test\n\n"
            f"`python bench/serve_load.py --clients {result.clients} --requests {result.requests} --method {result.method}`"
            f" (server: `explainrt serve {' '.join(server_arguments)}`, default model EfficientNet-Lite0 on "
            f"ONNX Runtime CPU; clients and server on one {platform.machine()} machine with {_cpus()} CPUs, "
            f"loopback; 1-minute load average {result.load_average:.1f} at the start: other processes shared the CPUs)\n\n| measure | value |\n|---|---|\n{table}\n")


def _cpus() -> int:
    return len(os.sched_getaffinity(0))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--method", default="gradcam")
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--max-queue-ms", type=float, default=5.0)
    parser.add_argument("--payloads", type=int, default=0, metavar="N",
                        help="also compare JSON and binary payloads of one 224x224 explanation, N requests each")
    parser.add_argument("--no-load", action="store_true", help="skip the load test (with --payloads)")
    parser.add_argument("--out", type=Path, help="write the Markdown table here")
    args = parser.parse_args(argv)
    if args.no_load and args.payloads < 1:
        parser.error("--no-load needs --payloads N")
    server_arguments = ["--max-batch", str(args.max_batch), "--max-queue-ms", str(args.max_queue_ms)]
    result, rows = None, []
    with ServerProcess(server_arguments) as server:
        if not args.no_load:
            result = run_load(server, args.clients, args.requests, args.method)
        if args.payloads > 0:
            rows = run_payloads(server, args.payloads)
        alive = server.alive()
    parts = ([markdown(result, server_arguments)] if result else []) + ([payload_markdown(rows)] if rows else [])
    report = "\n".join(parts)
    print(report)
    errors = result.errors if result else []
    for error in errors[:5]:
        print("error:", error, file=sys.stderr)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report)
    return 0 if not errors and alive else 1


if __name__ == "__main__":
    sys.exit(main())
