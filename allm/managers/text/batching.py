"""Continuous batching on llama.cpp: one context, a sequence per request, one decode a step.

A ``Batcher`` owns a llama.cpp context with ``n_parallel`` sequences (each with a KV
stream of its own, ``n_ctx`` tokens long) and one thread that drives it. Each step it
builds one ``llama_batch``: the last token of every running sequence that its reader is
ready for, then prompt tokens of sequences still reading their prompt (at most PREFILL_BUDGET
a step while others generate, first come first served, so a long prompt joins a running batch
without stalling it long), calls ``llama_decode`` once, and draws
each sequence's next token with that request's own llama.cpp sampler chain (penalties,
grammar, top-k/top-p/min-p, temperature and seed). The request's worker thread reads its
tokens as they come (``Batcher.take``); it runs at most LOOKAHEAD tokens ahead of its
reader, so a reader that stops (a stop sequence, the token limit, a cancel) costs at most
that many tokens of compute, and none of output.

Prefix reuse: a request goes to the free sequence whose cache shares the longest start
with its prompt (a system prompt, a conversation continued), which keeps those tokens and
decodes the rest. A seeded request is decoded in calls of its own, its prompt in chunks
aligned at fixed positions, and it reuses only a prefix that was decoded that same way (whole
aligned chunks of a seeded request, never the cache a batched request left, whose numbers
differ in the last bits): the same arithmetic whether it runs alone or beside others, and
whether its prefix was cached or not, so the same seed gives the same text (docs/agents.md,
"Sampling").

Speculative decoding (``speculative = "ngram"``, or a ``draft`` model): a request that is not
seeded has a draft, looked up in its own text (allm/managers/text/speculation.py) or guessed by
the draft model (allm/managers/text/draft_model.py), decoded with its next token in the same
step; a token is drawn at every position with its own sampler, and the draws are kept while
they match the draft, the rest of the step's cache removed. What is kept is what the
model draws without drafts; where the guesses are right, several tokens come from one step.

Prefixes outlive their sequence: before a sequence's cache is given up to another prompt, its
state is saved in host memory (``PrefixCache``, allm/managers/text/prefix_cache.py), and a
request whose prompt starts with a saved prefix longer than any free sequence holds has it
restored into a free sequence, computing only the rest. Saving and restoring are copies made
when a request is seated, never on the path of each token.
"""

from __future__ import annotations

import collections
import ctypes
import logging
import threading
from collections.abc import Callable
from typing import Any

import llama_cpp
import numpy as np

from allm.kernel.codes import AllmError, CancelledError, DeadlineError, InternalError
from allm.managers.text.draft_model import DraftModel, Want
from allm.managers.text.llama_load import sequences_context
from allm.managers.text.prefix_cache import Entry as SavedPrefix
from allm.managers.text.prefix_cache import PrefixCache, common_start
from allm.managers.text.speculation import Drafter, NgramDrafter

log = logging.getLogger("allm.text.batch")

#: tokens drawn ahead of a reader: a reader a moment late still joins the next step (with one,
#: late readers split a batch of four into two decodes: 0.74x llama-server's rate instead of 1.00x)
LOOKAHEAD = 3
#: prompt tokens one step decodes while other sequences are generating (chunked prefill), given
#: to the prompts first come, first served: finishing one prompt before the next gives the
#: earlier request its first token sooner (64 tokens to each prompt a step made eight agents'
#: first turns wait 2.1x llama-server's; bench/agents.py) and costs the later ones nothing, as
#: a step reads prompt tokens at about the same rate from 64 to 512. A step of 256 holds a
#: running stream's next token back ~1 s on 2 cores; llama-server's steps take up to 2048.
PREFILL_BUDGET = 256
#: the aligned chunk a seeded request's prompt is decoded in
SEEDED_CHUNK = 64
#: the most tokens one llama_decode takes
N_BATCH = 512
#: a sequence's cache is saved before it is given up when this many of its tokens would be lost:
#: an agent's turn adds a message and a reply (at 64, a turn of 53 tokens went unsaved and the
#: next turn computed it again); a save is one copy of the sequence's cache (~40 MB for 1,800
#: tokens of SmolLM2, some milliseconds), and it supersedes the entry it extends
SAVE_MIN_TOKENS = 16
#: a saved prefix is restored when it gives this many more tokens than the best free sequence
RESTORE_MIN_TOKENS = 64

