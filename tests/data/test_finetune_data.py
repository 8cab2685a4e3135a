"""Fine-tuning data: what each loader reads, the LM loss mask, first-sub-word labels, batches, bad input."""

from __future__ import annotations

import json
import logging
import re

import pytest
import torch

from gptforge.data.finetune import (
    IGNORE_INDEX,
    EncodedExample,
    LMExample,
    batches_per_epoch,
    build_label_map,
    check_labels,
    check_tags,
    collate,
    encode_classification,
    encode_lm_example,
    encode_lm_examples,
    encode_token_examples,
    encode_words,
    epoch_order,
    iter_batches,
    load_classification_examples,
    load_eval_data,
    load_lm_examples,
    load_token_examples,
    map_labels,
    split_off_validation,
)
from gptforge.errors import ConfigError, DataError
from gptforge.tokenizer import EOS_TOKEN, BPETokenizer, CharTokenizer, encode_chat_prompt, render_chat

TRAINING_TEXT = [
    "The capital of France is Paris. John Smith lives in Paris and works for Acme Corporation.\n",
    "What is the capital of Germany? Berlin is the capital of Germany.\n",
    "You are a helpful assistant. Answer briefly and politely.\n",
] * 20

CHAT = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris is the capital."},
    {"role": "user", "content": "And of Germany?"},
    {"role": "assistant", "content": "Berlin."},
]


@pytest.fixture(scope="module")
def bpe() -> BPETokenizer:
    return BPETokenizer.train(iter(TRAINING_TEXT), vocab_size=300)


@pytest.fixture(scope="module")
def char() -> CharTokenizer:
    return CharTokenizer.train(iter(TRAINING_TEXT))


@pytest.fixture(params=["bpe", "char"])
def tokenizer(request, bpe, char):
    return {"bpe": bpe, "char": char}[request.param]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def trained(tokenizer, ids, labels) -> str:
    return tokenizer.decode([i for i, label in zip(ids, labels) if label != IGNORE_INDEX])


def runs_of_trained(ids, labels) -> list[list[int]]:
    """Maximal runs of consecutive trained tokens."""
    runs, current = [], []
    for i, label in zip(ids, labels):
        if label != IGNORE_INDEX:
            current.append(i)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


# --------------------------------------------------------------------------------------------------
# LM: loading and the loss mask
def test_load_lm_examples_three_shapes(tmp_path):
    path = write_jsonl(tmp_path / "sft.jsonl", [
        {"text": "plain text"},
        {"prompt": "Q: ", "completion": "A"},
        {"messages": CHAT, "source": "extra fields are ignored"},
    ])
    path.write_text(path.read_text() + "\n\n", encoding="utf-8")  # trailing blank lines are fine
    examples = load_lm_examples(path)
    assert [e.kind for e in examples] == ["text", "completion", "chat"]
    assert examples[0].text == "plain text"
    assert (examples[1].prompt, examples[1].completion) == ("Q: ", "A")
    assert [dict(m) for m in examples[2].messages] == CHAT


def test_prompt_completion_mask(tokenizer):
    example = LMExample(prompt="What is the capital of France? ", completion="Paris is the capital.")
    ids, labels = encode_lm_example(tokenizer, example, max_length=512)
    assert len(ids) == len(labels)
    assert labels[:len(tokenizer.encode(example.prompt))] == [IGNORE_INDEX] * len(tokenizer.encode(example.prompt))
    assert trained(tokenizer, ids, labels) == "Paris is the capital." + EOS_TOKEN
    assert ids[-1] == tokenizer.eos_id and labels[-1] == tokenizer.eos_id
    assert [label for label in labels if label != IGNORE_INDEX] == \
        tokenizer.encode("Paris is the capital.") + [tokenizer.eos_id]
    ids2, labels2 = encode_lm_example(tokenizer, example, max_length=512, train_on_prompt=True)
    assert ids2 == ids and labels2 == ids


