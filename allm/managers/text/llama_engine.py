"""GGUF models through llama.cpp (llama-cpp-python): chat, completion, embeddings.

Generation is driven token by token here rather than through the binding's
``create_completion``, so that: each token leaves as it is produced; cancel
is checked between tokens; ``max_tokens`` is a hard limit (the binding
overshoots it while text ends mid UTF-8 sequence); usage is the tokenizer's
count.  Concurrent requests for one model are decoded together, a sequence
each, in one llama.cpp context (``batching.Batcher``: continuous batching).
Every binding call that can fail is wrapped and raises a coded error.
"""

from __future__ import annotations

import codecs
import ctypes
import logging
import threading
from collections.abc import Callable, Generator
from typing import Any

import jinja2
import llama_cpp
import llama_cpp._internals as llama_internals
from llama_cpp.llama_chat_format import Jinja2ChatFormatter
from llama_cpp.llama_grammar import LlamaGrammar

from allm.kernel.codes import InternalError, UnsupportedError
from allm.kernel.contract import Reply, RequestContext
from allm.managers.files.gguf import GGUFHeader
from allm.managers.text.batching import N_BATCH, Batcher
from allm.managers.text.chat_format import Family, family_of, render_chat, thinks
from allm.managers.text.chat_grammar import json_gbnf
from allm.managers.text.chat_plan import plan_reply
from allm.managers.text.draft_model import DraftModel, check_same_vocab
from allm.managers.text.generation import ChatDetokenizer, run_chat, run_generation
from allm.managers.text.llama_load import load_llama, prefix_cache_bytes
from allm.managers.text.options import LlamaOptions
from allm.managers.text.request import ChatRequest, chat_request, prompt_of
from allm.managers.text.sampling import PENALTY_LAST_N, Sampling, logprob_entry
from allm.managers.text.speculation import Drafter

log = logging.getLogger("allm.text.llama")

CONTEXT_EXCEEDED = "context_length_exceeded"
#: the context the binding's own Llama keeps: it only tokenizes (generation has the batcher's)
TOKENIZER_CTX = 256
#: the options' cache types as ggml names them
GGML_TYPES = {
    "f16": llama_cpp.GGML_TYPE_F16,
    "q8_0": llama_cpp.GGML_TYPE_Q8_0,
    "q4_0": llama_cpp.GGML_TYPE_Q4_0,
}
#: what llama-cpp-python's Jinja2ChatFormatter raises for a template that refuses the messages:
#: jinja2's own errors, and the ValueError of the ``raise_exception`` it gives the template
TEMPLATE_REFUSALS: tuple[type[Exception], ...] = (jinja2.TemplateError, ValueError)


