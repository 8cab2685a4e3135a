"""`gptforge serve --knowledge`: chat completions grounded in a retriever report their ``sources`` (in the body,
or in the final chunk of a stream), knowledge-only refusals are ordinary replies, and a knowledge base of
another tokenizer is one error before anything is served. Real HTTP against uvicorn in a thread."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from gptforge.config import GenerateConfig, GroundingConfig, ServeConfig
from gptforge.errors import ConfigError
from gptforge.generate import generate_ids
from gptforge.knowledge.grounding import Grounding, grounded_prompt
from gptforge.serve import create_app
from gptforge.serve.app import load_served_checkpoint
from tests.knowledge.test_grounding import CHARS, WordRetriever
from tests.model_utils import save_tiny_checkpoint
from tests.serve.serve_utils import LiveServer, client_of, serving, sse

pytestmark = pytest.mark.integration

QUESTION = "how long do refunds take?"


def write_checkpoint(path: Path) -> Path:
    return save_tiny_checkpoint(path, CHARS, block_size=256, n_layer=1, n_embd=16)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    path = write_checkpoint(tmp_path_factory.mktemp("grounded-serve") / "kb-bot")
    config = ServeConfig(checkpoint=str(path), device="cpu")
    grounding = Grounding(WordRetriever(), GroundingConfig(knowledge="kb", passages=2, knowledge_only=True,
                                                           min_score=1.0, refusal="no idea, sorry."))
    with serving(config, grounding=grounding) as live:
        yield live


@pytest.fixture(scope="module")
def client(served):
    with client_of(served) as c:
        yield c


def chat_body(question: str = QUESTION, **extra) -> dict:
    return {"model": "kb-bot", "messages": [{"role": "user", "content": question}], "max_tokens": 8, "temperature": 0, **extra}


def test_sources_come_with_the_reply_and_the_prompt_holds_their_passages(served, client):
    r = client.post("/v1/chat/completions", json=chat_body())
    assert r.status_code == 200, r.text
    body = r.json()
    assert [s["id"] for s in body["sources"]] == ["returns#1"]  # "shipping#1" shares no word with the question
    assert body["sources"][0] == {"id": "returns#1", "title": "Returns", "score": 1.0,
                                  "passage": "refunds reach your card within five days."}
    # the reply is the model's greedy continuation of the grounded prompt, which the usage counts
    state = served.state
    hits = state.grounding.retriever.search(QUESTION, k=2)[:1]
    prepared = grounded_prompt(state.tokenizer, [{"role": "user", "content": QUESTION}], hits,
                               context_length=state.block_size, max_new_tokens=8)
    assert body["usage"]["prompt_tokens"] == len(prepared.ids)
    expected = generate_ids(state.model, [prepared.ids], GenerateConfig(max_new_tokens=8, temperature=0),
                            eos_id=state.tokenizer.eos_id)
    assert body["choices"][0]["message"]["content"] == state.tokenizer.decode(expected[0][0].token_ids)


def test_streaming_sends_the_sources_in_the_final_chunk(client):
    with client.stream("POST", "/v1/chat/completions", json=chat_body(stream=True)) as r:
        assert r.status_code == 200
        chunks = sse(r)
    with_sources = [i for i, c in enumerate(chunks) if "sources" in c]
    assert with_sources == [len(chunks) - 1]
    final = chunks[-1]
    assert final["choices"][0]["finish_reason"] is not None
    assert [s["id"] for s in final["sources"]] == ["returns#1"]
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    plain = client.post("/v1/chat/completions", json=chat_body()).json()
    assert streamed == plain["choices"][0]["message"]["content"]


def test_a_question_the_knowledge_base_has_nothing_on_gets_the_refusal(client):
    r = client.post("/v1/chat/completions", json=chat_body("what colour is sky?", n=2))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["sources"] == [] and body["object"] == "chat.completion"
    assert [c["message"] for c in body["choices"]] == [{"role": "assistant", "content": "no idea, sorry."}] * 2
    assert {c["finish_reason"] for c in body["choices"]} == {"stop"}
    with client.stream("POST", "/v1/chat/completions",
                       json=chat_body("what colour is sky?", stream=True,
                                      stream_options={"include_usage": True})) as r:
        chunks = sse(r)
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]) == "no idea, sorry."
    final = next(c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"])
    assert final["choices"][0]["finish_reason"] == "stop" and final["sources"] == []
    assert chunks[-1]["usage"]["completion_tokens"] == len("no idea, sorry.")


def test_openai_client_reads_a_grounded_reply(served):
    openai = pytest.importorskip("openai")
    oc = openai.OpenAI(base_url=served.url + "/v1", api_key="unused", timeout=60)
    reply = oc.chat.completions.create(model="kb-bot", messages=[{"role": "user", "content": QUESTION}],
                                       max_tokens=5, temperature=0)
    assert reply.choices[0].message.content is not None
    assert reply.model_extra["sources"][0]["id"] == "returns#1"  # an unknown field, kept by the client


def test_a_knowledge_base_of_another_tokenizer_is_one_error_before_serving(tmp_path):
    class OtherTokenizerIndex(WordRetriever):
        def check_tokenizer(self, tokenizer):
            raise ConfigError("the knowledge base kb/ was built for another tokenizer")

    config = ServeConfig(checkpoint=str(write_checkpoint(tmp_path / "ckpt")), device="cpu")
    checkpoint = load_served_checkpoint(config)
    with pytest.raises(ConfigError, match="another tokenizer"):
        create_app(config, checkpoint, grounding=Grounding(OtherTokenizerIndex(), GroundingConfig(knowledge="kb")))


def test_an_ungrounded_server_adds_no_sources_field(tmp_path):
    config = ServeConfig(checkpoint=str(write_checkpoint(tmp_path / "kb-bot")), device="cpu")
    live = LiveServer(config, load_served_checkpoint(config), None)
    try:
        body = httpx.post(live.url + "/v1/chat/completions", json=chat_body(), timeout=60).json()
        assert "sources" not in body and body["choices"][0]["message"]["role"] == "assistant"
    finally:
        live.close()


def test_a_real_knowledge_base_served_end_to_end(tmp_path):
    """`gptforge index` output loaded as `gptforge serve --knowledge` loads it; its passage ids come back."""
    from gptforge.knowledge.index import build_knowledge_base

    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "returns.md").write_text("# Returns\n\nRefunds reach your card within five days.\n", encoding="utf-8")
    (docs / "shipping.md").write_text("# Shipping\n\nOrders leave the warehouse within one day.\n", encoding="utf-8")
    path = write_checkpoint(tmp_path / "kb-bot")
    built = build_knowledge_base(docs, tmp_path / "kb", checkpoint=path).knowledge_base
    config = ServeConfig(checkpoint=str(path), device="cpu")
    checkpoint = load_served_checkpoint(config)
    grounding = Grounding.load(GroundingConfig(knowledge=str(tmp_path / "kb"), passages=1), checkpoint.tokenizer)
    live = LiveServer(config, checkpoint, grounding)
    try:
        body = httpx.post(live.url + "/v1/chat/completions", json=chat_body(), timeout=60).json()
    finally:
        live.close()
    top = built.search(QUESTION, k=1)[0]
    assert body["sources"] == [top.to_source()] and top.passage.doc_id == "returns.md"
