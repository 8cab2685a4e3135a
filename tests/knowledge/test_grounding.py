"""Grounded prompts: the retrieval query, the context slot, the budget (passages cut before the conversation),
knowledge-only refusals, a grounded ChatSession, and grounded fine-tuning data rendered as inference renders it."""

from __future__ import annotations

import pytest

from gptforge.chat import ChatSession
from gptforge.checkpoint import load_checkpoint
from gptforge.config import DEFAULT_REFUSAL, GenerateConfig, GroundingConfig
from gptforge.data.finetune import IGNORE_INDEX, LMExample, add_retrieved_context, encode_lm_example
from gptforge.errors import ConfigError, DataError
from gptforge.knowledge.grounding import (GroundedPrompt, Grounding, context_retriever, grounded_prompt,
                                          passage_texts, prepare_grounded, retrieval_query, select_hits)
from gptforge.knowledge.types import Hit, Passage
from gptforge.tokenizer import (CONTEXT_ROLE, CUT_MARK, DEFAULT_CHAT_TEMPLATE, CharTokenizer, encode_chat_prompt,
                                with_context)
from tests.model_utils import save_tiny_checkpoint

CHARS = list("abcdefghijklmnopqrstuvwxyz0123456789 .,?!:'#\n<>|")
TOK = CharTokenizer(CHARS)

PASSAGES = [
    Passage("returns#1", "returns", "Returns", "refunds reach your card within five days."),
    Passage("shipping#1", "shipping", "Shipping", "orders leave the warehouse within one day."),
    Passage("warranty#1", "warranty", "Warranty", "the kettle has a two year warranty on parts."),
]


class WordRetriever:
    """A retriever for tests: a passage scores the number of query words it holds (0 when none)."""

    def __init__(self, passages=PASSAGES):
        self.passages = list(passages)
        self.queries: list[str] = []

    def search(self, query: str, k: int = 5) -> list[Hit]:
        self.queries.append(query)
        words = set(query.lower().replace("?", " ").split())
        hits = [Hit(p, float(len(words & set(p.text.replace(".", " ").split())))) for p in self.passages]
        return sorted(hits, key=lambda h: -h.score)[:k]


def hits(*scores: float) -> list[Hit]:
    return [Hit(p, s) for p, s in zip(PASSAGES, scores)]


def chat(question: str = "how long do refunds take?") -> list[dict]:
    return [{"role": "system", "content": "answer from the passages."}, {"role": "user", "content": question}]


def decode(ids) -> str:
    return TOK.decode(ids)


# --- the query ---------------------------------------------------------------------------------------------
def test_query_is_the_last_user_turns_oldest_first():
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "one"},
                {"role": "assistant", "content": "a"}, {"role": "user", "content": "two"},
                {"role": "assistant", "content": "b"}, {"role": "user", "content": "three"}]
    assert retrieval_query(messages) == "two\nthree"
    assert retrieval_query(messages, 1) == "three"
    assert retrieval_query(messages, 5) == "one\ntwo\nthree"


def test_hits_scoring_zero_or_below_min_score_are_left_out_best_first():
    assert [h.passage.id for h in select_hits(hits(0.0, 2.0, 1.0))] == ["shipping#1", "warranty#1"]
    assert [h.passage.id for h in select_hits(hits(0.0, 2.0, 1.0), min_score=1.5)] == ["shipping#1"]


# --- the context slot ----------------------------------------------------------------------------------------
def test_passages_render_in_a_context_message_before_the_last_user_turn():
    prepared = grounded_prompt(TOK, chat(), hits(3.0, 1.0), context_length=1000, max_new_tokens=10)
    text = decode(prepared.ids)
    assert text == ("<|system|>\nanswer from the passages.\n"
                    "<|context|>\nReturns\nrefunds reach your card within five days.\n\n"
                    "Shipping\norders leave the warehouse within one day.\n"
                    "<|user|>\nhow long do refunds take?\n<|assistant|>\n")
    assert [h.passage.id for h in prepared.hits] == ["returns#1", "shipping#1"]
    assert prepared.sources[0] == {"id": "returns#1", "title": "Returns", "score": 3.0,
                                   "passage": "refunds reach your card within five days."}
    # the same tokens as the chat template renders the messages with a context message
    messages = with_context(chat(), passage_texts(prepared.hits))
    assert messages[1]["role"] == CONTEXT_ROLE
    assert prepared.ids == encode_chat_prompt(TOK, messages, DEFAULT_CHAT_TEMPLATE)


