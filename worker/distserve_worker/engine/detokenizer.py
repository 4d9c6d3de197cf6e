"""Turns output tokens into text deltas and decides when a stop string or EOS ends the output.

Text that might be the start of a stop string, or an incomplete UTF-8 character, is held back
until it is known not to be, so the caller never sees text that is later taken back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

REPLACEMENT = "\ufffd"


@dataclass
class Detokenizer:
    tokenizer: Any
    stop: list[str] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    emitted: int = 0  # characters of the text already returned
    stopped: bool = False

    def add(self, token: int) -> str:
        """Append a token; return the text now safe to emit (after a stop string: the text before it)."""
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        for stop in self.stop:
            at = text.find(stop, max(0, self.emitted - len(stop)))
            if stop and at != -1:
                self.stopped = True
                delta = text[self.emitted : at] if at > self.emitted else ""
                self.emitted = max(self.emitted, at)
                return delta
        safe = len(text)
        if text.endswith(REPLACEMENT):
            safe = len(text.rstrip(REPLACEMENT))
        for stop in self.stop:
            # Hold back the longest tail that is a proper prefix of a stop string.
            for size in range(min(len(stop) - 1, len(text)), 0, -1):
                if text.endswith(stop[:size]):
                    safe = min(safe, len(text) - size)
                    break
        if safe <= self.emitted:
            return ""
        delta = text[self.emitted : safe]
        self.emitted = safe
        return delta

    def flush(self) -> str:
        """At the end of the output (not by a stop string): whatever was held back."""
        if self.stopped:
            return ""
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        delta = text[self.emitted :]
        self.emitted = len(text)
        return delta
