"""HF-style safetensors directories: mlx-lm on Apple silicon, ONNX Runtime GenAI on Windows,
transformers + torch elsewhere (``onnx_engine.py`` holds the onnx backend and its conversion).

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
import struct
import threading
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from allm.kernel.codes import (
    InternalError,
    LoadFailedError,
    ModelCorruptError,
    OomRamError,
    OomVramError,
    UnsupportedError,
)
from allm.kernel.runtime import Reply, RequestContext
from allm.managers.text.chat_format import Family, family_of, thinks
from allm.managers.text.generation import (
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
from allm.managers.text.guided import GuideTokenizer, guide_for
from allm.managers.text.options import (
    BACKENDS,
    DEFAULT_N_CTX,
    check_safetensors_options,
    default_threads,
    preferred_backend,
)
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
MAX_HEADER_BYTES = 100 * 1024 * 1024


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


def check_safetensors_file(path: Path) -> int:
    """Check one weight file's header against its size; returns the size in bytes."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ModelCorruptError(f"{path.name}: too short to be a safetensors file ({size} bytes)")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > min(size - 8, MAX_HEADER_BYTES):
                raise ModelCorruptError(f"{path.name}: header length {header_len} exceeds the file: damaged")
            header = json.loads(f.read(header_len))
    except FileNotFoundError:
        raise LoadFailedError(f"weight file not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelCorruptError(f"{path.name}: the safetensors header is not JSON: damaged ({exc})") from None
    if not isinstance(header, dict):
        raise ModelCorruptError(f"{path.name}: the safetensors header is not a map: damaged")
    data_bytes = size - 8 - header_len
    for name, spec in header.items():
        if name == "__metadata__":
            continue
        offsets = spec.get("data_offsets") if isinstance(spec, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise ModelCorruptError(f"{path.name}: tensor {name!r} has no valid data_offsets: damaged")
        if offsets[1] > data_bytes or offsets[0] > offsets[1]:
            raise ModelCorruptError(
                f"{path.name}: tensor {name!r} ends at byte {offsets[1]} "
                f"of {data_bytes} data bytes: truncated"
            )
    return size


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


class Backend(Protocol):
    """What the engine needs of a backend: its tokenizer's text and its tokens, one at a time."""

    name: str
    n_ctx: int
    eos: set[int]

    @property
    def hf_tokenizer(self) -> Any:
        """The Hugging Face fast tokenizer: its chat template, and the vocabulary grammars see."""
        ...

    def chat_text(self, messages: list[dict[str, Any]], **extra: Any) -> str: ...

    def chat_ids(self, messages: list[dict[str, Any]], **extra: Any) -> list[int]: ...

    def text_ids(self, prompt: str) -> list[int]: ...

    def decode(self, ids: list[int], special: bool = False) -> str:
        """``special``: special tokens are kept as their text (the markers tool calls use)."""
        ...

    def piece(self, token: int) -> bytes: ...

    def tokens(self, prompt: list[int], picker: TokenPicker) -> Iterator[int]:
        """Token after token after ``prompt``, each ``picker.pick``ed from the next logits."""
        ...


class HfTokenizerText:
    """Text through the directory's Hugging Face tokenizer (transformers' AutoTokenizer)."""

    tokenizer: Any

    @property
    def hf_tokenizer(self) -> Any:
        return self.tokenizer

    def chat_text(self, messages: list[dict[str, Any]], **extra: Any) -> str:
        return str(
            self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **extra)
        )

    def chat_ids(self, messages: list[dict[str, Any]], **extra: Any) -> list[int]:
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, **extra)
        if isinstance(ids, Mapping):  # transformers 5 may return a BatchEncoding
            ids = ids["input_ids"]
        return list(ids)

    def text_ids(self, prompt: str) -> list[int]:
        return list(self.tokenizer(prompt)["input_ids"])

    def decode(self, ids: list[int], special: bool = False) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=not special))

    def piece(self, token: int) -> bytes:
        return str(self.tokenizer.decode([token], skip_special_tokens=False)).encode("utf-8")


class _Transformers(HfTokenizerText):
    name = "transformers"

    def __init__(self, info: DirectoryInfo, options: Mapping[str, Any]) -> None:
        import torch
        import transformers

        self.torch = torch
        torch.set_num_threads(int(options.get("n_threads") or default_threads()))
        dtype = options.get("dtype", "float32")
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(str(info.path), local_files_only=True)
        self.model = transformers.AutoModelForCausalLM.from_pretrained(
            str(info.path), local_files_only=True, dtype=getattr(torch, dtype) if dtype != "auto" else "auto"
        )
        self.model.eval()
        self.n_ctx = int(getattr(self.model.config, "max_position_embeddings", 4096) or 4096)
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [eos]) - {None}

    def tokens(self, prompt: list[int], picker: TokenPicker) -> Iterator[int]:
        torch = self.torch
        with torch.inference_mode():
            out = self.model(input_ids=torch.tensor([prompt]), use_cache=True)
            while True:
                token = picker.pick(out.logits[0, -1].float().numpy())
                yield token
                out = self.model(
                    input_ids=torch.tensor([[token]]), past_key_values=out.past_key_values, use_cache=True
                )