def test_no_passages_renders_exactly_the_plain_chat():
    prepared = grounded_prompt(TOK, chat(), [], context_length=1000, max_new_tokens=10)
    assert prepared.ids == encode_chat_prompt(TOK, chat())
    assert prepared.hits == [] and prepared.fits


def test_a_custom_template_renders_the_context_role_too():
    template = "### {role}:\n{content}{end}\n"
    prepared = grounded_prompt(TOK, chat(), hits(1.0), template=template, context_length=1000, max_new_tokens=5)
    assert "### context:\nReturns\nrefunds" in decode(prepared.ids)


def test_a_chat_without_user_message_cannot_take_passages():
    with pytest.raises(DataError, match="no user message"):
        with_context([{"role": "system", "content": "x"}], ["p"])


# --- the budget ----------------------------------------------------------------------------------------------
def _length(passages: list[Hit]) -> int:
    return len(grounded_prompt(TOK, chat(), passages, context_length=10_000, max_new_tokens=1).ids)


def test_lower_ranked_whole_passages_are_dropped_before_the_conversation_is_cut():
    three = hits(3.0, 2.0, 1.0)
    plain, one, two, all_ = (_length(three[:n]) for n in range(4))
    reply = 20
    # room for two whole passages and a few characters more: too few to keep a cut third one
    context = two + 5 + reply
    prepared = grounded_prompt(TOK, chat(), three, context_length=context, max_new_tokens=reply)
    assert [h.passage.id for h in prepared.hits] == ["returns#1", "shipping#1"]
    assert len(prepared.ids) <= context - reply and prepared.fits
    text = decode(prepared.ids)
    assert "answer from the passages." in text and "how long do refunds take?" in text  # the chat is whole
    assert "warranty" not in text
    assert plain < one < two < all_


def test_the_last_passage_kept_is_cut_to_fill_the_room_left():
    three = hits(3.0, 2.0, 1.0)
    one = _length(three[:1])
    reply = 20
    context = one + 50 + reply  # the second passage (about 55 characters with its title) does not fit whole
    prepared = grounded_prompt(TOK, chat(), three, context_length=context, max_new_tokens=reply)
    assert [h.passage.id for h in prepared.hits] == ["returns#1", "shipping#1"]
    text = decode(prepared.ids)
    assert "refunds reach your card within five days." in text
    assert CUT_MARK + "\n<|user|>" in text and "orders leave the warehouse within one day." not in text
    assert len(prepared.ids) <= context - reply


def test_a_conversation_longer_than_the_budget_keeps_no_passage_and_does_not_fit():
    plain = _length([])
    prepared = grounded_prompt(TOK, chat(), hits(3.0, 2.0), context_length=plain + 5, max_new_tokens=10)
    assert prepared.hits == [] and not prepared.fits
    assert prepared.ids == encode_chat_prompt(TOK, chat())


def test_max_new_tokens_that_leaves_no_room_is_one_error():
    with pytest.raises(ConfigError, match="max_new_tokens"):
        grounded_prompt(TOK, chat(), hits(1.0), context_length=64, max_new_tokens=64)


# --- retrieval and refusals ----------------------------------------------------------------------------------
def test_prepare_retrieves_for_the_last_user_turns():
    retriever = WordRetriever()
    messages = [{"role": "user", "content": "where are my orders?"}, {"role": "assistant", "content": "coming."},
                {"role": "user", "content": "and the refunds?"}]
    prepared = prepare_grounded(TOK, messages, retriever, GroundingConfig(knowledge="kb", passages=2),
                                context_length=2000, max_new_tokens=10)
    assert retriever.queries == ["where are my orders?\nand the refunds?"]
    assert {h.passage.id for h in prepared.hits} == {"returns#1", "shipping#1"}
    assert prepared.refusal is None


