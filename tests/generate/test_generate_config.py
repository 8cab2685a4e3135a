"""GenerateConfig: every invalid value or combination is one ConfigError with a clear sentence."""

import pytest

from gptforge.config import GenerateConfig
from gptforge.errors import ConfigError


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_new_tokens=0), "max_new_tokens must be at least 1, got 0"),
    (dict(min_new_tokens=-1), "min_new_tokens must be between 0 and max_new_tokens (200), got -1"),
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
