"""Run ``explainrt serve`` (or another HTTP server) as a child process on a loopback port (for tests and
benchmarks).

The server is a real separate process, so what is measured (latency, resident memory) is the
server's own, and a crash in it cannot hide behind the caller. ``explainrt serve`` listens on
``--port 0`` (a port the kernel picks) and the URL is read from its "ready at" line: a port probed
free beforehand could be taken by another process (another test worker's server) before the child
binds it. Another server (``command``) says it is ready with its own line (``ready``: uvicorn's).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

from explainrt.errors import ExplainrtError


class ServerStartError(ExplainrtError):
    """The server process exited or did not become ready in time."""


_READY = re.compile(r"^explainrt: ready at http://[^\s/]+:(?P<port>\d+)/?\s*$")
UVICORN_READY = re.compile(r"Uvicorn running on http://\S+:(?P<port>\d+)")
"""The line a uvicorn server (KServe's ModelServer) logs once it listens."""


class ServerProcess:
    """``with ServerProcess(["--max-batch", "8"]) as server: httpx.get(server.url + "/v2/health/ready")``.

    ``command`` runs another server in place of ``explainrt serve <arguments>`` (from ``cwd``), which logs
    ``ready`` (a pattern with the group ``port``) once it listens on ``127.0.0.1``."""

    def __init__(self, arguments: Sequence[str] = (), env: Mapping[str, str] | None = None,
                 log_path: str | os.PathLike | None = None, ready_timeout: float = 300.0, *,
                 command: Sequence[str] | None = None, cwd: str | os.PathLike | None = None,
                 ready: re.Pattern[str] = _READY) -> None:
        self.host = "127.0.0.1"
        self.port = 0  # known once the server says where it listens
        self.url = ""
        self.command = list(command) if command is not None else [
            sys.executable, "-m", "explainrt.cli", "-v", "serve", "--host", self.host, "--port", "0", *arguments]
        self.cwd = cwd
        self.ready = ready
        self.env = dict(env if env is not None else os.environ)
        self.log_path = Path(log_path) if log_path else None
        self.ready_timeout = ready_timeout
        self.process: subprocess.Popen[bytes] | None = None
        self._ready = threading.Event()
        self._output: threading.Thread | None = None

    def __enter__(self) -> ServerProcess:
        self.process = subprocess.Popen(self.command, env=self.env, cwd=self.cwd, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT)
        self._output = threading.Thread(target=self._read_output, args=(self.process,), daemon=True)
        self._output.start()
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None) -> None:
        self.stop()

    @property
    def pid(self) -> int:
        if self.process is None:
            raise ServerStartError("the server is not running")
        return self.process.pid

    def _read_output(self, process: subprocess.Popen[bytes]) -> None:
        """Copy the server's output to the log (if any) and catch its "ready at URL" line; runs on a thread
        until the process closes its output."""
        with open(self.log_path, "wb") if self.log_path else open(os.devnull, "wb") as log:
            assert process.stdout is not None
            for line in process.stdout:
                log.write(line)
                log.flush()
                if not self._ready.is_set() and (ready := self.ready.search(line.decode(errors="replace"))):
                    self.port = int(ready["port"])
                    self.url = f"http://{self.host}:{self.port}"
                    self._ready.set()
        self._ready.set()  # the process is gone: _wait_ready reports it

    def _wait_ready(self) -> None:
        if not self._ready.wait(self.ready_timeout):
            raise ServerStartError(f"the server was not ready within {self.ready_timeout:.0f} s{self._log_tail()}")
        if not self.url:
            assert self._output is not None and self.process is not None
            self._output.join()
            raise ServerStartError(f"the server exited with status {self.process.wait()} before it was ready"
                                   f"{self._log_tail()}")

    def _log_tail(self) -> str:
        if self.log_path and self.log_path.is_file():
            return ":\n" + self.log_path.read_text(errors="replace")[-2000:]
        return ""

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def rss_bytes(self) -> int:
        """Resident memory of the server process (Linux /proc)."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise ServerStartError(f"no VmRSS for process {self.pid}")

    def stop(self) -> None:
        """SIGTERM (uvicorn shuts down gracefully), then SIGKILL after 10 s."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        if self._output is not None:
            self._output.join()
