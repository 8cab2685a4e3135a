"""GenerateConfig: every invalid value or combination is one ConfigError with a clear sentence."""

import pytest

from gptforge.config import DEFAULT_MAX_NEW_TOKENS, GenerateConfig, resolve_max_new_tokens
from gptforge.errors import ConfigError


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_new_tokens=0), "max_new_tokens must be at least 1, got 0"),
    (dict(min_new_tokens=-1), "min_new_tokens must be >= 0, got -1"),
    (dict(max_new_tokens=200, min_new_tokens=-1), "min_new_tokens must be between 0 and max_new_tokens (200), got -1"),
    (dict(max_new_tokens=5, min_new_tokens=6), "min_new_tokens must be between 0 and max_new_tokens (5), got 6"),
    (dict(temperature=-0.5), "temperature must be a finite number >= 0, got -0.5"),
    (dict(temperature=float("nan")), "temperature must be a finite number >= 0, got nan"),
    (dict(top_k=0), "top_k must be at least 1, got 0"),
    (dict(top_p=0.0), "top_p must be in (0, 1], got 0.0"),
    (dict(top_p=1.2), "top_p must be in (0, 1], got 1.2"),
    (dict(min_p=-0.1), "min_p must be in [0, 1], got -0.1"),
    (dict(min_p=1.5), "min_p must be in [0, 1], got 1.5"),
    (dict(repetition_penalty=0.0), "repetition_penalty must be a finite number > 0, got 0.0"),
    (dict(repetition_penalty=-1.0), "repetition_penalty must be a finite number > 0, got -1.0"),
    (dict(presence_penalty=2.5), "presence_penalty must be in [-2, 2], got 2.5"),
    (dict(frequency_penalty=-3.0), "frequency_penalty must be in [-2, 2], got -3.0"),
    (dict(no_repeat_ngram_size=-1), "no_repeat_ngram_size must be >= 0 (0 disables it), got -1"),
    (dict(num_beams=0), "num_beams must be at least 1, got 0"),
    (dict(length_penalty=float("inf")), "length_penalty must be a finite number, got inf"),
    (dict(num_return_sequences=0), "num_return_sequences must be at least 1, got 0"),
    (dict(stop="END"), "stop must be a list of strings, got 'END'"),
    (dict(stop=["END", 3]), "stop must be a list of strings, got ['END', 3]"),
    (dict(stop=["END", ""]), "stop strings must not be empty"),
    (dict(logprobs=-1), "logprobs must be >= 0 (0 returns none), got -1"),
    (dict(num_beams=4, temperature=0.8), "beam search is deterministic and does not sample; set temperature to 0"),
    (dict(num_beams=2, temperature=0, num_return_sequences=3),
     "num_return_sequences (3) must not exceed num_beams (2)"),
    (dict(num_beams=2, temperature=0, stop=["x"]), "stop strings are not supported with beam search"),
])
def test_invalid_values_raise_one_clear_sentence(kwargs, message):
    with pytest.raises(ConfigError) as err:
        GenerateConfig(**kwargs).validate()
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_valid_settings_pass():
    GenerateConfig(temperature=0, num_beams=4, num_return_sequences=4, length_penalty=-1.0).validate()
    GenerateConfig(top_p=1.0, min_p=0.0, min_new_tokens=200, presence_penalty=-2, stop=["\n\n"]).validate()


@pytest.mark.parametrize("max_new, prompt, context, expected", [
    (None, 3, 128, 125),       # the demo model's context: what it leaves
    (None, 3, 1024, DEFAULT_MAX_NEW_TOKENS),  # a roomy one: the cap
    (None, 127, 128, 1),
    (40, 3, 128, 40),          # a given value that fits is kept
    (125, 3, 128, 125),
])
def test_an_unset_max_new_tokens_is_what_the_context_leaves(max_new, prompt, context, expected):
    assert resolve_max_new_tokens(max_new, prompt, context) == expected
    assert GenerateConfig(max_new_tokens=max_new).for_prompt(prompt, context).max_new_tokens == expected


@pytest.mark.parametrize("config, prompt, message", [
    (GenerateConfig(max_new_tokens=200), 3, "prompt (3 tokens) + max_new_tokens (200) is longer than the model's "
                                            "context of 128 tokens; shorten the prompt or lower max_new_tokens"),
    (GenerateConfig(), 128, "the prompt (128 tokens) leaves no room to generate in the model's context of 128 "
                            "tokens; shorten the prompt"),
    (GenerateConfig(), 400, "the prompt (400 tokens) leaves no room to generate"),
    (GenerateConfig(min_new_tokens=30), 100, "min_new_tokens (30) is more than the 28 new tokens the model's context "
                                             "of 128 tokens leaves after the prompt (100 tokens)"),
])
def test_what_does_not_fit_the_context_is_one_clear_sentence(config, prompt, message):
    with pytest.raises(ConfigError) as err:
        config.for_prompt(prompt, 128)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert config.max_new_tokens in (None, 200)  # the config itself is left as it was
