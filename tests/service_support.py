"""Helpers of the service tests: apps on a shared model cache, a loopback uvicorn, a webhook sink."""

from __future__ import annotations

import contextlib
import http.server
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

from diffguide.service.config import ServiceConfig
from diffguide.service.models import ModelCache
from diffguide.service.server import create_app

PROMPT = "a handwritten digit 7"


def job_body(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "prompt": PROMPT,
        "steps": 3,
        "guidance": [{"method": "cfg", "scale": 4.0}, {"method": "pag", "scale": 1.5}],
    }
    body.update(overrides)
    return body


@contextlib.contextmanager
def client(cache: ModelCache, data_dir: Path, **settings: Any) -> Iterator[TestClient]:
    settings.setdefault("threads", 1)
    app = create_app(ServiceConfig(data_dir, **settings), cache)
    with TestClient(app) as c:
        yield c


def wait_state(c: TestClient, job_id: str, states: tuple[str, ...], timeout: float = 60.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = c.get(f"/v1/jobs/{job_id}").json()
        if job["state"] in states:
            return job
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} not in {states} after {timeout}s: {job}")


@contextlib.contextmanager
def live_server(config: ServiceConfig, cache: ModelCache) -> Iterator[str]:
    """A real uvicorn on loopback in this process; yields its base URL."""
    import uvicorn

    srv = uvicorn.Server(
        uvicorn.Config(create_app(config, cache), host="127.0.0.1", port=free_port(), log_level="warning")
    )
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not srv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{srv.config.port}"
    finally:
        srv.should_exit = True
        thread.join(30)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Sink:
    """A loopback HTTP server recording the JSON bodies POSTed to it (webhook target)."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.arrived = threading.Event()
        sink = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers["Content-Length"])
                sink.bodies.append(json.loads(self.rfile.read(length)))
                self.send_response(204)
                self.end_headers()
                sink.arrived.set()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Sink:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()


class Gate:
    """A forward pre-hook on the UNet that stops the run at forward ``at`` until opened (or raises)."""

    def __init__(self, unet: Any, at: int, raise_error: bool = False) -> None:
        self.at, self.raise_error = at, raise_error
        self.calls = 0
        self.reached, self.opened = threading.Event(), threading.Event()
        self.handle = unet.register_forward_pre_hook(self._hook)

    def _hook(self, *args: Any) -> None:
        self.calls += 1
        if self.calls == self.at:
            self.reached.set()
            if self.raise_error:
                raise RuntimeError("boom in the model")
            self.opened.wait(30)

    def remove(self) -> None:
        self.opened.set()
        self.handle.remove()
