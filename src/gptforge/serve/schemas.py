"""Request bodies in OpenAI's shapes, checked strictly: a wrong type is an error, never silently coerced.

Range checks that need the model (context length, the model's name) happen in the app; these models check
what a body can be judged on by itself. A field that is a decoding option (temperature, top_p, n, ...) keeps
OpenAI's name and default but is range-checked by :meth:`GenerateConfig.validate`, the one place that
checks it for the CLI and the Python API too; only the limits OpenAI's API adds on top are checked here.
:func:`openai_error` is the one error shape every route answers with.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..config import GenerateConfig
from ..errors import ConfigError

# OpenAI's limits, tighter than gptforge's own.
MAX_TEMPERATURE = 2.0
MAX_STOP_STRINGS = 4
MAX_LOGPROBS = 20
SEED_MIN, SEED_MAX = -2 ** 63, 2 ** 63 - 1  # OpenAI's: a signed 64-bit integer (choice i samples with seed + i)
DEFAULT_COMPLETION_TOKENS = 16
"""OpenAI's default ``max_tokens`` for /v1/completions; the server lowers it to what the context leaves."""

MAX_LOGIT_BIAS = 300  # entries of logit_bias: this server's limit
MAX_BAD_WORDS, MAX_BAD_WORD_CHARS = 64, 200  # banned phrases (a gptforge extension): this server's limits

GENERATE_OPTIONS = {"max_tokens": "max_new_tokens", "max_completion_tokens": "max_new_tokens",
                    "temperature": "temperature", "top_p": "top_p", "n": "num_return_sequences",
                    "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty",
                    "stop": "stop", "logprobs": "logprobs", "top_logprobs": "logprobs",
                    "logit_bias": "logit_bias", "bad_words": "bad_words"}
"""Request fields that are GenerateConfig options: the request's name → the GenerateConfig field."""


def check_generate_option(name: str, value: Any) -> Any:
    """``value`` of the request field ``name``, range-checked as the GenerateConfig option it is; a
    ValueError (which pydantic reports under ``name``) when it is out of range."""
    if value is None:
        return value
    option = GENERATE_OPTIONS[name]
    try:
        GenerateConfig(**{option: value}).validate()
    except ConfigError as exc:
        message = str(exc)
        if message.startswith(option + " "):  # the message names the option as the request does
            message = name + message[len(option):]
        raise ValueError(message) from None
    return value


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: Optional[str]
    """The request field at fault, or null."""
    code: Optional[str]


class ErrorResponse(BaseModel):
    """Every error the server answers: OpenAI's shape (for /openapi.json; :func:`openai_error` builds it)."""

    error: ErrorDetail


