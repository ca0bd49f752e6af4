"""HF-style safetensors directories: checked, then served by one of three backends.

mlx-lm on Apple silicon, ONNX Runtime GenAI on Windows, transformers + torch
elsewhere (``safetensors_backends.py`` holds mlx-lm's and transformers',
``onnx_engine.py`` the onnx backend and its conversion).

Before any backend sees the directory, ``check_directory`` reads what it can
cheaply and names what is wrong, each as its code:

    config.json missing                         FORMAT_MISMATCH (detection)
    config.json or tokenizer.json not JSON      MODEL_CORRUPT
    a weight file's header damaged or cut       MODEL_CORRUPT
    model_type outside the supported list       UNSUPPORTED (the type is named)
    tokenizer or a listed weight file missing   LOAD_FAILED (the file is named)

Nothing here reaches for a model hub: paths are checked first and the
offline switches are set before the libraries load.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import threading
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import jinja2

from allm.kernel.codes import (
    InternalError,
    LoadFailedError,
    ModelCorruptError,
    OomRamError,
    OomVramError,
    UnsupportedError,
)
from allm.kernel.contract import Reply, RequestContext
from allm.managers.files.safetensors import check_safetensors_file
from allm.managers.text.chat_format import Family, family_of, render_chat, thinks
from allm.managers.text.chat_grammar import json_gbnf
from allm.managers.text.chat_plan import plan_reply
from allm.managers.text.generation import run_chat, run_generation
from allm.managers.text.guided import GuideTokenizer, guide_for
from allm.managers.text.options import (
    BACKENDS,
    DEFAULT_N_CTX,
    check_safetensors_options,
    preferred_backend,
)
from allm.managers.text.request import ChatRequest, chat_request, prompt_of
from allm.managers.text.safetensors_backends import Backend, open_backend
from allm.managers.text.sampling import Sampling, TokenPicker

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ALL = frozenset({"mlx", "transformers", "onnx"})
#: config.json model_type → the backends that run it
ARCHITECTURES: Mapping[str, frozenset[str]] = {
    "llama": ALL,
    "mistral": ALL,
    "qwen2": ALL,
    "qwen": frozenset({"mlx"}),  # the original Qwen: transformers (and so the ONNX builder) lacks it
    "phi3": ALL,
    "phi": ALL,
    "gemma": ALL,
    "gemma2": ALL,
    "nemotron": ALL,
    "gpt_oss": ALL,
}
#: what a chat template refuses messages with, on every backend (transformers renders it, for
#: mlx-lm and onnx too): jinja2's own errors, which its ``raise_exception`` raises as well
TEMPLATE_REFUSALS: tuple[type[Exception], ...] = (jinja2.TemplateError,)


@dataclasses.dataclass(frozen=True, slots=True)
class DirectoryInfo:
    path: Path
    model_type: str
    config: Mapping[str, Any]
    weight_bytes: int
    mxfp4: bool  # experts in the MXFP4 layout of gpt-oss's original release
    files: tuple[Path, ...] = ()  # the weight files


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise LoadFailedError(f"{path.parent}: no {path.name} ({what})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelCorruptError(f"{path}: {what} is not valid JSON: {exc}") from None


def check_directory(path: Path) -> DirectoryInfo:
    config = _read_json(path / "config.json", "the model configuration")
    if not isinstance(config, dict):
        raise ModelCorruptError(f"{path}/config.json is not a JSON object")
    model_type = config.get("model_type")
    if not isinstance(model_type, str):
        raise ModelCorruptError(f"{path}/config.json has no model_type")
    if model_type not in ARCHITECTURES:
        raise UnsupportedError(
            f"model_type {model_type!r} is not supported (supported: {', '.join(sorted(ARCHITECTURES))})"
        )
    if (path / "tokenizer.json").is_file():
        _read_json(path / "tokenizer.json", "the tokenizer")
    elif not (path / "tokenizer.model").is_file():
        raise LoadFailedError(f"{path}: no tokenizer (tokenizer.json or tokenizer.model)")
    if (path / "tokenizer_config.json").is_file():
        _read_json(path / "tokenizer_config.json", "the tokenizer configuration")
    index = path / "model.safetensors.index.json"
    if index.is_file():
        mapping = _read_json(index, "the weight index").get("weight_map", {})
        files = sorted({path / name for name in mapping.values()})
    else:
        files = sorted(path.glob("*.safetensors"))
    if not files:
        raise LoadFailedError(f"{path}: no *.safetensors weight files")
    for file in files:
        if not file.is_file():
            raise LoadFailedError(f"{path}: weight file {file.name} (listed in the index) is missing")
    total = sum(check_safetensors_file(f) for f in files)
    quant = config.get("quantization_config") or {}
    return DirectoryInfo(path, model_type, config, total, quant.get("quant_method") == "mxfp4", tuple(files))


def context_of(info: DirectoryInfo, options: Mapping[str, Any]) -> int:
    """The context a model is served with: ``n_ctx``, else 4096, never past what it was trained for."""
    trained = int(info.config.get("max_position_embeddings") or DEFAULT_N_CTX)
    return min(int(options.get("n_ctx") or DEFAULT_N_CTX), trained)


def kv_cache_bytes_of(info: DirectoryInfo, options: Mapping[str, Any]) -> int:
    """The key/value cache a full context takes: keys and values, per layer, per KV head."""
    config = info.config
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    layers = int(text.get("num_hidden_layers") or 0)
    heads = int(text.get("num_attention_heads") or 1)
    kv_heads = int(text.get("num_key_value_heads") or heads)
    head_dim = int(text.get("head_dim") or (int(text.get("hidden_size") or 0) // max(1, heads)))
    dtype = str(options.get("dtype", "float32"))
    element = 2 if dtype in ("bfloat16", "float16") or options.get("backend") == "mlx" else 4
    return 2 * layers * context_of(info, options) * kv_heads * head_dim * element


READ_CHUNK_BYTES = 8 * 1024 * 1024


def read_ahead(files: Sequence[Path], progress: Callable[[float], None] | None) -> None:
    """Read the weight files once, reporting the fraction read as load progress.

    The backends load shard by shard without a hook; reading first gives the
    watchdog a steady signal however slow the disk, and leaves the backend
    to load from the page cache (the memory budget already counted the weights).
    """
    if progress is None:
        return
    total = sum(f.stat().st_size for f in files) or 1
    done = 0
    buffer = bytearray(READ_CHUNK_BYTES)
    for file in files:
        with file.open("rb", buffering=0) as f:
            while n := f.readinto(buffer):
                done += n
                progress(0.9 * done / total)  # the last tenth: the backend's own load


def choose_backend(requested: str, model_type: str) -> str:
    if requested not in BACKENDS:
        raise LoadFailedError(
            f"option backend must be one of {list(BACKENDS)}, got {requested!r}", param="options.backend"
        )
    able = ARCHITECTURES[model_type]
    if requested == "auto":
        preferred = preferred_backend()
        return preferred if preferred in able else sorted(able)[0]
    if requested not in able:
        raise UnsupportedError(
            f"model_type {model_type!r} does not run on the {requested} backend", param="options.backend"
        )
    return requested


class _TextDiff:
    """Detokenizes by decoding all generated tokens and emitting what is new.

    Holds back a trailing replacement character: the next token may complete it.
    """

    def __init__(self, decode: Any) -> None:
        self.decode = decode
        self.ids: list[int] = []
        self.sent = 0
        self.pending = False  # bytes of an unfinished character are held back

    def feed(self, token: int) -> str:
        self.ids.append(token)
        text = self.decode(self.ids)
        self.pending = text.endswith("\ufffd")
        if self.pending:
            return ""
        new, self.sent = text[self.sent :], len(text)
        return new

    def flush(self) -> str:
        text = self.decode(self.ids)
        new, self.sent = text[self.sent :], len(text)
        return new


class SafetensorsEngine:
    """One model on one backend; one request at a time.

    ``backend``: a backend ready to be made (the onnx one, whose files ``onnx_engine.load``
    converted and read first); otherwise the option ``backend`` picks one here.
    """

    def __init__(
        self,
        model_id: str,
        info: DirectoryInfo,
        options: Mapping[str, Any],
        progress: Callable[[float], None] | None = None,
        backend: Callable[[], Backend] | None = None,
    ) -> None:
        self.model_id = model_id
        self.lock = threading.Lock()
        name = "onnx"
        if backend is None:
            check_safetensors_options(model_id, options)
            name = choose_backend(str(options.get("backend", "auto")), info.model_type)

            def backend() -> Backend:
                read_ahead(info.files, progress)
                return open_backend(name, info, options)

        try:
            self.backend: Backend = backend()
        except MemoryError as exc:
            raise OomRamError(f"out of host memory loading {model_id}") from exc
        except (OSError, ValueError, KeyError, RuntimeError, TypeError) as exc:
            if "out of memory" in str(exc).lower() and "cuda" in str(exc).lower():
                raise OomVramError(f"out of GPU memory loading {model_id}: {exc}") from exc
            raise LoadFailedError(f"{name} could not load {model_id}: {exc}") from exc
        self.n_ctx = min(context_of(info, options), self.backend.n_ctx)
        text_config = info.config.get("text_config")
        self.n_vocab = int(info.config.get("vocab_size") or (text_config or {}).get("vocab_size") or 0)
        self._picker: TokenPicker | None = None
        template = getattr(self.backend.hf_tokenizer, "chat_template", None)
        template = template if isinstance(template, str) else None
        self.family = family_of(template)
        self.think = thinks(template)
        self._guide_tokenizer: GuideTokenizer | None = None
        if progress is not None:
            progress(1.0)

    def close(self) -> None:
        # Dropping the last reference frees the backend's weights and caches (torch, mlx and
        # ONNX Runtime free them when collected); only a second close finds none to drop.
        with contextlib.suppress(AttributeError):
            del self.backend

    def _chat_prompt(self, req: ChatRequest) -> tuple[list[int], str]:
        """A chat request through the model's chat template: the prompt's tokens, and its text where
        it tells whether the prompt opened <think>."""
        backend = self.backend
        if not getattr(backend.hf_tokenizer, "chat_template", None):
            raise UnsupportedError(f"{self.model_id} has no chat template; use completions", param="model")

        def render(messages: list[dict[str, Any]], **extras: Any) -> tuple[list[int], str]:
            ids = backend.chat_ids(messages, **extras)
            return ids, backend.chat_text(messages, **extras) if self.think else ""

        return render_chat(self.model_id, req, self.family, render, TEMPLATE_REFUSALS)

    def count(self, ctx: RequestContext) -> Reply:
        """The tokens of a chat request's prompt, exactly as ``chat`` renders it; nothing is generated."""
        prompt, _text = self._chat_prompt(chat_request(ctx.params))
        return Reply({"input_tokens": len(prompt)})

    def chat(self, ctx: RequestContext) -> Reply:
        req = chat_request(ctx.params)
        family = self.family
        prompt, text = self._chat_prompt(req)
        self._check_fits(prompt, "messages")
        plan, sampling = plan_reply(req, family, think=self.think, prompt=text)
        if self.n_vocab:
            sampling.check_vocab(self.n_vocab)
        source = _Source(self, sampling, special=family is not Family.GENERIC)
        with self.lock, self._errors():
            try:
                return run_chat(
                    ctx,
                    source,
                    prompt,
                    plan,
                    sampling,
                    room=self.n_ctx - len(prompt),
                    model_id=self.model_id,
                    logprob_of=self._logprob_of(sampling),
                )
            finally:
                self._picker = None

    def complete(self, ctx: RequestContext) -> Reply:
        prompt = self.backend.text_ids(prompt_of(ctx.params))
        return self._generate(ctx, prompt, Sampling.from_params(ctx.params), param="prompt")

    def embed(self, ctx: RequestContext) -> Reply:
        raise UnsupportedError(f"{self.model_id}: embeddings need a GGUF model here", param="model")

    def _logprob_of(self, sampling: Sampling) -> Callable[[int], dict[str, Any]] | None:
        """What the token loop calls for each token's logprobs, when the request asks for them."""
        if not sampling.logprobs:
            return None
        top_n = sampling.top_logprobs
        return lambda token: self.logprob_entry(token, top_n)

    def _check_fits(self, prompt: list[int], param: str) -> None:
        if len(prompt) >= self.n_ctx:
            raise UnsupportedError(
                f"the prompt is {len(prompt)} tokens, "
                f"but {self.model_id}'s context holds {self.n_ctx} tokens",
                reason="context_length_exceeded",
                param=param,
            )

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        """A backend's failure while generating, as its code."""
        try:
            yield
        except MemoryError as exc:
            raise OomRamError(f"out of host memory generating with {self.model_id}") from exc
        except RuntimeError as exc:
            raise InternalError(f"{self.backend.name} failed while generating: {exc}") from exc

    def picker(self, sampling: Sampling, gbnf: str | None, *, client_schema: bool) -> TokenPicker:
        """A new picker for one generation, under ``gbnf`` when given (guided.py)."""
        guide = None
        if gbnf is not None:
            if self._guide_tokenizer is None:
                width = self.n_vocab or len(self.backend.hf_tokenizer)
                self._guide_tokenizer = GuideTokenizer(self.backend.hf_tokenizer, width, self.backend.eos)
            guide = guide_for(self._guide_tokenizer, gbnf, client_schema=client_schema)
        self._picker = picker = TokenPicker(sampling, sampling.seed_or_random(), guide)
        return picker

    def _generate(self, ctx: RequestContext, prompt: list[int], sampling: Sampling, *, param: str) -> Reply:
        self._check_fits(prompt, param)
        if self.n_vocab:
            sampling.check_vocab(self.n_vocab)
        eos = self.backend.eos
        with self.lock, self._errors():
            picker = self.picker(sampling, json_gbnf(sampling), client_schema=True)
            try:
                return run_generation(
                    ctx,
                    self.backend.tokens(prompt, picker),
                    _TextDiff(self.backend.decode),
                    lambda token: token in eos,
                    sampling,
                    prompt_tokens=len(prompt),
                    room=self.n_ctx - len(prompt),
                    stream=ctx.stream,
                    model_id=self.model_id,
                    logprob_of=self._logprob_of(sampling),
                )
            finally:
                self._picker = None

    def logprob_entry(self, token: int, top_n: int) -> dict[str, Any]:
        """OpenAI's logprobs entry for ``token``, just yielded by generation.

        Call it once per token, in order, before the next token is pulled: the
        model's own distribution there (log-softmax of the raw logits, before any
        sampling step), as allm/managers/text/sampling.py documents. A token's bytes are
        its decoded text in UTF-8 (a token that ends mid-character reads U+FFFD).
        """
        if self._picker is None:
            raise InternalError("logprob_entry called outside a generation")
        return self._picker.logprob_entry(token, top_n, self.backend.piece)


class _Source:
    """The chat loop's tokens from a safetensors backend (generation.TokenSource)."""

    def __init__(self, engine: SafetensorsEngine, sampling: Sampling, *, special: bool) -> None:
        self.engine = engine
        self.sampling = sampling
        self.special = special  # a tool format's markers may be special tokens: keep their text

    def tokens(self, prompt: list[int], grammar: str | None) -> Generator[int, None, None]:
        gbnf, client = (grammar, False) if grammar is not None else (json_gbnf(self.sampling), True)
        picker = self.engine.picker(self.sampling, gbnf, client_schema=client)
        yield from self.engine.backend.tokens(prompt, picker)

    def detokenizer(self, prompt: list[int]) -> _TextDiff:
        decode = self.engine.backend.decode
        special = self.special
        return _TextDiff(lambda ids: decode(ids, special))

    def is_end(self, token: int) -> bool:
        return token in self.engine.backend.eos