def test_chat_mask_trains_exactly_the_assistant_replies(tokenizer):
    example = LMExample(messages=tuple(CHAT))
    ids, labels = encode_lm_example(tokenizer, example, max_length=512)
    assert tokenizer.decode(ids) == "".join(text for text, _ in render_chat(CHAT))
    eos = tokenizer.eos_id
    expected = [tokenizer.encode("Paris is the capital.") + [eos], tokenizer.encode("Berlin.") + [eos]]
    assert runs_of_trained(ids, labels) == expected
    assert all(label in (IGNORE_INDEX, i) for i, label in zip(ids, labels))
    # The untrained tokens are exactly the system, user and header text.
    untrained = tokenizer.decode([i for i, label in zip(ids, labels) if label == IGNORE_INDEX])
    assert "helpful assistant" in untrained and "And of Germany?" in untrained and "Berlin" not in untrained
    _, all_labels = encode_lm_example(tokenizer, example, max_length=512, train_on_prompt=True)
    assert all_labels == ids


def test_text_is_all_trained(tokenizer):
    ids, labels = encode_lm_example(tokenizer, LMExample(text="The capital of France."), max_length=512)
    assert labels == ids == tokenizer.encode("The capital of France.") + [tokenizer.eos_id]


def test_chat_prompt_is_the_training_prefix(tokenizer):
    ids, labels = encode_lm_example(tokenizer, LMExample(messages=tuple(CHAT[:3])), max_length=512)
    prompt = encode_chat_prompt(tokenizer, CHAT[:2])
    first_trained = next(n for n, label in enumerate(labels) if label != IGNORE_INDEX)
    assert prompt == ids[:first_trained]
    assert tokenizer.decode(prompt).endswith("<|user|>\nWhat is the capital of France?\n<|assistant|>\n")


def test_custom_template(bpe):
    template = "### {role}:\n{content}{end}\n\n"
    ids, labels = encode_lm_example(bpe, LMExample(messages=tuple(CHAT[1:3])), template=template, max_length=512)
    assert bpe.decode(ids) == ("### user:\nWhat is the capital of France?\n\n"
                               "### assistant:\nParis is the capital.<|endoftext|>\n\n")
    assert trained(bpe, ids, labels) == "Paris is the capital.<|endoftext|>"
    literal = render_chat(CHAT[1:2], "{{{role}}} {content}{end}|")
    assert "".join(text for text, _ in literal) == "{user} What is the capital of France?|"


def test_lm_truncation_keeps_the_start_and_warns_once(bpe, caplog):
    long = LMExample(prompt="Q ", completion="The capital of France is Paris. " * 10)
    short = LMExample(text="Paris.")
    prompt_only = LMExample(prompt="The capital of France is Paris. " * 10, completion="Paris")
    full, _ = encode_lm_example(bpe, long, max_length=10_000)
    with caplog.at_level(logging.WARNING, logger="gptforge.data.finetune"):
        encoded = encode_lm_examples(bpe, [long, short, long, prompt_only], max_length=12)
    assert [len(e.input_ids) for e in encoded] == [12, len(bpe.encode("Paris.")) + 1, 12]
    assert encoded[0].input_ids == full[:12]
    truncation = [r for r in caplog.records if "longer than max_length=12" in r.getMessage()]
    assert len(truncation) == 1 and "3 of 4 examples" in truncation[0].getMessage()
    assert any("1 examples have no trained tokens" in r.getMessage() for r in caplog.records)
    # A one-token example has nothing to predict (labels[0] is never a target) and is left out too.
    assert encode_lm_examples(bpe, [short], max_length=1) == []


def test_no_end_of_text_token_is_a_config_error():
    class NoEOS(CharTokenizer):
        @property
        def eos_id(self):
            return None

    with pytest.raises(ConfigError, match="no end-of-text token"):
        encode_lm_example(NoEOS(["a"]), LMExample(text="a"), max_length=8)