def openai_error(message: str, *, type: str = "invalid_request_error", param: Optional[str] = None,
                 code: Optional[str] = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class _Strict(BaseModel):
    # strict: "0.5" is not a number and 1.0 is not an integer; unknown fields are refused, not ignored.
    model_config = ConfigDict(strict=True, extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False


class _SamplingRequest(_Strict):
    model: str
    max_tokens: Optional[int] = None
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[int] = Field(None, ge=SEED_MIN, le=SEED_MAX)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    user: Optional[str] = None
    """Accepted for compatibility; OpenAI uses it to track abuse, this server ignores it."""
    logit_bias: Optional[dict[str, float]] = None
    """OpenAI's: token id (a string, as JSON keys are) → bias in [-100, 100], added to the logits."""
    bad_words: Optional[list[str]] = None
    """A gptforge extension (OpenAI clients send it through extra_body): phrases the output never contains."""

    _scoring_form: ClassVar[bool] = False

    @field_validator("max_tokens", "temperature", "top_p", "n", "presence_penalty", "frequency_penalty")
    @classmethod
    def _generate_option(cls, value, info):
        if value == 0 and info.field_name == "max_tokens" and cls._scoring_form:
            return value
        return check_generate_option(info.field_name, value)

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, value):
        if value is not None and len(value) > MAX_LOGIT_BIAS:
            raise ValueError(f"logit_bias may have at most {MAX_LOGIT_BIAS} entries, got {len(value)}")
        return check_generate_option("logit_bias", value)

    @field_validator("bad_words")
    @classmethod
    def _bad_words(cls, value):
        if value is None:
            return value
        if len(value) > MAX_BAD_WORDS:
            raise ValueError(f"bad_words may have at most {MAX_BAD_WORDS} phrases, got {len(value)}")
        if any(len(phrase) > MAX_BAD_WORD_CHARS for phrase in value):
            raise ValueError(f"each of bad_words may have at most {MAX_BAD_WORD_CHARS} characters")
        return check_generate_option("bad_words", value)

    @field_validator("temperature")
    @classmethod
    def _openai_temperature_limit(cls, value):
        if value > MAX_TEMPERATURE:
            raise ValueError(f"temperature must be at most {MAX_TEMPERATURE:g} (OpenAI's limit), got {value}")
        return value

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, value):
        if value is None:
            return []
        stops = [value] if isinstance(value, str) else value
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(stops)}")
        return check_generate_option("stop", stops)

    @property
    def stop_list(self) -> list[str]:
        return list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_SamplingRequest):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: Optional[int] = None
    """None: OpenAI's default (16), lowered to what the context leaves after the prompt. 0 generates nothing:
    with ``echo`` and ``logprobs`` it is OpenAI's legacy scoring form (the prompt's token log-probabilities)."""
    logprobs: Optional[int] = None
    echo: bool = False
    _scoring_form: ClassVar[bool] = True  # max_tokens 0 allowed (the app checks that it comes with echo)

    @field_validator("logprobs")
    @classmethod
    def _logprobs_range(cls, value):
        return _logprobs_limit("logprobs", check_generate_option("logprobs", value))

    @field_validator("prompt")
    @classmethod
    def _prompt_not_empty_list(cls, value):
        if isinstance(value, list) and not value:
            raise ValueError("prompt must not be an empty list")
        if isinstance(value, list) and any(isinstance(p, list) and not p for p in value):
            raise ValueError("a prompt of token ids must not be empty")
        return value


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant", "developer"]
    content: Union[str, list[TextPart]]
    name: Optional[str] = None

    @property
    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = None
    logprobs: bool = False
    top_logprobs: Optional[int] = None

    @field_validator("max_completion_tokens")
    @classmethod
    def _max_completion_tokens_range(cls, value):
        return check_generate_option("max_completion_tokens", value)

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs_range(cls, value):
        return _logprobs_limit("top_logprobs", check_generate_option("top_logprobs", value))

    @model_validator(mode="after")
    def _top_needs_logprobs(self):
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs set to true")
        return self

    @property
    def token_limit(self) -> Optional[int]:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class ClassifyRequest(_Strict):
    model: Optional[str] = None
    input: Union[str, list[str]]
    explain: bool = False
    """Also return each input's token attributions (gptforge.explain.attribution)."""
    explain_method: Optional[Literal["ig", "occlusion"]] = None
    """With ``explain``: integrated gradients (``"ig"``, the default) or occlusion."""

    @field_validator("input")
    @classmethod
    def _not_empty(cls, value):
        if isinstance(value, list) and not value:
            raise ValueError("input must not be an empty list")
        return value

    @field_validator("explain_method")
    @classmethod
    def _method_needs_explain(cls, value, info):
        if value is not None and info.data.get("explain") is not True:  # explain is checked first (field order)
            raise ValueError("explain_method applies only with explain: true")
        return value


class ScoreRequest(_Strict):
    """``POST /v1/score``: how likely the model finds each candidate text right after the context."""

    model: Optional[str] = None
    context: str
    """The text every candidate follows (may be empty: candidates then start after the end-of-text token)."""
    candidates: list[str] = Field(min_length=1)
    """The texts to score; each needs at least one token."""
    normalize: Literal["none", "token", "byte"] = "none"
    """What ``score`` (and so ``rank``) uses: the total log-probability, the mean per token, or per UTF-8 byte."""
    top_logprobs: Optional[int] = None
    """Null: no per-token detail. N (0..20): each candidate also gets ``logprobs`` in the completions shape
    (its tokens, their log-probabilities and the N most likely tokens at each position)."""

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs_range(cls, value):
        if value is not None and value < 0:
            raise ValueError(f"top_logprobs must be >= 0, got {value}")
        return _logprobs_limit("top_logprobs", value)


def _logprobs_limit(name: str, value: Optional[int]) -> Optional[int]:
    if value is not None and value > MAX_LOGPROBS:
        raise ValueError(f"{name} must be at most {MAX_LOGPROBS} (OpenAI's limit), got {value}")
    return value


def first_error(exc) -> tuple[str, Optional[str]]:
    """A pydantic ValidationError as (one-line message, the offending top-level field)."""
    err = exc.errors(include_url=False)[0]
    loc = [str(part) for part in err.get("loc", ())]
    param = loc[0] if loc else None
    message = err.get("msg", "invalid request")
    message = message.removeprefix("Value error, ")
    where = ".".join(loc)
    return (f"{where}: {message}" if where else message), param
