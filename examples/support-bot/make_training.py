#!/usr/bin/env python3
"""Writes train-grounded.jsonl, the grounded model's training data, from faq.jsonl and docs/.

    python3 examples/support-bot/make_training.py            # rewrites train-grounded.jsonl (seeded: same file)

A model this small learns the FAQ by heart faster than it learns to read. The file therefore holds three
kinds of chat example, each with one passage in its ``context`` slot:

1. **The FAQ**: each FAQ question with the passage (``## `` section of docs/) that answers it.
2. **Changed copies** of those: the same question and passage, but the answer in the passage replaced by
   another one drawn from a broad pool of answer shapes (prices, counts, dates, times, names, places,
   phrases), which becomes the target. Memorising cannot get these right; copying from the passage can.
3. **Reading exercises** about made-up places and services: a sentence from a template holding an answer
   drawn from the same pool, and a question about it worded differently from the sentence. These teach the
   model to find the span a question asks for in a sentence it has never seen, wherever the span stands.

No answer of the documents added after fine-tuning (qa-added.jsonl) is ever a target here: the pool skips
them (and tests/examples/test_support_bot.py checks it), so those questions test copying, not recall.
Standard library only; the same seed writes the same file.
"""

from __future__ import annotations

import json
import random
import re
import string
from pathlib import Path

HERE = Path(__file__).resolve().parent
SEED = 20
COPIES = 8          # changed copies of each FAQ example
EXERCISES = 2400    # reading exercises

MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
NUMBER_WORDS = ["two", "three", "four", "five", "six", "seven", "eight", "ten", "twelve"]
FIRST = ["Anna", "Oskar", "Liisa", "Pavel", "Ines", "Juho", "Greta", "Matteo", "Saara", "Viktor", "Noora",
         "Emil", "Helka", "Ruben", "Aino", "Kasper", "Lotta", "Felix", "Mirja", "Daniel", "Selma", "Arvo"]
LAST = ["Rantala", "Berg", "Koski", "Lind", "Halme", "Sorensen", "Varga", "Niemi", "Ahola", "Brandt",
        "Laine", "Moreau", "Kallio", "Strand", "Petrov", "Heikura", "Dahl", "Ortega", "Salo", "Weber"]
PLACE_NAMES = ["Riverside", "Elm Park", "Birchwood", "Saltmarsh", "Hilltop", "Westgate", "Foxhollow",
               "Copper Bay", "Mill Road", "Greenfield", "Stonebridge", "Kingsway", "Pier Point", "Ashford",
               "Meadowbank", "Redcliff", "Oakhill", "Seaview", "Brookside", "Castle Hill"]
STREET_KINDS = ["Street", "Road", "Avenue", "Way", "Square", "Quay", "Place"]
LANGUAGES = ["German", "French", "Spanish", "Polish", "Danish", "Norwegian", "Italian", "Dutch", "Latvian",
             "Portuguese", "Czech", "Greek"]
COLOURS = ["red", "blue", "green", "yellow", "white", "black", "purple", "grey"]
THINGS = ["sticker", "flag", "lamp", "stripe", "bell", "tag", "light", "sign", "ribbon", "label"]
PHRASES = ["a reusable water bottle", "a spare inner tube", "a printed receipt", "a rain cover",
           "a pair of gloves", "a discount voucher", "a welcome letter", "a bicycle bell", "a tote bag",
           "a reflective vest", "a phone holder", "a thank-you card", "priority booking", "free parking",
           "a guided tour", "a monthly newsletter", "two free drinks", "a lock and chain", "a basket liner",
           "late checkout", "an extra hour", "a city guide", "unlimited refills", "weekend access"]
PERIODS = ["weekend afternoons", "weekday evenings", "public holidays", "school holidays", "Sunday mornings",
           "the first week of each month", "summer nights", "rainy days", "workday lunchtimes"]
DEPARTMENTS = ["support", "info", "bookings", "hello", "office", "team", "desk", "contact"]
DOMAINS = ["riverferry", "lunhavenzoo", "oldmill", "cityhall", "parkrun", "harbourbaths", "museumcard"]


