"""From tokens to the text a client sees: incremental detokenisation and OpenAI ``stop`` strings."""

from __future__ import annotations

from collections.abc import Sequence

from lit_llm.tokenizer import Tokenizer


class TextStream:
    """Turns a reply's tokens, one at a time, into text deltas that are safe to send.

    Two things make a new token's text unsafe to send at once: it may end inside a UTF-8 character (a
    byte-level BPE token can hold half of one; the decoded text then ends in U+FFFD), and it may be the start
    of a ``stop`` string that later tokens complete (the client must never see any part of a stop string).
    Such a tail is held back until the next token settles it. Special tokens (the end-of-turn token) are not
    part of the text.

    Args:
        tok: The model's tokenizer.
        stop: Strings that end the reply; the text ends just before the first one to appear.
    """

    def __init__(self, tok: Tokenizer, stop: Sequence[str] = ()) -> None:
        self.tok = tok
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.sent = 0  # characters of the text already returned
        self.text = ""
        self.stopped = False  # a stop string was found: the reply ends here

    def push(self, token: int) -> str:
        """Add one token; return the text that may be sent now (possibly empty)."""
        if self.stopped:
            return ""
        self.ids.append(token)
        text = self.tok.decode(self.ids)
        # a stop string can only start in the part not yet settled (or straddle its start)
        longest = max((len(s) for s in self.stop), default=0)
        lo = max(0, self.sent - longest + 1)
        hits = [i for i in (text.find(s, lo) for s in self.stop) if i >= 0]
        if hits:
            end = min(hits)
            self.stopped = True
            self.text = text[:end]
            return self._advance(end)
        self.text = text
        safe = len(text)
        if text.endswith("\ufffd"):  # an incomplete character: wait for its other bytes
            safe = len(text.rstrip("\ufffd"))
        for s in self.stop:  # hold back a tail that may grow into a stop string
            for k in range(min(len(s) - 1, safe - self.sent), 0, -1):
                if text[safe - k : safe] == s[:k]:
                    safe -= k
                    break
        return self._advance(safe)

    def finish(self) -> str:
        """The reply ended (stop token or length): whatever was held back, now final."""
        return self._advance(len(self.text))

    def _advance(self, end: int) -> str:
        end = max(end, self.sent)
        delta = self.text[self.sent : end]
        self.sent = end
        return delta
