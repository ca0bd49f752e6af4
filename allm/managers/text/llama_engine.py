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
import collections
import contextlib
import ctypes
import logging
import os
import shutil
import subprocess
import threading
from collections.abc import Callable, Generator, Iterator
from typing import Any

from allm.kernel.codes import InternalError, LoadFailedError, OomRamError, OomVramError, UnsupportedError
from allm.kernel.runtime import Reply, RequestContext
from allm.managers.text.batching import Batcher
from allm.managers.text.chat_format import Family, family_of, thinks
from allm.managers.text.generation import (
    ChatDetokenizer,
    chat_plan,
    chat_request,
    json_gbnf,
    plan_sampling,
    prompt_of,
    run_chat,
    run_generation,
    template_extras,
    template_messages,
)
from allm.managers.text.gguf_header import GGUFHeader
from allm.managers.text.options import LlamaOptions
from allm.managers.text.sampling import PENALTY_LAST_N, Sampling, logprob_entry

# OMP_WAIT_POLICY stays unset here (GNU OpenMP's default: spin briefly, then sleep): on a
# small model each token crosses many thread barriers, and PASSIVE (right for whisper.cpp
# and stable-diffusion.cpp, whose managers set it) made every one a sleep and a wake-up, a
# third of the speed at two threads (docs/agents.md; bench/gateway.py measures it).
os.environ.setdefault("GGML_NO_BACKTRACE", "1")

import llama_cpp
import llama_cpp._internals as llama_internals
from llama_cpp.llama_chat_format import Jinja2ChatFormatter
from llama_cpp.llama_grammar import LlamaGrammar

log = logging.getLogger("allm.text.llama")

CONTEXT_EXCEEDED = "context_length_exceeded"
#: the context the binding's own Llama keeps: it only tokenizes (generation has the batcher's)
TOKENIZER_CTX = 256

# llama.cpp explains a failed load only in its log: keep the last lines.
_LOG_LINES: collections.deque[str] = collections.deque(maxlen=50)


@llama_cpp.llama_log_callback  # type: ignore[untyped-decorator]
def _on_llama_log(level: int, text: bytes, _user_data: ctypes.c_void_p) -> None:
    line = text.decode("utf-8", "replace").strip()
    if line:
        _LOG_LINES.append(line)


llama_cpp.llama_log_set(_on_llama_log, ctypes.c_void_p(0))


def _llama_reason() -> str:
    """The most telling recent llama.cpp log line."""
    for line in reversed(_LOG_LINES):
        if any(w in line.lower() for w in ("error", "failed", "invalid", "unknown", "not ")):
            return line
    return _LOG_LINES[-1] if _LOG_LINES else "no reason logged"


