"""The chat page at `/`, driven in headless Chromium against the real server over real HTTP.

Chromium is steered through the Chrome DevTools Protocol over a pipe (``--remote-debugging-pipe``: NUL-separated
JSON on file descriptors 3 and 4), so the test needs nothing beyond the standard library and Debian's
``chromium`` package (``.ci/run`` installs it when missing). It types a message, clicks Send and waits for
the streamed assistant reply.
"""

from __future__ import annotations

import fcntl
import json
import os
import queue
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from gptforge.checkpoint import save_checkpoint
from gptforge.config import ModelConfig
from gptforge.model import GPT
from gptforge.tokenizer import CharTokenizer

pytestmark = pytest.mark.integration

STATIC = Path(__file__).resolve().parents[2] / "src/gptforge/serve/static"
API_KEY = "page-test-key"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--remote-debugging-pipe"]


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------------------------------
class Browser:
    """Headless Chromium with one page, steered over the DevTools pipe."""

    def __init__(self, executable: str, profile: Path):
        to_browser_r, to_browser_w = os.pipe()
        from_browser_r, from_browser_w = os.pipe()
        # Chromium reads commands on fd 3 and writes replies on fd 4. The child's ends go to free high
        # descriptors first, so that putting them on 3 and 4 in the child cannot clobber one another.
        high_in = fcntl.fcntl(to_browser_r, fcntl.F_DUPFD, 64)
        high_out = fcntl.fcntl(from_browser_w, fcntl.F_DUPFD, 64)
        os.close(to_browser_r)
        os.close(from_browser_w)

        def wire_fds():
            os.dup2(high_in, 3)
            os.dup2(high_out, 4)

        self.proc = subprocess.Popen([executable, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     pass_fds=(3, 4, high_in, high_out), preexec_fn=wire_fds)
        os.close(high_in)
        os.close(high_out)
        self._write = os.fdopen(to_browser_w, "wb", buffering=0)
        self._read = os.fdopen(from_browser_r, "rb", buffering=0)
        self._replies: "queue.Queue[dict]" = queue.Queue()
        self._next_id = 0
        threading.Thread(target=self._pump, daemon=True).start()
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.call("Page.enable", session=True)
        self.call("Runtime.enable", session=True)

    def _pump(self) -> None:
        buffer = b""
        while True:
            chunk = self._read.read(65536)
            if not chunk:
                return
            buffer += chunk
            while b"\0" in buffer:
                message, buffer = buffer.split(b"\0", 1)
                parsed = json.loads(message)
                if "id" in parsed:
                    self._replies.put(parsed)
                else:
                    self.on_event(parsed)

    def on_event(self, message: dict) -> None:
        """An event (a message that answers no call); this browser keeps none."""

    def call(self, method: str, *, session: bool = False, timeout: float = 30, **params) -> dict:
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = self.session
        self._write.write(json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._replies.get(timeout=max(0.01, deadline - time.monotonic()))
            if reply["id"] == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", session=True, expression=expression, returnByValue=True,
                           awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression!r} raised {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 30, interval: float = 0.05):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(interval)
        raise AssertionError(f"timed out waiting for {expression}")

    def click(self, selector: str) -> None:
        """A real mouse click (press + release) at the centre of the element."""
        box = self.evaluate(f"(() => {{ const r = document.querySelector({json.dumps(selector)})"
                            ".getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; })()")
        for kind in ("mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", session=True, type=kind, x=box[0], y=box[1], button="left",
                      clickCount=1)

    def type(self, selector: str, text: str) -> None:
        self.evaluate(f"document.querySelector({json.dumps(selector)}).focus()")
        self.call("Input.insertText", session=True, text=text)

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=5)
        except Exception:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self._write.close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    executable = find_chromium()
    if executable is None:
        pytest.skip("Chromium is not installed (Debian: apt-get install chromium; .ci/run installs it)")
    b = Browser(executable, tmp_path_factory.mktemp("chromium-profile"))
    yield b
    b.close()


