"""Alerts POSTed as JSON to a URL, on a thread of their own so that a slow or dead endpoint never stalls the
monitor: each alert is tried ``retries`` times with a growing pause, then given up with a warning."""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
import urllib.error
import urllib.request
from typing import Any, Optional

log = logging.getLogger(__name__)


class AlertPoster:
    def __init__(self, url: str, *, retries: int = 3, timeout: float = 5.0, backoff: float = 0.5):
        self.url = url
        self.retries = retries
        self.timeout = timeout
        self.backoff = backoff
        self.sent = 0
        self.failed = 0
        self._queue: "queue.Queue[Optional[dict[str, Any]]]" = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="gptforge-alert-post", daemon=True)
        self._thread.start()

    def post(self, alert: dict[str, Any]) -> None:
        self._queue.put(alert)

    def close(self, wait: float = 30.0) -> None:
        """Send what is queued (waiting at most ``wait`` seconds), then stop the thread."""
        self._queue.put(None)
        self._thread.join(wait)
        if self._thread.is_alive():
            log.warning("alert POSTs to %s still pending after %.0f s; giving them up", self.url, wait)

    def _run(self) -> None:
        while True:
            alert = self._queue.get()
            if alert is None:
                return
            self._send(alert)

    def _send(self, alert: dict[str, Any]) -> None:
        body = json.dumps(alert).encode("utf-8")
        error = ""
        for attempt in range(self.retries):
            request = urllib.request.Request(self.url, data=body, method="POST",
                                             headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    response.read()
                self.sent += 1
                return
            except urllib.error.HTTPError as exc:
                error = f"HTTP {exc.code}"
            except (urllib.error.URLError, OSError, ValueError) as exc:
                error = str(getattr(exc, "reason", exc))
            log.debug("alert POST to %s failed (try %d of %d): %s", self.url, attempt + 1, self.retries, error)
            if attempt + 1 < self.retries:
                time.sleep(self.backoff * 2 ** attempt)
        self.failed += 1
        log.warning("could not POST alert %s to %s after %d tries: %s", alert.get("id"), self.url, self.retries, error)