def free_vram_bytes() -> int | None:
    """Free memory of the first NVIDIA GPU, or None where it cannot be read."""
    tool = shutil.which("nvidia-smi")
    if tool is None:
        return None
    try:
        done = subprocess.run(  # noqa: S603 - a fixed tool and arguments
            [tool, "--query-gpu=memory.free", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
        return int(done.stdout.split()[0]) * 1024 * 1024
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def check_gpu_fit(model_id: str, header: GGUFHeader, options: LlamaOptions) -> None:
    """Refuse GPU layers this build cannot offload, or that do not fit the GPU (OOM_VRAM)."""
    if options.n_gpu_layers == 0:
        return
    if not llama_cpp.llama_supports_gpu_offload():
        raise UnsupportedError(
            f"{model_id}: n_gpu_layers = {options.n_gpu_layers}, but this llama.cpp build has no GPU offload",
            param="n_gpu_layers",
        )
    layers = header.arch_int("block_count") or 1
    share = 1.0 if options.n_gpu_layers < 0 else min(1.0, options.n_gpu_layers / layers)
    need = int((header.file_size + options.n_parallel * kv_cache_bytes(header, options.n_ctx)) * share)
    free = free_vram_bytes()
    if free is not None and need > free:
        raise OomVramError(
            f"{model_id} needs about {need / 2**20:.0f} MiB of GPU memory for its offloaded layers; "
            f"{free / 2**20:.0f} MiB is free"
        )


def kv_cache_bytes(header: GGUFHeader, n_ctx: int) -> int:
    """Memory the f16 key/value cache of a context of n_ctx tokens takes."""
    layers = header.arch_int("block_count")
    embd = header.arch_int("embedding_length")
    heads = header.arch_int("attention.head_count") or 1
    kv_heads = header.arch_int("attention.head_count_kv") or heads
    return 2 * layers * n_ctx * (embd // heads) * kv_heads * 2


_PROGRESS_LOCK = threading.Lock()


@contextlib.contextmanager
def _load_progress(report: Callable[[float], None] | None) -> Iterator[None]:
    """Feed llama.cpp's load progress to ``report`` during one ``Llama()`` construction.

    llama-cpp-python builds its model parameters inside ``Llama.__init__`` from
    ``llama_model_default_params()`` and offers no way to pass llama.cpp's
    ``progress_callback``: hand it defaults that carry ours, for this load only.
    """
    if report is None:
        yield
        return

    def on_progress(fraction: float, _user_data: ctypes.c_void_p) -> bool:
        with contextlib.suppress(Exception):  # an exception must never unwind into C
            report(float(fraction))
        return True  # False would abort the load

    callback = llama_cpp.llama_progress_callback(on_progress)
    low_level = llama_cpp.llama_cpp
    original = low_level.llama_model_default_params

    def with_progress() -> Any:
        params = original()
        params.progress_callback = callback
        return params

    with _PROGRESS_LOCK:
        low_level.llama_model_default_params = with_progress
        try:
            yield
        finally:
            low_level.llama_model_default_params = original


class LlamaEngine:
    """One GGUF model in one llama.cpp context; one request at a time."""

    def __init__(
        self,
        model_id: str,
        header: GGUFHeader,
        options: LlamaOptions,
        progress: Callable[[float], None] | None = None,
        reserve_embedder: Callable[[], None] | None = None,
    ) -> None:
        self.model_id = model_id
        self.header = header
        self.options = options
        self.lock = threading.Lock()  # the embedding context: one request at a time
        self._embedder: llama_cpp.Llama | None = None
        self._reserve_embedder = reserve_embedder
        # The binding's Llama gives the model, its tokenizer and metadata; its own context is
        # left tiny: generation runs in the batcher's, a sequence per request.
        self.llm = self._load(embedding=False, progress=progress, n_ctx=TOKENIZER_CTX)
        self.n_ctx = options.n_ctx
        try:
            self.batcher = Batcher(
                self.llm._model.model,
                n_parallel=options.n_parallel,
                n_ctx=options.n_ctx,
                n_threads=options.n_threads or 1,
                n_vocab=self.llm.n_vocab(),
                logprob_of=lambda logits, token, top_n: logprob_entry(
                    logits, token, top_n, self._token_bytes
                ),
                name=model_id,
            )
        except BaseException:
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

    def _piece(self, token: int) -> str:
        return self.llm.detokenize([token], special=True).decode("utf-8", "replace")

    def _load(
        self, *, embedding: bool, progress: Callable[[float], None] | None, n_ctx: int | None = None
    ) -> llama_cpp.Llama:
        _LOG_LINES.clear()
        try:
            with _load_progress(progress):
                return llama_cpp.Llama(
                    str(self.header.path),
                    n_ctx=n_ctx or self.options.n_ctx,
                    n_threads=self.options.n_threads,
                    n_threads_batch=self.options.n_threads,
                    n_gpu_layers=self.options.n_gpu_layers,
                    embedding=embedding,
                    # A causal model has no pooling of its own: average its token states.
                    pooling_type=llama_cpp.LLAMA_POOLING_TYPE_MEAN if embedding else -1,
                    verbose=False,
                )
        except MemoryError as exc:
            raise OomRamError(f"out of host memory loading {self.model_id}") from exc
        except ValueError as exc:
            reason = _llama_reason()
            if self.options.n_gpu_layers and any(
                w in reason.lower() for w in ("cudamalloc", "out of memory")
            ):
                raise OomVramError(f"out of GPU memory loading {self.model_id}: {reason}") from exc
            raise LoadFailedError(f"llama.cpp could not load {self.model_id}: {reason}") from exc

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.batcher.close()
        with contextlib.suppress(Exception):
            self.llm.close()
        if self._embedder is not None:
            with contextlib.suppress(Exception):
                self._embedder.close()

    # -- operations ---------------------------------------------------------------

    def chat(self, ctx: RequestContext) -> Reply:
        req = chat_request(ctx.params)
        if self._formatter is None:
            raise UnsupportedError(f"{self.model_id} has no chat template; use completions", param="model")
        family = self.family
        extra = template_extras(req, family)
        try:
            text = self._formatter(
                messages=template_messages(req.messages, family, req.tools), **extra
            ).prompt
        except Exception as exc:
            raise UnsupportedError(f"{self.model_id}'s chat template refused the messages: {exc}") from exc
        prompt = self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        self._check_not_empty(prompt, "messages")
        self._check_fits(len(prompt), 1, "messages")
        thinking = self.think and text.rstrip().endswith("<think>")
        plan = chat_plan(req, family, think=self.think, thinking=thinking)
        sampling = plan_sampling(plan, req.sampling)
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
        )
        reply.data["cached_tokens"] = drawn.cached or 0  # prompt tokens its sequence held already
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
                self._embedder = self._load(embedding=True, progress=ctx.progress)
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
        return reply


class _Drawn:
    """What the batcher said of one request's tokens: the last one's logprobs entry, and how
    many of its prompt tokens its sequence's cache already held."""

    def __init__(self) -> None:
        self.entry: dict[str, Any] | None = None
        self.cached: int | None = None

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
