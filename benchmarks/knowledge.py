"""The knowledge base at scale: split, index, save, load and search about 100,000 passages.

    python benchmarks/knowledge.py                 # 100,000 passages, 1,000 queries
    python benchmarks/knowledge.py --passages 2000 --queries 50

The documents are synthetic but word-realistic: words are drawn (seeded) with the frequencies they have in
the built-in Shakespeare corpus (a real Zipf distribution: many common words, a long tail of rare ones).
Each document has ten ``##`` sections of one 25–50 word paragraph, so that with the default budget (96
tokens) nearly every section is one passage. Queries are "known-item" queries: four words drawn from one
passage's text; the fraction whose source passage comes first is printed as a sanity check.

Timed: splitting (read documents → passages), building the BM25 index (bm25s), saving and loading the
folder, adding one document (a full rebuild), and queries/s one at a time (``KnowledgeBase.search``) and
as a batch (``search_many``). The references, measured in the same process on the same index:

- bm25s's own ``retrieve`` on the same pre-tokenized queries (its numpy backend, one thread, and all
  threads), which returns top-k ids without gptforge's deterministic tie order or ``Hit`` objects: the gap
  is gptforge's overhead over the library;
- a naive scorer: the same precomputed BM25 matrix as a scipy CSR (passages × terms) times a query's 0/1
  term vector, then a full ``argsort``: what scoring every passage costs without an inverted index's
  column slices.

Every figure is one run on the machine at hand (printed first); nothing is asserted.
"""

from __future__ import annotations

import argparse
import collections
import os
import platform
import random
import re
import shutil
import tempfile
import time
from pathlib import Path



def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def word_distribution(max_words: int = 30000) -> tuple[list[str], list[int]]:
    """Words of the built-in Shakespeare corpus and their counts (the most frequent ``max_words``)."""
    from gptforge.data.corpus import iter_corpus

    counts: collections.Counter = collections.Counter()
    for piece in iter_corpus("shakespeare"):
        counts.update(re.findall(r"[a-z]+(?:'[a-z]+)?", piece.text.lower()))
    words, freqs = zip(*counts.most_common(max_words))
    return list(words), list(freqs)


