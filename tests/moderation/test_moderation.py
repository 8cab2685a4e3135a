"""gptforge.moderation: verdicts of a classifier whose decision is known (tests/moderation/utils.py), the
output screen's hold-back, the configuration's checks, and chat sessions with moderation."""

from __future__ import annotations

import random

import pytest

from gptforge.chat import ChatSession
from gptforge.config import GenerateConfig, ModerationConfig
from gptforge.errors import CheckpointError, ConfigError
from gptforge.generate import generate_ids
from gptforge.moderation import Moderator, OutputScreen
from tests.model_utils import save_tiny_checkpoint
from tests.moderation.utils import CHARS, P_CLEAN, SCRIPT, char_classifier, reciting_lm, save_char_classifier


def moderator(bad: str = "x", **config) -> Moderator:
    model, tok, task = char_classifier(CHARS, bad)
    config = {"moderation": "clf", "block": ["toxic"], "threshold": 0.5, "moderation_window": 24,
              "moderation_stride": 6, **config}
    return Moderator(model, tok, task["labels"], ModerationConfig(**config))


def test_check_blocks_texts_with_the_chosen_character_only():
    m = moderator()
    blocked = m.check("you are an ox", "input")
    assert blocked.blocked and blocked.label == "toxic" and blocked.probability > 0.99 and blocked.side == "input"
    assert set(blocked.scores) == {"ok", "toxic"}
    clean = m.check("you are kind")
    assert not clean.blocked and clean.label == "ok" and clean.probability == pytest.approx(1 - P_CLEAN, abs=1e-4)
    assert [v.blocked for v in m.check_many(["a", "x", "", "axa"])] == [False, True, False, True]
    assert m.check("").label is None  # nothing to read: never blocked


def test_threshold_decides():
    # p(toxic) of a clean text is 0.12: a threshold below it blocks everything with a token
    assert moderator(threshold=0.1).check("kind words").blocked
    assert not moderator(threshold=0.5).check("kind words").blocked
    assert moderator(threshold=1.0).check("x").blocked  # p(toxic) rounds to 1.0 in float32
    assert not moderator(block=["ok"], threshold=0.95).check("kind words").blocked


def test_a_text_longer_than_the_context_is_read_whole():
    m = moderator()
    assert m.context == 128
    long = "a b " * 100  # 400 characters, three times the classifier's context
    assert not m.check(long).blocked
    assert m.check(long + "x").blocked          # the end, which a truncating read would miss
    assert m.check("x" + long).blocked
    assert m.check(long[:200] + "x" + long[200:]).blocked


def released_text(m: Moderator, pieces):
    screen = m.screen()
    consumed = []

    def source():
        for piece in pieces:
            consumed.append(piece)
            yield piece

    out = list(m.filter(source(), screen))
    return "".join(out), screen, len(consumed)


def test_filter_releases_a_clean_text_whole_and_cuts_a_blocked_one_before_the_word():
    m = moderator()
    text = "the quick brown dog jumps over the lazy cat and sleeps"
    out, screen, _ = released_text(m, list(text))
    assert out == text and screen.blocked is None and screen.done
    text = "the quick brown fox jumps over the lazy dog and sleeps all day long in the warm sun"
    out, screen, consumed = released_text(m, list(text))
    assert screen.blocked is not None and screen.blocked.label == "toxic"
    assert "x" not in out and text.startswith(out)
    assert out == "the quick brown "  # up to the last word boundary a check cleared: not "the quick brown fo"
    assert consumed < len(text)  # decoding stopped soon after the blocked window


def test_nothing_blocked_is_ever_released_for_any_split():
    m = moderator()
    rng = random.Random(0)
    words = ["kind", "words", "are", "fine", "ox", "lynx", "box", "a", "the", "sun", ",", "."]
    for trial in range(60):
        text = " ".join(rng.choice(words) for _ in range(rng.randint(1, 30)))
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(0, 12)))) if len(text) > 1 else []
        pieces = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
        out, screen, _ = released_text(m, pieces)
        assert text.startswith(out)
        if "x" in text:
            assert "x" not in out and screen.blocked is not None
        else:
            assert out == text and screen.blocked is None


def test_screen_checks_windows_no_more_than_half_a_window_apart():
    screen = OutputScreen(window=20, stride=4)
    text = "aaaa bbbb cccc dddd eeee ffff gggg hhhh iiii jjjj "  # 50 characters, none checked yet
    for ch in text:
        screen.push(ch, ch)
    checks = screen.checks()
    ends = [end for end, _ in checks]
    assert ends == sorted(ends) and ends[-1] == len(text)
    gaps = [b - a for a, b in zip([0] + ends, ends)]
    assert max(gaps) <= 10
    for end, window in checks:
        assert len(window) <= 20 and text[:end].endswith(window)