def _n(rng: random.Random, lo: int, hi: int) -> str:
    return str(rng.randint(lo, hi))


def _place(rng: random.Random) -> str:
    kind = rng.randrange(4)
    if kind == 0:
        return f"the {rng.choice(PLACE_NAMES)} station"
    if kind == 1:
        return f"{_n(rng, 1, 99)} {rng.choice(PLACE_NAMES).split()[0]} {rng.choice(STREET_KINDS)}"
    if kind == 2:
        return f"{rng.choice(PLACE_NAMES)} {rng.choice(STREET_KINDS)}"
    return f"the {rng.choice(['front desk', 'ticket office', 'visitor centre', 'side entrance'])} " \
           f"on {rng.choice(PLACE_NAMES)} {rng.choice(STREET_KINDS)}"


# Each answer kind: a function that draws one answer of that shape.
KINDS = {
    "price": lambda r: r.choice([f"{_n(r, 2, 95)} euros", f"{_n(r, 5, 95)} cents",
                                 f"{_n(r, 2, 60)} euros a {r.choice(['month', 'year', 'week', 'day'])}",
                                 f"{_n(r, 2, 60)} euros per {r.choice(['hour', 'quarter', 'visit', 'person'])}",
                                 f"{_n(r, 2, 40)} euros for {r.choice(NUMBER_WORDS)} hours",
                                 f"{r.choice(['a third', 'a quarter', 'two thirds'])} of the price",
                                 "nothing"]),
    "count": lambda r: r.choice([_n(r, 2, 999), f"{_n(r, 1, 9)},{_n(r, 100, 999)}", r.choice(NUMBER_WORDS)]),
    "amount": lambda r: r.choice([f"{_n(r, 2, 500)} {r.choice(['kilometres', 'metres', 'kilograms', 'litres'])}",
                                  f"{_n(r, 2, 95)} percent", f"{_n(r, 2, 90)} {r.choice(['seats', 'lockers', 'rooms'])}",
                                  f"{_n(r, 2, 60)} free {r.choice(['minutes', 'rides', 'nights'])}"]),
    "date": lambda r: r.choice([f"{_n(r, 1, 28)} {r.choice(MONTHS)} {_n(r, 2015, 2029)}",
                                f"{r.choice(MONTHS)} {_n(r, 2015, 2029)}", f"{_n(r, 1, 28)} {r.choice(MONTHS)}",
                                f"{_n(r, 1, 12)} to {_n(r, 13, 28)} {r.choice(MONTHS)}", _n(r, 1990, 2029)]),
    "season": lambda r: r.choice([f"{r.choice(MONTHS)} to {r.choice(MONTHS)}", r.choice(PERIODS),
                                  f"{r.choice(WEEKDAYS)}s", f"{r.choice(WEEKDAYS)} to {r.choice(WEEKDAYS)}"]),
    "time": lambda r: r.choice([f"{_n(r, 5, 11)} am", f"{_n(r, 1, 11)} pm",
                                f"{_n(r, 5, 11)} am to {_n(r, 1, 11)} pm", "noon", "midnight"]),
    "duration": lambda r: r.choice([f"{_n(r, 2, 90)} {r.choice(['minutes', 'hours', 'days', 'weeks'])}",
                                    f"{r.choice(NUMBER_WORDS)} {r.choice(['days', 'weeks', 'months', 'years'])}",
                                    f"one {r.choice(['hour', 'day', 'week', 'month', 'year'])}"]),
    "person": lambda r: f"{r.choice(FIRST)} {r.choice(LAST)}",
    "place": _place,
    "thing": lambda r: r.choice([f"a {r.choice(COLOURS)} {r.choice(THINGS)}", r.choice(PHRASES),
                                 f"{r.choice(COLOURS)} {r.choice(THINGS)}s"]),
    "language": lambda r: r.choice([r.choice(LANGUAGES), f"{r.choice(LANGUAGES)} and {r.choice(LANGUAGES)}"]),
    "age": lambda r: r.choice([f"at least {_n(r, 6, 21)}", f"over {_n(r, 6, 21)}", f"under {_n(r, 6, 21)}",
                               _n(r, 6, 21)]),
    "contact": lambda r: r.choice([f"{r.choice(DEPARTMENTS)}@{r.choice(DOMAINS)}.example",
                                   f"0800 {_n(r, 100, 999)} {_n(r, 1000, 9999)}"]),
}