class LlamaEngine:
    """One GGUF model in one llama.cpp context; one request at a time."""

    def __init__(
        self,
        model_id: str,
        header: GGUFHeader,
        options: LlamaOptions,
        progress: Callable[[float], None] | None = None,
        reserve_embedder: Callable[[], None] | None = None,
        *,
        draft: tuple[str, GGUFHeader] | None = None,
    ) -> None:
        self.model_id = model_id
        self.header = header
        self.options = options
        self.lock = threading.Lock()  # the embedding context: one request at a time
        self._embedder: llama_cpp.Llama | None = None
        self._reserve_embedder = reserve_embedder
        # The binding's Llama gives the model, its tokenizer and metadata; its own context is
        # left tiny: generation runs in the batcher's, a sequence per request.
        share = 1.0 if draft is None else header.file_size / (header.file_size + draft[1].file_size)
        own = _part(progress, 0.0, share)
        self.llm = load_llama(model_id, header, options, n_ctx=TOKENIZER_CTX, embedding=False, progress=own)
        self.n_ctx = options.n_ctx
        draft_model = None
        try:
            if draft is not None:
                draft_model = self._load_draft(*draft, _part(progress, share, 1.0 - share))
            self.batcher = Batcher(
                self.llm._model.model,
                n_parallel=options.n_parallel,
                n_ctx=options.n_ctx,
                n_threads=options.n_threads or 1,
                n_vocab=self.llm.n_vocab(),
                logprob_of=lambda logits, token, top_n: logprob_entry(
                    logits, token, top_n, self._token_bytes
                ),
                cache_bytes=prefix_cache_bytes(header, options),
                speculative=options.speculative,
                draft_model=draft_model,
                is_eog=lambda token: bool(llama_cpp.llama_vocab_is_eog(self.llm._model.vocab, token)),
                type_k=GGML_TYPES[options.cache_type_k],
                type_v=GGML_TYPES[options.cache_type_v],
                name=model_id,
            )
        except BaseException:
            if draft_model is not None:
                draft_model.close()
            self.llm.close()
            raise
        meta = self.llm.metadata
        template = meta.get("tokenizer.chat_template")
        self._formatter = None
        self.family = family_of(template)
        self.think = thinks(template)
        if template:
            eos = self.llm.token_eos()
            bos = self.llm.token_bos()
            self._formatter = Jinja2ChatFormatter(
                template=template,
                eos_token=self._piece(eos),
                bos_token=self._piece(bos) if bos >= 0 else "",
                add_generation_prompt=True,
                stop_token_ids=[eos],
            )
        self._add_bos = meta.get("tokenizer.ggml.add_bos_token", "true") != "false"

    def _load_draft(
        self, draft_id: str, header: GGUFHeader, progress: Callable[[float], None] | None
    ) -> DraftModel:
        """The draft model in a context of as many sequences as the target's; refused (and
        freed) if its tokens are not the target's."""
        options = self.options
        llm = load_llama(draft_id, header, options, n_ctx=TOKENIZER_CTX, embedding=False, progress=progress)
        try:
            check_same_vocab(self.model_id, self.llm, draft_id, llm)
            return DraftModel(
                llm,
                n_vocab=self.llm.n_vocab(),
                n_parallel=options.n_parallel,
                n_ctx=options.n_ctx,
                n_threads=options.n_threads or 1,
                n_batch=N_BATCH,
                name=draft_id,
            )
        except BaseException:
            llm.close()
            raise

    def engine_stats(self) -> dict[str, dict[str, int]]:
        """What /status and /metrics show of it: the saved prefixes (entries, bytes, their
        bound, restores) and the drafts decoded and kept."""
        return {"prefix_cache": self.batcher.cache_status(), "speculative": self.batcher.draft_status()}

    def _piece(self, token: int) -> str:
        return self.llm.detokenize([token], special=True).decode("utf-8", "replace")

    def close(self) -> None:
        """Free the native objects, each even when another failed; a failure is logged with
        what may have leaked (the pool goes on unloading the others)."""
        self._free("the batch context (a llama.cpp context and batch)", self.batcher.close)
        self._free("the model (its llama.cpp model and tokenizing context)", self.llm.close)
        if self._embedder is not None:
            self._free("the embedding context (a second llama.cpp model and context)", self._embedder.close)

    def _free(self, what: str, close: Callable[[], None]) -> None:
        try:
            close()
        except Exception:
            log.exception("unloading %s: freeing %s failed; it may have leaked", self.model_id, what)

    # -- operations ---------------------------------------------------------------

    def _chat_prompt(self, req: ChatRequest) -> tuple[str, list[int]]:
        """A chat request through the model's chat template: the prompt's text and its tokens."""
        if self._formatter is None:
            raise UnsupportedError(f"{self.model_id} has no chat template; use completions", param="model")
        formatter = self._formatter
        text = render_chat(
            self.model_id,
            req,
            self.family,
            lambda messages, **extras: formatter(messages=messages, **extras).prompt,
            TEMPLATE_REFUSALS,
        )
        return text, self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)

    def count(self, ctx: RequestContext) -> Reply:
        """The tokens of a chat request's prompt, exactly as ``chat`` renders it; nothing is generated."""
        _text, prompt = self._chat_prompt(chat_request(ctx.params))
        return Reply({"input_tokens": len(prompt)})

    def chat(self, ctx: RequestContext) -> Reply:
        req = chat_request(ctx.params)
        family = self.family
        text, prompt = self._chat_prompt(req)
        self._check_not_empty(prompt, "messages")
        self._check_fits(len(prompt), 1, "messages")
        plan, sampling = plan_reply(req, family, think=self.think, prompt=text)
        drawn = _Drawn()
        source = _LlamaSource(self, ctx, sampling, drawn, special=family is not Family.GENERIC)
        reply = run_chat(
            ctx,
            source,
            prompt,
            plan,
            sampling,
            room=self.n_ctx - len(prompt),
            model_id=self.model_id,
            logprob_of=drawn.logprob_of(sampling),
            cached_tokens=lambda: drawn.cached or 0,
        )
        reply.data["cached_tokens"] = drawn.cached or 0  # prompt tokens its sequence held already
        if drawn.drafter is not None:  # it speculated: its draft tokens, and the ones kept
            reply.data["speculative"] = {"drafted": drawn.drafter.drafted, "accepted": drawn.drafter.accepted}
        return reply

    def complete(self, ctx: RequestContext) -> Reply:
        prompt = prompt_of(ctx.params)
        sampling = Sampling.from_params(ctx.params)
        tokens = self.llm.tokenize(prompt.encode("utf-8"), add_bos=self._add_bos, special=False)
        return self._generate(ctx, tokens, sampling, stream=ctx.stream, param="prompt")

    def embed(self, ctx: RequestContext) -> Reply:
        inputs = ctx.params.get("input")
        if isinstance(inputs, str):
            inputs = [inputs]
        if not isinstance(inputs, list) or not inputs or not all(isinstance(s, str) for s in inputs):
            raise UnsupportedError(
                "input must be a string or a list of strings", reason="invalid_request", param="input"
            )
        if self._embedder is None:
            if self._reserve_embedder is not None:
                self._reserve_embedder()  # its own cache counts against the budget
            # A second load of the model: a phase of its own for the watchdog.
            with ctx.phase(f"load of {self.model_id}'s embedding context", ctx.stall_limit_s):
                self._embedder = load_llama(
                    self.model_id,
                    self.header,
                    self.options,
                    n_ctx=self.options.n_ctx,
                    embedding=True,
                    progress=ctx.progress,
                )
        vectors = []
        used = 0
        for text in inputs:
            ctx.check()
            tokens = self._embedder.tokenize(text.encode("utf-8"), add_bos=self._add_bos)
            self._check_not_empty(tokens, "input")
            self._check_fits(len(tokens), 0, "input")
            used += len(tokens)
            vectors.append([float(x) for x in self._embedder.embed(text, normalize=True)])
        return Reply({"embeddings": vectors, "usage": {"prompt_tokens": used}})

    # -- generation ---------------------------------------------------------------

    def _check_not_empty(self, tokens: list[int], param: str) -> None:
        # The tokenizer may drop every character (control bytes): llama.cpp asserts or
        # fails to decode on no tokens, and a failed decode has damaged its heap here.
        if not tokens:
            raise UnsupportedError(
                f"'{param}' holds no text {self.model_id}'s tokenizer keeps (nothing left to read)",
                reason="invalid_request",
                param=param,
            )

    def _check_fits(self, n_prompt: int, n_min_new: int, param: str) -> None:
        n_ctx = self.n_ctx
        if n_prompt + n_min_new > n_ctx:
            raise UnsupportedError(
                f"the prompt is {n_prompt} tokens, but {self.model_id}'s context holds {n_ctx} tokens"
                + (f" and {n_min_new} must be left for the reply" if n_min_new else ""),
                reason=CONTEXT_EXCEEDED,
                param=param,
            )

    def _compile(self, gbnf: str) -> LlamaGrammar:
        """A grammar allm wrote itself (tool calls): one that fails to compile is allm's bug."""
        try:
            return LlamaGrammar.from_string(gbnf, verbose=False)
        except (ValueError, RuntimeError) as exc:
            raise InternalError(f"a tool-call grammar failed to compile: {exc}", restart=True) from exc

    def _grammar(self, sampling: Sampling) -> LlamaGrammar | None:
        try:
            gbnf = json_gbnf(sampling)
            if gbnf is not None:
                return LlamaGrammar.from_string(gbnf, verbose=False)
        except (ValueError, RuntimeError, TypeError, KeyError) as exc:
            # The gateway lets through only schemas the converter handles; one that still
            # fails went through llama.cpp's grammar parser, whose failures have been seen
            # to damage the heap for later requests (docs/reliability.md): restart.
            raise UnsupportedError(
                f"the JSON schema cannot be turned into a grammar: {exc}",
                reason="invalid_request",
                param="response_format",
                restart=True,
            ) from exc
        return None

    def _tokens(
        self,
        ctx: RequestContext,
        prompt: list[int],
        sampling: Sampling,
        drawn: _Drawn,
        gbnf: str | None = None,
    ) -> Generator[int, None, None]:
        """The request's tokens, drawn on its own sequence of the batcher's context."""
        sampling.check_vocab(self.llm.n_vocab())
        grammar = self._grammar(sampling) if gbnf is None else self._compile(gbnf)
        chain = self._sampler_chain(sampling, grammar, sampling.seed_or_random())
        work = self.batcher.start(
            prompt,
            chain,
            top_logprobs=sampling.top_logprobs if sampling.logprobs else None,
            seeded=sampling.seed is not None,
        )
        try:
            while True:
                token, entry = self.batcher.take(
                    work, cancelled=lambda: ctx.cancelled, time_left_s=ctx.time_left_s
                )
                if drawn.cached is None:
                    drawn.cached = work.cached
                    drawn.drafter = work.drafter
                drawn.entry = entry
                yield token
        finally:
            self.batcher.finish(work)

    def _sampler_chain(
        self, sampling: Sampling, grammar: LlamaGrammar | None, seed: int
    ) -> llama_internals.LlamaSampler:
        """llama.cpp's native samplers in the order of allm/managers/text/sampling.py."""
        chain = llama_internals.LlamaSampler()
        n_vocab = self.llm.n_vocab()
        if sampling.logit_bias:
            chain.add_logit_bias(n_vocab, dict(sampling.logit_bias))
        if sampling.penalized:
            chain.add_penalties(
                n_vocab,
                PENALTY_LAST_N,
                sampling.repeat_penalty,
                sampling.frequency_penalty,
                sampling.presence_penalty,
            )
        if grammar is not None:
            chain.add_grammar(self.llm._model, grammar)
        if sampling.temperature == 0:
            chain.add_greedy()
            return chain
        if sampling.top_k > 0:
            chain.add_top_k(sampling.top_k)
        if sampling.top_p < 1.0:
            chain.add_top_p(sampling.top_p, 1)
        if sampling.min_p > 0.0:
            chain.add_min_p(sampling.min_p, 1)
        chain.add_temp(sampling.temperature)
        chain.add_dist(seed)
        return chain

    def _token_bytes(self, token: int) -> bytes:
        """A token's own bytes: no leading space stripped, special tokens as their text."""
        vocab = self.llm._model.vocab
        size = 64
        while True:
            buffer = ctypes.create_string_buffer(size)
            n = llama_cpp.llama_token_to_piece(vocab, token, buffer, size, 0, True)
            if n >= 0:
                return buffer.raw[:n]
            size = -n

    def _generate(
        self, ctx: RequestContext, prompt: list[int], sampling: Sampling, *, stream: bool, param: str
    ) -> Reply:
        self._check_not_empty(prompt, param)
        self._check_fits(len(prompt), 1, param)
        vocab = self.llm._model.vocab
        drawn = _Drawn()
        reply = run_generation(
            ctx,
            self._tokens(ctx, prompt, sampling, drawn),
            _LlamaDetokenizer(self.llm, prompt),
            lambda token: bool(llama_cpp.llama_vocab_is_eog(vocab, token)),
            sampling,
            prompt_tokens=len(prompt),
            room=self.n_ctx - len(prompt),
            stream=stream,
            model_id=self.model_id,
            logprob_of=drawn.logprob_of(sampling),
        )
        reply.data["cached_tokens"] = drawn.cached or 0  # prompt tokens its sequence held already
        if drawn.drafter is not None:  # it speculated: its draft tokens, and the ones kept
            reply.data["speculative"] = {"drafted": drawn.drafter.drafted, "accepted": drawn.drafter.accepted}
        return reply