def test_whole_output_is_checked_at_the_end():
    # a classifier that blocks only what is long: every window passes, the whole text does not
    m = moderator()
    screen = m.screen()
    for ch in "kind words " * 6:
        screen.push(ch, ch)
    screen.push("", "", final=True)
    checks = screen.checks()
    assert checks[-1] == (-1, screen.text)  # the whole text, after the windows


@pytest.mark.parametrize("config, message", [
    (dict(threshold=1.5), "threshold must be a probability in [0, 1], got 1.5"),
    (dict(threshold=-0.1), "threshold must be a probability in [0, 1]"),
    (dict(block=[]), "--moderation needs --block LABEL[,LABEL]"),
    (dict(moderation_window=24, moderation_stride=13), "must be at most half of moderation_window"),
    (dict(moderation_window=0), "moderation_window must be at least 1"),
    (dict(moderation_refusal=" "), "moderation_refusal must not be empty"),
    (dict(moderation=None, threshold=0.9), "--block, --threshold only apply with --moderation"),
])
def test_config_errors(config, message):
    values = {"moderation": "clf", "block": ["toxic"], "threshold": 0.5, **config}
    with pytest.raises(ConfigError) as err:
        ModerationConfig(**values).validate()
    assert message in str(err.value)


def test_block_labels_split_at_commas_and_unknown_ones_name_the_labels():
    assert ModerationConfig(moderation="c", block=["toxic, threat", "spam"]).validate().block == ["toxic", "threat", "spam"]
    with pytest.raises(ConfigError) as err:
        moderator(block=["toxic", "rude"])
    assert str(err.value) == "--block rude: is not a label of the moderation classifier the classifier; its labels are ok, toxic"


def test_load_refuses_a_language_model_and_a_missing_checkpoint(tmp_path):
    lm = save_tiny_checkpoint(tmp_path / "lm", CHARS, block_size=16, n_layer=1, n_embd=8)
    with pytest.raises(ConfigError, match="is a language model; moderation needs a text classifier"):
        Moderator.load(ModerationConfig(moderation=str(lm), block=["toxic"]), "cpu")
    with pytest.raises(CheckpointError, match="does not exist"):
        Moderator.load(ModerationConfig(moderation=str(tmp_path / "nope"), block=["toxic"]), "cpu")
    clf = save_char_classifier(tmp_path / "clf", CHARS, "x")
    loaded = Moderator.load(ModerationConfig(moderation=str(clf), block=["toxic"]), "cpu")
    assert loaded.labels == ["ok", "toxic"] and loaded.check("fox").blocked


# --------------------------------------------------------------------------------------------------
def session(**kw) -> ChatSession:
    lm, tok = reciting_lm()
    return ChatSession(lm, tok, GenerateConfig(temperature=0, max_new_tokens=60), moderator=moderator(**kw))


def test_chat_refuses_a_blocked_message_without_running_the_model():
    s = session(moderation_refusal="Not like that.")
    assert "".join(s.send("you ox")) == "Not like that."
    assert s.moderated.side == "input" and s.moderated.label == "toxic"
    assert s.history == [] and s.turns == 0  # the model never ran; the turn is not remembered


def reference(lm, tok, ids, max_new_tokens):
    return generate_ids(lm, [ids], GenerateConfig(temperature=0, max_new_tokens=max_new_tokens), tok.eos_id,
                        tokenizer=tok)[0][0].text


def test_chat_cuts_a_blocked_reply_and_keeps_a_clean_one():
    lm, tok = reciting_lm()
    s = session()
    ids = s.prompt_ids("hi")
    full = reference(lm, tok, ids, 60)
    assert "x" in full  # the reciting model says "fox" in this turn
    reply = "".join(s.send("hi"))
    assert s.moderated is not None and s.moderated.side == "output"
    assert "x" not in reply and full.startswith(reply) and s.history == []
    # a reply that stops before the fox is released whole, and the turn is remembered
    s = ChatSession(lm, tok, GenerateConfig(temperature=0, max_new_tokens=4), moderator=moderator())
    reply = "".join(s.send("hi"))
    assert s.moderated is None and reply == reference(lm, tok, ids, 4) and "x" not in reply
    assert len(s.history) == 2
