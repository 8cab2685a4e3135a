"""The OpenAI-compatible HTTP app: routes, validation, errors, streaming, authentication, graceful shutdown.

    app = create_app(ServeConfig(checkpoint="runs/demo"))       # loads the checkpoint, starts the scheduler
    run_server(ServeConfig(checkpoint="runs/demo", port=8000))  # the same on uvicorn, with SIGTERM draining

Routes: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions`` (both with ``stream``
as server-sent events ending in ``data: [DONE]``), ``POST /v1/classify`` (classification checkpoints),
``POST /v1/score`` (candidate texts after a context: log-probabilities and ranks), ``GET /health``,
``GET /metrics`` (Prometheus text) and the chat page at ``/``; with ``--monitor DIR``, the live page of a
``gptforge monitor`` folder at ``/monitor`` and its data at ``GET /v1/monitor``.

Every error is OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``: 400 for a bad request
(also malformed HTTP, which uvicorn answers itself: :func:`server_config` gives it a protocol that answers
in this shape), 401 for a missing or wrong API key, 404/405 for an unknown route or method, 413 for an
oversized body, 415 for a body that is not JSON, 503 (with Retry-After) when the queue is full or the
server is draining, 504 when a request runs past ``request_timeout``. Every answer is strict JSON: a
non-finite float (a log-probability of a broken model) is sent as null, never as ``NaN``. The model runs
on one thread (:class:`~gptforge.serve.scheduler.Scheduler`); the event loop only parses, queues and
relays tokens.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import json
import logging
import re
import secrets
import threading
import time
import uuid
import weakref
from pathlib import Path
from typing import Any, AsyncIterator, Optional

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect

from ..config import GenerateConfig, ServeConfig
from ..errors import ConfigError, GptforgeError
from ..fsutil import json_safe
from .metrics import Metrics
from .moderation import CONTENT_FILTER, ServerModeration
from .scheduler import QueueFull, Scheduler, SchedulerStopped, Sequence, TokenEvent
from .schemas import (DEFAULT_COMPLETION_TOKENS, ChatCompletionRequest, ClassifyRequest, CompletionRequest,
                      ErrorResponse, ScoreRequest, first_error, openai_error)

log = logging.getLogger(__name__)

__all__ = ["create_app", "load_served_checkpoint", "run_server", "server_config", "ServerState"]

STATIC_DIR = Path(__file__).parent / "static"
ROUTES = ("/v1/models", "/v1/completions", "/v1/chat/completions", "/v1/classify", "/v1/score", "/health",
          "/metrics", "/openapi.json", "/", "/monitor", "/v1/monitor")
OPEN_ROUTES = ("/health", "/", "/monitor")  # the pages hold no data; they ask for the key themselves
RETRY_AFTER_S = 1
MAX_CLASSIFY_TEXTS = 256
POLL_S = 0.2  # how often a waiting handler checks its client and its deadline
ABORT_GRACE_S = 0.5  # after a second signal: time for open streams to send their error event before exit
JSON_CHARSETS = ("utf-8", "utf8")


# --------------------------------------------------------------------------------------------------
# Strict JSON out: no NaN or Infinity (not JSON), no lone surrogates (not UTF-8).
def json_text(content: Any) -> str:
    """``content`` as strict JSON text: a non-finite float becomes null (a broken model's log-probability
    or class probability; the answer's shape is kept), a lone surrogate U+FFFD."""
    try:
        text = json.dumps(content, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    except ValueError:  # a NaN or an infinity somewhere: the rare case pays for the walk
        text = json.dumps(json_safe(content), ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return text


class StrictJSONResponse(JSONResponse):
    """A JSONResponse that renders with :func:`json_text`; every JSON answer of the app is one."""

    def render(self, content: Any) -> bytes:
        return json_text(content).encode("utf-8")


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None, headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def response_body(self) -> dict:
        return openai_error(self.message, type=self.type, param=self.param, code=self.code)

    def response(self) -> JSONResponse:
        return StrictJSONResponse(self.response_body(), status_code=self.status, headers=self.headers)


def _bad(message: str, param: Optional[str] = None, code: Optional[str] = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


class ServerState:
    """What the routes share: the loaded checkpoint, its scheduler, metrics, and the draining flag."""

    def __init__(self, config: ServeConfig, checkpoint, grounding=None, moderator=None):
        self.config = config
        self.grounding = grounding
        """A :class:`~gptforge.knowledge.grounding.Grounding` (``--knowledge``): chat turns are grounded in it."""
        self.checkpoint = checkpoint
        self.model = checkpoint.model
        self.tokenizer = checkpoint.tokenizer
        task = checkpoint.config.get("task") or {}
        self.task = task.get("type", "lm") if isinstance(task, dict) else "lm"
        self.labels = list(task.get("labels") or []) if isinstance(task, dict) else []
        self.chat_template = (task.get("chat_template") if isinstance(task, dict) else None) or None
        # The name the user gave (`--checkpoint runs/demo` serves "demo"), not the step folder it resolved to.
        self.model_name = (config.model_name or Path(config.checkpoint or "").name or Path(str(checkpoint.path)).name
                           or "gptforge")
        self.created = int(time.time())
        self.scheduler = Scheduler(self.model, self.tokenizer, max_batch_size=config.max_batch_size,
                                   max_queue=config.max_queue, batch_invariant=config.batch_invariant)
        self.metrics = Metrics(self._gauges)
        self.moderation = ServerModeration(moderator, self.scheduler, self.metrics) if moderator is not None else None
        """Input and output screening with a classifier (``--moderation``), or None."""
        self.draining = False
        self.aborting = False  # a second signal: open requests end now with an error
        self.loop: Optional[asyncio.AbstractEventLoop] = None  # the event loop serving (set by the lifespan)
        # Generation requests being answered (event loop only); weak, so that a stream whose body was never
        # iterated (the client left first) does not stay here.
        self.jobs: "weakref.WeakSet[_Job]" = weakref.WeakSet()
        self._in_flight = 0
        self._lock = threading.Lock()

    @property
    def gpt(self):
        """The GPT itself (a classifier's ``base``)."""
        return getattr(self.model, "base", self.model)

    @property
    def block_size(self) -> int:
        return self.gpt.config.block_size

    @property
    def vocab_size(self) -> int:
        return self.gpt.config.vocab_size

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def enter(self) -> None:
        with self._lock:
            self._in_flight += 1

    def leave(self) -> None:
        with self._lock:
            self._in_flight -= 1

    def abort(self) -> None:
        """End every open request now (safe from any thread, a signal handler included): each stream sends an
        error event and ``data: [DONE]``, each waiting request a 503; the scheduler stops after its step."""
        self.draining = self.aborting = True
        self.scheduler.stop(timeout=0)
        loop = self.loop
        if loop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(self._abort_jobs)
            except RuntimeError:  # the loop closed meanwhile: nothing is open any more
                pass

    def _abort_jobs(self) -> None:  # event loop
        for job in list(self.jobs):
            job.abort()

    def _gauges(self) -> dict[str, tuple[str, str, float]]:
        s = self.scheduler.stats
        return {
            "gptforge_queue_length": ("gauge", "Sequences waiting for a place in the batch.", s.queue_length),
            "gptforge_running_batch_size": ("gauge", "Sequences in the running batch.", s.running),
            "gptforge_requests_in_flight": ("gauge", "HTTP requests being answered.", self._in_flight),
            "gptforge_generated_tokens_total": ("counter", "Tokens generated.", s.generated_tokens),
            "gptforge_prompt_tokens_total": ("counter", "Prompt tokens prefilled.", s.prompt_tokens),
            "gptforge_decode_steps_total": ("counter", "Batched decode steps run.", s.steps),
            "gptforge_cancelled_sequences_total": ("counter", "Sequences dropped (client gone, timeout, "
                                                   "shutdown).", s.cancelled),
            "gptforge_draining": ("gauge", "1 while shutting down (new requests get 503).", float(self.draining)),
        }


# --------------------------------------------------------------------------------------------------
# The gate: authentication, draining, body size, in-flight count and per-request metrics (pure ASGI,
# so that a streamed response counts until its last byte).
class _Gate:
    def __init__(self, app, state: ServerState):
        self.app = app
        self.state = state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        state = self.state
        path = scope.get("path", "")
        route = path if path in ROUTES else "other"
        start = time.monotonic()
        status_box = [500]

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status_box[0] = message["status"]
            await send(message)

        state.enter()
        try:
            refusal = self._refusal(scope, path)
            if refusal is not None:
                await refusal.response()(scope, receive, send_wrapper)
            else:
                await self.app(scope, receive, send_wrapper)
        finally:
            state.leave()
            state.metrics.observe_request(route, status_box[0], time.monotonic() - start)

    def _refusal(self, scope, path: str) -> Optional[ApiError]:
        state = self.state
        if scope.get("method") == "OPTIONS":
            return None  # CORS preflight (answered by the CORS middleware when origins are configured)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        key = state.config.api_key
        if key is not None and path not in OPEN_ROUTES:
            given = headers.get("authorization", "")
            token = given[7:].strip() if given[:7].lower() == "bearer " else ""
            if not secrets.compare_digest(token.encode("utf-8", "replace"), key.encode("utf-8")):
                return ApiError(401, "missing or wrong API key (send the header 'Authorization: Bearer <key>')",
                                type="authentication_error", code="invalid_api_key")
        if state.draining and path != "/health":
            return _shutting_down()
        length = headers.get("content-length")
        if length is not None:
            try:
                too_big = int(length) > state.config.max_request_bytes
            except ValueError:
                return _bad("the Content-Length header is not a number")
            if too_big:
                return _too_large(state.config.max_request_bytes)
        return None


def _shutting_down() -> ApiError:
    return ApiError(503, "the server is shutting down", type="server_error", code="shutting_down",
                    headers={"Retry-After": str(RETRY_AFTER_S)})


def _too_large(limit: int) -> ApiError:
    return ApiError(413, f"the request body is larger than {limit} bytes", code="request_too_large")


# --------------------------------------------------------------------------------------------------
def load_served_checkpoint(config: ServeConfig):
    """The checkpoint to serve, on the configured device: a language model, or a classifier."""
    from ..checkpoint import load_for_inference

    return load_for_inference(config, task=True)


def create_app(config: ServeConfig, checkpoint=None, *, grounding=None, moderator=None) -> FastAPI:
    """The app for ``config``; ``checkpoint`` (a loaded :class:`~gptforge.checkpoint.Checkpoint`) skips loading.

    ``grounding`` (a :class:`~gptforge.knowledge.grounding.Grounding`): each chat completion retrieves
    passages for its last user turns, puts them into the prompt's context slot and reports them as
    ``sources``; its knowledge base must have been built for the model's tokenizer (checked here, before
    anything is served). ``moderator`` (a :class:`~gptforge.moderation.Moderator`, ``--moderation``): every
    request's input and generated output are screened (docs/moderation.md). The scheduler thread starts with the app's lifespan and stops when the app shuts down.
    """
    if checkpoint is None:
        config.validate()
        checkpoint = load_served_checkpoint(config)
    state = ServerState(config, checkpoint, grounding, moderator)
    if moderator is not None and state.task != "lm":
        raise ConfigError(f"--moderation screens generated text, and the served model is a {state.task!r} model "
                          "that does not generate text")
    if grounding is not None:
        if state.task != "lm":
            raise ConfigError(f"--knowledge grounds chat replies, and the served model is a {state.task!r} model "
                              "that does not generate text")
        grounding.check_tokenizer(state.tokenizer)
    if config.monitor is not None and state.task == "classify":
        from ..monitor import monitor_labels

        folder_labels = monitor_labels(config.monitor)
        if folder_labels is not None and folder_labels != state.labels:
            raise ConfigError(f"--monitor {config.monitor} was written by a classifier with labels {folder_labels}, "
                              f"and the served classifier has {state.labels}: serve the checkpoint the monitor "
                              "runs with")

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.loop = asyncio.get_running_loop()
        if not state.scheduler.alive:
            state.scheduler.start()
        log.info("serving %s (%s) as %r", checkpoint.path, state.task, state.model_name)
        yield
        state.scheduler.stop(timeout=10)

    from .. import __version__

    # /openapi.json is served (behind the key when one is set); the docs pages are not: they load
    # their scripts from a CDN, and the chat page is the browser's way in.
    app = FastAPI(title="gptforge", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url="/openapi.json", default_response_class=StrictJSONResponse,
                  description="An OpenAI-compatible API serving one gptforge checkpoint. Every error is "
                              '{"error": {"message", "type", "param", "code"}}.')
    app.state.server = state
    _add_error_handlers(app)
    _add_routes(app, state)
    _add_openapi(app)
    app.add_middleware(_Gate, state=state)
    if config.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(config.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    return app


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        message = {404: f"no route {request.url.path}", 405: f"method {request.method} is not allowed on "
                   f"{request.url.path}"}.get(exc.status_code, str(exc.detail))
        return StrictJSONResponse(openai_error(message, type=kind), status_code=exc.status_code,
                                  headers=getattr(exc, "headers", None))

    @app.exception_handler(_ClientGone)
    async def client_gone(request: Request, exc: _ClientGone):  # nobody is listening; recorded in the metrics
        return StrictJSONResponse({}, status_code=499)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):  # a bug: logged, answered in the same shape
        log.exception("unexpected error answering %s", request.url.path)
        return StrictJSONResponse(openai_error("internal error", type="server_error"), status_code=500)


_BODIES = {"/v1/completions": CompletionRequest, "/v1/chat/completions": ChatCompletionRequest,
           "/v1/classify": ClassifyRequest, "/v1/score": ScoreRequest}
_ERRORS = {400: "a malformed request (the field at fault is `param`)", 401: "a missing or wrong API key",
           413: "a body over --max-request-bytes", 415: "a body that is not application/json",
           503: "the queue is full or the server is shutting down (see Retry-After)",
           504: "the request ran past --request-timeout"}


def _add_openapi(app: FastAPI) -> None:
    """The routes read their bodies themselves (strict types, 400s in OpenAI's shape, not FastAPI's 422s);
    the schema still describes each body and the error shape, for clients and for schema-driven fuzzers."""
    from fastapi.openapi.utils import get_openapi

    def openapi() -> dict:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for model in (*_BODIES.values(), ErrorResponse):
            body = model.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(body.pop("$defs", {}))
            components[model.__name__] = body
        error = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}
        for path, item in schema.get("paths", {}).items():
            for method, operation in item.items():
                responses = operation.setdefault("responses", {})
                responses.pop("422", None)  # FastAPI's own validation error; this server answers 400
                codes = [401] if app.state.server.config.api_key is not None and path not in OPEN_ROUTES else []
                if method == "post":
                    codes = [400, *codes, 413, 415, 503] + ([504] if path in _BODIES else [])
                    operation["requestBody"] = {"required": True, "content": {"application/json": {
                        "schema": {"$ref": f"#/components/schemas/{_BODIES[path].__name__}"}}}}
                for code in codes:
                    responses[str(code)] = {"description": _ERRORS[code], **error}
        app.openapi_schema = schema
        return schema

    app.openapi = openapi


# --------------------------------------------------------------------------------------------------
class _ClientGone(Exception):
    """The client hung up before its request body arrived."""


def _check_content_type(request: Request) -> None:
    """JSON bodies only (415 otherwise), in UTF-8. A request without a Content-Type is read as JSON: OpenAI's
    clients always send one, and a bare ``curl --data-binary @body.json`` sends none."""
    value = request.headers.get("content-type")
    if value is None:
        return
    media, _, params = value.partition(";")
    media = media.strip().lower()
    shown = value if len(value) <= 80 else value[:80] + "..."
    if media != "application/json":
        hint = " (curl -d sends a form; add -H 'Content-Type: application/json')" if media.startswith(
            "application/x-www-form-urlencoded") else ""
        raise ApiError(415, f"the body must be JSON, sent with 'Content-Type: application/json'; got {shown!r}{hint}",
                       code="unsupported_media_type")
    for param in params.split(";"):
        name, _, charset = param.partition("=")
        if name.strip().lower() == "charset" and charset.strip().strip('"').lower() not in JSON_CHARSETS:
            raise ApiError(415, f"JSON bodies must be UTF-8; got {shown!r}", code="unsupported_media_type")


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _lone_surrogate(data: dict) -> tuple[bool, Optional[str]]:
    """Whether a string (or a key) in ``data`` holds a lone surrogate (``"\\ud800"``: valid JSON, not valid
    Unicode, no tokenizer can take it), and the top-level field it sits in (None: a key of the body)."""
    stack: list[tuple[Any, Optional[str]]] = []
    for key, value in data.items():
        if _not_unicode(key):
            return True, None
        stack.append((value, key))
    while stack:
        value, field = stack.pop()
        if isinstance(value, str):
            if _not_unicode(value):
                return True, field
        elif isinstance(value, dict):
            for k, v in value.items():
                if _not_unicode(k):
                    return True, field
                stack.append((v, field))
        elif isinstance(value, list):
            stack.extend((v, field) for v in value)
    return False, None


def _not_unicode(text: str) -> bool:
    if text.isascii():
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


async def _read_json(request: Request, limit: int, model_cls):
    _check_content_type(request)
    body = bytearray()
    try:
        async for chunk in request.stream():
            body.extend(chunk)
            if len(body) > limit:
                raise _too_large(limit)
    except ClientDisconnect:
        raise _ClientGone() from None
    try:
        text = bytes(body).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _bad(f"the body is not valid UTF-8: byte 0x{body[exc.start]:02x} at position {exc.start}") from None
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise _bad(f"the body is not valid JSON: {exc}") from None
    except RecursionError:
        raise _bad("the body is not valid JSON: nested too deeply") from None
    if not isinstance(data, dict):
        raise _bad(f"the body must be a JSON object, got {type(data).__name__}")
    if _SURROGATE_ESCAPE.search(body):  # only a \uD800-\uDFFF escape makes a surrogate
        found, param = _lone_surrogate(data)
        if found:
            where = f"{param} holds" if param is not None else "a field name is"
            raise _bad(f"{where} a lone surrogate (an unpaired \\uD800-\\uDFFF escape), which is not valid Unicode",
                       param=param, code="invalid_unicode")
    try:
        return model_cls.model_validate(data)
    except ValidationError as exc:
        message, param = first_error(exc)
        raise _bad(message, param=param) from None
    except (RecursionError, ValueError) as exc:
        raise _bad(f"invalid request: {exc}") from None


def _check_model(state: ServerState, name: Optional[str]) -> None:
    if name is not None and name != state.model_name:
        raise ApiError(400, f"the model {name!r} does not exist; this server serves {state.model_name!r}",
                       param="model", code="model_not_found")


def _add_routes(app: FastAPI, state: ServerState) -> None:
    @app.get("/health")
    async def health():
        if state.draining:
            return StrictJSONResponse({"status": "draining"}, status_code=503,
                                      headers={"Retry-After": str(RETRY_AFTER_S)})
        if not state.scheduler.alive:
            return StrictJSONResponse({"status": "scheduler stopped"}, status_code=503)
        return {"status": "ok", "model": state.model_name, "task": state.task}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(state.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/", include_in_schema=False)
    async def chat_page():
        page = STATIC_DIR / "index.html"
        if not page.is_file():
            raise ApiError(404, "no chat page is installed", type="not_found_error")
        return FileResponse(page, media_type="text/html")

    @app.get("/monitor", include_in_schema=False)
    async def monitor_page():
        if state.config.monitor is None:
            raise ApiError(404, "no monitor is shown: start the server with --monitor DIR", type="not_found_error")
        return FileResponse(STATIC_DIR / "monitor.html", media_type="text/html")

    @app.get("/v1/monitor")
    async def monitor_data(request: Request):
        """The --monitor folder's per-key label shares and recent alerts (gptforge.monitor.read_monitor);
        ``?points=N`` (per key, default 500) and ``?alerts=N`` (default 50) bound the answer."""
        if state.config.monitor is None:
            raise ApiError(404, "no monitor folder is served: start the server with --monitor DIR",
                           type="not_found_error")
        limits = {}
        for name, default, most in (("points", 500, 10_000), ("alerts", 50, 1_000)):
            given = request.query_params.get(name, str(default))
            if not (given.isascii() and given.isdigit()) or not 1 <= int(given) <= most:
                raise _bad(f"{name} must be an integer in [1, {most}], got {given!r}", param=name)
            limits[name] = int(given)
        from ..monitor import read_monitor

        return await asyncio.to_thread(read_monitor, state.config.monitor, max_points=limits["points"],
                                       max_alerts=limits["alerts"])

    @app.get("/v1/models")
    async def models():  # context_length: the page (and any client) sizes max_tokens by it
        return {"object": "list", "data": [{"id": state.model_name, "object": "model", "created": state.created,
                                            "owned_by": "gptforge", "task": state.task,
                                            "context_length": state.block_size}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = await _read_json(request, state.config.max_request_bytes, CompletionRequest)
        _check_model(state, req.model)
        _require_lm(state)
        prompts_ids, prompt_texts = _completion_prompts(state, req.prompt)
        if req.max_tokens == 0:  # OpenAI's legacy scoring form: the prompt back, with its log-probabilities
            return await _echo_only(state, req, prompts_ids, prompt_texts)
        refused = await _moderate_input(state, [[text] for text in prompt_texts], "prompt")
        job = _Job(state, request, kind="completion", req=req, prompts_ids=prompts_ids,
                   max_tokens=req.max_tokens, default_tokens=DEFAULT_COMPLETION_TOKENS, logprobs=req.logprobs,
                   echo_texts=prompt_texts if req.echo else None, refused=refused)
        if req.echo and req.logprobs is not None:  # the prompt's log-probabilities, then the generated ones
            job.echo_logprobs = await _prompt_logprobs(state, prompts_ids, req.logprobs)
        return await job.respond()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = await _read_json(request, state.config.max_request_bytes, ChatCompletionRequest)
        _check_model(state, req.model)
        _require_lm(state)
        # Retrieval is CPU work: off the event loop, so that streams in flight keep flowing.
        prepared = await asyncio.to_thread(_chat_prompt, state, req) if state.grounding else _chat_prompt(state, req)
        refused = await _moderate_input(state, [_new_user_texts(req)], "messages")
        if prepared.refusal is not None and not refused:
            return _refusal(state, req, prepared)
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        job = _Job(state, request, kind="chat", req=req, prompts_ids=[prepared.ids], max_tokens=req.token_limit,
                   logprobs=logprobs, sources=prepared.sources if state.grounding is not None else None,
                   refused=refused)
        return await job.respond()

    @app.post("/v1/classify")
    async def classify(request: Request):
        req = await _read_json(request, state.config.max_request_bytes, ClassifyRequest)
        _check_model(state, req.model)
        if state.task != "classify":
            raise _bad(f"the served model is a {state.task!r} model; /v1/classify needs a classification "
                       f"checkpoint (gptforge finetune --task classify)", code="unsupported_task")
        texts = [req.input] if isinstance(req.input, str) else list(req.input)
        if len(texts) > MAX_CLASSIFY_TEXTS:
            raise _bad(f"at most {MAX_CLASSIFY_TEXTS} texts per request, got {len(texts)}", param="input")
        prompt_tokens = 0
        for i, text in enumerate(texts):
            n_tokens = len(state.tokenizer.encode(text))
            if not n_tokens:  # nothing for the classifier to read
                raise _bad(f"input {i} is empty; every text needs at least one token", param="input")
            prompt_tokens += n_tokens
        from ..evaluate.predict import classify_texts

        job = functools.partial(classify_texts, state.model, state.tokenizer, texts, state.labels)
        if req.explain:  # the same prediction, with each token's attribution to it (gptforge.explain)
            from ..explain.attribution import classify_with_attributions

            job = functools.partial(classify_with_attributions, state.model, state.tokenizer, texts, state.labels,
                                    method=req.explain_method or "ig")
        results = await _run_model_job(state, job, param="input")
        return {"object": "list", "model": state.model_name,
                "data": [{"index": i, "object": "classification", "label": r["label"],
                          "probabilities": r["probabilities"],
                          **({"attributions": r["attributions"]} if "attributions" in r else {})}
                         for i, r in enumerate(results)],
                "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}}

    @app.post("/v1/score")
    async def score(request: Request):
        req = await _read_json(request, state.config.max_request_bytes, ScoreRequest)
        _check_model(state, req.model)
        if state.task != "lm":
            raise _bad(f"the served model is a {state.task!r} model; /v1/score needs a language model (it scores "
                       "texts by how likely the model finds them); use /v1/classify", code="unsupported_task")
        from .scoring import ScoreRequestError, check_candidates, score_candidates

        try:
            total = await asyncio.to_thread(check_candidates, state.tokenizer, req.context, req.candidates,
                                            state.block_size)  # tokenizing: off the event loop
        except ScoreRequestError as exc:
            raise _bad(str(exc), param=exc.param, code=exc.code) from None
        data = await _run_model_job(state, lambda: score_candidates(
            state.model, state.tokenizer, req.context, req.candidates, normalize=req.normalize,
            top_logprobs=req.top_logprobs), param="candidates")
        return {"object": "score", "model": state.model_name, "data": data,
                "usage": {"prompt_tokens": total, "total_tokens": total}}


async def _run_model_job(state: ServerState, job, *, param: Optional[str] = None, what: str = ""):
    """``job()``'s result, run on the scheduler thread between decode steps (the thread that owns the model
    and its cache): 504 past ``request_timeout``, 503 when the server stops first, a GptforgeError the
    request's fault (400 naming ``param``, its message after ``what``)."""
    try:
        future = state.scheduler.run_job(job)
    except SchedulerStopped:
        raise _shutting_down() from None
    # asyncio.wait, not wait_for: a job the stopping scheduler cancels must not look like this task's own
    # cancellation (awaiting the wrapped future would raise CancelledError here).
    waiter = asyncio.wrap_future(future)
    waiter.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved, even after a timeout
    done, _ = await asyncio.wait({waiter}, timeout=state.config.request_timeout)
    if not done:
        future.cancel()
        raise ApiError(504, "the request timed out", type="timeout", code="timeout")
    if waiter.cancelled():
        raise _shutting_down()
    try:
        return waiter.result()
    except GptforgeError as exc:
        raise _bad(what + str(exc), param=param) from None


async def _prompt_logprobs(state: ServerState, prompts_ids: list[list[int]], top_n: int) -> list[dict]:
    """Each prompt's legacy ``logprobs`` object (tokens, token_logprobs with the first null, top_logprobs,
    text_offset), computed on the scheduler thread."""
    from .scoring import prompt_legacy_logprobs

    return await _run_model_job(state, lambda: [prompt_legacy_logprobs(state.model, state.tokenizer, ids, top_n)
                                                for ids in prompts_ids], param="prompt")


async def _echo_only(state: ServerState, req: CompletionRequest, prompts_ids: list[list[int]],
                     prompt_texts: list[str]):
    """``max_tokens: 0``: nothing is generated; each choice is its prompt (``echo`` is required), with the
    prompt's log-probabilities when ``logprobs`` is set, and finish_reason "length" (as OpenAI answers)."""
    if not req.echo:
        raise _bad("max_tokens: max_tokens must be at least 1, got 0 (0 generates nothing: it returns the prompt "
                   "with echo: true, and its log-probabilities with logprobs too)", param="max_tokens")
    config = state.config
    if req.n > config.max_n:
        raise _bad(f"n must be at most {config.max_n}, got {req.n}", param="n")
    if req.n * len(prompts_ids) > config.max_queue:
        raise _bad(f"the request asks for {req.n * len(prompts_ids)} sequences; the server queues at most "
                   f"{config.max_queue}", param="n")
    for ids in prompts_ids:
        if len(ids) > state.block_size:
            raise _bad(f"this model's context is {state.block_size} tokens, but the prompt has {len(ids)}; "
                       "shorten the prompt", param="prompt", code="context_length_exceeded")
    logprobs = await _prompt_logprobs(state, prompts_ids, req.logprobs) if req.logprobs is not None else None
    choices = [{"index": p * req.n + i, "text": text, "logprobs": None if logprobs is None else logprobs[p],
                "finish_reason": "length"} for p, text in enumerate(prompt_texts) for i in range(req.n)]
    prompt_tokens = sum(len(ids) for ids in prompts_ids)
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": 0, "total_tokens": prompt_tokens}
    body = {"id": "cmpl-" + uuid.uuid4().hex[:24], "object": "text_completion", "created": int(time.time()),
            "model": state.model_name, "choices": choices}
    if not req.stream:
        return StrictJSONResponse({**body, "usage": usage})

    async def stream() -> AsyncIterator[str]:  # one chunk a choice, as its only (and last) chunk
        for choice in choices:
            yield f"data: {json_text({**body, 'choices': [choice]})}\n\n"
        if req.include_usage:
            yield f"data: {json_text({**body, 'choices': [], 'usage': usage})}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _moderate_input(state: ServerState, prompts: list[list[str]], param: str) -> dict[int, Any]:
    """With ``--moderation``: the prompts (each given as its texts) that the classifier blocks, as
    {prompt index: the most blocked text's Verdict}; they get the refusal and never reach the model. The
    check runs on the model thread between decode steps."""
    if state.moderation is None:
        return {}
    texts = [text for prompt in prompts for text in prompt]
    moderation = state.moderation
    # A GptforgeError here is e.g. a character the classifier's tokenizer cannot read.
    verdicts = iter(await _run_model_job(state, lambda: moderation.check_inputs(texts), param=param,
                                         what=f"the moderation classifier cannot read the {param}: "))
    refused = {}
    for p, prompt in enumerate(prompts):
        blocked = [v for v in (next(verdicts) for _ in prompt) if v.blocked]
        if blocked:
            refused[p] = max(blocked, key=lambda v: v.probability)
    return refused


def _new_user_texts(req: ChatCompletionRequest) -> list[str]:
    """The user messages that moderation reads: those after the last assistant message (a client that keeps
    an earlier refused message in its history is not refused again for it; the reply to it is screened)."""
    texts: list[str] = []
    for m in req.messages:
        if m.role == "assistant":
            texts = []
        elif m.role == "user":
            texts.append(m.text)
    return texts


def _require_lm(state: ServerState) -> None:
    if state.task != "lm":
        raise _bad(f"the served model is a {state.task!r} model and does not generate text; "
                   f"use /v1/classify", code="unsupported_task")


def _completion_prompts(state: ServerState, prompt) -> tuple[list[list[int]], list[str]]:
    from ..generate.engine import encode_prompt

    if isinstance(prompt, str):
        prompts: list = [prompt]
    elif all(isinstance(p, int) for p in prompt):
        prompts = [prompt]
    else:
        prompts = list(prompt)
        if not all(isinstance(p, str) for p in prompts) and not all(isinstance(p, list) for p in prompts):
            raise _bad("prompt must be a string, a list of strings, a list of token ids or a list of those",
                       param="prompt")
    ids, texts = [], []
    for p in prompts:
        if isinstance(p, str):
            try:
                ids.append(encode_prompt(state.tokenizer, p))
            except GptforgeError as exc:
                raise _bad(str(exc), param="prompt") from None
            texts.append(p)
        else:
            if any(not 0 <= t < state.vocab_size for t in p):
                raise _bad(f"token ids must be in [0, {state.vocab_size})", param="prompt")
            ids.append(list(p))
            texts.append(state.tokenizer.decode(p))
    return ids, texts


def _chat_prompt(state: ServerState, req: ChatCompletionRequest):
    """The request's prompt as a :class:`~gptforge.knowledge.grounding.GroundedPrompt`: with passages and
    sources when the server is grounded, else the plain chat's ids."""
    from ..knowledge.grounding import GroundedPrompt
    from ..tokenizer import DEFAULT_CHAT_TEMPLATE, encode_chat_prompt

    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text} for m in req.messages]
    template = state.chat_template or DEFAULT_CHAT_TEMPLATE
    try:
        if state.grounding is None:
            return GroundedPrompt(encode_chat_prompt(state.tokenizer, messages, template))
        block = state.block_size
        # A max_tokens that leaves no room is reported by _Job, in the same words as without grounding.
        limit = req.token_limit if req.token_limit is not None and req.token_limit < block else None
        return state.grounding.prepare(state.tokenizer, messages, template=template, context_length=block,
                                       max_new_tokens=limit)
    except GptforgeError as exc:
        raise _bad(str(exc), param="messages") from None


def _refusal(state: ServerState, req: ChatCompletionRequest, prepared):
    """The knowledge-only refusal as an ordinary chat completion (finish_reason "stop", empty sources),
    streamed or not as asked; the model does not run."""
    completion_id = "chatcmpl-" + uuid.uuid4().hex[:24]
    created = int(time.time())
    text = prepared.refusal
    n_tokens = len(state.tokenizer.encode(text))
    usage = {"prompt_tokens": len(prepared.ids), "completion_tokens": n_tokens * req.n,
             "total_tokens": len(prepared.ids) + n_tokens * req.n}
    if not req.stream:
        return StrictJSONResponse({
            "id": completion_id, "object": "chat.completion", "created": created, "model": state.model_name,
            "choices": [{"index": i, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": "stop"} for i in range(req.n)],
            "usage": usage, "sources": []})

    def chunk(choices: list[dict], **extra) -> str:
        body = {"id": completion_id, "object": "chat.completion.chunk", "created": created,
                "model": state.model_name, "choices": choices, **extra}
        return f"data: {json_text(body)}\n\n"

    async def stream() -> AsyncIterator[str]:
        yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                      "finish_reason": None} for i in range(req.n)])
        yield chunk([{"index": i, "delta": {"content": text}, "logprobs": None, "finish_reason": "stop"}
                     for i in range(req.n)], sources=[])
        if req.include_usage:
            yield chunk([], usage=usage)
        yield "data: [DONE]\n\n"

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


# --------------------------------------------------------------------------------------------------
class _Cancelled(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason  # "timeout" | "disconnected" | "server" (stopped) | "error" (the model failed) | "abort"


_ABORT = TokenEvent(-1, "", finish_reason="abort")  # queued by ServerState.abort (a second signal)


class _EventPump:
    """Hands token events from the scheduler thread to the event loop, one loop wake-up a burst.

    ``loop.call_soon_threadsafe`` writes to the loop's wake-up pipe every call; with 16 streams that was
    16 writes (and 16 wake-ups) a decode step, paid on the scheduler thread. Here the first event of a burst
    schedules one drain and the rest join it; the drain runs on the loop and delivers them in order.
    """

    _pumps: "dict[asyncio.AbstractEventLoop, _EventPump]" = {}
    _pumps_lock = threading.Lock()

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._lock = threading.Lock()
        self._pending: list[tuple[asyncio.Queue, TokenEvent]] = []

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop) -> "_EventPump":
        with cls._pumps_lock:
            for old in [other for other in cls._pumps if other.is_closed()]:
                del cls._pumps[old]
            pump = cls._pumps.get(loop)
            if pump is None:
                pump = cls._pumps[loop] = cls(loop)
            return pump

    def put(self, queue: asyncio.Queue, event: TokenEvent) -> None:  # scheduler thread
        with self._lock:
            self._pending.append((queue, event))
            if len(self._pending) > 1:  # a drain is already scheduled and has not run yet
                return
        try:
            self.loop.call_soon_threadsafe(self._drain)
        except RuntimeError:  # the event loop is gone (server stopped)
            with self._lock:
                self._pending.clear()

    def _drain(self) -> None:  # event loop
        with self._lock:
            items, self._pending = self._pending, []
        for queue, event in items:
            queue.put_nowait(event)


class _Job:
    """One completion or chat request: its sequences, their events, and the response built from them."""

    def __init__(self, state: ServerState, request: Request, *, kind: str, req, prompts_ids: list[list[int]],
                 max_tokens: Optional[int], logprobs: Optional[int], echo_texts: Optional[list[str]] = None,
                 default_tokens: Optional[int] = None, sources: Optional[list[dict]] = None,
                 refused: Optional[dict[int, Any]] = None):
        """``max_tokens`` None: ``default_tokens`` (None: the rest of the context), lowered to what the context
        leaves after each prompt, so that leaving it out never fails for length alone. ``sources`` (a grounded
        chat): reported in the response body, or in each streamed chunk that carries a finish_reason.
        ``refused`` (moderation): {prompt index: Verdict} of prompts whose choices are the refusal, unrun."""
        self.state, self.request, self.kind, self.req = state, request, kind, req
        self.refused = refused or {}
        self.screens: dict[int, Any] = {}  # choice index → its ScreenedSink (moderation)
        self.sources = sources
        self.prompts_ids = prompts_ids
        self.logprobs = logprobs
        self.echo_texts = echo_texts
        # Each prompt's legacy logprobs (echo with logprobs): set by the route before respond().
        self.echo_logprobs: Optional[list[dict]] = None
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        config = state.config
        n = req.n
        if n > config.max_n:
            raise _bad(f"n must be at most {config.max_n}, got {n}", param="n")
        if n * len(prompts_ids) > config.max_queue:
            raise _bad(f"the request asks for {n * len(prompts_ids)} sequences; the server queues at most "
                       f"{config.max_queue}", param="n")
        block = state.block_size
        self.max_tokens = []
        for ids in prompts_ids:
            room = block - len(ids)
            limit = max_tokens if max_tokens is not None else room if default_tokens is None else min(default_tokens,
                                                                                                      room)
            if len(ids) + max(limit, 1) > block:
                param = "messages" if kind == "chat" else "prompt"
                if max_tokens is not None and len(ids) < block:
                    param = "max_completion_tokens" if getattr(req, "max_completion_tokens", None) else "max_tokens"
                raise _bad(f"this model's context is {block} tokens, but {len(ids)} prompt tokens + "
                           f"{max(limit, 1)} completion tokens were asked for; shorten the prompt or lower max_tokens",
                           param=param, code="context_length_exceeded")
            self.max_tokens.append(limit)
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue[TokenEvent] = asyncio.Queue()
        self.pump = _EventPump.of(self.loop)
        self.deadline = time.monotonic() + config.request_timeout
        self.sequences = []
        for p, ids in enumerate(prompts_ids):
            gen = self._generate_config(self.max_tokens[p])
            if p in self.refused:
                continue
            group = object()  # the prompt's n choices share one prefill
            for i in range(n):
                index = p * n + i
                seed = None if req.seed is None else req.seed + index
                sink = self._sink
                if state.moderation is not None:  # events reach the client only as moderation clears them
                    sink = self.screens[index] = state.moderation.sink(self._sink, index)
                self.sequences.append(Sequence(ids, gen, sink, index=index, seed=seed, deadline=self.deadline,
                                               prefill_group=group))
                if state.moderation is not None:
                    sink.sequence = self.sequences[-1]

    def _generate_config(self, max_tokens: int) -> GenerateConfig:
        req = self.req
        config = GenerateConfig(
            max_new_tokens=max_tokens, temperature=req.temperature, top_p=None if req.top_p >= 1 else req.top_p,
            presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty, stop=req.stop_list,
            logprobs=0 if self.logprobs is None else max(self.logprobs, 1), seed=req.seed,
            logit_bias=req.logit_bias, bad_words=req.bad_words or [],
        )
        try:
            config.check_vocab(self.state.vocab_size)
        except GptforgeError as exc:
            raise _bad(str(exc), param="logit_bias") from None
        try:
            return config.validate()
        except GptforgeError as exc:
            raise _bad(str(exc)) from None

    def _sink(self, event: TokenEvent) -> None:  # scheduler thread
        self.pump.put(self.events, event)

    def _cancel_all(self) -> None:
        for seq in self.sequences:
            seq.cancel()

    async def _next_event(self) -> TokenEvent:
        if not self.events.empty():  # already here: no wait_for (which makes a task and a timer each call)
            return self.events.get_nowait()
        while True:
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                raise _Cancelled("timeout")
            try:
                return await asyncio.wait_for(self.events.get(), min(POLL_S, remaining))
            except asyncio.TimeoutError:
                if await self.request.is_disconnected():
                    raise _Cancelled("disconnected") from None

    async def _events(self) -> AsyncIterator[TokenEvent]:
        """Every event of every sequence until all have finished; cancels them all if the caller stops."""
        left = len(self.sequences)
        try:
            while left:
                event = await self._next_event()
                if event.finish_reason == "abort":
                    raise _Cancelled("abort")
                if event.finish_reason == "error":
                    raise _Cancelled("error")
                if event.finish_reason == "cancelled":
                    # After a second signal the scheduler's stop may reach this job before its abort event does.
                    if self.state.aborting:
                        raise _Cancelled("abort")
                    raise _Cancelled("timeout" if time.monotonic() >= self.deadline else "server")
                if event.finish_reason is not None:
                    left -= 1
                yield event
        finally:
            if left:
                self._cancel_all()

    def abort(self) -> None:  # event loop
        self.events.put_nowait(_ABORT)

    def _submit(self) -> None:
        if self.state.aborting:
            raise _shutting_down()
        try:
            self.state.scheduler.submit(self.sequences)
        except QueueFull as exc:
            raise ApiError(503, f"the server is busy: {exc}; retry later", type="server_error", code="queue_full",
                           headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        except SchedulerStopped:
            raise _shutting_down() from None

    async def respond(self):
        self._submit()
        self.state.jobs.add(self)
        if self.req.stream:
            return StreamingResponse(self._stream(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            return await self._complete()
        finally:
            self.state.jobs.discard(self)

    # -- non-streaming --------------------------------------------------------------------------------
    def _choices(self) -> list["_Choice"]:
        """Every choice of the request, by index (a refused prompt's choices hold the refusal already)."""
        choices = [_Choice(self, index) for index in range(len(self.prompts_ids) * self.req.n)]
        for choice in choices:
            if choice.prompt in self.refused:
                choice.refuse(self.state.moderation.refusal, self.refused[choice.prompt])
        return choices

    async def _complete(self) -> JSONResponse:
        choices = self._choices()
        events = self._events()
        try:
            async for event in events:
                choices[event.index].add(event)
        except _Cancelled as exc:
            if exc.reason == "timeout":
                raise ApiError(504, f"the request did not finish within {self.state.config.request_timeout} s",
                               type="timeout", code="timeout") from None
            if exc.reason == "disconnected":
                return StrictJSONResponse({}, status_code=499)  # nobody is listening; recorded in the metrics only
            raise _stopped_error(exc.reason) from None
        finally:
            await events.aclose()
        body = {"id": self.id, "object": "chat.completion" if self.kind == "chat" else "text_completion",
                "created": self.created, "model": self.state.model_name,
                "choices": [c.final() for c in choices], "usage": self._usage(choices)}
        if self.sources is not None:
            body["sources"] = self.sources
        return StrictJSONResponse(body)

    def _usage(self, choices) -> dict[str, int]:
        prompt = sum(len(ids) for ids in self.prompts_ids)
        completion = sum(c.tokens for c in choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    # -- streaming -------------------------------------------------------------------------------------
    def _chunk(self, choices: list[dict], usage: Optional[dict] = None) -> str:
        body = {"id": self.id, "object": "chat.completion.chunk" if self.kind == "chat" else "text_completion",
                "created": self.created, "model": self.state.model_name, "choices": choices}
        if self.sources is not None and any(c.get("finish_reason") is not None for c in choices):
            body["sources"] = self.sources  # the final chunk of a choice (OpenAI clients ignore the field)
        if usage is not None:
            body["usage"] = usage
        return f"data: {json_text(body)}\n\n"

    async def _stream(self) -> AsyncIterator[str]:
        choices = self._choices()
        if self.kind == "chat":
            yield self._chunk([{"index": c.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                "finish_reason": None} for c in choices])
        elif self.echo_texts is not None:
            yield self._chunk([{"index": c.index, "text": c.echo, "logprobs": c.echo_logprobs, "finish_reason": None}
                               for c in choices if c.verdict is None])
        if self.refused:  # moderation's refusals first: the model never ran for them
            yield self._chunk([c.chunk(c.pieces[0], None, CONTENT_FILTER) for c in choices if c.verdict is not None])
        events = self._events()
        try:
            async for event in events:
                chunk = choices[event.index].add(event)
                if chunk is not None:
                    yield self._chunk([chunk])
        except _Cancelled as exc:
            if exc.reason == "disconnected":
                return
            if exc.reason == "timeout":
                error = openai_error("the request did not finish within the server's timeout", type="timeout",
                                     code="timeout")
            else:
                error = _stopped_error(exc.reason).response_body()
            yield f"data: {json_text(error)}\n\n"
        except Exception:  # a bug: logged; the stream still ends as the protocol says, with an error event
            log.exception("unexpected error streaming %s", self.id)
            yield f"data: {json_text(openai_error('internal error', type='server_error'))}\n\n"
        else:
            if self.req.include_usage:
                yield self._chunk([], usage=self._usage(choices))
        finally:
            await events.aclose()
            self.state.jobs.discard(self)
        yield "data: [DONE]\n\n"


def _stopped_error(reason: str) -> ApiError:
    """Why a request ended before its last token, when the client is still there and it did not time out."""
    if reason == "abort":
        return ApiError(503, "the server is shutting down now; the request did not finish",
                        type="server_error", code="shutting_down", headers={"Retry-After": str(RETRY_AFTER_S)})
    if reason == "error":  # a fault of the server (logged by the scheduler), not of the request
        return ApiError(500, "internal error: the model failed while answering this request", type="server_error")
    return ApiError(503, "the server stopped before the request finished", type="server_error",
                    code="shutting_down", headers={"Retry-After": str(RETRY_AFTER_S)})


class _Choice:
    """One choice's text, tokens and log-probabilities as its events arrive."""

    def __init__(self, job: _Job, index: int):
        self.job = job
        self.index = index
        self.pieces: list[str] = []
        self.tokens = 0
        self.finish_reason: Optional[str] = None
        prompt = index // job.req.n
        self.echo = job.echo_texts[prompt] if job.echo_texts is not None else ""
        self.offset = len(self.echo)
        self.lp_tokens: list[str] = []
        self.lp_values: list[float] = []
        self.lp_top: list[Any] = []
        self.lp_offsets: list[int] = []
        self.lp_chat: list[dict] = []
        self.echo_logprobs = job.echo_logprobs[prompt] if job.echo_logprobs is not None else None
        if self.echo_logprobs is not None:  # the prompt's tokens come first (OpenAI's echo with logprobs)
            self.lp_tokens += self.echo_logprobs["tokens"]
            self.lp_values += self.echo_logprobs["token_logprobs"]
            self.lp_top += self.echo_logprobs["top_logprobs"]
            self.lp_offsets += self.echo_logprobs["text_offset"]
        self.prompt = prompt
        self.verdict = None  # moderation's Verdict when it refused the input (see refuse) or cut the output

    def refuse(self, text: str, verdict) -> None:
        """This choice is moderation's refusal of its input: ``text``, finish reason "content_filter"."""
        self.pieces, self.finish_reason, self.verdict, self.echo = [text], CONTENT_FILTER, verdict, ""
        self.echo_logprobs = None  # nor is its prompt echoed (with echo), log-probabilities included
        self.lp_tokens, self.lp_values, self.lp_top, self.lp_offsets = [], [], [], []

    def chunk(self, text: str, logprobs, finish_reason: Optional[str]) -> dict:
        """The streamed chunk's choice for ``text``."""
        if self.job.kind == "chat":
            delta = {"content": text} if text else {}
            body = {"index": self.index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        else:
            body = {"index": self.index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
        return self._with_moderation(body)

    def _with_moderation(self, body: dict) -> dict:
        """A choice that moderation ended says why: ``{"side", "label", "probability"}`` (OpenAI's clients
        ignore the field)."""
        if body.get("finish_reason") == CONTENT_FILTER:
            if self.verdict is None and self.index in self.job.screens:
                self.verdict = self.job.screens[self.index].verdict
            if self.verdict is not None:
                body["moderation"] = {"side": self.verdict.side, "label": self.verdict.label,
                                      "probability": self.verdict.probability}
        return body

    def add(self, event: TokenEvent) -> Optional[dict]:
        """Record ``event``; the streaming chunk's choice for it (None when there is nothing to send)."""
        logprobs = None
        if event.token_id is not None:
            self.tokens += 1
            if self.job.logprobs is not None and event.logprob is not None:
                logprobs = self._add_logprob(event)
        self.pieces.append(event.text)
        if event.finish_reason is not None:
            self.finish_reason = event.finish_reason
        if not event.text and logprobs is None and event.finish_reason is None:
            return None
        return self.chunk(event.text, logprobs, event.finish_reason)

    def _add_logprob(self, event: TokenEvent) -> dict:
        decode = self.job.state.tokenizer.decode
        token = decode([event.token_id])
        top_n = self.job.logprobs or 0
        top = [(decode([t]), lp) for t, lp in (event.top_logprobs or [])[:top_n]]
        if self.job.kind == "chat":
            entry = {"token": token, "logprob": event.logprob, "bytes": list(token.encode("utf-8")),
                     "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(t.encode("utf-8"))} for t, lp in top]}
            self.lp_chat.append(entry)
            return {"content": [entry]}
        self.lp_tokens.append(token)
        self.lp_values.append(event.logprob)
        self.lp_top.append(dict(top) if top_n else None)
        self.lp_offsets.append(self.offset)
        self.offset += len(token)
        return {"tokens": [token], "token_logprobs": [event.logprob], "top_logprobs": [self.lp_top[-1]],
                "text_offset": [self.lp_offsets[-1]]}

    def final(self) -> dict:
        text = "".join(self.pieces)
        if self.job.kind == "chat":
            logprobs = {"content": self.lp_chat} if self.job.logprobs is not None else None
            return self._with_moderation({"index": self.index, "message": {"role": "assistant", "content": text},
                                          "logprobs": logprobs, "finish_reason": self.finish_reason})
        logprobs = None
        if self.job.logprobs is not None:
            logprobs = {"tokens": self.lp_tokens, "token_logprobs": self.lp_values, "top_logprobs": self.lp_top,
                        "text_offset": self.lp_offsets}
        return self._with_moderation({"index": self.index, "text": self.echo + text, "logprobs": logprobs,
                                      "finish_reason": self.finish_reason})


# --------------------------------------------------------------------------------------------------
def run_server(config: ServeConfig, app: Optional[FastAPI] = None, *, sockets=None,
               log_level: str = "info") -> None:
    """Serve ``config`` on uvicorn until SIGINT/SIGTERM.

    The first signal starts draining: new requests get 503, in-flight ones finish (for up to
    ``shutdown_grace`` seconds), then the server exits. A second signal stops at once: every open stream
    ends with an error event and ``data: [DONE]``, every waiting request gets a 503, and the process exits
    (within ABORT_GRACE_S of the signal, a third signal at once).
    """
    import uvicorn

    app = app or create_app(config)
    state: ServerState = app.state.server

    class DrainingServer(uvicorn.Server):
        # Runs in the main thread between two bytecodes of the event loop: only flags are set here, and
        # ServerState.abort hands the loop its work through call_soon_threadsafe.
        def handle_exit(self, sig, frame) -> None:
            if not state.draining:
                state.draining = True
                log.info("shutting down: finishing %d request(s) in flight, refusing new ones", state.in_flight)
                threading.Thread(target=self._drain, name="gptforge-drain", daemon=True).start()
            elif not state.aborting:
                log.warning("stopping now: ending %d open request(s) with an error", len(state.jobs))
                state.abort()
                self.should_exit = True
                timer = threading.Timer(ABORT_GRACE_S, self._force_exit)
                timer.daemon = True
                timer.start()
            else:
                self._force_exit()

        def _force_exit(self) -> None:
            self.force_exit = self.should_exit = True

        def _drain(self) -> None:
            deadline = time.monotonic() + config.shutdown_grace
            while state.in_flight > 0 and time.monotonic() < deadline:
                time.sleep(0.05)
            if state.in_flight > 0:
                log.warning("%d request(s) still in flight after %g s (--shutdown-grace): ending them",
                            state.in_flight, config.shutdown_grace)
                state.abort()
            self.should_exit = True

    _warn_if_open(config)
    DrainingServer(server_config(app, config, log_level=log_level)).run(sockets=sockets)


def server_config(app: FastAPI, config: ServeConfig, *, log_level: str = "info"):
    """uvicorn's configuration for ``app``: the HTTP protocol answers malformed HTTP in OpenAI's error shape."""
    import uvicorn

    return uvicorn.Config(app, host=config.host, port=config.port, log_level=log_level,
                          timeout_graceful_shutdown=5, access_log=False, http=json_error_http_protocol())


def _warn_if_open(config: ServeConfig) -> None:
    if config.api_key is None and not _is_loopback(config.host):
        log.warning("listening on %s without an API key: anyone who can reach this port can use the model "
                    "(set --api-key or GPTFORGE_API_KEY)", config.host)


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


_PROTOCOLS: dict[type, type] = {}


def json_error_http_protocol() -> type:
    """uvicorn's HTTP/1.1 protocol (h11 or httptools, whichever uvicorn picks) whose own 400 for a request it
    cannot parse (a junk Content-Length, a malformed request line or header) is JSON in OpenAI's shape
    instead of plain text. The request never reaches the app; uvicorn closes the connection after it."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    base = AutoHTTPProtocol
    if base not in _PROTOCOLS:
        class JSONErrorHTTPProtocol(base):  # type: ignore[misc, valid-type]
            def send_400_response(self, msg: str) -> None:
                cycle = getattr(self, "cycle", None)
                if cycle is not None and cycle.response_started and not cycle.response_complete:
                    self.transport.close()  # mid-response (pipelining): nothing can be written cleanly
                    return
                body = json_text(openai_error(
                    "invalid HTTP request: a malformed request line or header (such as a Content-Length that is "
                    "not a number)", code="invalid_http_request")).encode("utf-8")
                head = [b"HTTP/1.1 400 Bad Request\r\n"]
                for name, value in self.server_state.default_headers:
                    head.append(name + b": " + value + b"\r\n")
                head += [b"content-type: application/json\r\n",
                         b"content-length: " + str(len(body)).encode("ascii") + b"\r\n",
                         b"connection: close\r\n\r\n"]
                self.transport.write(b"".join(head) + body)
                self.transport.close()

        _PROTOCOLS[base] = JSONErrorHTTPProtocol
    return _PROTOCOLS[base]
