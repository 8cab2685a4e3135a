"""Writes the made-up example data of this folder (fictional companies, tickers and headlines; nothing here
is real news): headlines_train.jsonl / headlines_val.jsonl to fine-tune a sentiment classifier, and
news.jsonl, a stream of 240 headlines in which sentiment about ACME turns negative halfway through.

    python examples/monitor/make_data.py    # rewrites the three files (seeded: the same files every time)
"""

import json
import random
from datetime import datetime, timedelta, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
COMPANIES = {"ACME": "Acme Corp", "GLBX": "Globex", "INIT": "Initech", "UMBR": "Umbrella Labs", "HOOL": "Hooli"}
POSITIVE = ["{c} beats quarterly earnings estimates", "{c} raises full-year guidance", "{c} shares jump after strong sales",
            "{c} wins major contract", "{c} reports record revenue", "analysts upgrade {c} to buy",
            "{c} announces dividend increase", "{c} profit surges on new product demand",
            "{c} expands into new markets with solid growth", "investors cheer {c} results"]
NEGATIVE = ["{c} misses earnings estimates", "{c} cuts full-year guidance", "{c} shares plunge after weak sales",
            "{c} loses key customer", "{c} reports quarterly loss", "analysts downgrade {c} to sell",
            "{c} suspends dividend", "{c} faces regulatory probe", "{c} recalls products over safety fears",
            "{c} announces layoffs as demand slumps"]
NEUTRAL = ["{c} to hold annual meeting next month", "{c} names new chief financial officer",
           "{c} schedules earnings call for Thursday", "{c} opens office in Lisbon", "{c} files quarterly report",
           "{c} updates its website", "{c} shares unchanged in quiet trading", "{c} confirms date of investor day",
           "{c} board meets as planned", "{c} publishes annual sustainability report"]
TEMPLATES = {"positive": POSITIVE, "negative": NEGATIVE, "neutral": NEUTRAL}


def examples(rng: random.Random, n: int) -> list[dict]:
    out = []
    for _ in range(n):
        label = rng.choice(list(TEMPLATES))
        name = rng.choice(list(COMPANIES.values()))
        out.append({"text": rng.choice(TEMPLATES[label]).format(c=name), "label": label})
    return out


def stream(rng: random.Random, n: int = 240) -> list[dict]:
    start = datetime(2026, 12, 1, 9, 0, tzinfo=timezone.utc)
    out = []
    for i in range(n):
        ticker = rng.choice(list(COMPANIES))
        weights = {"positive": 0.45, "neutral": 0.4, "negative": 0.15}
        if ticker == "ACME" and i >= n // 2:  # the turn the monitor should catch
            weights = {"positive": 0.05, "neutral": 0.15, "negative": 0.8}
        label = rng.choices(list(weights), list(weights.values()))[0]
        when = start + timedelta(minutes=3 * i)
        out.append({"time": when.isoformat().replace("+00:00", "Z"), "key": ticker,
                    "text": rng.choice(TEMPLATES[label]).format(c=COMPANIES[ticker]), "publisher": "made-up wire"})
    return out


def write(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


if __name__ == "__main__":
    rng = random.Random(0)
    write(HERE / "headlines_train.jsonl", examples(rng, 600))
    write(HERE / "headlines_val.jsonl", examples(rng, 150))
    write(HERE / "news.jsonl", stream(rng))