# Reading exercises: (answer kind, sentences holding {s} the subject and {a} the answer, questions about {s}).
TEMPLATES = [
    ("price", ["{S} costs {a}.", "The fee for {s} is {a}.", "For {s} you pay {a}.", "{S} is priced at {a}."],
     ["How much is {s}?", "What is the price of {s}?", "What do I pay for {s}?", "What does {s} cost?"]),
    ("count", ["{S} has {a} {unit}.", "There are {a} {unit} at {s}.", "{A} {unit} belong to {s}."],
     ["How many {unit} does {s} have?", "What is the number of {unit} at {s}?", "How many {unit} are at {s}?"]),
    ("amount", ["{S} offers {a}.", "With {s} you get {a}.", "{S} gives riders {a}."],
     ["What does {s} offer?", "What do I get with {s}?", "What is offered by {s}?"]),
    ("date", ["{S} opened on {a}.", "{S} opens in {a}.", "Since {a}, {s} has been open.", "{S} started in {a}."],
     ["When did {s} open?", "When does {s} start?", "What is the opening date of {s}?", "Since when is {s} open?"]),
    ("season", ["{S} is open from {a}.", "{S} runs on {a}.", "You can use {s} on {a}.", "{S} only runs {a}."],
     ["When is {s} open?", "When can I use {s}?", "On which days does {s} run?", "At what times of year is {s} on?"]),
    ("time", ["{S} opens at {a}.", "{S} is open from {a}.", "At {a}, {s} opens its doors."],
     ["What time does {s} open?", "When is {s} open?", "At what hour can I go to {s}?"]),
    ("duration", ["{S} lasts {a}.", "{S} is kept for {a}.", "{S} takes {a}.", "You have {a} to use {s}."],
     ["How long does {s} last?", "For how long is {s} kept?", "How much time does {s} take?",
      "How long can I use {s}?"]),
    ("person", ["{S} is run by {a}.", "{A} manages {s}.", "The head of {s} is {a}.", "{S} was set up by {a}."],
     ["Who runs {s}?", "Who is in charge of {s}?", "Who manages {s}?", "Who leads {s}?"]),
    ("place", ["{S} is at {a}.", "You will find {s} at {a}.", "{S} is located at {a}.", "{S} sits next to {a}."],
     ["Where is {s}?", "Where can I find {s}?", "What is the location of {s}?", "Where do I go for {s}?"]),
    ("thing", ["{S} comes with {a}.", "Every visit to {s} includes {a}.", "{S} is marked with {a}."],
     ["What comes with {s}?", "What do I get at {s}?", "What is included with {s}?", "How is {s} marked?"]),
    ("language", ["{S} is available in {a}.", "{S} speaks {a}.", "Staff at {s} speak {a}."],
     ["In which languages is {s} offered?", "What languages does {s} use?", "Which language is spoken at {s}?"]),
    ("age", ["Visitors to {s} must be {a}.", "{S} is for people aged {a}.", "To use {s} you must be {a}."],
     ["How old must I be for {s}?", "What is the age limit of {s}?", "Who is old enough for {s}?"]),
    ("contact", ["You can reach {s} at {a}.", "{S} answers at {a}.", "Write or call {s} at {a}."],
     ["How do I contact {s}?", "How can I reach {s}?", "What is the contact for {s}?"]),
]
UNITS = ["seats", "tables", "lockers", "rooms", "docks", "benches", "boats", "staff", "lanes", "courts"]
SUBJECTS = ["the river ferry", "the ice rink", "the rooftop garden", "the night market", "the repair cafe",
            "the city library", "the swimming hall", "the sailing club", "the climbing wall", "the old lighthouse",
            "the tram museum", "the bike school", "the dog park", "the flea market", "the summer camp",
            "the harbour sauna", "the youth hostel", "the chess club", "the film club", "the tool library",
            "the bakery course", "the kayak rental", "the botanical garden", "the art studio", "the cinema",
            "the concert hall", "the farmers market", "the yoga class", "the tennis court", "the ski track",
            "the city zoo", "the pottery workshop", "the bus pass", "the parking garage", "the car wash",
            "the book fair", "the science centre", "the boat tour", "the choir", "the open-air pool"]


