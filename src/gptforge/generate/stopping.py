"""Stop strings that may span several tokens, checked on a bounded tail of text.

:class:`StopStringFilter` sits between the decoder and whoever reads the text. It releases text only once it
cannot be the start of a stop string, so a stream never shows text that a later token turns into a stop
string, and the text released is exactly the final text. Each push looks at the held-back tail plus the new
piece only (shorter than the longest stop string plus one piece), never at the whole output.
"""

from __future__ import annotations

from typing import Optional, Sequence

from ..tokenizer import IncrementalDecoder, Tokenizer


class StopStringFilter:
    def __init__(self, stops: Sequence[str]):
        self.stops = list(stops)
        self.pending = ""  # text that might be the beginning of a stop string
        self.stopped = False

    def push(self, piece: str) -> str:
        """Add decoded text; return what is now safe to show (everything before a stop string, once one is found)."""
        if self.stopped:
            return ""
        text = self.pending + piece
        hit = _first_match(text, self.stops)
        if hit is not None:
            self.pending, self.stopped = "", True
            return text[:hit]
        keep = _longest_partial_match(text, self.stops)
        self.pending = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep]

    def flush(self) -> str:
        """At the end of generation the held-back text is final."""
        text, self.pending = self.pending, ""
        return text


def _first_match(text: str, stops: Sequence[str]) -> Optional[int]:
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


def _longest_partial_match(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of some stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


class TextTracker:
    """One output row's text: decodes token by token and applies the stop strings."""

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int], stops: Sequence[str]):
        self.decoder = IncrementalDecoder(tokenizer, prompt_ids)
        self.filter = StopStringFilter(stops)
        self.pieces: list[str] = []

    @property
    def stopped(self) -> bool:
        return self.filter.stopped

    def push(self, token_id: int) -> str:
        """Add a token; return the newly decided text (possibly empty)."""
        return self._emit(self.filter.push(self.decoder.push(token_id)))

    def finish(self) -> str:
        """Release what was held back (an unfinished character, a partial stop string)."""
        if self.filter.stopped:
            return ""
        piece = self.filter.push(self.decoder.flush())
        return self._emit(piece + self.filter.flush())

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    def _emit(self, piece: str) -> str:
        if piece:
            self.pieces.append(piece)
        return piece
