"""Speculative decoding with a draft model: a smaller model of the same tokenizer guesses ahead.

``draft = "model-id"`` names another GGUF model of the catalog. It is loaded beside the target,
with a context of its own holding a sequence for each of the target's: sequence ``i`` of the
draft follows what sequence ``i`` of the target serves. Each step, every speculating request's
text (its prompt and the tokens drawn so far) is brought into its draft sequence, computing only
what the sequence does not hold yet, and the draft model then decodes greedily, all requests in
one batch a token, until a request's draft is as long as it may be or the draft model is unsure
of its next token (its probability below DRAFT_P_MIN, llama-server's ``--draft-p-min``). The
target checks the guesses as it checks n-gram ones (allm/managers/text/batching.py): the text is
the one it gives without drafts.

A draft model is useful only when it shares the target's tokenizer, so that its tokens are the
target's: that is checked at load, token by token over the tokens both have (their sizes may
differ by padding), and refused naming both models. A draft never holds a token the target
does not have.
"""

from __future__ import annotations

import dataclasses
import logging

import llama_cpp
import numpy as np

from allm.kernel.codes import InternalError, LoadFailedError
from allm.managers.text.llama_load import sequences_context
from allm.managers.text.prefix_cache import common_start

log = logging.getLogger("allm.text.draft")

#: a draft stops where the draft model gives its likeliest next token less than this
DRAFT_P_MIN = 0.75
#: the most two vocabularies may differ in size and still be one tokenizer (a family's sizes
#: are padded differently: Qwen2.5's 0.5B has 151,936 tokens and its 7B 152,064); llama.cpp's
#: own bound (SPEC_VOCAB_MAX_SIZE_DIFFERENCE)
VOCAB_SIZE_SLACK = 128


@dataclasses.dataclass(frozen=True, slots=True)
class Want:
    """One request's part in a round of drafting: its sequence, its text, and the most tokens
    its draft may hold."""

    seq: int
    text: np.ndarray
    most: int


def check_same_vocab(target_id: str, target: llama_cpp.Llama, draft_id: str, draft: llama_cpp.Llama) -> None:
    """Refuse a draft model whose tokens are not the target's, naming the first difference."""

    def refuse(what: str) -> LoadFailedError:
        return LoadFailedError(
            f"{target_id}: its draft model {draft_id} has another tokenizer ({what}); "
            "a draft model must share the target's tokens",
            param="options.draft",
        )

    tv, dv = target._model.vocab, draft._model.vocab
    if llama_cpp.llama_vocab_type(tv) != llama_cpp.llama_vocab_type(dv):
        raise refuse("another kind of vocabulary")
    if abs(target.n_vocab() - draft.n_vocab()) > VOCAB_SIZE_SLACK:
        raise refuse(f"{draft.n_vocab()} tokens, the target {target.n_vocab()}")
    for name in ("bos", "eos"):
        special = getattr(llama_cpp, f"llama_vocab_{name}")
        ours, theirs = special(tv), special(dv)
        if ours != theirs:
            raise refuse(f"its {name} token is {theirs}, the target's {ours}")
    for token in range(min(target.n_vocab(), draft.n_vocab())):
        ours, theirs = llama_cpp.llama_vocab_get_text(tv, token), llama_cpp.llama_vocab_get_text(dv, token)
        if ours != theirs:
            raise refuse(f"token {token} is {theirs!r}, the target's {ours!r}")