class _Mlx:
    name = "mlx"

    def __init__(self, info: DirectoryInfo, options: Mapping[str, Any]) -> None:
        import mlx.core as mx
        from mlx_lm import load

        self.mx = mx
        if info.model_type == "gpt_oss" and not info.mxfp4:
            self.model, self.tokenizer = _load_mlx_gpt_oss_dequantized(info.path)
        else:
            self.model, self.tokenizer = load(str(info.path))
        self.n_ctx = int(info.config.get("max_position_embeddings") or 4096)
        self.eos = set(self.tokenizer.eos_token_ids)

    @property
    def hf_tokenizer(self) -> Any:
        return self.tokenizer._tokenizer  # mlx-lm's TokenizerWrapper holds the HF one

    def chat_text(self, messages: list[dict[str, Any]], **extra: Any) -> str:
        return str(
            self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **extra)
        )

    def chat_ids(self, messages: list[dict[str, Any]], **extra: Any) -> list[int]:
        return list(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, **extra))

    def text_ids(self, prompt: str) -> list[int]:
        return list(self.tokenizer.encode(prompt))

    def decode(self, ids: list[int], special: bool = False) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=not special))

    def piece(self, token: int) -> bytes:
        return str(self.tokenizer.decode([token], skip_special_tokens=False)).encode("utf-8")

    def tokens(self, prompt: list[int], picker: TokenPicker) -> Iterator[int]:
        from mlx_lm.generate import generate_step

        mx = self.mx

        def pick(_tokens: Any, logits: Any) -> Any:
            # The whole order runs in the picker; mlx-lm's sampler then takes its token.
            token = picker.pick(np.array(logits[0].astype(mx.float32)))
            return mx.where(mx.arange(logits.shape[-1]) == token, 0.0, float("-inf"))[None]

        # generate_step computes one token ahead: the picker pairs logprobs with tokens in order.
        for token, _logprobs in generate_step(
            mx.array(prompt),
            self.model,
            max_tokens=-1,
            sampler=lambda logprobs: mx.argmax(logprobs, axis=-1),
            logits_processors=[pick],
        ):
            yield int(token)


def _load_mlx_gpt_oss_dequantized(path: Path) -> tuple[Any, Any]:
    """gpt-oss in the de-quantised bf16 layout, which mlx-lm reads only as MXFP4.

    transformers stores each layer's experts as ``gate_up_proj`` [experts, in, 2·out]
    (gate and up interleaved) and ``down_proj`` [experts, in, out]; mlx-lm wants
    separate [experts, out, in] matrices.  Everything else loads as it is.
    """
    import mlx.core as mx
    from mlx_lm.utils import load_model, load_tokenizer

    model, _config = load_model(path, strict=False)
    experts = []
    for file in sorted(path.glob("*.safetensors")):
        for name, value in mx.load(str(file)).items():
            if name.endswith("mlp.experts.gate_up_proj"):
                stem = name.removesuffix("gate_up_proj")
                experts.append((stem + "gate_proj.weight", value[..., ::2].transpose(0, 2, 1)))
                experts.append((stem + "up_proj.weight", value[..., 1::2].transpose(0, 2, 1)))
            elif name.endswith("mlp.experts.down_proj"):
                experts.append((name + ".weight", value.transpose(0, 2, 1)))
    if not experts:
        raise LoadFailedError(f"{path}: no gpt-oss expert weights (gate_up_proj, down_proj) found")
    model.load_weights(experts, strict=False)
    mx.eval(model.parameters())
    return model, load_tokenizer(path)


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
            chosen = _Mlx if name == "mlx" else _Transformers

            def backend() -> Backend:
                read_ahead(info.files, progress)
                return chosen(info, options)

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
        with contextlib.suppress(Exception):
            del self.backend

    def chat(self, ctx: RequestContext) -> Reply:
        req = chat_request(ctx.params)
        family = self.family
        extra = template_extras(req, family)
        messages = template_messages(req.messages, family, req.tools)
        try:
            prompt = self.backend.chat_ids(messages, **extra)
            thinking = self.think and self.backend.chat_text(messages, **extra).rstrip().endswith("<think>")
        except Exception as exc:
            raise UnsupportedError(f"{self.model_id}'s chat template refused the messages: {exc}") from exc
        self._check_fits(prompt, "messages")
        plan = chat_plan(req, family, think=self.think, thinking=thinking)
        sampling = plan_sampling(plan, req.sampling)
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
