"""Speculative decoding's drafts: by n-gram lookup in the request's own text, or from a draft model.

Text that an agent or an editor asks for often repeats what it was given: code rewritten with
small edits, a quoted passage, a list continued. Where the last few tokens of a request's text
(its prompt and its reply so far) occurred before in it, the tokens that followed them then are
a cheap guess at what follows now. The batcher decodes the guess (the draft) with the request's
next token in one step, draws a token at every position with the request's own sampler, and
keeps the draws while they match the draft (allm/managers/text/batching.py). Every token kept
was drawn from the model's own distribution given the tokens before it, so the text is the
one the model would give without drafts (greedy: the same tokens; sampled: the same
distribution), only sooner when the guesses are right.

A wrong guess costs its tokens' compute, so the draft grows while guesses are kept and
shrinks to what was kept when they are not.

A draft model (``draft = "model-id"``: a smaller model with the same tokenizer) guesses instead,
by decoding the request's text greedily (allm/managers/text/draft_model.py); the target keeps
its guesses by the same rule, so the text is the same either way.
"""

from __future__ import annotations

import numpy as np

#: the longest and shortest run of last tokens looked up, longest first
NGRAM_MAX = 4
NGRAM_MIN = 2
#: the most tokens one draft holds, and how many a request's first draft holds
DRAFT_MAX = 8
DRAFT_START = 4


class Drafter:
    """One request's text so far (its prompt and the tokens drawn), and its drafts' length and
    record."""

    __slots__ = ("accepted", "draft_len", "drafted", "length", "text")

    def __init__(self, prompt: list[int], capacity: int) -> None:
        self.text = np.empty(max(capacity, len(prompt)) + DRAFT_MAX + 1, dtype=np.int32)
        self.text[: len(prompt)] = prompt
        self.length = len(prompt)
        self.draft_len = DRAFT_START
        self.drafted = 0  # draft tokens decoded
        self.accepted = 0  # of them, the ones kept

    def extend(self, tokens: list[int]) -> None:
        """Tokens drawn for the reply."""
        room = len(self.text) - self.length
        tokens = tokens[:room]
        self.text[self.length : self.length + len(tokens)] = tokens
        self.length += len(tokens)

    def tokens(self) -> np.ndarray:
        """The text so far: the prompt and every token drawn (the last not yet decoded)."""
        return self.text[: self.length]

    def judged(self, drafted: int, accepted: int) -> None:
        """A draft of ``drafted`` tokens had its first ``accepted`` kept."""
        self.drafted += drafted
        self.accepted += accepted
        if accepted == drafted:
            self.draft_len = min(DRAFT_MAX, self.draft_len * 2)
        else:
            self.draft_len = max(1, accepted)


class NgramDrafter(Drafter):
    """Drafts looked up in the request's own text."""

    __slots__ = ()

    def draft(self, most: int) -> list[int]:
        """What followed the latest earlier occurrence of the text's last tokens (at most
        ``most`` tokens, and the current draft length); empty where they never occurred."""
        most = min(most, self.draft_len)
        if most <= 0:
            return []
        text = self.text[: self.length]
        for n in range(NGRAM_MAX, NGRAM_MIN - 1, -1):
            if self.length <= n:
                continue
            windows = np.lib.stride_tricks.sliding_window_view(text[:-1], n)
            found = np.flatnonzero((windows == text[-n:]).all(axis=1))
            if len(found):
                start = int(found[-1]) + n
                return [int(t) for t in text[start : start + most]]
        return []