class _Drawn:
    """What the batcher said of one request's tokens: the last one's logprobs entry, and how
    many of its prompt tokens its sequence's cache already held."""

    def __init__(self) -> None:
        self.entry: dict[str, Any] | None = None
        self.cached: int | None = None
        self.drafter: Drafter | None = None

    def logprob_of(self, sampling: Sampling) -> Callable[[int], dict[str, Any]] | None:
        """What the token loop calls for each token's logprobs, when the request asks for them.

        The entries are the model's own distribution (the log-softmax of the raw logits),
        before logit_bias, penalties, grammar or any filter, as OpenAI's logprobs are; the
        batcher reads them when it draws the token."""
        if not sampling.logprobs:
            return None

        def entry(_token: int) -> dict[str, Any]:
            assert self.entry is not None
            return self.entry

        return entry


class _LlamaSource:
    """A LlamaEngine as the chat loop's TokenSource, for one request's sampling."""

    def __init__(
        self, engine: LlamaEngine, ctx: RequestContext, sampling: Sampling, drawn: _Drawn, *, special: bool
    ) -> None:
        self.engine = engine
        self.ctx = ctx
        self.sampling = sampling
        self.drawn = drawn
        self.special = special
        self.vocab = engine.llm._model.vocab

    def tokens(self, prompt: list[int], grammar: str | None) -> Generator[int, None, None]:
        return self.engine._tokens(self.ctx, prompt, self.sampling, self.drawn, grammar)

    def detokenizer(self, prompt: list[int]) -> ChatDetokenizer:
        return _LlamaDetokenizer(self.engine.llm, prompt, special=self.special)

    def is_end(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self.vocab, token))


class _LlamaDetokenizer:
    """Token bytes through an incremental UTF-8 decoder: no character is split.

    ``special``: control tokens show as their text, for models whose tool and
    channel markers are such tokens (``[TOOL_CALLS]``, ``<|channel|>``).
    """

    def __init__(self, llm: llama_cpp.Llama, prompt: list[int], *, special: bool = False) -> None:
        self.llm = llm
        self.previous = list(prompt[-4:])  # context for tokenizers that strip leading spaces
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.special = special

    @property
    def pending(self) -> bool:
        """Whether bytes of an unfinished character are held back."""
        return bool(self.decoder.getstate()[0])

    def feed(self, token: int) -> str:
        piece = self.llm.detokenize([token], prev_tokens=self.previous, special=self.special)
        self.previous = [*self.previous[-3:], token]
        return self.decoder.decode(piece)

    def flush(self) -> str:
        return self.decoder.decode(b"", final=True)


def _part(
    progress: Callable[[float], None] | None, start: float, share: float
) -> Callable[[float], None] | None:
    """A load's progress over ``share`` of the whole from ``start`` (a target and its draft
    model load one after the other)."""
    if progress is None:
        return None
    return lambda fraction: progress(start + fraction * share)