def test_knowledge_only_refuses_when_no_passage_reaches_min_score():
    retriever = WordRetriever()
    config = GroundingConfig(knowledge="kb", knowledge_only=True, min_score=2.0)
    refused = prepare_grounded(TOK, chat("what colour is the sky?"), retriever, config, context_length=2000,
                               max_new_tokens=10)
    assert refused.refusal == DEFAULT_REFUSAL and refused.hits == []
    answered = prepare_grounded(TOK, chat("refunds reach my card when?"), retriever, config, context_length=2000,
                                max_new_tokens=10)
    assert answered.refusal is None and answered.hits[0].passage.id == "returns#1"
    # without knowledge_only the same question goes to the model, with no passages
    guessed = prepare_grounded(TOK, chat("what colour is the sky?"), retriever,
                               GroundingConfig(knowledge="kb", min_score=2.0), context_length=2000, max_new_tokens=10)
    assert guessed.refusal is None and guessed.ids == encode_chat_prompt(TOK, chat("what colour is the sky?"))


def test_grounding_flags_without_a_knowledge_base_are_an_error():
    with pytest.raises(ConfigError, match="--min-score, --knowledge-only only apply with --knowledge"):
        GroundingConfig(knowledge_only=True, min_score=1.0).validate()
    with pytest.raises(ConfigError, match="passages must be at least 1"):
        GroundingConfig(knowledge="kb", passages=0).validate()
    with pytest.raises(ConfigError, match="no knowledge base to load"):
        Grounding.load(GroundingConfig())


# --- a grounded chat session ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("grounded") / "ckpt", CHARS, block_size=256, n_layer=1,
                                n_embd=16)


@pytest.fixture(scope="module")
def loaded(checkpoint):
    return load_checkpoint(checkpoint)


def test_chat_session_grounds_each_turn_and_keeps_the_sources(loaded):
    grounding = Grounding(WordRetriever(), GroundingConfig(knowledge="kb", passages=1))
    session = ChatSession(loaded.model, loaded.tokenizer, GenerateConfig(max_new_tokens=5, seed=0, ignore_eos=True),
                          grounding=grounding)
    reply = "".join(session.send("how long do refunds take?"))
    assert [h.passage.id for h in session.sources] == ["returns#1"] and not session.refused
    # the passages are not part of the history: the next turn retrieves its own
    assert session.history == [{"role": "user", "content": "how long do refunds take?"},
                                {"role": "assistant", "content": reply}]
    text = loaded.tokenizer.decode(session.prompt_ids("when do orders leave the warehouse?"))
    assert "<|context|>\nShipping\norders leave" in text and text.count("<|context|>") == 1


def test_chat_session_refuses_without_running_the_model(loaded):
    config = GroundingConfig(knowledge="kb", knowledge_only=True, refusal="no idea, sorry.")
    session = ChatSession(loaded.model, loaded.tokenizer, GenerateConfig(max_new_tokens=5, seed=0),
                          grounding=Grounding(WordRetriever(), config))
    assert list(session.send("what colour is sky?")) == ["no idea, sorry."]
    assert session.refused and session.sources == [] and session.turns == 0
    assert session.history[-1] == {"role": "assistant", "content": "no idea, sorry."}


def test_chat_session_cuts_passages_before_dropping_turns(loaded):
    long_passage = Passage("manual#1", "manual", "Manual", "refunds " + "and more words " * 12)
    grounding = Grounding(WordRetriever([long_passage]), GroundingConfig(knowledge="kb"))
    session = ChatSession(loaded.model, loaded.tokenizer, GenerateConfig(max_new_tokens=100, seed=0),
                          grounding=grounding)
    session.history = [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "hi."}]
    prepared = session.prepare("refunds?")
    assert session.dropped_turns == 0 and "hello there" in loaded.tokenizer.decode(prepared.ids)
    assert prepared.hits and CUT_MARK in loaded.tokenizer.decode(prepared.ids)  # cut, not dropped
    assert len(prepared.ids) <= 256 - 100