class DraftModel:
    """A draft model's context of ``n_parallel`` sequences, driven by the batcher's thread."""

    def __init__(
        self,
        llm: llama_cpp.Llama,
        *,
        n_vocab: int,
        n_parallel: int,
        n_ctx: int,
        n_threads: int,
        n_batch: int,
        name: str,
    ) -> None:
        self.llm = llm  # the binding's Llama: its model, kept alive while the context is
        model = llm._model.model
        self.ctx = sequences_context(
            model, n_parallel=n_parallel, n_ctx=n_ctx, n_threads=n_threads, n_batch=n_batch, name=name
        )
        self.name = name
        self.n_batch = n_batch
        self.n_vocab = llm.n_vocab()
        self.usable = min(n_vocab, self.n_vocab)  # the tokens the target has too (``n_vocab``)
        self._memory = llama_cpp.llama_get_memory(self.ctx)
        self._batch = llama_cpp.llama_batch_init(n_batch, 0, 1)
        self._held: list[list[int]] = [[] for _ in range(n_parallel)]  # each sequence's cache

    def close(self) -> None:
        llama_cpp.llama_batch_free(self._batch)
        llama_cpp.llama_free(self.ctx)
        self.llm.close()

    def drafts(self, wants: list[Want]) -> list[list[int]]:
        """Each request's draft: the draft model's greedy continuation of its text."""
        drafts: list[list[int]] = [[] for _ in wants]
        live = [i for i, want in enumerate(wants) if want.most > 0]
        guesses = self._catch_up([wants[i] for i in live]) if live else []
        positions = {i: len(wants[i].text) for i in live}
        while live:
            going = []
            for i, (token, sure) in zip(live, guesses, strict=True):
                if not sure:
                    continue
                drafts[i].append(token)
                if len(drafts[i]) < wants[i].most:
                    going.append((i, token))
            if not going:
                break
            indexes = self._decode([(wants[i].seq, [token], positions[i]) for i, token in going])
            guesses = [self._likeliest(index) for index in indexes]
            for i, token in going:
                self._held[wants[i].seq].append(token)
                positions[i] += 1
            live = [i for i, _ in going]
        return drafts

    def _catch_up(self, wants: list[Want]) -> list[tuple[int, bool]]:
        """Bring each sequence's cache to its request's text, computing only what it does not
        hold; the likeliest token after each text, and whether the draft model is sure of it."""
        feeds = []
        for want in wants:
            held = np.asarray(self._held[want.seq], dtype=np.int32)
            keep = min(common_start(held, want.text), len(want.text) - 1)  # the last gives logits
            llama_cpp.llama_memory_seq_rm(self._memory, want.seq, keep, -1)
            del self._held[want.seq][keep:]
            feeds.append((want.seq, [int(t) for t in want.text[keep:]], keep))
        guess: dict[int, tuple[int, bool]] = {}
        while feeds:  # a long catch-up (a new prompt) goes in slices of a batch
            parts, rest, room = [], [], self.n_batch
            for seq, tokens, pos in feeds:
                take = tokens[:room]
                room -= len(take)
                if take:
                    parts.append((seq, take, pos))
                if len(take) < len(tokens):
                    rest.append((seq, tokens[len(take) :], pos + len(take)))
            indexes = self._decode(parts)
            unfinished = {seq for seq, _, _ in rest}
            for (seq, take, _), index in zip(parts, indexes, strict=True):
                self._held[seq].extend(take)
                if seq not in unfinished:  # read now: the next decode overwrites the logits
                    guess[seq] = self._likeliest(index)
            feeds = rest
        return [guess[want.seq] for want in wants]

    def _decode(self, parts: list[tuple[int, list[int], int]]) -> list[int]:
        """One llama_decode of ``parts`` (sequence, tokens, first position); the batch index of
        each part's last token, whose logits it computes."""
        batch = self._batch
        n = 0
        last = []
        for seq, tokens, pos in parts:
            for i, token in enumerate(tokens):
                batch.token[n] = token
                batch.pos[n] = pos + i
                batch.n_seq_id[n] = 1
                batch.seq_id[n][0] = seq
                batch.logits[n] = i == len(tokens) - 1
                n += 1
            last.append(n - 1)
        batch.n_tokens = n
        rc = llama_cpp.llama_decode(self.ctx, batch)
        if rc != 0:
            raise InternalError(
                f"llama_decode failed with status {rc} in the draft model {self.name}", restart=True
            )
        return last

    def _likeliest(self, index: int) -> tuple[int, bool]:
        """The draft model's likeliest token at ``index``, and whether it is sure enough of it."""
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.ctx, index), shape=(self.n_vocab,))
        token = int(np.argmax(logits[: self.usable]))
        p = 1.0 / float(np.exp(logits - logits[token]).sum())
        return token, p >= DRAFT_P_MIN