Entry = dict[str, Any]
LogprobOf = Callable[[np.ndarray, int, int], Entry]  # (logits, token, top_n) → OpenAI's entry


class _Sequence:
    """One of the context's sequences, and the tokens its cache holds."""

    __slots__ = ("aligned", "busy", "saved", "seq", "tokens")

    def __init__(self, seq: int) -> None:
        self.seq = seq
        self.tokens: list[int] = []
        self.busy = False
        #: the leading cached tokens a seeded cold start would have computed the same: whole
        #: SEEDED_CHUNKs from 0, each decoded in a call of its own
        self.aligned = 0
        #: the leading cached tokens the prefix cache holds too (saved from or restored to it)
        self.saved = 0

    def cut(self, keep: int) -> None:
        """What it holds after its cache past ``keep`` is removed."""
        del self.tokens[keep:]
        self.aligned = min(self.aligned, keep - keep % SEEDED_CHUNK)
        self.saved = min(self.saved, keep)


class Work:
    """One request's generation on one sequence."""

    __slots__ = (
        "cached",
        "closed",
        "drafter",
        "error",
        "last",
        "out",
        "pos",
        "prompt",
        "sampler",
        "seeded",
        "sequence",
        "todo",
        "top_logprobs",
    )

    def __init__(
        self,
        prompt: list[int],
        sampler: Any,
        *,
        top_logprobs: int | None,
        seeded: bool,
        drafter: Drafter | None = None,
    ) -> None:
        self.prompt = prompt
        self.drafter = drafter  # its drafts, where it speculates
        self.sampler = sampler  # llama_cpp._internals.LlamaSampler: kept alive while in use
        self.top_logprobs = top_logprobs
        self.seeded = seeded
        self.out: collections.deque[tuple[int, Entry | None]] = collections.deque()
        self.error: AllmError | None = None
        self.closed = False  # its reader is done with it
        self.sequence: _Sequence | None = None
        self.todo: list[int] = []  # prompt tokens still to decode
        self.pos = 0  # the position of the next token to decode
        self.last: int | None = None  # drawn, not yet decoded
        self.cached = 0  # prompt tokens its sequence's cache already held


