"""The OpenAI-compatible HTTP server: the app (:mod:`.app`), request schemas (:mod:`.schemas`), the
continuous-batching scheduler (:mod:`.scheduler`), Prometheus metrics (:mod:`.metrics`) and the chat page
(``static/``). ``gptforge serve`` runs it; :func:`create_app` builds it for tests or another ASGI server."""

from .app import create_app, load_served_checkpoint, run_server
from .scheduler import QueueFull, Scheduler, Sequence, TokenEvent

__all__ = ["create_app", "load_served_checkpoint", "run_server", "QueueFull", "Scheduler", "Sequence", "TokenEvent"]
