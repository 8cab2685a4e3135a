"""Grounded fine-tuning data: the ``context`` field of ``--task lm`` chat examples, retrieval for examples
without one (``finetune --knowledge``), the same rendering as grounded chat, and one clear error per bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gptforge.checkpoint import save_checkpoint
from gptforge.config import FinetuneConfig, GroundingConfig, ModelConfig
from gptforge.data.finetune import IGNORE_INDEX, encode_lm_example, load_lm_examples, load_task_data
from gptforge.errors import ConfigError, DataError, GptforgeError
from gptforge.knowledge.grounding import context_retriever, grounded_prompt, prepare_grounded
from gptforge.model import GPT
from tests.knowledge.test_grounding import TOK, WordRetriever, hits

QUESTION = "how long do refunds take?"


def jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def chat(question: str = QUESTION, answer: str = "five days.") -> list[dict]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def test_context_field_takes_a_passage_or_a_list_of_strings_and_titled_passages(tmp_path):
    path = jsonl(tmp_path / "train.jsonl", [
        {"messages": chat(), "context": "refunds take five days."},
        {"messages": chat(), "context": ["one passage", {"title": "Returns", "text": "refunds take five days."}]},
        {"messages": chat(), "context": []},
        {"messages": chat()},
    ])
    examples = load_lm_examples(path)
    assert examples[0].context == ("refunds take five days.",)
    assert examples[1].context == ("one passage", "Returns\nrefunds take five days.")
    assert examples[2].context == () and examples[3].context is None


@pytest.mark.parametrize("record, fragment", [
    ({"text": "hello", "context": "p"}, "only a \"messages\" example takes"),
    ({"prompt": "q", "completion": "a", "context": "p"}, "only a \"messages\" example takes"),
    ({"messages": chat(), "context": 3}, "\"context\" must be a passage"),
    ({"messages": chat(), "context": [{"title": "t"}]}, "passage 1: \"context\" must be a passage"),
    ({"messages": chat(), "context": ["ok", "  "]}, "passage 2 of \"context\" is empty"),
    ({"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}], "context": "p"},
     "no user message"),
])
def test_bad_context_is_one_clear_error_naming_the_line(tmp_path, record, fragment):
    path = jsonl(tmp_path / "bad.jsonl", [{"messages": chat()}, record])
    with pytest.raises(DataError) as info:
        load_lm_examples(path)
    assert "line 2" in str(info.value) and fragment in str(info.value)


def test_a_file_example_renders_as_grounded_chat_renders_the_same_passages(tmp_path):
    used = hits(3.0, 2.0)
    context = [{"title": h.passage.title, "text": h.passage.text} for h in used]
    example = load_lm_examples(jsonl(tmp_path / "t.jsonl", [{"messages": chat(), "context": context}]))[0]
    ids, labels = encode_lm_example(TOK, example, max_length=1000)
    inference = grounded_prompt(TOK, chat()[:1], used, context_length=1000, max_new_tokens=20)
    assert ids[:len(inference.ids)] == inference.ids
    assert set(labels[:len(inference.ids)]) == {IGNORE_INDEX}
    assert TOK.decode([t for t in labels if t != IGNORE_INDEX]) == "five days.<|endoftext|>"


# --- load_task_data with retrieval -------------------------------------------------------------------------
@pytest.fixture()
def base(tmp_path) -> Path:
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=TOK.vocab_size, block_size=256, n_layer=1, n_head=2, n_embd=16))
    return save_checkpoint(tmp_path / "base", model, TOK, {"model": vars(model.config)})


def test_retrieval_fills_the_training_and_validation_examples(tmp_path):
    train = jsonl(tmp_path / "train.jsonl", [{"messages": chat()}, {"messages": chat("when do orders leave?")},
                                             {"messages": chat(), "context": "my own passage"}])
    val = jsonl(tmp_path / "val.jsonl", [{"messages": chat("when do orders leave?")}])
    config = FinetuneConfig(task="lm", checkpoint="unused", train_file=str(train), val_file=str(val))
    grounding = GroundingConfig(knowledge="kb", passages=1)
    retriever = WordRetriever()
    data = load_task_data(config, TOK, 256, retrieve=context_retriever(retriever, grounding))
    for example, question in ((data.train[0], QUESTION), (data.train[1], "when do orders leave?"),
                              (data.val[0], "when do orders leave?")):
        prompt = prepare_grounded(TOK, chat(question)[:1], retriever, grounding, context_length=256,
                                  max_new_tokens=16)
        assert prompt.hits and example.input_ids[:len(prompt.ids)] == prompt.ids
    assert "my own passage" in TOK.decode(data.train[2].input_ids)
    assert data.task["grounding"] == {"knowledge": "kb", "passages": 1, "min_score": 0.0, "query_turns": 2}


def test_retrieval_checks_the_tokenizer_first_and_only_grounds_lm(tmp_path):
    class OtherTokenizerIndex(WordRetriever):
        def check_tokenizer(self, tokenizer):
            raise GptforgeError("the knowledge base kb was built for another tokenizer")

    train = jsonl(tmp_path / "train.jsonl", [{"messages": chat()}, {"messages": chat()}])
    config = FinetuneConfig(task="lm", checkpoint="unused", train_file=str(train))
    retrieve = context_retriever(OtherTokenizerIndex(), GroundingConfig(knowledge="kb"))
    with pytest.raises(GptforgeError, match="another tokenizer"):
        load_task_data(config, TOK, 256, retrieve=retrieve)
    classify = FinetuneConfig(task="classify", checkpoint="unused", train_file=str(train))
    with pytest.raises(ConfigError, match="ground lm examples"):
        load_task_data(classify, TOK, 256, retrieve=context_retriever(WordRetriever(), GroundingConfig(knowledge="kb")))


def test_finetune_with_retrieval_trains_on_grounded_examples(tmp_path, base, caplog):
    """A short grounded run through the library, as `gptforge finetune --knowledge` runs it."""
    from gptforge.finetune import finetune

    records = [{"messages": chat(q, a)} for q, a in [(QUESTION, "five days."), ("when do orders leave?", "in a day."),
                                                     ("what warranty on the kettle?", "two years.")]] * 4
    train = jsonl(tmp_path / "train.jsonl", records)
    config = FinetuneConfig(task="lm", checkpoint=str(base), train_file=str(train), out_dir=str(tmp_path / "run"),
                            max_steps=2, eval_interval=2, batch_size=4, device="cpu", evaluate_before=False)
    caplog.set_level("INFO", logger="gptforge.data.finetune")
    result = finetune(config, progress=False,
                      retrieve=context_retriever(WordRetriever(), GroundingConfig(knowledge="kb", passages=1)))
    assert result.steps == 2 and result.stopped_by is None
    assert "retrieved passages for 12 of 12 examples" in caplog.text
    saved = json.loads((Path(result.best_checkpoint) / "config.json").read_text())
    assert saved["task"]["grounding"]["knowledge"] == "kb"  # the run says what grounded it


@pytest.mark.parametrize("extra, fragment", [
    (["--task", "classify", "--knowledge", "kb"], "--knowledge grounds --task lm examples"),
    (["--task", "lm", "--min-score", "1"], "--min-score only applies with --knowledge"),
])
def test_finetune_grounding_flags_are_one_line_errors(tmp_path, capsys, extra, fragment):
    from tests.cli_utils import assert_one_line_error, run

    train = jsonl(tmp_path / "train.jsonl", [{"messages": chat()}] * 2)
    code, _, err = run(capsys, "finetune", "--checkpoint", "unused", "--train", str(train),
                       "--out", str(tmp_path / "run"), *extra)
    assert_one_line_error(code, err, fragment)
    assert not (tmp_path / "run").exists()