# --------------------------------------------------------------------------------------------------
# Classification
def test_classification_csv_and_jsonl_agree(tmp_path):
    csv_path = tmp_path / "train.csv"
    csv_path.write_text('id,text,label\n1,"Great, loved it",1\n\n2,"Awful ""film""",0\n3,"two\nlines",1\n',
                        encoding="utf-8")
    jsonl_path = write_jsonl(tmp_path / "train.jsonl", [
        {"text": "Great, loved it", "label": 1}, {"text": 'Awful "film"', "label": "0"},
        {"text": "two\nlines", "label": 1},
    ])
    expected = [("Great, loved it", "1"), ('Awful "film"', "0"), ("two\nlines", "1")]
    assert load_classification_examples(csv_path) == expected
    assert load_classification_examples(jsonl_path) == expected


def test_label_map_is_sorted_and_stable():
    assert build_label_map(["pos", "neg", "neutral", "neg"]) == ["neg", "neutral", "pos"]
    assert build_label_map(["neutral", "pos", "neg"]) == ["neg", "neutral", "pos"]
    assert map_labels(["pos", "neg"], ["neg", "pos"]) == [1, 0]
    with pytest.raises(ValueError, match="call check_labels first"):
        map_labels(["x"], ["neg", "pos"])


def test_check_labels_names_file_row_and_known_labels(tmp_path):
    check_labels(["a", "b", "a"], ["a", "b"], tmp_path / "val.csv")
    with pytest.raises(DataError) as info:
        check_labels(["a", "b", "x"], ["a", "b"], tmp_path / "val.csv")
    assert str(info.value) == (f"label 'x' in {tmp_path / 'val.csv'} (row 3) does not occur in the training data "
                               "(labels: a, b)")


def test_encode_classification_truncates_and_warns_once(bpe, caplog):
    texts = ["Paris", "The capital of France is Paris. " * 5, "The capital of Germany is Berlin. " * 5]
    with caplog.at_level(logging.WARNING, logger="gptforge.data.finetune"):
        encoded = encode_classification(bpe, texts, [0, 1, 1], max_length=6)
    assert encoded[0] == EncodedExample(bpe.encode("Paris"), 0)
    assert encoded[1] == EncodedExample(bpe.encode(texts[1])[:6], 1)
    assert len([r for r in caplog.records if "2 of 3 texts" in r.getMessage()]) == 1


# --------------------------------------------------------------------------------------------------
# Token classification
CONLL = """-DOCSTART- -X- -X- O

John NNP B-NP B-PER
Smith NNP I-NP I-PER
lives VBZ B-VP O

Paris NNP B-NP B-LOC
"""


def test_conll_and_jsonl_tokens(tmp_path):
    conll = tmp_path / "train.conll"
    conll.write_text(CONLL + "\n\n", encoding="utf-8")
    expected = [(["John", "Smith", "lives"], ["B-PER", "I-PER", "O"]), (["Paris"], ["B-LOC"])]
    assert load_token_examples(conll) == expected
    jsonl = write_jsonl(tmp_path / "train.jsonl", [{"tokens": t, "tags": g} for t, g in expected])
    assert load_token_examples(jsonl) == expected


def test_first_subword_carries_the_label(tokenizer):
    words = ["John", "Smith", "lives", "in", "Paris", "."]
    tags = [1, 2, 0, 0, 3, 0]
    ids, labels, starts = encode_words(tokenizer, words, tags, max_length=512)
    assert len(ids) == len(labels) and len(starts) == len(words)
    assert [labels[s] for s in starts] == tags
    assert sum(label != IGNORE_INDEX for label in labels) == len(words)
    # Every word is tokenized as in running text, so the ids are those of the joined sentence's words.
    assert tokenizer.decode(ids) == "John Smith lives in Paris ."
    pieces = [tokenizer.encode(w if n == 0 else " " + w) for n, w in enumerate(words)]
    assert ids == [i for piece in pieces for i in piece]
    for n, start in enumerate(starts):
        # the labelled token holds the start of the word itself, never just the space before it
        assert tokenizer.decode([ids[start]]).strip() and words[n].startswith(tokenizer.decode([ids[start]]).strip())
    if isinstance(tokenizer, CharTokenizer):
        assert labels[starts[1] - 1] == IGNORE_INDEX and tokenizer.decode([ids[starts[1] - 1]]) == " "


