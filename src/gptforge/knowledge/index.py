"""The knowledge base: passages and their BM25 index (``bm25s``), saved as a folder like a checkpoint.

A knowledge base folder holds:

- ``passages.jsonl``: one passage a line (``id``, ``doc_id``, ``title``, ``text``), in index order;
- ``meta.json``: counts, the splitting settings (budget, overlap, and the tokenizer that counted the tokens:
  kind, fingerprint, vocabulary size, or ``estimate``), the BM25 settings, the docs it was built from;
- the tokenizer's own files when one counted the tokens (so ``--add`` splits new documents alike);
- bm25s's index files (``*.index.npy``, saved and loaded with ``allow_pickle=False``, and ``*.index.json``):
  nothing in the folder is a pickle;
- ``COMPLETE``, written last: a folder without it is never loaded.

The folder is written to a temporary sibling, fsynced and renamed into place
(:func:`gptforge.fsutil.publish_folder`), so a process killed at any moment leaves the old knowledge base
or the new one, never half of one.

Search text: a passage is indexed as its title followed by its text, so a heading's words find the
passages under it. Text is lower-cased and split into runs of letters and digits (any script; one
character words and numbers count); English stopwords (bm25s's list) are left out unless
``stopwords="none"``; the ``plural`` stemmer (Harman's S-stemmer: ``refunds → refund``,
``policies → policy``, ``boxes → boxe``) lets singular and plural forms match. Scores are BM25 (bm25s's
``lucene`` variant, k1 = 1.5, b = 0.75); :meth:`KnowledgeBase.search` returns passages with a score above
zero, best first, equal scores in passage order.

Adding documents (:meth:`KnowledgeBase.add`) drops the passages of every document added again, appends
the new ones and rebuilds the whole BM25 matrix: BM25's document frequencies change with every passage,
so an addition costs as much as a build of the whole knowledge base (13–15 s for 100,000 passages on a
2-core AMD EPYC, well under a second for a support FAQ's few hundred; see benchmarks/README.md).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import numpy as np

from ..config import KNOWLEDGE_STEMMERS, KNOWLEDGE_STOPWORDS, IndexConfig
from ..errors import ConfigError, KnowledgeError
from ..fsutil import check_output_dir, publish_folder
from ..tokenizer import check_text
from .passages import ESTIMATE_KIND, Document, normalize_text, read_documents, split_documents
from .types import Hit, Passage

log = logging.getLogger(__name__)

KIND = "gptforge-knowledge-base"
FORMAT = 1
MARKER = "COMPLETE"
META_FILE = "meta.json"
PASSAGES_FILE = "passages.jsonl"
TOKEN_PATTERN = r"(?u)\b\w+\b"
BM25_METHOD = "lucene"
BM25_K1 = 1.5
BM25_B = 0.75


def plural_stem(word: str) -> str:
    """Harman's S-stemmer (1991): ``-ies → -y`` (not ``-eies``/``-aies``), ``-es → -e`` (not
    ``-aes``/``-ees``/``-oes``), ``-s → ''`` (not ``-us``/``-ss``)."""
    if len(word) > 3 and word.endswith("ies") and not word.endswith(("eies", "aies")):
        return word[:-3] + "y"
    if len(word) > 2 and word.endswith("es") and not word.endswith(("aes", "ees", "oes")):
        return word[:-1]
    if len(word) > 1 and word.endswith("s") and not word.endswith(("us", "ss")):
        return word[:-1]
    return word


def _stem_words(words: list[str]) -> list[str]:
    return [plural_stem(w) for w in words]


@dataclass
class _Terms:
    """How text becomes BM25 terms; recorded in meta.json and used alike for passages and queries."""

    stopwords: str = "en"
    stemmer: str = "plural"
    lowercase: bool = True
    token_pattern: str = TOKEN_PATTERN

    def __call__(self, texts: Sequence[str]) -> list[list[str]]:
        import bm25s

        return bm25s.tokenize(list(texts), lower=self.lowercase, token_pattern=self.token_pattern,
                              stopwords=self.stopwords if self.stopwords != "none" else None,
                              stemmer=_stem_words if self.stemmer == "plural" else None,
                              return_ids=False, show_progress=False)

    def to_dict(self) -> dict[str, Any]:
        return {"lowercase": self.lowercase, "token_pattern": self.token_pattern, "stopwords": self.stopwords,
                "stemmer": self.stemmer}


def _search_text(passage: Passage) -> str:
    return f"{passage.title}\n{passage.text}"


@dataclass(eq=False)
class KnowledgeBase:
    """Passages and their BM25 index. Build with :meth:`build` (or :func:`build_knowledge_base`), open a
    saved one with :meth:`load`."""

    passages: list[Passage]
    meta: dict[str, Any]
    path: Optional[Path] = None
    """The folder it was loaded from or last saved to (None for one only in memory)."""
    _retriever: Any = field(default=None, repr=False)
    _tokenizer: Any = field(default=None, repr=False)
    _by_id: dict[str, int] = field(default_factory=dict, repr=False)

    # ----------------------------------------------------------------------------------------------
    # Building
    @classmethod
    def build(cls, passages: Sequence[Passage], config: Optional[IndexConfig] = None, *, tokenizer=None,
              sources: Sequence[str] = ()) -> "KnowledgeBase":
        """Index ``passages`` (cut with ``config``'s budget by ``tokenizer``, None for the word estimate:
        recorded so that :meth:`check_tokenizer` can tell a model of another tokenizer)."""
        config = (config or IndexConfig()).validate()
        if tokenizer is None:
            counted_by: dict[str, Any] = {"kind": ESTIMATE_KIND}
        else:
            counted_by = {"kind": tokenizer.kind, "fingerprint": tokenizer.fingerprint,
                          "vocab_size": tokenizer.vocab_size}
        meta = {
            "format": FORMAT,
            "kind": KIND,
            "splitting": {"max_passage_tokens": config.max_passage_tokens, "overlap_tokens": config.overlap_tokens,
                          "tokenizer": counted_by},
            "bm25": {"library": "bm25s", "method": BM25_METHOD, "k1": BM25_K1, "b": BM25_B,
                     "fields": "title + text", **_Terms(config.stopwords, config.stemmer).to_dict()},
            "sources": list(dict.fromkeys(sources)),
        }
        kb = cls(passages=[], meta=meta, _tokenizer=tokenizer)
        kb._index(list(passages))
        return kb

    def _index(self, passages: list[Passage]) -> None:
        import bm25s

        if not passages:
            raise KnowledgeError("no passages to index")
        by_id: dict[str, int] = {}
        for i, p in enumerate(passages):
            if p.id in by_id:
                raise KnowledgeError(f"two passages have the id {p.id!r}; passage ids must be unique")
            by_id[p.id] = i
        start = time.perf_counter()
        retriever = bm25s.BM25(method=BM25_METHOD, k1=BM25_K1, b=BM25_B)
        retriever.index(self._terms([_search_text(p) for p in passages]), show_progress=False)
        self.passages, self._by_id, self._retriever = passages, by_id, retriever
        self.meta["passages"] = len(passages)
        self.meta["documents"] = len({p.doc_id for p in passages})
        self.meta["bm25s_version"] = bm25s.__version__
        log.info("indexed %d passages of %d documents in %.2f s", len(passages), self.meta["documents"],
                 time.perf_counter() - start)

    @property
    def _terms(self) -> _Terms:
        bm25 = self.meta["bm25"]
        return _Terms(stopwords=bm25["stopwords"], stemmer=bm25["stemmer"], lowercase=bm25["lowercase"],
                      token_pattern=bm25["token_pattern"])

    @property
    def config(self) -> IndexConfig:
        """The settings this knowledge base was built with."""
        s, b = self.meta["splitting"], self.meta["bm25"]
        return IndexConfig(max_passage_tokens=s["max_passage_tokens"], overlap_tokens=s["overlap_tokens"],
                           stopwords=b["stopwords"], stemmer=b["stemmer"])

    @property
    def tokenizer(self):
        """The tokenizer that counted the passages' tokens (None for the word estimate)."""
        if self._tokenizer is None and self.meta["splitting"]["tokenizer"]["kind"] != ESTIMATE_KIND \
                and self.path is not None:
            from ..tokenizer import load_tokenizer

            self._tokenizer = load_tokenizer(self.path)
        return self._tokenizer

    def split(self, documents: Iterable[Document]) -> list[Passage]:
        """``documents`` cut into passages with this knowledge base's settings and tokenizer."""
        c = self.config
        return split_documents(documents, max_passage_tokens=c.max_passage_tokens, overlap_tokens=c.overlap_tokens,
                               tokenizer=self.tokenizer)

    def add(self, passages: Sequence[Passage], sources: Sequence[str] = ()) -> dict[str, int]:
        """Add ``passages`` (cut with :meth:`split`), replacing every passage of the documents they come
        from; rebuilds the BM25 matrix, which costs as much as building the whole knowledge base anew.
        Returns counts: ``added`` and ``removed`` passages, ``replaced_documents``."""
        passages = list(passages)
        new_docs = {p.doc_id for p in passages}
        kept = [p for p in self.passages if p.doc_id not in new_docs]
        counts = {"added": len(passages), "removed": len(self.passages) - len(kept),
                  "replaced_documents": len(new_docs & {p.doc_id for p in self.passages})}
        self._index(kept + passages)
        self.meta["sources"] = list(dict.fromkeys([*self.meta.get("sources", []), *sources]))
        return counts

    # ----------------------------------------------------------------------------------------------
    # Searching
    def search(self, query: str, k: int = 5) -> list[Hit]:
        """The ``k`` passages that best match ``query`` (BM25, title + text), best first; only passages
        sharing a term with the query (score above 0); equal scores in passage order."""
        return self.search_many([query], k)[0]

    def search_many(self, queries: Sequence[str], k: int = 5) -> list[list[Hit]]:
        """:meth:`search` for each query."""
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ConfigError(f"k (passages to retrieve) must be a positive integer, got {k!r}")
        for q in queries:
            check_text(q, "the query")
        terms = self._terms([normalize_text(q) for q in queries])
        return [self._top(self._retriever.get_tokens_ids(t), k) for t in terms]

    def _top(self, term_ids: list[int], k: int) -> list[Hit]:
        if not term_ids:
            return []
        scores = self._retriever.get_scores_from_ids(term_ids)
        candidates = np.flatnonzero(scores > 0)
        if len(candidates) > k:
            # The k-th best score, then every passage at or above it: ties at the edge are kept so that the
            # stable order below (score, then passage order) decides, not argpartition's arbitrary pick.
            kth = np.partition(scores[candidates], len(candidates) - k)[len(candidates) - k]
            candidates = candidates[scores[candidates] >= kth]
        order = np.lexsort((candidates, -scores[candidates]))
        return [Hit(self.passages[i], float(scores[i])) for i in candidates[order][:k]]

    def get(self, passage_id: str) -> Passage:
        """The passage with this id; KnowledgeError if there is none."""
        try:
            return self.passages[self._by_id[passage_id]]
        except KeyError:
            raise KnowledgeError(f"the knowledge base has no passage {passage_id!r}") from None

    def __len__(self) -> int:
        return len(self.passages)

    # ----------------------------------------------------------------------------------------------
    # Checking against a model
    def check_tokenizer(self, tokenizer) -> None:
        """KnowledgeError if the passages were cut to a budget counted by another tokenizer than
        ``tokenizer`` (the model's). An index built without a tokenizer (word estimate) suits any model."""
        counted = self.meta["splitting"]["tokenizer"]
        if counted["kind"] == ESTIMATE_KIND or counted.get("fingerprint") == tokenizer.fingerprint:
            return
        where = f"knowledge base {self.path}" if self.path else "the knowledge base"
        budget = self.meta["splitting"]["max_passage_tokens"]
        sources = " ".join(self.meta.get("sources") or []) or "DOCS"
        raise KnowledgeError(
            f"{where} was split into passages of {budget} tokens of another tokenizer ({counted['kind']}, "
            f"fingerprint {counted.get('fingerprint')}) than the model's ({tokenizer.kind}, fingerprint "
            f"{tokenizer.fingerprint}); rebuild it for this model: gptforge index --docs {sources} "
            f"--out {self.path or 'KB'} --checkpoint MODEL")

    # ----------------------------------------------------------------------------------------------
    # Saving and loading
    def save(self, path: str | Path) -> Path:
        """Write the knowledge base to the folder ``path`` atomically (replacing a knowledge base there;
        refusing any other non-empty folder)."""
        target = Path(path)
        check_output_dir(target, replaceable=is_knowledge_base(target), what="a knowledge base")
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            tokenizer = self.tokenizer
            self._retriever.save(str(tmp), show_progress=False, allow_pickle=False)
            with open(tmp / PASSAGES_FILE, "w", encoding="utf-8") as f:
                for p in self.passages:
                    f.write(json.dumps(p.to_dict(), ensure_ascii=False) + "\n")
            if tokenizer is not None:
                tokenizer.save(tmp)
            (tmp / META_FILE).write_text(json.dumps(self.meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
            (tmp / MARKER).write_text(json.dumps({"kind": KIND, "format": FORMAT}) + "\n", encoding="utf-8")
            publish_folder(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self.path = target
        return target

    @classmethod
    def load(cls, path: str | Path) -> "KnowledgeBase":
        """The knowledge base saved in the folder ``path``. KnowledgeError for a missing, incomplete,
        damaged or foreign folder, or one written by a newer gptforge."""
        import bm25s

        folder = Path(path)
        if not folder.exists():
            raise KnowledgeError(f"knowledge base {folder} does not exist; build it with "
                                 f"gptforge index --docs DOCS --out {folder}")
        if not folder.is_dir():
            raise KnowledgeError(f"knowledge base {folder} is not a folder")
        marker = folder / MARKER
        if not marker.is_file():
            if (folder / META_FILE).exists() or (folder / PASSAGES_FILE).exists():
                raise KnowledgeError(f"knowledge base {folder} is incomplete (no {MARKER} marker: it was being "
                                     "written when the process stopped); build it again")
            raise KnowledgeError(f"{folder} is not a gptforge knowledge base (no {META_FILE}, {PASSAGES_FILE} and "
                                 f"{MARKER}); build one with gptforge index --docs DOCS --out {folder}")
        record = _read_json(marker, folder)
        if not isinstance(record, dict) or record.get("kind") != KIND:
            raise KnowledgeError(f"{folder} is not a gptforge knowledge base (its {MARKER} marker is another "
                                 "kind's: a model checkpoint?)")
        if not isinstance(record.get("format"), int) or record["format"] > FORMAT:
            raise KnowledgeError(f"knowledge base {folder} has format {record.get('format')!r}, newer than this "
                                 f"gptforge reads ({FORMAT}); upgrade gptforge or build it again")
        meta = _read_json(folder / META_FILE, folder)
        try:
            passages = [_passage(json.loads(line)) for line in
                        (folder / PASSAGES_FILE).read_text(encoding="utf-8").splitlines() if line.strip()]
            retriever = bm25s.BM25.load(str(folder), load_corpus=False, allow_pickle=False)
            num_docs = int(retriever.scores["num_docs"])
            _ = meta["splitting"]["tokenizer"]["kind"], meta["splitting"]["max_passage_tokens"]
            bm25 = meta["bm25"]
            if bm25["stemmer"] not in KNOWLEDGE_STEMMERS or bm25["stopwords"] not in KNOWLEDGE_STOPWORDS:
                raise ValueError(f"unknown stemmer or stopwords in {META_FILE}")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise KnowledgeError(f"knowledge base {folder} is damaged ({type(exc).__name__}: {exc}); "
                                 "build it again") from None
        if not (len(passages) == num_docs == meta.get("passages")):
            raise KnowledgeError(f"knowledge base {folder} is damaged: {PASSAGES_FILE} holds {len(passages)} passages, "
                                 f"the index {num_docs} and {META_FILE} {meta.get('passages')}; build it again")
        kb = cls(passages=passages, meta=meta, path=folder, _retriever=retriever,
                 _by_id={p.id: i for i, p in enumerate(passages)})
        log.debug("loaded knowledge base %s: %d passages", folder, len(passages))
        return kb


def _read_json(path: Path, folder: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise KnowledgeError(f"knowledge base {folder} is damaged: {path.name} is missing; build it again") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise KnowledgeError(f"knowledge base {folder} is damaged: cannot read {path.name} ({exc}); "
                             "build it again") from None


def _passage(obj: Any) -> Passage:
    if not isinstance(obj, dict) or not all(isinstance(obj.get(k), str) for k in ("id", "doc_id", "title", "text")):
        raise ValueError(f"a line of {PASSAGES_FILE} is not a passage (id, doc_id, title, text)")
    return Passage(id=obj["id"], doc_id=obj["doc_id"], title=obj["title"], text=obj["text"])


def is_knowledge_base(path: str | Path) -> bool:
    """Whether ``path`` is a complete knowledge base folder (what :meth:`KnowledgeBase.save` may replace)."""
    marker = Path(path) / MARKER
    try:
        return marker.is_file() and json.loads(marker.read_text(encoding="utf-8")).get("kind") == KIND
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return False


# --------------------------------------------------------------------------------------------------
# The library call behind `gptforge index --docs`
@dataclass
class BuildResult:
    knowledge_base: KnowledgeBase
    path: Path
    documents: int
    """Documents read from the docs given this time."""
    added_passages: int
    removed_passages: int
    """Passages of documents given again (replaced by their new passages)."""
    replaced_documents: int
    seconds: float


def tokenizer_of(checkpoint: str | Path):
    """The tokenizer of a checkpoint, run folder, Hugging Face folder or hub id (the model is not loaded)."""
    from ..checkpoint import resolve_model_source
    from ..tokenizer import load_tokenizer

    _, folder = resolve_model_source(str(checkpoint))
    return load_tokenizer(folder)


def build_knowledge_base(docs: str | Path, out: str | Path, settings: Optional[dict[str, Any]] = None, *,
                         checkpoint: Optional[str | Path] = None, add: bool = False) -> BuildResult:
    """Read ``docs``, cut them into passages, index them and save the knowledge base at ``out``.

    ``settings``: :class:`~gptforge.config.IndexConfig` fields given by the user; those not given take their
    defaults. ``checkpoint``: count tokens with that model's tokenizer (else the word estimate). ``add``: add
    to the knowledge base at ``out`` instead, replacing the documents given again; its own settings and
    tokenizer apply, and ``settings`` or ``checkpoint`` that differ from them are an error. Nothing at
    ``out`` changes when this fails."""
    from ..config import config_from_dict

    start = time.perf_counter()
    out = Path(out)
    settings = dict(settings or {})
    config = config_from_dict(IndexConfig, settings, "index").validate()
    source = str(Path(docs).resolve())
    if add:
        kb = KnowledgeBase.load(out)
        _check_same_settings(kb, settings, out)
        if checkpoint is not None:
            tokenizer = tokenizer_of(checkpoint)
            if kb.tokenizer is None:
                raise KnowledgeError(f"knowledge base {out} counts tokens by the word estimate (it was built without "
                                     "--checkpoint); add to it without --checkpoint, or rebuild it with one")
            kb.check_tokenizer(tokenizer)
        documents = read_documents(docs)
        log.info("read %d documents from %s", len(documents), docs)
        new = kb.split(documents)
        log.info("split them into %d passages", len(new))
        counts = kb.add(new, sources=[source])
    else:
        check_output_dir(out, replaceable=is_knowledge_base(out), what="a knowledge base")
        tokenizer = tokenizer_of(checkpoint) if checkpoint is not None else None
        documents = read_documents(docs)
        log.info("read %d documents from %s", len(documents), docs)
        new = split_documents(documents, max_passage_tokens=config.max_passage_tokens,
                              overlap_tokens=config.overlap_tokens, tokenizer=tokenizer)
        log.info("split them into %d passages of at most %d tokens (%s)", len(new), config.max_passage_tokens,
                 f"counted by the {tokenizer.kind} tokenizer" if tokenizer is not None else "estimated from the words")
        kb = KnowledgeBase.build(new, config, tokenizer=tokenizer, sources=[source])
        counts = {"added": len(new), "removed": 0, "replaced_documents": 0}
    kb.save(out)
    return BuildResult(knowledge_base=kb, path=out, documents=len(documents), added_passages=counts["added"],
                       removed_passages=counts["removed"], replaced_documents=counts["replaced_documents"],
                       seconds=time.perf_counter() - start)


def _check_same_settings(kb: KnowledgeBase, settings: dict[str, Any], out: Path) -> None:
    have = kb.config
    for name, given in settings.items():
        if given != getattr(have, name):
            raise KnowledgeError(f"knowledge base {out} was built with {name} {getattr(have, name)!r}, not {given!r}; "
                                 "--add keeps its settings (drop the option, or rebuild without --add)")


# --------------------------------------------------------------------------------------------------
# The library call behind `gptforge evaluate --task retrieval`
def evaluate_knowledge_base(knowledge: str | Path, data_file: str | Path) -> dict[str, Any]:
    """Recall@1/5/10 and MRR of the knowledge base at ``knowledge`` on the questions of ``data_file``
    (:mod:`gptforge.evaluate.retrieval`): ``{"task", "knowledge", "data", "metrics", "report"}``."""
    from ..evaluate.retrieval import check_answers_exist, evaluate_retrieval, read_retrieval_data

    kb = KnowledgeBase.load(knowledge)
    questions = read_retrieval_data(data_file)
    check_answers_exist(questions, kb.passages, data=str(data_file), knowledge=f"knowledge base {kb.path}")
    start = time.perf_counter()
    result = evaluate_retrieval(kb, questions)
    log.info("searched %d questions in %.2f s", len(questions), time.perf_counter() - start)
    return {"task": "retrieval", "knowledge": str(kb.path), "data": str(data_file), **result}
