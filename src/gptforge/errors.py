"""User-facing errors.

Anything a user can cause (a missing file, a bad value, a checkpoint from another tokenizer) raises a
subclass of :class:`GptforgeError` with one sentence that names the problem. The CLI prints that sentence
and exits non-zero; it never shows a traceback for these.
"""


class GptforgeError(Exception):
    """An error caused by the user's input, reported as one clear line."""


class ConfigError(GptforgeError, ValueError):
    """An unknown config key, a value of the wrong type or out of range."""


class DataError(GptforgeError):
    """A missing, empty or malformed corpus or dataset, or data from another tokenizer."""


class CheckpointError(GptforgeError):
    """A missing, incomplete or incompatible checkpoint."""


class InvalidTextError(DataError, ValueError):
    """Text that is not valid Unicode: a lone surrogate, such as Python makes of bytes that are not UTF-8
    (command-line arguments, ``surrogateescape`` streams) or a JSON ``"\\ud800"`` escape. ``position`` is the
    index of the first bad character."""

    def __init__(self, message: str, position: int = 0):
        super().__init__(message)
        self.position = position


class TrainingDiverged(GptforgeError):
    """Training produced non-finite losses, gradients or weights too many steps in a row to go on."""


class KnowledgeError(GptforgeError):
    """A missing, incomplete or foreign knowledge base, a docs folder with no passages, or an index built
    for another tokenizer than the model's."""
