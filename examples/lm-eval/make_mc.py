"""Make mc.jsonl, the multiple-choice questions of this example, from the demo corpus's held-out text.

    python examples/lm-eval/make_mc.py data/shakespeare > examples/lm-eval/mc.jsonl

Each question is a line of the validation split (text the demo model never trained on): the context is its
first words, the right choice the next four words, the three wrong ones four-word runs from other lines.
The answers are known, so the data measures how well a model continues Shakespeare, not trivia.
"""

import json
import random
import sys
from pathlib import Path

import numpy as np

from gptforge.tokenizer import load_tokenizer

folder = Path(sys.argv[1])
tokenizer = load_tokenizer(folder)
text = tokenizer.decode(np.fromfile(folder / "val.bin", dtype=np.uint16).tolist())
lines = [line.split() for line in text.splitlines() if len(line.split()) >= 9]
rng = random.Random(0)
for words in rng.sample(lines, 60):
    cut = rng.randint(3, len(words) - 4)
    right = " " + " ".join(words[cut:cut + 4])
    wrong = set()
    while len(wrong) < 3:
        other = rng.choice(lines)
        start = rng.randint(0, len(other) - 4)
        candidate = " " + " ".join(other[start:start + 4])
        if candidate != right:
            wrong.add(candidate)
    choices = sorted(wrong) + [right]
    rng.shuffle(choices)
    print(json.dumps({"context": " ".join(words[:cut]), "choices": choices, "answer": choices.index(right)}))