def test_multi_token_word_labels_only_its_first_token(bpe):
    ids, labels, starts = encode_words(bpe, ["Corporationxyz"], [4], max_length=512)
    assert len(ids) > 1
    assert labels == [4] + [IGNORE_INDEX] * (len(ids) - 1) and starts == [0]


def test_token_truncation_drops_cut_off_words(char, caplog):
    words, tags = ["John", "Smith", "lives"], [1, 2, 0]
    with caplog.at_level(logging.WARNING, logger="gptforge.data.finetune"):
        (encoded,) = encode_token_examples(char, [words], [tags], max_length=7)
    # "John" (4) + " Smith" (6): the S of Smith is at position 5, inside 7 tokens; "lives" is cut off.
    assert encoded.input_ids == char.encode("John Smith")[:7]
    assert encoded.word_starts == [0, 5]
    assert encoded.labels == [1, -100, -100, -100, -100, 2, -100]
    assert any("1 of 1 sentences" in r.getMessage() and "1 words left out" in r.getMessage()
               for r in caplog.records)


def test_check_tags_names_sentence(tmp_path):
    with pytest.raises(DataError) as info:
        check_tags([["O"], ["B-PER", "B-XYZ"]], ["B-PER", "O"], tmp_path / "val.conll")
    assert str(info.value) == (f"tag 'B-XYZ' in {tmp_path / 'val.conll'} (sentence 2) does not occur in the "
                               "training data (tags: B-PER, O)")