def make_documents(n_passages: int, seed: int):
    from gptforge.knowledge.passages import Document

    words, freqs = word_distribution()
    rng = random.Random(seed)
    cumulative = list(__import__("itertools").accumulate(freqs))

    def sample(n: int) -> list[str]:
        return rng.choices(words, cum_weights=cumulative, k=n)

    def sentence(n: int) -> str:
        ws = sample(n)
        return " ".join(ws).capitalize() + "."

    docs = []
    sections = 10
    for d in range((n_passages + sections - 1) // sections):
        title = " ".join(sample(3)).title()
        body = [f"# {title}"]
        for s in range(min(sections, n_passages - d * sections)):
            body.append(f"## {' '.join(sample(2)).title()}")
            n = rng.randint(25, 50)
            cut = rng.randint(8, n - 8)
            body.append(sentence(cut) + " " + sentence(n - cut))
        docs.append(Document(doc_id=f"doc{d:06d}.md", title=title, text="\n\n".join(body)))
    return docs


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--passages", type=int, default=100_000, help="about this many passages (default 100,000)")
    parser.add_argument("--queries", type=int, default=1000, help="queries to time (default 1,000)")
    parser.add_argument("-k", type=int, default=5, help="passages per query (default 5)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import bm25s
    import numpy as np
    import scipy.sparse as sp

    from gptforge.knowledge.index import KnowledgeBase
    from gptforge.knowledge.passages import split_documents

    print(f"machine: {cpu_name()}, {os.cpu_count()} CPUs; python {platform.python_version()}, "
          f"bm25s {bm25s.__version__}, numpy {np.__version__}")
    docs, t_gen = timed(make_documents, args.passages, args.seed)
    passages, t_split = timed(split_documents, docs)
    n = len(passages)
    words = sum(len(p.text.split()) for p in passages)
    print(f"corpus: {len(docs):,} documents → {n:,} passages ({words / n:.0f} words a passage on average), "
          f"generated in {t_gen:.1f} s")
    print(f"split documents into passages   {t_split:8.2f} s   ({n / t_split:,.0f} passages/s)")

    kb, t_build = timed(KnowledgeBase.build, passages)
    print(f"build BM25 index (bm25s)        {t_build:8.2f} s   ({n / t_build:,.0f} passages/s; "
          f"{len(kb._retriever.vocab_dict):,} terms)")
    tmp = Path(tempfile.mkdtemp(prefix="kb-bench-"))
    try:
        _, t_save = timed(kb.save, tmp / "kb")
        loaded, t_load = timed(KnowledgeBase.load, tmp / "kb")
        print(f"save folder (atomic)            {t_save:8.2f} s   ({folder_bytes(tmp / 'kb') / 1e6:.1f} MB, no pickles)")
        print(f"load folder                     {t_load:8.2f} s")
        extra = split_documents(make_documents(10, args.seed + 1)[:1])
        extra = [type(p)(id=p.id.replace("doc000000", "added"), doc_id="added.md", title=p.title, text=p.text)
                 for p in extra]
        _, t_add = timed(loaded.add, extra)
        print(f"{f'add one document ({len(extra)} passages)':32}{t_add:8.2f} s   (a full rebuild of the BM25 matrix)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    rng = random.Random(args.seed + 2)
    targets = [rng.randrange(n) for _ in range(args.queries)]
    stop = set(bm25s.stopwords.STOPWORDS_EN)
    queries = []
    for i in targets:
        content = [w for w in re.findall(r"[a-z']+", passages[i].text.lower()) if w not in stop] or ["the"]
        queries.append(" ".join(rng.sample(content, min(4, len(content)))))

    start = time.perf_counter()
    single = [kb.search(q, args.k) for q in queries]
    t_single = time.perf_counter() - start
    batched, t_batch = timed(kb.search_many, queries, args.k)
    assert [[h.passage.id for h in hits] for hits in single] == [[h.passage.id for h in hits] for hits in batched]
    found = sum(bool(hits) and hits[0].passage.id == passages[i].id for hits, i in zip(single, targets))
    found_k = sum(any(h.passage.id == passages[i].id for h in hits) for hits, i in zip(single, targets))
    print(f"\nqueries: {len(queries):,} known-item queries of 4 words, top {args.k}; source passage first for "
          f"{found / len(queries):.1%}, in the top {args.k} for {found_k / len(queries):.1%}")
    print(f"  gptforge KnowledgeBase.search, one at a time    {len(queries) / t_single:9,.0f} queries/s "
          f"({1000 * t_single / len(queries):.2f} ms each)")
    print(f"  gptforge KnowledgeBase.search_many (a batch)    {len(queries) / t_batch:9,.0f} queries/s")

    # References on the same index.
    terms = kb._terms(queries)
    retriever = kb._retriever
    k = min(args.k, n)
    _, t_ref = timed(retriever.retrieve, terms, k=k, show_progress=False, n_threads=0)
    print(f"  reference: bm25s retrieve, 1 thread             {len(queries) / t_ref:9,.0f} queries/s")
    (ref_ids, ref_scores), t_ref_mt = timed(retriever.retrieve, terms, k=k, show_progress=False, n_threads=-1)
    print(f"  reference: bm25s retrieve, {os.cpu_count()} threads            {len(queries) / t_ref_mt:9,.0f} queries/s")
    same_ids = sum({int(j) for j in row} >= {kb._by_id[h.passage.id] for h in hits}
                   for row, hits in zip(ref_ids, single))
    same_scores = sum(np.allclose([h.score for h in hits] + [0.0] * (k - len(hits)), row)
                      for row, hits in zip(ref_scores, single))
    print(f"  against bm25s retrieve: the same top-{k} passages for {same_ids}/{len(queries)} queries, the same "
          f"top-{k} scores for {same_scores}/{len(queries)} (same scores, other passages: ties, which gptforge "
          "breaks by passage order)")

    scores = retriever.scores
    csc = sp.csc_matrix((scores["data"], scores["indices"], scores["indptr"]),
                        shape=(scores["num_docs"], len(scores["indptr"]) - 1))
    csr = csc.tocsr()
    n_naive = min(len(queries), 200)
    start = time.perf_counter()
    for t in terms[:n_naive]:
        vec = np.zeros(csr.shape[1], dtype=np.float32)
        vec[retriever.get_tokens_ids(t)] = 1.0
        order = np.argsort(-(csr @ vec), kind="stable")[:k]
    t_naive = time.perf_counter() - start
    print(f"  reference: naive scoring (CSR matrix × query vector, full argsort; {n_naive} queries)"
          f" {n_naive / t_naive:,.0f} queries/s")
    del order


if __name__ == "__main__":
    main()
