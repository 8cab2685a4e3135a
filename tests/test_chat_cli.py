"""`gptforge chat` and the ChatSession under it: history, /reset, /exit, the context limit, streaming."""

import copy
import subprocess
import sys
from pathlib import Path

import pytest

from gptforge.chat import ChatSession, chat_template_of
from gptforge.checkpoint import load_checkpoint
from gptforge.config import GenerateConfig
from gptforge.errors import ConfigError
from gptforge.backends import prepare_for_inference
from gptforge.tokenizer import DEFAULT_CHAT_TEMPLATE
from tests.model_utils import save_tiny_checkpoint

CHARS = list("abcdefghijklmnopqrstuvwxyz .,?!\n<>|")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("chat") / "ckpt", CHARS, block_size=192, n_layer=1,
                                n_embd=16)


@pytest.fixture(scope="module")
def loaded(checkpoint):
    return load_checkpoint(checkpoint)


def decode(session, ids):
    return session.tokenizer.decode(ids)


def test_history_reaches_the_next_prompt_and_reset_clears_it(loaded):
    gen = GenerateConfig(max_new_tokens=8, temperature=1.0, seed=3, ignore_eos=True)
    session = ChatSession(loaded.model, loaded.tokenizer, gen, system="be brief.")
    reply1 = "".join(session.send("first question?"))
    assert len(reply1) > 0
    assert session.history == [{"role": "user", "content": "first question?"},
                               {"role": "assistant", "content": reply1}]
    prompt2 = decode(session, session.prompt_ids("second one"))
    assert prompt2.startswith("<|system|>\nbe brief.\n<|user|>\nfirst question?\n<|assistant|>\n" + reply1 + "<|endoftext|>")
    assert prompt2.endswith("<|user|>\nsecond one\n<|assistant|>\n")
    session.reset()
    assert session.history == []
    prompt3 = decode(session, session.prompt_ids("second one"))
    assert "first question?" not in prompt3 and prompt3.startswith("<|system|>\nbe brief.\n")


def test_reply_streams_in_pieces_that_join_to_the_history(loaded):
    session = ChatSession(loaded.model, loaded.tokenizer,
                          GenerateConfig(max_new_tokens=6, temperature=1.0, seed=1, ignore_eos=True))
    pieces = list(session.send("hi"))
    assert len(pieces) > 1
    assert session.history[-1]["content"] == "".join(pieces)


def test_oldest_turns_are_dropped_to_fit_the_context(loaded):
    gen = GenerateConfig(max_new_tokens=40, temperature=0.0, ignore_eos=True)
    session = ChatSession(loaded.model, loaded.tokenizer, gen, system="sys.")
    for i in range(4):
        "".join(session.send(f"message number {'abcd'[i]}"))
    assert session.dropped_turns > 0
    assert session.history[0]["role"] == "user" and len(session.history) % 2 == 0
    ids = session.prompt_ids("last")
    assert len(ids) + gen.max_new_tokens <= loaded.model.config.block_size
    assert decode(session, ids).startswith("<|system|>\nsys.\n")  # the system prompt survives
    with pytest.raises(ConfigError, match="does not fit"):
        session.prompt_ids("x" * 200)


def test_template_comes_from_the_checkpoint_config():
    assert chat_template_of({}) == DEFAULT_CHAT_TEMPLATE
    assert chat_template_of({"task": {"chat_template": "{role}: {content}{end}\n"}}) == "{role}: {content}{end}\n"