# --- grounded fine-tuning renders as inference does ----------------------------------------------------------
def test_training_prompt_ids_equal_the_grounded_inference_prompt():
    messages = chat() + [{"role": "assistant", "content": "within five days."}]
    used = hits(3.0, 2.0)
    example = LMExample(messages=tuple(messages), context=tuple(passage_texts(used)))
    ids, labels = encode_lm_example(TOK, example, max_length=1000)
    inference = grounded_prompt(TOK, chat(), used, context_length=1000, max_new_tokens=10)
    n_prompt = len(inference.ids)
    assert ids[:n_prompt] == inference.ids
    assert all(label == IGNORE_INDEX for label in labels[:n_prompt])  # the prompt, passages included, is masked
    assert decode(ids[n_prompt:]) == "within five days.<|endoftext|>\n"
    assert labels[n_prompt:-1] == ids[n_prompt:-1]


def test_training_cuts_passages_not_the_answer_to_fit_max_length():
    messages = chat() + [{"role": "assistant", "content": "within five days."}]
    used = hits(3.0, 2.0, 1.0)
    example = LMExample(messages=tuple(messages), context=tuple(passage_texts(used)))
    full, _ = encode_lm_example(TOK, example, max_length=10_000)
    ids, labels = encode_lm_example(TOK, example, max_length=len(full) - 60)
    text = decode(ids)
    assert text.endswith("<|assistant|>\nwithin five days.<|endoftext|>\n")  # the answer survives whole
    assert "Warranty" not in text and "Returns\nrefunds" in text


def test_retrieval_fills_the_context_of_examples_without_one():
    retriever = WordRetriever()
    given = LMExample(messages=tuple(chat() + [{"role": "assistant", "content": "x"}]), context=("my own passage",))
    missing = LMExample(messages=tuple(chat("when do orders leave?") + [{"role": "assistant", "content": "y"}]))
    text = LMExample(text="plain text")
    out = add_retrieved_context([given, missing, text], context_retriever(retriever, GroundingConfig(knowledge="kb", passages=1)))
    assert out[0].context == ("my own passage",)
    assert out[1].context == ("Shipping\norders leave the warehouse within one day.",)
    assert out[2] == text
    # the same passages inference puts into the prompt for that question
    inference = prepare_grounded(TOK, chat("when do orders leave?"), retriever,
                                 GroundingConfig(knowledge="kb", passages=1), context_length=1000, max_new_tokens=5)
    ids, _ = encode_lm_example(TOK, out[1], max_length=1000)
    assert ids[:len(inference.ids)] == inference.ids


def test_grounded_prompt_type_defaults():
    assert GroundedPrompt([1, 2], budget=2).fits and not GroundedPrompt([1, 2, 3], budget=2).fits


# --- with a real knowledge base (gptforge index) -------------------------------------------------------------
DOCS = {
    "returns.md": "# Returns\n\nRefunds reach your card within five days.\n",
    "shipping.md": "# Shipping\n\nOrders leave the warehouse within one day.\n",
    "warranty.md": "# Warranty\n\nThe kettle has a two year warranty on parts.\n",
}


@pytest.fixture(scope="module")
def knowledge(tmp_path_factory, checkpoint):
    """A knowledge base of three documents, built for the test model's tokenizer, and one built for another."""
    from gptforge.knowledge.index import build_knowledge_base

    root = tmp_path_factory.mktemp("kb")
    docs = root / "docs"
    docs.mkdir()
    for name, text in DOCS.items():
        (docs / name).write_text(text, encoding="utf-8")
    build_knowledge_base(docs, root / "kb", checkpoint=checkpoint)
    other = save_tiny_checkpoint(root / "other-ckpt", list("abcdefghijklmnopqrstuvwxyz .?\n"), block_size=64,
                                 n_layer=1, n_embd=16)
    build_knowledge_base(docs, root / "other-kb", checkpoint=other)
    return {"kb": root / "kb", "other": root / "other-kb", "root": root}


