"""What the server tests share: the app on a free loopback port in a thread, configured as `gptforge serve`
configures it; a module's server-and-client fixtures in one call; and the events of a streamed answer."""

from __future__ import annotations

import json
import socket
import threading
import time
from contextlib import contextmanager
from typing import Iterator

import httpx

from gptforge.config import ServeConfig
from gptforge.serve import create_app
from gptforge.serve.app import load_served_checkpoint, server_config


class LiveServer:
    """uvicorn serving ``create_app(config, checkpoint)`` on a free 127.0.0.1 port in a thread, configured as
    ``gptforge serve`` configures it (:func:`server_config`)."""

    def __init__(self, config: ServeConfig, checkpoint, grounding=None, **app_options):
        import uvicorn

        self.app = create_app(config, checkpoint, grounding=grounding, **app_options)
        self.state = self.app.state.server
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        uv_config = server_config(self.app, config, log_level="warning")
        uv_config.timeout_graceful_shutdown = 2
        self.server = uvicorn.Server(uv_config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@contextmanager
def serving(config: ServeConfig, checkpoint=None, **app_options) -> Iterator[LiveServer]:
    """A :class:`LiveServer` of ``checkpoint`` (by default ``config``'s, loaded) with ``app_options``
    (``grounding``, ``moderator``, ...), closed on the way out: a module fixture is
    ``with serving(config) as live: yield live``."""
    live = LiveServer(config, checkpoint if checkpoint is not None else load_served_checkpoint(config),
                      **app_options)
    try:
        yield live
    finally:
        live.close()


@contextmanager
def client_of(live: LiveServer, **options) -> Iterator[httpx.Client]:
    """An httpx client on ``live``'s URL (a generous timeout: CI shares 2 cores)."""
    with httpx.Client(base_url=live.url, **{"timeout": 60, **options}) as client:
        yield client


def sse(response: httpx.Response) -> list[dict]:
    """The JSON events of a streamed answer, which must be a 200 that ends in ``data: [DONE]``."""
    assert response.status_code == 200, response.read()
    events = [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]
    assert events and events[-1] == "[DONE]", events[-3:]
    return [json.loads(e) for e in events[:-1]]