# --------------------------------------------------------------------------------------------------
# Batches
def test_collate_right_pads():
    batch = [EncodedExample([5, 6, 7], [-100, 6, 7]), EncodedExample([8], [8])]
    out = collate(batch, pad_id=0)
    assert out["input_ids"].dtype == torch.long
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert out["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    classes = collate([EncodedExample([1, 2], 3), EncodedExample([4], 0)], pad_id=9)
    assert classes["labels"].tolist() == [3, 0] and classes["input_ids"].tolist() == [[1, 2], [4, 9]]
    words = collate([EncodedExample([1, 2], [0, -100], word_starts=[0])], pad_id=0)
    assert words["word_starts"] == [[0]]
    assert "word_starts" not in out and "word_starts" not in classes


def test_iter_batches_order_shuffle_and_sizes():
    data = [EncodedExample([i], [i]) for i in range(10)]
    batches = list(iter_batches(data, 4))
    assert [[e.input_ids[0] for e in b] for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    def order(seed):
        batches = iter_batches(data, 3, shuffle=True, generator=torch.Generator().manual_seed(seed))
        return [e.input_ids[0] for b in batches for e in b]
    assert sorted(order(0)) == list(range(10)) and order(0) == order(0) and order(0) != order(1)
    with pytest.raises(ConfigError, match="batch_size must be a positive integer, got 0"):
        next(iter_batches(data, 0))


# --------------------------------------------------------------------------------------------------
# Bad input: every message names the file and the line (or row, or sentence)
def test_epoch_order_is_a_seeded_permutation_in_batches():
    first = epoch_order(10, 4, seed=3, epoch=0)
    assert [len(b) for b in first] == [4, 4, 2] and sorted(i for b in first for i in b) == list(range(10))
    assert first == epoch_order(10, 4, seed=3, epoch=0)  # a resumed run sees the same batches
    assert first != epoch_order(10, 4, seed=3, epoch=1) and first != epoch_order(10, 4, seed=4, epoch=0)
    generator = torch.Generator().manual_seed(3 * 1_000_003 + 0)
    assert first == list(iter_batches(range(10), 4, shuffle=True, generator=generator))
    assert batches_per_epoch(10, 4) == 3 and batches_per_epoch(8, 4) == 2


def test_lm_examples_count_the_bytes_they_are_scored_on(bpe):
    (example,) = encode_lm_examples(bpe, [LMExample(prompt="Q: ", completion="Café.")], max_length=64)
    scored = [t for t in example.labels[1:] if t != IGNORE_INDEX]
    assert example.target_bytes == len(bpe.decode(scored).encode("utf-8")) == len("Café.".encode()) + len(EOS_TOKEN)


def test_eval_data_keeps_each_words_tag_names(tmp_path, char):
    path = write_jsonl(tmp_path / "val.jsonl", [{"tokens": ["John", "Smith"], "tags": ["B-PER", "I-PER"]}])
    (example,) = load_eval_data(path, {"type": "tokens", "labels": ["B-PER", "I-PER", "O"]}, char, 64)
    assert example.tags == ["B-PER", "I-PER"] and example.word_starts == [0, 5]
    assert [example.labels[i] for i in example.word_starts] == [0, 1]
    with pytest.raises(DataError, match="does not occur in the training data"):
        load_eval_data(path, {"type": "tokens", "labels": ["B-PER", "O"]}, char, 64)


def test_split_off_validation_holds_out_a_seeded_share():
    train, val = split_off_validation(list(range(20)), 0.1, seed=0)
    assert len(val) == 2 and sorted(train + val) == list(range(20))
    assert (train, val) == split_off_validation(list(range(20)), 0.1, seed=0)
    assert len(split_off_validation([1, 2], 0.0, seed=0)[1]) == 1  # at least one example
    with pytest.raises(DataError, match="cannot be split"):
        split_off_validation([1], 0.5, seed=0)


def test_missing_and_empty_files(tmp_path):
    for load in (load_lm_examples, load_classification_examples, load_token_examples):
        with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'nope.jsonl'} not found")):
            load(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n\n", encoding="utf-8")
    (tmp_path / "empty.csv").write_text("", encoding="utf-8")
    (tmp_path / "header_only.csv").write_text("text,label\n", encoding="utf-8")
    (tmp_path / "empty.conll").write_text("-DOCSTART- O\n\n", encoding="utf-8")
    for load, name in [(load_lm_examples, "empty.jsonl"), (load_classification_examples, "empty.jsonl"),
                       (load_classification_examples, "empty.csv"),
                       (load_classification_examples, "header_only.csv"),
                       (load_token_examples, "empty.jsonl"), (load_token_examples, "empty.conll")]:
        with pytest.raises(DataError, match=re.escape(f"{tmp_path / name} holds no examples")):
            load(tmp_path / name)


LM_ERRORS = [
    ('{"text": "ok"}\n{"text": "unterminated}\n', "line 2 is not valid JSON"),
    ('["a list"]\n', "line 1 must be a JSON object, got a JSON list"),
    ('{"txt": "typo"}\n',
     'line 1 must have one of "text", "prompt" + "completion" or "messages", but has none'),
    ('{"text": "a", "prompt": "b", "completion": "c"}\n',
     'line 1 must have one of "text", "prompt" + "completion" or "messages", but has both "text" and "prompt"'),
    ('{"prompt": "Q"}\n', 'line 1 has no "completion" field'),
    ('{"text": 42}\n', 'line 1: "text" must be a string, got int'),
    ('{"prompt": "Q", "completion": ["A"]}\n', 'line 1: "completion" must be a string, got list'),
    ('{"text": "  "}\n', 'line 1: "text" is empty'),
    ('{"messages": []}\n', 'line 1: "messages" must be a non-empty list'),
    ('{"messages": [{"role": "user"}]}\n', 'line 1, message 1 must be an object with "role" and "content"'),
    ('{"messages": [{"role": "bot", "content": "hi"}]}\n',
     "line 1, message 1 has role 'bot'; expected one of system, user, assistant"),
    ('{"messages": [{"role": "user", "content": 3}]}\n', 'line 1, message 1: "content" must be a string, got int'),
    ('{"messages": [{"role": "user", "content": "hi"}]}\n', "line 1 has no assistant message"),
]


@pytest.mark.parametrize("content, message", LM_ERRORS)
def test_lm_bad_input(tmp_path, content, message):
    path = tmp_path / "sft.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=re.escape(f"{path} {message}" if message.startswith("line") else message)):
        load_lm_examples(path)


CLASSIFY_ERRORS = [
    ("train.csv", "sentence,label\nhi,a\n", 'has no "text" column (its header is: sentence, label)'),
    ("train.csv", "text,category\nhi,a\n", 'has no "label" column (its header is: text, category)'),
    ("train.csv", "text,label\nhi,a\nno label here\n", 'line 3 has 1 fields and no "label" (the header has 2)'),
    ("train.csv", "label,text\na,hi\nb\n", 'line 3 has 1 fields and no "text"'),
    ("train.csv", "text,label\nhi,\n", 'line 2: "label" is empty'),
    ("train.csv", 'text,label\n"open quote,a\n', "line 2 is not valid CSV: unexpected end of data"),
    ("train.csv", 'text,label\n"a"b,c\n', "line 2 is not valid CSV"),
    ("train.jsonl", '{"text": "hi", "label": "a"}\n{"text": "hi"}\n', 'line 2 has no "label" field'),
    ("train.jsonl", '{"label": "a"}\n', 'line 1 has no "text" field'),
    ("train.jsonl", '{"text": ["hi"], "label": "a"}\n', 'line 1: "text" must be a string, got list'),
    ("train.jsonl", '{"text": "hi", "label": null}\n', 'line 1: "label" must be a non-empty string or an integer'),
    ("train.jsonl", '{"text": "hi", "label": "a"}\n{oops}\n', "line 2 is not valid JSON"),
]


@pytest.mark.parametrize("name, content, message", CLASSIFY_ERRORS)
def test_classification_bad_input(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=re.escape(f"{path} {message}")):
        load_classification_examples(path)


TOKEN_ERRORS = [
    ("train.conll", "John B-PER\nlives\n", "line 2 has one column; expected a token and its tag"),
    ("train.jsonl", '{"tokens": ["a", "b"], "tags": ["O"]}\n', "line 1 has 2 tokens but 1 tags"),
    ("train.jsonl", '{"tokens": ["a"]}\n', 'line 1 has no "tags" field'),
    ("train.jsonl", '{"tags": ["O"]}\n', 'line 1 has no "tokens" field'),
    ("train.jsonl", '{"tokens": "a b", "tags": ["O", "O"]}\n', 'line 1: "tokens" must be a non-empty list'),
    ("train.jsonl", '{"tokens": ["a", 7], "tags": ["O", "O"]}\n',
     'line 1: "tokens" item 2 must be a non-empty string, got 7'),
    ("train.jsonl", '{"tokens": ["a"], "tags": ["O"]}\nnot json\n', "line 2 is not valid JSON"),
]


@pytest.mark.parametrize("name, content, message", TOKEN_ERRORS)
def test_token_bad_input(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=re.escape(f"{path} {message}")):
        load_token_examples(path)


def test_not_utf8_is_a_data_error(tmp_path):
    path = tmp_path / "train.csv"
    path.write_bytes(b"text,label\n\xff\xfe,a\n")
    with pytest.raises(DataError, match="is not valid UTF-8"):
        load_classification_examples(path)


def test_bad_max_length_is_a_config_error(bpe):
    with pytest.raises(ConfigError, match="max_length must be a positive integer, got 0"):
        encode_lm_example(bpe, LMExample(text="a"), max_length=0)
    with pytest.raises(ConfigError, match="max_length must be a positive integer"):
        encode_words(bpe, ["a"], [0], max_length=-1)
