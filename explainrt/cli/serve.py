"""The ``explainrt serve`` subcommand: load the models once, then serve them with uvicorn."""

from __future__ import annotations

import argparse
import logging
import socket
from typing import Any

from explainrt.cli.common import positive_int
from explainrt.export.inputs import INPUT_LAYOUTS
from explainrt.serve.codec import DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_PIXELS, Limits

log = logging.getLogger(__name__)


def register(commands: Any, parents: dict[str, argparse.ArgumentParser]) -> None:
    """Add ``serve`` to the CLI's subcommands."""
    serve = commands.add_parser(
        "serve", parents=[parents["verbose"]], help="serve explanations over HTTP (KServe V1/V2, web page)",
        description="Serve the models over HTTP: KServe V1 (/v1/models/NAME:predict, :explain), the Open Inference "
                    "Protocol (/v2/models/NAME/infer), Prometheus /metrics and a web page at /. Concurrent requests "
                    "for the same model, method and options are micro-batched into one runtime call.")
    serve.add_argument("--model", action="append", metavar="M", dest="models",
                       help="an ONNX file (explainable or not), served under its file stem; repeat for several "
                            "(default: the shipped EfficientNet-Lite0, served as 'default')")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8080, help="port to listen on (default: 8080; 0: any free port)")
    serve.add_argument("--max-batch", type=positive_int, default=16, metavar="N",
                       help="most images per runtime call (default: 16)")
    serve.add_argument("--max-queue-ms", type=float, default=5.0, metavar="MS",
                       help="longest a request waits for others to join its batch (default: 5)")
    serve.add_argument("--max-queue", type=positive_int, default=512, metavar="N",
                       help="images waiting per model before requests are refused with 503 (default: 512)")
    serve.add_argument("--max-body-mb", type=float, default=DEFAULT_MAX_BODY_BYTES / 2**20, metavar="MB",
                       help=f"largest request body (default: {DEFAULT_MAX_BODY_BYTES / 2**20:g})")
    serve.add_argument("--max-pixels", type=positive_int, default=DEFAULT_MAX_PIXELS, metavar="N",
                       help=f"largest image, in pixels (default: {DEFAULT_MAX_PIXELS})")
    serve.add_argument("--max-images", type=positive_int, default=Limits.max_instances, metavar="N",
                       help=f"most images in one request; more are refused with 413 (default: {Limits.max_instances})")
    serve.add_argument("--input-layout", choices=INPUT_LAYOUTS, metavar="LAYOUT",
                       help="the --model files' image input layout, nchw or nhwc, where a graph and its sizes do not "
                            "tell it (default: told from each model)")
    serve.add_argument("--provider", action="append", metavar="NAME", dest="providers",
                       help="onnxruntime execution provider, in priority order (default: CPUExecutionProvider)")
    serve.set_defaults(run=_serve)


def _serve(args: argparse.Namespace) -> int:
    from explainrt.errors import BackendUnavailableError, InvalidInputError

    try:
        import uvicorn

        from explainrt.serve.app import ServeConfig, create_app
    except ImportError as error:
        raise BackendUnavailableError(f"explainrt serve needs the serve extra (pip install 'explainrt[serve]'): {error}") from error
    from explainrt.serve.models import load_models

    if not 0 <= args.port <= 65535:
        raise InvalidInputError(f"--port must be a TCP port in 0..65535 (0: any free port), got {args.port}")
    if args.max_queue_ms < 0 or args.max_body_mb <= 0:
        raise InvalidInputError("--max-queue-ms must be >= 0 and --max-body-mb > 0, got "
                                f"{args.max_queue_ms} and {args.max_body_mb}")
    listener = _listen(args.host, args.port)  # before loading models: a taken port fails in a second
    try:
        explainers = load_models(args.models, args.providers, args.input_layout)
    except BaseException:
        listener.close()
        raise
    limits = Limits(max_body_bytes=int(args.max_body_mb * 2**20), max_pixels=args.max_pixels,
                    max_instances=args.max_images)
    config = ServeConfig(args.max_batch, args.max_queue_ms / 1000, args.max_queue, limits)
    app = create_app(explainers, config)
    host, port = listener.getsockname()[:2]
    url = f"http://{host}:{port}/"
    print(f"explainrt: serving {', '.join(explainers)} on {url} (KServe V1 /v1, Open Inference Protocol /v2, "
          "web page /)", flush=True)
    verbose = getattr(args, "verbose", 0) > 0
    server_config = uvicorn.Config(app, log_level="info" if verbose else "warning", access_log=verbose)
    _announcing_server(server_config, url).run(sockets=[listener])
    return 0


def _listen(host: str, port: int) -> socket.socket:
    """A bound, listening TCP socket, or an InvalidInputError saying why not (port taken, bad address)."""
    from explainrt.errors import InvalidInputError

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, port))
        listener.listen(2048)
    except (OSError, OverflowError) as error:
        listener.close()
        reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        raise InvalidInputError(f"cannot listen on {host}:{port}: {reason}") from None
    return listener


def _announcing_server(config: Any, url: str) -> Any:
    """uvicorn's server, printing one "ready" line once it accepts requests."""
    import uvicorn

    class Announcing(uvicorn.Server):
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets=sockets)
            if not self.should_exit:
                print(f"explainrt: ready at {url}", flush=True)

    return Announcing(config)