# --------------------------------------------------------------------------------------------------
CHARS = list("abcdefghijklmnopqrstuvwxyz .,?!\n<>|")
CONTEXT = 128  # the demo model's context


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    tok = CharTokenizer(CHARS)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=CONTEXT, n_layer=1, n_head=2, n_embd=16))
    path = tmp_path_factory.mktemp("page") / "ckpt"
    save_checkpoint(path, model, tok, {"model": vars(model.config)})
    return path


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    """`gptforge serve` in a subprocess on a free loopback port; its base URL."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("serve") / "serve.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "gptforge.cli", "serve", "--checkpoint", str(checkpoint),
                                 "--host", "127.0.0.1", "--port", str(port), "--device", "cpu",
                                 "--api-key", API_KEY],
                                stdout=log_file, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        import httpx

        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"the server exited ({proc.returncode}):\n{log_path.read_text()}")
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"the server did not start within 60 s:\n{log_path.read_text()}")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)


def test_page_is_self_contained():
    html = (STATIC / "index.html").read_text(encoding="utf-8")
    for external in ("http://", "https://", "//cdn", "<link", "src="):
        assert external not in html, f"the page must load nothing from elsewhere ({external!r} found)"
    for label in ('for="prompt"', 'for="system"', 'for="temperature"', 'for="top_p"', 'for="max_tokens"',
                  'for="seed"', 'for="api_key"'):
        assert label in html


def open_page(browser, url: str, *, fresh: bool = False) -> None:
    """The page at ``url``, its models listed with the key (``fresh``: as on a first visit, nothing stored)."""
    browser.call("Page.navigate", session=True, url=url + "/")
    browser.wait_for("document.readyState === 'complete' && !!document.getElementById('send')")
    if fresh:
        browser.evaluate("localStorage.clear()")
        browser.call("Page.navigate", session=True, url=url + "/")
        browser.wait_for("document.readyState === 'complete' && !!document.getElementById('send')")
    browser.type("#api_key", API_KEY)
    browser.evaluate("document.getElementById('api_key').dispatchEvent(new Event('change'))")
    browser.wait_for("document.getElementById('model').options.length > 0")


def set_fields(browser, **values: str) -> None:
    """Fill the page's settings (by element id) as a person would: the value, then a change event."""
    browser.evaluate(f"""(() => {{ for (const [id, v] of Object.entries({json.dumps(values)})) {{
        const e = document.getElementById(id); e.value = v; e.dispatchEvent(new Event('change')); }} }})()""")


def send_and_wait(browser, text: str) -> None:
    """Send ``text`` as a person would and wait until its reply (or its error) is done."""
    before = browser.evaluate("document.querySelectorAll('.message.user, .message.error').length")
    browser.type("#prompt", text)
    browser.click("#send")
    browser.wait_for(f"document.querySelectorAll('.message.user, .message.error').length > {before}")
    browser.wait_for("document.getElementById('send').disabled === false", timeout=60)


