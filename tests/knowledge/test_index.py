"""The knowledge base: retrieval order, round trip through a folder, --add, tokenizer checks, bad folders."""

import json
import os

import pytest

from gptforge.config import IndexConfig
from gptforge.errors import GptforgeError, InvalidTextError, KnowledgeError
from gptforge.knowledge.index import MARKER, KnowledgeBase, build_knowledge_base, is_knowledge_base, plural_stem
from gptforge.knowledge.passages import Document, split_documents
from gptforge.knowledge.types import Passage
from gptforge.tokenizer import CharTokenizer

CORPUS = {
    "returns.md": "# Returns\n\nYou can return any item within 30 days of delivery for a full refund.\n\n"
                  "## Refunds\n\nRefunds reach your card within 5 business days after we receive the parcel.",
    "shipping.md": "# Shipping\n\nStandard shipping takes 3 to 5 days. Express shipping arrives the next day.",
    "password.md": "# Account\n\n## Password\n\nTo reset your password, click 'Forgot password' on the sign-in page.",
    "warranty.md": "# Warranty\n\nEvery widget has a two-year warranty covering manufacturing defects.",
}


def passage(pid, text, title="T"):
    return Passage(id=pid, doc_id=pid.split("#")[0], title=title, text=text)


@pytest.fixture
def docs(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    for name, text in CORPUS.items():
        (folder / name).write_text(text, encoding="utf-8")
    return folder


@pytest.fixture
def kb(docs, tmp_path):
    return build_knowledge_base(docs, tmp_path / "kb").knowledge_base


def ids(hits):
    return [h.passage.id for h in hits]


@pytest.mark.parametrize("query,best", [
    ("How long until my refund reaches my card?", "returns.md#2"),
    ("how do I reset my password", "password.md#1"),
    ("express delivery next day", "shipping.md#1"),
    ("WARRANTY defects", "warranty.md#1"),
    ("can I return an item after 30 days", "returns.md#1"),
])
def test_retrieval_puts_the_answering_passage_first(kb, query, best):
    hits = kb.search(query, k=3)
    assert hits[0].passage.id == best
    assert all(a.score >= b.score > 0 for a, b in zip(hits, hits[1:]))


def test_titles_are_searched_too(kb):
    assert ids(kb.search("account", k=1)) == ["password.md#1"]  # "Account" is only in the title


def test_plural_and_singular_forms_match_with_the_default_stemmer(kb):
    assert ids(kb.search("parcels", k=1)) == ["returns.md#2"]
    assert [plural_stem(w) for w in ("refunds", "policies", "boxes", "bus", "glass", "is")] == \
        ["refund", "policy", "boxe", "bus", "glass", "i"]


def test_no_shared_word_gives_no_hits_and_k_limits(kb):
    assert kb.search("zebra xylophone") == []
    assert kb.search("the and of") == []  # stopwords only
    assert len(kb.search("days", k=1)) == 1
    assert len(kb.search("days", k=50)) == 3  # only passages with a score above 0


def test_equal_scores_keep_passage_order():
    passages = [passage(f"d{i}#1", "same words here") for i in range(7)] + [passage("x#1", "other text")]
    kb = KnowledgeBase.build(passages)
    for k in (1, 3, 7):
        hits = kb.search("same words", k=k)
        assert ids(hits) == [f"d{i}#1" for i in range(k)]
        assert len({h.score for h in hits}) == 1


def test_bad_k_and_bad_query_are_clear_errors(kb):
    for k in (0, -1, 1.5, True):
        with pytest.raises(GptforgeError, match="k .* must be a positive integer"):
            kb.search("refund", k=k)
    with pytest.raises(InvalidTextError, match="the query holds a lone surrogate U\\+DCFF"):
        kb.search("refund \udcff")


def test_unicode_queries_are_normalised_like_passages():
    kb = KnowledgeBase.build([passage("a#1", "Le café est prêt"), passage("b#1", "autre chose")])
    assert ids(kb.search("cafe\u0301", k=1)) == ["a#1"]  # decomposed é finds the composed one
    assert ids(kb.search("CAFÉ", k=1)) == ["a#1"]


def test_get_and_passages(kb):
    assert kb.get("shipping.md#1").title == "Shipping"
    assert [p.id for p in kb.passages][:2] == ["password.md#1", "returns.md#1"]
    with pytest.raises(KnowledgeError, match="no passage 'nope#1'"):
        kb.get("nope#1")


def test_round_trip_through_the_folder(kb, tmp_path):
    loaded = KnowledgeBase.load(tmp_path / "kb")
    assert loaded.passages == kb.passages
    assert loaded.meta == kb.meta
    for query in ("refund card", "password", "shipping days"):
        expected = [(h.passage, h.score) for h in kb.search(query, 4)]
        assert expected and [(h.passage, h.score) for h in loaded.search(query, 4)] == expected
    files = sorted(os.listdir(tmp_path / "kb"))
    assert MARKER in files and "passages.jsonl" in files and "meta.json" in files
    assert not any(f.endswith((".pkl", ".pickle")) for f in files)
    for f in files:  # nothing is a pickle: every .npy loads without allow_pickle
        if f.endswith(".npy"):
            import numpy as np
            np.load(tmp_path / "kb" / f, allow_pickle=False)
    meta = json.loads((tmp_path / "kb" / "meta.json").read_text())
    assert meta["passages"] == len(kb.passages) and meta["documents"] == 4
    assert meta["splitting"] == {"max_passage_tokens": 96, "overlap_tokens": 16, "tokenizer": {"kind": "estimate"}}


def test_add_appends_new_documents_and_replaces_changed_ones(kb, docs, tmp_path):
    more = tmp_path / "more"
    more.mkdir()
    (more / "gift-cards.md").write_text("# Gift cards\n\nGift cards never expire.", encoding="utf-8")
    (more / "shipping.md").write_text("# Shipping\n\nWe now ship by drone within one hour.", encoding="utf-8")
    before = KnowledgeBase.load(tmp_path / "kb")
    result = build_knowledge_base(more, tmp_path / "kb", add=True)
    assert (result.added_passages, result.removed_passages, result.replaced_documents) == (2, 1, 1)
    after = KnowledgeBase.load(tmp_path / "kb")
    assert ids(after.search("gift card expire", 1)) == ["gift-cards.md#1"]
    assert ids(after.search("drone", 1)) == ["shipping.md#1"]
    assert after.search("express standard") == []  # the old shipping text is gone
    assert [p for p in after.passages if p.doc_id not in ("shipping.md", "gift-cards.md")] == \
        [p for p in before.passages if p.doc_id != "shipping.md"]
    assert after.meta["documents"] == 5 and len(after.meta["sources"]) == 2
    # Adding and building from scratch give the same scores for the same passages.
    fresh = KnowledgeBase.build(after.passages)
    assert [(h.passage.id, h.score) for h in fresh.search("days refund", 5)] == \
           [(h.passage.id, h.score) for h in after.search("days refund", 5)]


def test_add_keeps_the_knowledge_base_settings(kb, docs, tmp_path):
    (tmp_path / "kb2").mkdir()
    built = build_knowledge_base(docs, tmp_path / "kb2", {"max_passage_tokens": 32, "overlap_tokens": 4})
    assert built.knowledge_base.config == IndexConfig(max_passage_tokens=32, overlap_tokens=4)
    build_knowledge_base(docs, tmp_path / "kb2", add=True)  # no options: its own apply
    assert KnowledgeBase.load(tmp_path / "kb2").config.max_passage_tokens == 32
    with pytest.raises(KnowledgeError, match="built with max_passage_tokens 32, not 96"):
        build_knowledge_base(docs, tmp_path / "kb2", {"max_passage_tokens": 96}, add=True)


def test_a_tokenizer_budget_is_recorded_and_checked(docs, tmp_path):
    tok = CharTokenizer(list("abcdefghijklmnopqrstuvwxyz"))
    other = CharTokenizer(list("abcdefghijklmnopqrstuvwxyz0123456789"))
    passages = split_documents([Document("d", "D", "some text here")], tokenizer=tok)
    kb = KnowledgeBase.build(passages, IndexConfig(max_passage_tokens=64), tokenizer=tok, sources=["/docs"])
    kb.save(tmp_path / "kb")
    loaded = KnowledgeBase.load(tmp_path / "kb")
    assert loaded.meta["splitting"]["tokenizer"]["fingerprint"] == tok.fingerprint
    assert loaded.tokenizer.fingerprint == tok.fingerprint  # kept in the folder for --add
    loaded.check_tokenizer(tok)
    with pytest.raises(KnowledgeError) as info:
        loaded.check_tokenizer(other)
    message = str(info.value)
    assert "passages of 64 tokens of another tokenizer" in message and "gptforge index --docs /docs" in message
    assert "--checkpoint" in message
    KnowledgeBase.build(passages).check_tokenizer(other)  # the word estimate suits any model


def test_save_is_atomic_and_never_replaces_a_foreign_folder(kb, tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    (project / "keep.txt").write_text("precious")
    with pytest.raises(GptforgeError, match="not a knowledge base"):
        kb.save(project)
    assert (project / "keep.txt").read_text() == "precious"
    kb.save(tmp_path / "kb")  # replacing a knowledge base is fine
    assert is_knowledge_base(tmp_path / "kb")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_a_failed_build_leaves_the_old_knowledge_base(kb, tmp_path):
    before = (tmp_path / "kb" / "passages.jsonl").read_bytes()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(KnowledgeError):
        build_knowledge_base(empty, tmp_path / "kb")
    with pytest.raises(KnowledgeError):
        build_knowledge_base(empty, tmp_path / "kb", add=True)
    assert (tmp_path / "kb" / "passages.jsonl").read_bytes() == before


def put(path, text):
    """Overwrite ``path`` with ``text``; return the knowledge base folder it is in."""
    path.write_text(text, encoding="utf-8")
    return path.parent


@pytest.mark.parametrize("damage,fragment", [
    (lambda kb: kb / "missing", "does not exist; build it with gptforge index"),
    (lambda kb: (kb / MARKER).unlink() or kb, "is incomplete (no COMPLETE marker"),
    (lambda kb: put(kb / MARKER, '{"format": 1, "algorithm": "sha256", "files": {}}'),
     "is not a gptforge knowledge base"),
    (lambda kb: put(kb / MARKER, '{"kind": "gptforge-knowledge-base", "format": 99}'), "newer"),
    (lambda kb: put(kb / "meta.json", "{"), "is damaged: cannot read meta.json"),
    (lambda kb: (kb / "meta.json").unlink() or kb, "is damaged: meta.json is missing"),
    (lambda kb: (kb / "data.csc.index.npy").unlink() or kb, "is damaged"),
    (lambda kb: put(kb / "meta.json", (kb / "meta.json").read_text().replace('"plural"', '"snowball"')),
     "unknown stemmer or stopwords"),
    (lambda kb: put(kb / "passages.jsonl", '{"id": "a"}\n'), "is damaged"),
    (lambda kb: put(kb / "passages.jsonl", '{"id": "a#1", "doc_id": "a", "title": "A", "text": "t"}\n'),
     "holds 1 passages, the index 5"),
])
def test_a_bad_folder_is_one_clear_error(kb, tmp_path, damage, fragment):
    path = damage(tmp_path / "kb")
    with pytest.raises(KnowledgeError) as info:
        KnowledgeBase.load(path)
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_folders_that_are_not_knowledge_bases(tmp_path):
    (tmp_path / "plain").mkdir()
    (tmp_path / "file").write_text("x")
    with pytest.raises(KnowledgeError, match="is not a gptforge knowledge base"):
        KnowledgeBase.load(tmp_path / "plain")
    with pytest.raises(KnowledgeError, match="is not a folder"):
        KnowledgeBase.load(tmp_path / "file")


def test_duplicate_passage_ids_and_empty_builds_are_refused():
    with pytest.raises(KnowledgeError, match="two passages have the id"):
        KnowledgeBase.build([passage("a#1", "x"), passage("a#1", "y")])
    with pytest.raises(KnowledgeError, match="no passages"):
        KnowledgeBase.build([])