def _norm(text: str) -> str:
    """SQuAD's answer normalisation (lower case, no punctuation, no articles), as gptforge evaluate uses."""
    text = "".join(c for c in text.lower() if c not in set(string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def passages(folder: Path, ids: bool = False) -> dict:
    """Each ``## `` section of folder's documents: ``Document title > section heading`` → its text, or with
    ``ids`` its passage id (``pricing.md#1``, as gptforge index names it) → (that title, its text)."""
    out = {}
    for path in sorted(folder.glob("*.md")):
        text = path.read_text(encoding="utf-8")
        title = text.splitlines()[0][2:]
        for n, section in enumerate(text.split("\n## ")[1:], 1):
            heading, _, body = section.partition("\n")
            key, value = f"{title} > {heading.strip()}", body.strip()
            if ids:
                out[f"{path.name}#{n}"] = (key, value)
            else:
                out[key] = value
    return out


def held_out_answers() -> set[str]:
    """The normalised answers of the questions on documents added after fine-tuning: never a target here."""
    return {_norm(row["answer"]) for row in _jsonl(HERE / "qa-added.jsonl")}


def _example(title: str, text: str, question: str, answer: str) -> dict:
    return {"context": [{"title": title, "text": text}],
            "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def make_examples(seed: int = SEED) -> list[dict]:
    rng = random.Random(seed)
    forbidden = held_out_answers()

    def draw(kind: str, avoid: str = "") -> str:
        while True:
            answer = KINDS[kind](rng)
            if _norm(answer) not in forbidden and answer != avoid:
                return answer

    faq = _jsonl(HERE / "faq.jsonl")
    # qa.jsonl holds one paraphrase of each FAQ question, in the same order, with the id of its passage.
    where = [row["passage_id"] for row in _jsonl(HERE / "qa.jsonl")]
    by_id = passages(HERE / "docs", ids=True)
    faithful, changed = [], []
    for row, passage_id in zip(faq, where, strict=True):
        title, text = by_id[passage_id]
        span = re.compile(rf"(?<!\w){re.escape(row['answer'])}(?!\w)")
        assert len(span.findall(text)) == 1, (row, text)
        faithful.append(_example(title, text, row["question"], row["answer"]))
        for _ in range(COPIES):
            answer = draw(rng.choice(sorted(KINDS)), avoid=row["answer"])
            changed.append(_example(title, span.sub(lambda _: answer, text), row["question"], answer))
    exercises = []
    for _ in range(EXERCISES):
        kind, sentences, questions = rng.choice(TEMPLATES)
        subject, unit, answer = rng.choice(SUBJECTS), rng.choice(UNITS), draw(kind)
        template = rng.choice(sentences)
        if template.startswith("{A}"):   # a sentence that starts with the answer capitalises it: copy it so
            answer = answer[0].upper() + answer[1:]
        fill = {"s": subject, "S": subject[0].upper() + subject[1:], "a": answer, "A": answer, "unit": unit}
        name = subject.removeprefix("the ")
        title = f"{name[0].upper() + name[1:]} > {kind.capitalize()}"
        exercises.append(_example(title, template.format(**fill), rng.choice(questions).format(**fill), answer))
    rest = changed + exercises
    rng.shuffle(rest)
    return faithful + rest


def main() -> None:
    rows = make_examples()
    out = HERE / "train-grounded.jsonl"
    out.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    print(f"wrote {len(rows)} examples to {out}")


if __name__ == "__main__":
    main()
