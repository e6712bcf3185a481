"""Token ids arriving step by step -> the text a client may be sent now, with OpenAI's stop rules.

A completion ends at the model's end-of-text token or a ``stop`` string (finish_reason "stop"; the
stop string itself is not part of the text), or after ``max_tokens`` tokens ("length"). While
streaming, text that could still turn into a stop string, or an incomplete UTF-8 character at the
end of the decoded bytes, is held back until the next step decides it; so the streamed deltas add
up to exactly the non-streamed text.
"""

from __future__ import annotations

from calm_core.tokenizer import CalmTokenizer


class StopCutter:
    """One completion's text: ``push`` the ids of a step, get the new text that is safe to send."""

    def __init__(self, tok: CalmTokenizer, stop: list[str], max_tokens: int, ignore_eos: bool = False):
        self.tok, self.stop, self.max_tokens = tok, [s for s in stop if s], max_tokens
        self.ignore_eos = ignore_eos  # end-of-text is kept as a token and does not end the completion
        self.longest = max((len(s) for s in self.stop), default=0)
        self.ids: list[int] = []
        self.sent = ""  # text already returned
        self.clear = 0  # no stop string starts before this character of the text (matched incrementally)
        self.finish: str | None = None  # "stop" | "length" once the completion has ended

    @property
    def done(self) -> bool:
        return self.finish is not None

    def push(self, ids: list[int]) -> str:
        """Take the next step's ids; returns the text to send now ("" when nothing is safe yet)."""
        for i in ids:
            if self.done:
                break
            if i == self.tok.eot_id and not self.ignore_eos:
                self.finish = "stop"
            else:
                self.ids.append(i)
                if len(self.ids) >= self.max_tokens:
                    self.finish = "length"
        return self._advance()

    def close(self) -> str:
        """The generation ran out of steps: end as "length" and release what was held back."""
        if not self.done:
            self.finish = "length"
        return self._advance()

    @property
    def tokens(self) -> int:
        return len(self.ids)

    def _advance(self) -> str:
        text = self.tok.decode(self.ids)
        # only the new tail is searched: a match starts at or after ``clear`` (the stable text of the
        # last step less the longest stop string), so the scan per step is short however long the text
        cut = min((j for j in (text.find(s, self.clear) for s in self.stop) if j >= 0), default=-1)
        if cut >= 0:
            text, self.finish = text[:cut], "stop"
        elif self.stop:
            stable = len(text.rstrip("\ufffd"))  # an undecoded byte at the end may still change
            self.clear = max(self.clear, stable - self.longest + 1)
        if not self.done:
            text = text[: len(text) - self._held_back(text)]
        delta = text[len(self.sent):] if text.startswith(self.sent) else ""  # sent text is never taken back
        self.sent += delta
        return delta

    def _held_back(self, text: str) -> int:
        """Characters at the end of ``text`` that must wait: an undecoded byte sequence, or the
        longest suffix that is a proper prefix of a stop string."""
        n = len(text) - len(text.rstrip("\ufffd"))
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:k]):
                    n = max(n, k)
                    break
        return n