@pytest.mark.integration
def test_cli_two_turns_reset_and_exit(checkpoint, loaded):
    stdin = "hello there\nand again?\n/reset\nfresh start\n/exit\nnever read\n"
    done = subprocess.run([sys.executable, "-m", "gptforge.cli", "chat", "--checkpoint", str(checkpoint),
                           "--system", "you are kind.", "--max-new-tokens", "10", "--seed", "1",
                           "--device", "cpu"], input=stdin, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    # The same conversation through the library, on the model prepared as the CLI prepares it, gives the
    # same replies, so the CLI kept the history, cleared it on /reset and stopped reading at /exit.
    model = prepare_for_inference(copy.deepcopy(loaded.model))
    session = ChatSession(model, loaded.tokenizer, GenerateConfig(max_new_tokens=10, temperature=0.8, seed=1),
                          system="you are kind.")
    first = "".join(session.send("hello there"))
    second = "".join(session.send("and again?"))
    session.reset()
    third = "".join(session.send("fresh start"))
    assert done.stdout == f"{first}\n{second}\n(history cleared)\n{third}\n"


def test_cli_eof_ends_the_chat(checkpoint, capsys, monkeypatch):
    import io

    from gptforge.cli import main

    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\n"))  # no /exit: end of input leaves
    code = main(["chat", "--checkpoint", str(checkpoint), "--max-new-tokens", "4", "--temperature", "0"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out.endswith("\n") and "Traceback" not in err


def test_cli_says_once_that_old_turns_are_dropped(checkpoint, capsys, monkeypatch):
    import io

    from gptforge.cli import main

    lines = [f"this is message number {c}, rather long to fill the context quickly" for c in "abcde"]
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(lines + ["/bogus", ""]) + "\n"))
    code = main(["chat", "--checkpoint", str(checkpoint), "--max-new-tokens", "60", "--temperature", "0",
                 "--device", "cpu"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out.count("no longer fits the model's context") == 1
    assert "unknown command /bogus" in out


def test_cli_message_too_long_is_an_error_line_and_the_chat_goes_on(checkpoint, capsys, monkeypatch):
    import io

    from gptforge.cli import main

    monkeypatch.setattr(sys, "stdin", io.StringIO("x" * 300 + "\nhi\n"))
    code = main(["chat", "--checkpoint", str(checkpoint), "--max-new-tokens", "5", "--temperature", "0"])
    out, err = capsys.readouterr()
    assert code == 0
    assert err.count("error:") == 1 and "does not fit" in err and "Traceback" not in err
    assert len(out) >= 2 and out.endswith("\n")  # the reply to "hi" (greedy from random weights: maybe blank)


@pytest.fixture(scope="module")
def demo_sized(tmp_path_factory) -> Path:
    """The demo model's context (128 tokens) and tokenizer kind (byte-level BPE)."""
    from tests.cli_utils import save_tiny_bpe_checkpoint

    return save_tiny_bpe_checkpoint(tmp_path_factory.mktemp("chat128") / "ckpt")


def test_an_unset_max_new_tokens_keeps_half_the_context_for_the_reply(demo_sized):
    ckpt = load_checkpoint(demo_sized)
    session = ChatSession(ckpt.model, ckpt.tokenizer, GenerateConfig(temperature=0.0, ignore_eos=True))
    assert session.reply_tokens == 64  # half of 128 (256 was the old default: more than the whole context)
    reply = "".join(session.send("ROMEO:"))
    assert session.history[-1] == {"role": "assistant", "content": reply}
    with pytest.raises(ConfigError) as err:
        session.prompt_ids("KING: " * 20)
    assert str(err.value) == ("the message (102 tokens with the system prompt and chat template) does not fit the "
                              "model's context of 128 tokens with 64 tokens kept for the reply; shorten it")
    assert session.dropped_turns == 1 and session.history == []  # the earlier turn was dropped to try to fit it
    with pytest.raises(ConfigError, match=r"^max_new_tokens \(128\) leaves no room for the conversation"):
        ChatSession(ckpt.model, ckpt.tokenizer, GenerateConfig(max_new_tokens=128))


@pytest.mark.integration
def test_cli_line_that_is_not_utf8_is_an_error_and_the_chat_goes_on(demo_sized):
    stdin = b"hello\nbad \xff line\nROMEO: again\n"
    done = subprocess.run([sys.executable, "-m", "gptforge.cli", "chat", "--checkpoint", str(demo_sized),
                           "--temperature", "0", "--device", "cpu"], input=stdin, capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr
    err = done.stderr.decode()
    assert [line for line in err.splitlines() if line.startswith(("error:", "loaded", "Traceback"))] == [
        f"loaded {demo_sized}",
        "error: the message holds a lone surrogate U+DCFF at character 4 (as Python reads the byte 0xff of input "
        "that is not UTF-8), which is not valid Unicode and cannot be tokenized"]
    # two replies (the chat went on after the bad line), with the default reply length on a 128-token context
    ckpt = load_checkpoint(demo_sized)
    session = ChatSession(prepare_for_inference(ckpt.model), ckpt.tokenizer, GenerateConfig(temperature=0.0))
    first = "".join(session.send("hello"))
    second = "".join(session.send("ROMEO: again"))
    expected = f"{first}\n{second}\n"
    if session.dropped_turns:
        expected = f"{first}\n(the conversation no longer fits the model's context: dropping the oldest turns)\n{second}\n"
    assert done.stdout.decode() == expected


# --------------------------------------------------------------------------------------------------
# `gptforge chat --knowledge`: the knowledge base is a test retriever here (tests/knowledge has the index's own)
def _grounded_main(monkeypatch, retriever=None):
    from gptforge import cli
    from gptforge.knowledge.grounding import Grounding
    from tests.knowledge.test_grounding import WordRetriever

    monkeypatch.setattr(cli, "_load_grounding",
                        lambda config: None if config.knowledge is None else Grounding(retriever or WordRetriever(),
                                                                                        config))
    return cli.main


def test_cli_prints_the_sources_after_each_grounded_reply(checkpoint, loaded, capsys, monkeypatch):
    import io

    from gptforge.config import GroundingConfig
    from gptforge.knowledge.grounding import Grounding
    from tests.knowledge.test_grounding import WordRetriever

    main = _grounded_main(monkeypatch)
    monkeypatch.setattr(sys, "stdin", io.StringIO("how long do refunds take?\nwhat colour is sky?\n"))
    code = main(["chat", "--checkpoint", str(checkpoint), "--max-new-tokens", "6", "--temperature", "0",
                 "--device", "cpu", "--knowledge", "kb", "-k", "2", "--query-turns", "1"])
    out, err = capsys.readouterr()
    assert code == 0, err
    # the same turns through the library give the replies; the sources follow each one
    model = prepare_for_inference(copy.deepcopy(loaded.model))
    session = ChatSession(model, loaded.tokenizer, GenerateConfig(max_new_tokens=6, temperature=0),
                          grounding=Grounding(WordRetriever(), GroundingConfig(knowledge="kb", passages=2,
                                                                               query_turns=1)))
    first = "".join(session.send("how long do refunds take?"))
    second = "".join(session.send("what colour is sky?"))
    assert out == (f"{first}\nsources:\n  [1] returns#1 | Returns | score 1.00\n"
                   f"{second}\nsources: none\n")


def test_cli_knowledge_only_prints_the_refusal(checkpoint, capsys, monkeypatch):
    import io

    main = _grounded_main(monkeypatch)
    monkeypatch.setattr(sys, "stdin", io.StringIO("what colour is sky?\n"))
    code = main(["chat", "--checkpoint", str(checkpoint), "--device", "cpu", "--knowledge", "kb",
                 "--knowledge-only", "--refusal", "ask our support desk."])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out == "ask our support desk.\nsources: none\n"


@pytest.mark.parametrize("argv, fragment", [
    (["--knowledge-only"], "--knowledge-only only applies with --knowledge"),
    (["--min-score", "2"], "--min-score only applies with --knowledge"),
    (["--knowledge", "kb", "-k", "0"], "passages must be at least 1"),
])
def test_cli_grounding_flags_are_checked_before_loading(checkpoint, capsys, argv, fragment):
    from tests.cli_utils import assert_one_line_error, run

    code, _, err = run(capsys, "chat", "--checkpoint", str(checkpoint), *argv)
    assert_one_line_error(code, err, fragment)


def test_cli_knowledge_base_of_another_tokenizer_is_one_error(checkpoint, capsys, monkeypatch):
    import io

    from gptforge.errors import GptforgeError
    from tests.cli_utils import assert_one_line_error
    from tests.knowledge.test_grounding import WordRetriever

    class OtherTokenizerIndex(WordRetriever):
        def check_tokenizer(self, tokenizer):
            raise GptforgeError("the knowledge base kb was built for another tokenizer")

    main = _grounded_main(monkeypatch, OtherTokenizerIndex())
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\n"))
    code = main(["chat", "--checkpoint", str(checkpoint), "--device", "cpu", "--knowledge", "kb"])
    out, err = capsys.readouterr()
    assert_one_line_error(code, err, "another tokenizer")
    assert out == ""