def test_a_loaded_knowledge_base_grounds_a_turn(knowledge, loaded):
    from gptforge.knowledge.index import KnowledgeBase

    grounding = Grounding.load(GroundingConfig(knowledge=str(knowledge["kb"]), passages=2), loaded.tokenizer)
    assert isinstance(grounding.retriever, KnowledgeBase)
    prepared = grounding.prepare(loaded.tokenizer, chat("how long do refunds take?"), context_length=256,
                                 max_new_tokens=32)
    top = prepared.hits[0].passage
    assert top.doc_id == "returns.md" and "Refunds reach your card" in loaded.tokenizer.decode(prepared.ids)
    assert prepared.sources[0]["id"] == top.id and prepared.sources[0]["passage"] == top.text


def test_a_missing_or_foreign_knowledge_base_is_one_clear_error(knowledge, loaded, tmp_path):
    from gptforge.errors import KnowledgeError

    with pytest.raises(KnowledgeError, match="does not exist"):
        Grounding.load(GroundingConfig(knowledge=str(tmp_path / "nowhere")), loaded.tokenizer)
    with pytest.raises(KnowledgeError, match="another tokenizer"):
        Grounding.load(GroundingConfig(knowledge=str(knowledge["other"])), loaded.tokenizer)


def test_cli_chat_with_a_knowledge_base_prints_its_passage_ids(knowledge, checkpoint, capsys, monkeypatch):
    import io
    import sys

    from gptforge.cli import main
    from gptforge.knowledge.index import KnowledgeBase

    monkeypatch.setattr(sys, "stdin", io.StringIO("how long do refunds take?\n"))
    code = main(["chat", "--checkpoint", str(checkpoint), "--device", "cpu", "--max-new-tokens", "4",
                 "--knowledge", str(knowledge["kb"]), "-k", "1"])
    out, err = capsys.readouterr()
    assert code == 0, err
    passage = KnowledgeBase.load(knowledge["kb"]).search("how long do refunds take?", k=1)[0].passage
    assert f"sources:\n  [1] {passage.id} | {passage.title} | score " in out


@pytest.mark.parametrize("command", ["chat", "serve", "finetune"])
@pytest.mark.parametrize("which, fragment", [("other", "another tokenizer"), ("missing", "does not exist")])
def test_cli_refuses_a_missing_or_foreign_knowledge_base_in_one_line(knowledge, checkpoint, capsys, tmp_path,
                                                                   command, which, fragment):
    from tests.cli_utils import assert_one_line_error, run

    kb = knowledge["other"] if which == "other" else tmp_path / "missing-kb"
    if command == "finetune":
        train = tmp_path / "train.jsonl"
        train.write_text('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n' * 4)
        argv = ["finetune", "--task", "lm", "--checkpoint", str(checkpoint), "--train", str(train),
                "--out", str(tmp_path / "run"), "-q"]
    else:
        argv = [command, "--checkpoint", str(checkpoint), "--device", "cpu"]
    code, out, err = run(capsys, *argv, "--knowledge", str(kb))
    assert_one_line_error(code, err, fragment)
    assert not (tmp_path / "run").exists()


def test_cli_finetune_with_a_knowledge_base_grounds_its_examples(knowledge, checkpoint, capsys, tmp_path):
    from tests.cli_utils import run

    train = tmp_path / "train.jsonl"
    lines = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
             for q, a in [("how long do refunds take?", "five days."), ("when do orders leave?", "in a day.")]] * 4
    train.write_text("".join(__import__("json").dumps(r) + "\n" for r in lines), encoding="utf-8")
    code, out, err = run(capsys, "finetune", "--task", "lm", "--checkpoint", str(checkpoint), "--train", str(train),
                         "--out", str(tmp_path / "run"), "--knowledge", str(knowledge["kb"]), "-k", "1",
                         "--max_steps=2", "--eval_interval=2", "--batch_size=4", "--device=cpu")
    assert code == 0, err
    assert "retrieved passages for 8 of 8 examples" in err  # the CLI shows the library's INFO lines