def test_page_sizes_max_tokens_to_the_models_context(server, browser):
    """The page reads context_length from /v1/models: on the demo model's 128 tokens its default max tokens is 64
    (half the context, at most 256; it was a fixed 256, so the first message got a 400). A reply that would
    overflow the context is asked again without max_tokens (the server then fits it); a conversation that fills
    the context says so."""
    from gptforge.tokenizer import DEFAULT_CHAT_TEMPLATE, encode_chat_prompt

    open_page(browser, server, fresh=True)
    assert browser.evaluate("document.getElementById('max_tokens').value") == str(CONTEXT // 2)
    assert browser.evaluate("document.getElementById('max_tokens').max") == str(CONTEXT - 1)

    send_and_wait(browser, "hello there")
    assert browser.evaluate("document.querySelector('.message.error')") is None
    assert browser.evaluate("document.querySelector('.message.assistant').dataset.state") == "done"
    reply = browser.evaluate("document.querySelector('.message.assistant .content').textContent")
    assert len(reply) <= CONTEXT // 2

    # A message of 100 prompt tokens: 100 + 64 > 128, but 28 tokens are left. No error: the reply fits them.
    browser.click("#new-chat")
    tok = CharTokenizer(CHARS)
    overhead = len(encode_chat_prompt(tok, [{"role": "user", "content": ""}], DEFAULT_CHAT_TEMPLATE))
    send_and_wait(browser, "a" * (100 - overhead))
    assert browser.evaluate("document.querySelector('.message.error')") is None, \
        browser.evaluate("document.querySelector('.message.error').textContent")
    assert browser.evaluate("document.querySelector('.message.assistant').dataset.state") == "done"
    note = browser.evaluate("document.querySelector('.message.assistant .note').textContent")
    assert "shortened to fit the model's context" in note
    assert len(browser.evaluate("document.querySelector('.message.assistant .content').textContent")) <= 28

    # A message that fills the context by itself: the server's error, shown; the text goes back in the box.
    browser.click("#new-chat")
    send_and_wait(browser, "b" * CONTEXT)
    error = browser.evaluate("document.querySelector('.message.error').textContent")
    assert "HTTP 400" in error and "context is 128 tokens" in error
    assert browser.evaluate("document.getElementById('prompt').value") == "b" * CONTEXT

    # Set by the person, the value is kept (and stored), whatever the context.
    set_fields(browser, max_tokens="10")
    open_page(browser, server)
    assert browser.evaluate("document.getElementById('max_tokens').value") == "10"


def test_served_page_streams_a_reply(server, browser):
    browser.call("Page.navigate", session=True, url=server + "/")
    browser.wait_for("document.readyState === 'complete' && !!document.getElementById('send')")
    browser.evaluate("localStorage.clear()")  # a first visit: no key or settings kept from another test
    browser.call("Page.navigate", session=True, url=server + "/")
    browser.wait_for("document.readyState === 'complete' && !!document.getElementById('send')")
    # The server wants a key: the page says the models could not be listed until one is given.
    status = browser.wait_for("(s => s.includes('401') && s)(document.getElementById('status').textContent)")
    assert "could not list models" in status
    browser.type("#api_key", API_KEY)
    browser.evaluate("document.getElementById('api_key').dispatchEvent(new Event('change'))")
    browser.wait_for("document.getElementById('model').options.length > 0")  # GET /v1/models answered
    # Settings as a person would set them: a long enough reply to arrive in several pieces.
    set_fields(browser, max_tokens="24", temperature="1", seed="3", system="you are brief.")
    # Record the reply's length each time it changes, to see it arrive piece by piece.
    browser.evaluate("""(() => {
        window.__lengths = [];
        new MutationObserver(() => {
            const c = document.querySelector('.message.assistant .content');
            if (c) window.__lengths.push(c.textContent.length);
        }).observe(document.getElementById('log'), {subtree: true, childList: true, characterData: true});
    })()""")
    browser.type("#prompt", "hello, who are you?")
    browser.click("#send")
    browser.wait_for("document.querySelector('.message.user') !== null")
    assert browser.evaluate("document.querySelector('.message.user .content').textContent") == "hello, who are you?"
    browser.wait_for("document.querySelector('.message.assistant')?.dataset.state === 'done'", timeout=60)
    assert browser.evaluate("document.querySelector('.message.error')") is None
    reply = browser.evaluate("document.querySelector('.message.assistant .content').textContent")
    pieces = int(browser.evaluate("document.querySelector('.message.assistant').dataset.pieces"))
    lengths = browser.evaluate("window.__lengths")
    assert reply.strip(), "the assistant reply is empty"
    assert pieces > 1, f"the reply arrived in one piece: {reply!r}"
    assert len({n for n in lengths if n > 0}) > 1, lengths  # the view showed partial replies on the way
    assert browser.evaluate("document.getElementById('send').disabled") is False
    assert browser.evaluate("document.getElementById('stop').disabled") is True


# --------------------------------------------------------------------------------------------------
# A grounded server (`gptforge serve --knowledge`): the page lists each reply's sources under it.
@pytest.fixture(scope="module")
def grounded_server(tmp_path_factory):
    from gptforge.config import GroundingConfig, ServeConfig
    from gptforge.knowledge.grounding import Grounding
    from tests.knowledge.test_grounding import WordRetriever
    from tests.serve.serve_utils import serving
    from tests.serve.test_grounded_serving import write_checkpoint

    config = ServeConfig(checkpoint=str(write_checkpoint(tmp_path_factory.mktemp("grounded-page") / "kb-bot")),
                         device="cpu")
    grounding = Grounding(WordRetriever(), GroundingConfig(knowledge="kb", knowledge_only=True,
                                                           refusal="no idea, sorry."))
    with serving(config, grounding=grounding) as live:
        yield live.url


def test_page_shows_the_sources_under_each_grounded_reply(grounded_server, browser):
    open_page(browser, grounded_server, fresh=True)
    set_fields(browser, max_tokens="8")
    send_and_wait(browser, "how long do refunds take?")
    assert browser.evaluate("document.querySelector('.message.error')") is None
    ids = browser.evaluate("[...document.querySelectorAll('.message.assistant .sources li.source')]"
                           ".map(li => li.dataset.id)")
    assert ids == ["returns#1"]  # the only passage that shares a word with the question
    summary = browser.evaluate("document.querySelector('.message.assistant .sources summary').textContent")
    assert summary.startswith("Returns · returns#1") and "(" in summary
    passage = browser.evaluate("document.querySelector('.message.assistant .sources .passage').textContent")
    assert passage == "refunds reach your card within five days."

    # a question the knowledge base has nothing on (in a new chat: a follow-up would also retrieve for the
    # question before it): the refusal, and no sources
    browser.click("#new-chat")
    send_and_wait(browser, "what colour is sky?")
    replies = browser.evaluate("[...document.querySelectorAll('.message.assistant')].map(b => "
                               "[b.querySelector('.content').textContent, b.querySelector('.sources').textContent])")
    assert replies == [["no idea, sorry.", "no sources"]]


# --------------------------------------------------------------------------------------------------
# A moderated server (`gptforge serve --moderation`): the page says why a reply was refused or cut short.
@pytest.fixture(scope="module")
def moderated_server(tmp_path_factory):
    from gptforge.config import ModerationConfig, ServeConfig
    from gptforge.moderation import Moderator
    from tests.moderation.utils import CHARS, save_char_classifier, save_reciting_lm
    from tests.serve.serve_utils import serving

    root = tmp_path_factory.mktemp("moderated-page")
    config = ServeConfig(checkpoint=str(save_reciting_lm(root / "reciter")), device="cpu")
    moderator = Moderator.load(ModerationConfig(moderation=str(save_char_classifier(root / "clf", CHARS, "x")),
                                                block=["toxic"], moderation_refusal="Let us keep it kind.",
                                                moderation_window=24, moderation_stride=6), "cpu")
    with serving(config, moderator=moderator) as live:
        yield live.url


def test_page_notes_the_moderation_filter_on_a_refused_message_and_on_a_cut_reply(moderated_server, browser):
    open_page(browser, moderated_server, fresh=True)
    set_fields(browser, max_tokens="60", temperature="0")
    send_and_wait(browser, "you ox")  # the classifier blocks any text with an x
    replies = browser.evaluate("[...document.querySelectorAll('.message.assistant')].map(b => "
                               "[b.querySelector('.content').textContent, (b.querySelector('.note') || {}).textContent])")
    assert replies == [["Let us keep it kind.", "your message was refused by the moderation filter (toxic)"]]
    browser.click("#new-chat")  # the reciter's context is short: the next reply starts over
    send_and_wait(browser, "hi")  # the reciter's reply reaches "fox" within 60 tokens: cut before it
    [reply] = browser.evaluate("[...document.querySelectorAll('.message.assistant')].map(b => "
                               "[b.querySelector('.content').textContent, (b.querySelector('.note') || {}).textContent])")
    assert browser.evaluate("document.querySelector('.message.error')") is None
    assert reply[0] and "x" not in reply[0] and reply[1] == "the reply was stopped by the moderation filter (toxic)"