class Batcher:
    """A llama.cpp context of ``n_parallel`` sequences, driven by a thread of its own."""

    def __init__(
        self,
        model: Any,
        *,
        n_parallel: int,
        n_ctx: int,
        n_threads: int,
        n_vocab: int,
        logprob_of: LogprobOf,
        cache_bytes: int = 0,
        speculative: str = "none",
        draft_model: DraftModel | None = None,
        is_eog: Callable[[int], bool] = lambda _token: False,
        type_k: int | None = None,
        type_v: int | None = None,
        name: str = "model",
    ) -> None:
        self.ctx = sequences_context(
            model,
            n_parallel=n_parallel,
            n_ctx=n_ctx,
            n_threads=n_threads,
            n_batch=N_BATCH,
            name=name,
            type_k=type_k,
            type_v=type_v,
        )
        self.n_ctx = n_ctx
        self.n_vocab = n_vocab
        self.name = name
        self._logprob_of = logprob_of
        self._memory = llama_cpp.llama_get_memory(self.ctx)
        self._batch = llama_cpp.llama_batch_init(N_BATCH, 0, 1)
        self._sequences = [_Sequence(i) for i in range(n_parallel)]
        self.cache = PrefixCache(cache_bytes)
        self.speculative = speculative
        self.draft_model = draft_model  # closed with the batcher
        self._is_eog = is_eog
        self.drafted = 0  # draft tokens decoded, all requests together
        self.accepted = 0  # of them, the ones kept
        self._waiting: collections.deque[Work] = collections.deque()
        self._running: list[Work] = []
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name=f"batch-{name}", daemon=True)
        self._thread.start()

    # -- the readers' side (worker threads) ------------------------------------------

    def start(self, prompt: list[int], sampler: Any, *, top_logprobs: int | None, seeded: bool) -> Work:
        # A seeded request is decoded alone, a token a call: its arithmetic stays the same
        drafter: Drafter | None = None
        if self.draft_model is not None and not seeded:
            drafter = Drafter(prompt, self.n_ctx)
        elif self.speculative == "ngram" and not seeded:
            drafter = NgramDrafter(prompt, self.n_ctx)
        work = Work(prompt, sampler, top_logprobs=top_logprobs, seeded=seeded, drafter=drafter)
        with self._cond:
            if self._closed:
                raise InternalError(f"{self.name} is being unloaded")
            self._waiting.append(work)
            self._cond.notify_all()
        return work

    def take(
        self, work: Work, *, cancelled: Callable[[], bool], time_left_s: Callable[[], float | None]
    ) -> tuple[int, Entry | None]:
        """The next token of ``work`` (and its logprobs entry), waiting for it; raises the
        request's cancel or deadline, or the engine's error."""
        with self._cond:
            while not work.out:
                if work.error is not None:
                    raise work.error
                if cancelled():
                    raise CancelledError("request cancelled")
                left = time_left_s()
                if left is not None and left <= 0:
                    raise DeadlineError("request passed its deadline")
                self._cond.wait(0.05 if left is None else max(0.001, min(0.05, left)))
            item = work.out.popleft()
            self._cond.notify_all()  # it may now draw the next one
            return item

    def finish(self, work: Work) -> None:
        """The reader is done with ``work`` (finished, stopped, cancelled): free its sequence."""
        with self._cond:
            work.closed = True
            if work in self._waiting:
                self._waiting.remove(work)
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            for work in [*self._waiting, *self._running]:
                work.error = InternalError(f"{self.name} was unloaded")
            self._cond.notify_all()
        self._thread.join(timeout=30)
        if self._thread.is_alive():  # stuck in C: the context must outlive it
            log.error("the batch thread of %s did not stop; leaving its context", self.name)
            return
        self.cache.clear()
        llama_cpp.llama_batch_free(self._batch)
        llama_cpp.llama_free(self.ctx)
        if self.draft_model is not None:
            self.draft_model.close()

    # -- the batch thread ------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cond:
                ready = self._schedule()
                while not ready and not self._closed:
                    self._cond.wait()
                    ready = self._schedule()
                if self._closed:
                    return
            plain = [w for w in ready if not w.seeded]
            groups = ([plain] if plain else []) + [[w] for w in ready if w.seeded]
            for group in groups:
                try:
                    self._step(group)
                except AllmError as exc:
                    self._fail(group, exc)
                except Exception as exc:  # never let the thread die with readers waiting
                    log.exception("a batch step of %s failed", self.name)
                    self._fail(
                        group, InternalError(f"llama.cpp failed while generating: {exc}", restart=True)
                    )

    def _schedule(self) -> list[Work]:
        """Under the lock: let go of finished work, seat waiting work, and say what can step."""
        for work in [w for w in self._running if w.closed or w.error is not None]:
            self._running.remove(work)
            assert work.sequence is not None
            work.sequence.busy = False
        while self._waiting:
            free = [s for s in self._sequences if not s.busy]
            if not free:
                break
            work = self._waiting.popleft()
            try:
                self._seat(work, free)
            except Exception as exc:  # never let the thread die with readers waiting
                log.exception("seating a request of %s failed", self.name)
                work.error = InternalError(f"llama.cpp failed while seating the request: {exc}", restart=True)
                self._forget(free)
                self._cond.notify_all()
                continue
            self._running.append(work)
        return [
            w
            for w in self._running
            if not w.closed
            and w.error is None
            and len(w.out) < LOOKAHEAD
            and w.pos < self.n_ctx  # a reader stops at its room; never past the context
        ]

    def _seat(self, work: Work, free: list[_Sequence]) -> None:
        """Give ``work`` the free sequence whose cache shares the longest start with its prompt,
        or restore a longer saved prefix into a free sequence; save what a sequence gives up."""
        prompt = np.asarray(work.prompt, dtype=np.int32)

        def usable(n: int, aligned: int) -> int:
            n = min(n, len(work.prompt) - 1)  # the last prompt token gives the logits
            if work.seeded:  # only what a cold start would have computed the same
                n = min(n, aligned)
                n -= n % SEEDED_CHUNK
            return n

        def reusable(sequence: _Sequence) -> int:
            return usable(common_start(np.asarray(sequence.tokens, dtype=np.int32), prompt), sequence.aligned)

        # the longest start; among equals, the sequence that loses least (empty, or saved)
        sequence = max(free, key=lambda s: (reusable(s), s.saved - len(s.tokens)))
        keep = reusable(sequence)
        saved, length = self.cache.longest(prompt)
        length = usable(length, saved.aligned) if saved is not None else 0
        if saved is not None and length >= keep + RESTORE_MIN_TOKENS:
            sequence = min(free, key=lambda s: len(s.tokens) - s.saved)  # the least to lose
            self.cache.touch(saved)  # saving what the sequence holds puts it out last
            self._save(sequence, keep=0)
            keep = length if self._restore(saved, sequence) else 0
            if keep:
                self.cache.used(saved, keep)
        else:
            self._save(sequence, keep)
        llama_cpp.llama_memory_seq_rm(self._memory, sequence.seq, keep, -1)
        sequence.cut(keep)
        sequence.busy = True
        work.sequence = sequence
        work.cached = keep
        work.pos = keep
        work.todo = work.prompt[keep:]

    def _forget(self, free: list[_Sequence]) -> None:
        """Empty the caches of ``free`` sequences, whose bookkeeping a failure may have left
        unlike what they hold: a later request computes its prompt rather than trust them."""
        for sequence in free:
            if not sequence.busy:
                llama_cpp.llama_memory_seq_rm(self._memory, sequence.seq, -1, -1)
                sequence.tokens, sequence.aligned, sequence.saved = [], 0, 0

    def _save(self, sequence: _Sequence, keep: int) -> None:
        """Copy the cache of ``sequence`` to the prefix cache if keeping only ``keep`` of its
        tokens would lose enough that nothing saved holds."""
        if len(sequence.tokens) - max(keep, sequence.saved) < SAVE_MIN_TOKENS:
            return
        tokens = np.asarray(sequence.tokens, dtype=np.int32)
        if self.cache.covers(tokens, sequence.aligned):
            sequence.saved = len(tokens)
            return
        size = llama_cpp.llama_state_seq_get_size(self.ctx, sequence.seq)
        if not self.cache.fits(size):
            return
        state = (ctypes.c_ubyte * size)()
        wrote = llama_cpp.llama_state_seq_get_data(self.ctx, state, size, sequence.seq)
        if wrote != size:
            log.warning("llama.cpp saved %d of %d bytes of a sequence of %s", wrote, size, self.name)
            return
        self.cache.put(SavedPrefix(tokens, state, sequence.aligned))
        sequence.saved = len(tokens)

    def _restore(self, saved: SavedPrefix, sequence: _Sequence) -> bool:
        """Copy a saved prefix into ``sequence``'s cache; False (and an empty cache) if llama.cpp
        would not take it."""
        llama_cpp.llama_memory_seq_rm(self._memory, sequence.seq, -1, -1)
        read = llama_cpp.llama_state_seq_set_data(self.ctx, saved.state, saved.size, sequence.seq)
        if read == 0:
            log.warning("llama.cpp could not restore a saved prefix of %s; computing it", self.name)
            llama_cpp.llama_memory_seq_rm(self._memory, sequence.seq, -1, -1)
            sequence.tokens, sequence.aligned, sequence.saved = [], 0, 0
            return False
        sequence.tokens = saved.tokens.tolist()
        sequence.aligned = saved.aligned
        sequence.saved = len(sequence.tokens)
        return True

    def _step(self, group: list[Work]) -> None:
        batch = self._batch
        n = 0
        draws: list[tuple[Work, int, list[int]]] = []  # (work, its first logits' index, its draft)
        added: list[tuple[Work, list[int]]] = []

        def add(work: Work, tokens: list[int], outputs: int) -> None:
            """Put ``tokens`` in the batch; the last ``outputs`` of them give logits."""
            nonlocal n
            assert work.sequence is not None
            for i, token in enumerate(tokens):
                batch.token[n] = token
                batch.pos[n] = work.pos + i
                batch.n_seq_id[n] = 1
                batch.seq_id[n][0] = work.sequence.seq
                batch.logits[n] = i >= len(tokens) - outputs
                n += 1
            if outputs:
                draws.append((work, n - outputs, tokens[len(tokens) - outputs + 1 :]))
            added.append((work, tokens))

        generating = [w for w in group if not w.todo]
        for work, draft in zip(generating, self._drafts(generating), strict=True):
            assert work.last is not None
            add(work, [work.last, *draft], 1 + len(draft))
        budget = PREFILL_BUDGET if generating else N_BATCH
        for work in group:  # in the order they came
            if not work.todo or n >= N_BATCH or budget <= 0:
                continue
            chunk = SEEDED_CHUNK - work.pos % SEEDED_CHUNK if work.seeded else budget
            take = work.todo[: min(chunk, N_BATCH - n)]
            budget -= len(take)
            add(work, take, 1 if len(take) == len(work.todo) else 0)
        batch.n_tokens = n
        rc = llama_cpp.llama_decode(self.ctx, batch)
        if rc != 0:
            # A failed decode leaves the context in an unknown state (docs/reliability.md).
            raise InternalError(f"llama_decode failed with status {rc} in {self.name}", restart=True)
        drawn = [(work, self._draw(work, index, draft)) for work, index, draft in draws]
        # a generating sequence keeps its next token and the draft tokens its draws matched
        kept = {id(work): len(out) for work, out in drawn if work in generating}
        for work, tokens in added:
            assert work.sequence is not None
            sequence = work.sequence
            valid = kept.get(id(work), len(tokens))
            if valid < len(tokens):  # a draft's rejected tail
                llama_cpp.llama_memory_seq_rm(self._memory, sequence.seq, work.pos + valid, -1)
            if work.seeded and work.todo and work.pos == sequence.aligned and len(tokens) == SEEDED_CHUNK:
                sequence.aligned += SEEDED_CHUNK  # a whole aligned chunk of its prompt, alone
            sequence.tokens.extend(tokens[:valid])
            work.pos += valid
            if work.todo:
                del work.todo[: len(tokens)]
        with self._cond:
            for work, out in drawn:
                work.last = out[-1][0]
                work.out.extend(out)
            self._cond.notify_all()

    def _drafts(self, generating: list[Work]) -> list[list[int]]:
        """A guess at the tokens after each generating request's next one (none where it does
        not speculate): never past a sequence's context, nor past the batch, where every next
        token comes first."""
        room = N_BATCH - len(generating)
        most = []
        for work in generating:
            n = 0 if work.drafter is None else min(room, work.drafter.draft_len, self.n_ctx - work.pos - 1)
            room -= n
            most.append(n)
        if self.draft_model is not None:
            wants = [
                Want(work.sequence.seq, work.drafter.tokens(), n)
                for work, n in zip(generating, most, strict=True)
                if work.drafter is not None and work.sequence is not None
            ]
            guessed = iter(self.draft_model.drafts(wants))
            return [next(guessed) if w.drafter is not None else [] for w in generating]
        return [
            w.drafter.draft(n) if isinstance(w.drafter, NgramDrafter) else []
            for w, n in zip(generating, most, strict=True)
        ]

    def _draw(self, work: Work, index: int, draft: list[int]) -> list[tuple[int, Entry | None]]:
        """Draw ``work``'s tokens from the logits at ``index`` on: one, then one more for each
        draft token the draw before matched (an end of text ends them)."""
        out: list[tuple[int, Entry | None]] = []
        for i in range(len(draft) + 1):
            token = int(llama_cpp.llama_sampler_sample(work.sampler.sampler, self.ctx, index + i))
            entry = None
            if work.top_logprobs is not None:
                logits = np.ctypeslib.as_array(
                    llama_cpp.llama_get_logits_ith(self.ctx, index + i), shape=(self.n_vocab,)
                )
                entry = self._logprob_of(logits, token, work.top_logprobs)
            out.append((token, entry))
            if i == len(draft) or token != draft[i] or self._is_eog(token):
                break
        if work.drafter is not None:
            if draft:
                work.drafter.judged(len(draft), len(out) - 1)
                self.drafted += len(draft)
                self.accepted += len(out) - 1
            work.drafter.extend([token for token, _ in out])
        return out

    def _fail(self, group: list[Work], exc: AllmError) -> None:
        with self._cond:
            for work in group:
                work.error = exc
            self._cond.notify_all()

    # -- what /status and the tests read ---------------------------------------------

    def cached_tokens(self, work: Work) -> int:
        return work.cached

    def cache_status(self) -> dict[str, int]:
        return self.cache.status()

    def draft_status(self) -> dict[str, int]:
        return {"drafted": self.drafted, "accepted": self.accepted}
