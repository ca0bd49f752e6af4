"""ONNX Runtime GenAI: the onnx backend of the safetensors engine, and its conversion of a model.

Safetensors directories are converted once by its model builder; ONNX GenAI
directories (``genai_config.json``) are served as they are.

A safetensors directory first passes ``safetensors_engine.check_directory`` (a damaged one
is MODEL_CORRUPT before anything runs). The model builder then converts it in a child
process, once, into the manager's ``cache_dir`` under a name keyed by the source's identity
(the path, each file's name, size and mtime), the precision, the execution provider and
the builder's version;
it writes to a temporary directory renamed into place, so a crash never leaves half a
model where a load would find it. While the builder runs, its output and its CPU time are
the load's progress for the watchdog; a request cancelled or past its deadline kills it.

    the builder refuses the architecture (NotImplementedError)  UNSUPPORTED, architecture named
    the builder runs out of memory (MemoryError, SIGKILL)        OOM_RAM
    any other failure of the builder                             LOAD_FAILED, its last words quoted
    genai_config.json not JSON                                   MODEL_CORRUPT
    model.onnx unreadable, its external data cut short           MODEL_CORRUPT
    the decoder's file or the tokenizer missing                  LOAD_FAILED (the file named)
    ONNX Runtime cannot run the graph (the load's probe token)   LOAD_FAILED, its reason quoted

Generation is the shared path's: ``og.Generator`` computes the logits of the next position,
``TokenPicker`` picks the token in Python (temperature, seed, penalties, logprobs), and the
token is appended. A JSON format's or a tool call's grammar masks the logits in the picker
too (guided.py); ONNX Runtime GenAI's own guidance is not used. Text goes through the
model's Hugging Face tokenizer (transformers' ``AutoTokenizer``), as on the transformers
backend: the same chat template, the same ids.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from allm.kernel.codes import (
    AllmError,
    LoadFailedError,
    ModelCorruptError,
    OomRamError,
    UnsupportedError,
)
from allm.managers.text.options import OnnxOptions
from allm.managers.text.safetensors_backends import HfTokenizerText
from allm.managers.text.safetensors_engine import (
    DirectoryInfo,
    SafetensorsEngine,
    context_of,
    read_ahead,
)
from allm.managers.text.sampling import TokenPicker

log = logging.getLogger("allm.text.onnx")

GENAI_CONFIG = "genai_config.json"
CONVERTER_VERSION = 1  # part of a converted model's cache key: a new way of converting converts again
POLL_S = 0.2
#: the packages whose CUDA / DirectML builds bring each execution provider
PROVIDER_PACKAGES = {"cuda": "onnxruntime-genai-cuda", "dml": "onnxruntime-genai-directml"}

# The builder's own entry point, run with PR_SET_PDEATHSIG first (Linux), so that a manager
# killed mid-conversion takes its builder with it.
_BUILDER_BOOT = (
    "import runpy, sys\n"
    "if sys.platform.startswith('linux'):\n"
    "    import ctypes, signal\n"
    "    ctypes.CDLL(None).prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG\n"
    "runpy.run_module('onnxruntime_genai.models.builder', run_name='__main__', alter_sys=True)\n"
)


# -- an ONNX GenAI directory ------------------------------------------------------------------


def _read_genai_config(path: Path) -> dict[str, Any]:
    file = path / GENAI_CONFIG
    try:
        config = json.loads(file.read_text())
    except FileNotFoundError:
        raise LoadFailedError(f"{path}: no {GENAI_CONFIG}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelCorruptError(f"{file} is not valid JSON: {exc}") from None
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise ModelCorruptError(f"{file} has no 'model' object")
    return config


def check_genai_directory(path: Path) -> DirectoryInfo:
    """Check an ONNX GenAI directory's config, files and tokenizer, loading nothing."""
    model = _read_genai_config(path)["model"]
    decoder = model.get("decoder") if isinstance(model.get("decoder"), dict) else {}
    filename = decoder.get("filename")
    if not isinstance(filename, str) or not filename:
        raise ModelCorruptError(f"{path}/{GENAI_CONFIG} names no decoder file (model.decoder.filename)")
    onnx_file = path / filename
    if not onnx_file.is_file():
        raise LoadFailedError(f"{path}: the decoder file {filename} named in {GENAI_CONFIG} is missing")
    if not (path / "tokenizer.json").is_file() and not (path / "tokenizer.model").is_file():
        raise LoadFailedError(f"{path}: no tokenizer (tokenizer.json or tokenizer.model)")
    files = tuple(sorted({onnx_file, *path.glob(f"{filename}.data"), *path.glob("*.onnx.data")}))
    heads = int(decoder.get("num_attention_heads") or 1)
    config = {
        "model_type": str(model.get("type", "onnx")),
        "max_position_embeddings": model.get("context_length"),
        "vocab_size": model.get("vocab_size"),
        "num_hidden_layers": decoder.get("num_hidden_layers"),
        "num_attention_heads": heads,
        "num_key_value_heads": decoder.get("num_key_value_heads") or heads,
        "head_dim": decoder.get("head_size"),
        "hidden_size": decoder.get("hidden_size"),
    }
    size = sum(f.stat().st_size for f in files)
    return DirectoryInfo(path, config["model_type"], config, size, False, files)


def check_onnx_files(path: Path) -> None:
    """Read model.onnx (not its weights) and check its external data lies within the data files.

    A truncated graph or data file is MODEL_CORRUPT here, named, instead of an error deep in
    ONNX Runtime's session creation.
    """
    import onnx
    from google.protobuf.message import DecodeError

    filename = _read_genai_config(path)["model"].get("decoder", {}).get("filename", "model.onnx")
    try:
        graph = onnx.load(str(path / filename), load_external_data=False).graph
    except (DecodeError, ValueError, OSError) as exc:
        raise ModelCorruptError(
            f"{path / filename} cannot be read as an ONNX model: damaged ({exc})"
        ) from exc
    sizes: dict[str, int] = {}
    for tensor in graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        where = {entry.key: entry.value for entry in tensor.external_data}
        location = where.get("location", "")
        if location not in sizes:
            data = path / location
            if not data.is_file():
                raise LoadFailedError(f"{path}: the weight file {location} that {filename} names is missing")
            sizes[location] = data.stat().st_size
        end = int(where.get("offset", 0)) + int(where.get("length", 0))
        if end > sizes[location]:
            raise ModelCorruptError(
                f"{path / location}: tensor {tensor.name!r} ends at byte {end} "
                f"of {sizes[location]}: truncated"
            )


# -- converting a safetensors directory ---------------------------------------------------------


def cache_name(info: DirectoryInfo, options: OnnxOptions) -> str:
    """The converted copy's directory name: the source's identity, the precision, the provider."""
    try:
        builder = importlib.metadata.version("onnxruntime-genai")
    except importlib.metadata.PackageNotFoundError:
        builder = "?"
    parts = [str(info.path.resolve()), options.precision, options.execution_provider, builder]
    for file in sorted(p for p in info.path.iterdir() if p.is_file()):
        stat = file.stat()
        parts.append(f"{file.name}|{stat.st_size}|{stat.st_mtime_ns}")
    parts.append(str(CONVERTER_VERSION))
    digest = hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", info.path.name)[:64]
    return f"{slug}-{options.precision}-{options.execution_provider}-{digest}"


def _remove_abandoned(parent: Path) -> None:
    """Temporary directories of conversions whose manager is gone (killed mid-conversion)."""
    import psutil

    for work in parent.glob(".*.tmp"):
        pid = work.name.rsplit(".", 2)[-2]
        if pid.isdigit() and int(pid) != os.getpid() and not psutil.pid_exists(int(pid)):
            shutil.rmtree(work, ignore_errors=True)


class _BuilderWatch:
    """The builder's output and CPU time as load progress; a builder doing neither is not moving."""

    def __init__(self, log_path: Path, layers: int) -> None:
        self.log_path = log_path
        self.layers = max(1, layers)
        self.offset = 0
        self.read = 0
        self.stage = 0.02
        self.cpu_s = -1.0

    def fraction(self, pid: int) -> float | None:
        """The fraction done if the builder moved since the last look, else None."""
        moved = False
        with contextlib.suppress(OSError), self.log_path.open("rb") as f:
            f.seek(self.offset)
            new = f.read()
            self.offset += len(new)
            moved = bool(new)
            self.read += new.count(b"Reading layer")
            if b"Saving ONNX model" in new:
                self.stage = 0.85
            if b"Saving GenAI config" in new:
                self.stage = 0.88
        cpu = _cpu_s(pid)
        if cpu > self.cpu_s:
            moved, self.cpu_s = True, cpu
        if not moved:
            return None
        # Reading the layers is most of the work; writing the model comes after.
        return max(self.stage, 0.05 + 0.75 * min(self.read, self.layers) / self.layers)


def _cpu_s(pid: int) -> float:
    import psutil

    try:
        times = psutil.Process(pid).cpu_times()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return -1.0
    return float(times.user + times.system)


def exception_of(output: str) -> tuple[str, str] | None:
    """The exception a Python child died of: (type name, message), from its traceback."""
    at = output.rfind("Traceback (most recent call last):")
    if at < 0:
        return None
    for line in reversed(output[at:].splitlines()):
        if line and not line[0].isspace():
            kind, _, message = line.partition(":")
            if re.fullmatch(r"[A-Za-z_][\w.]*", kind):
                return kind.rsplit(".", 1)[-1], message.strip()
            return None
    return None


def builder_failure(
    model_id: str, info: DirectoryInfo, options: OnnxOptions, returncode: int, output: str
) -> AllmError:
    """The coded error for a builder that exited with ``returncode`` after printing ``output``."""
    exception = exception_of(output)
    kind, message = exception if exception is not None else ("", "")
    architectures = info.config.get("architectures")
    arch = architectures[0] if isinstance(architectures, list) and architectures else info.model_type
    if kind == "NotImplementedError":
        return UnsupportedError(
            f"{model_id}: the ONNX Runtime GenAI model builder does not support {arch!r} "
            f"(model_type {info.model_type!r}): {message}",
            param="options.backend",
        )
    if kind == "MemoryError" or returncode == -9:
        return OomRamError(
            f"{model_id}: the ONNX Runtime GenAI model builder ran out of memory converting it"
        )
    if exception is not None:
        said = f"{kind}: {message}" if message else kind
    else:
        tail = [line for line in output.splitlines() if line.strip()][-3:]
        said = " | ".join(tail) or "no output"
    return LoadFailedError(
        f"{model_id}: the ONNX Runtime GenAI model builder could not convert {info.path} "
        f"({options.precision}, {options.execution_provider}; exit status {returncode}): {said}"
    )


def convert(
    model_id: str,
    info: DirectoryInfo,
    options: OnnxOptions,
    target: Path,
    *,
    progress: Callable[[float], None],
    should_stop: Callable[[], None],
) -> None:
    """Run the model builder on ``info``'s directory into ``target``, atomically.

    ``should_stop`` raises when the request that loads the model should stop (cancelled,
    past its deadline): the builder is killed and the error goes on.
    """
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned(parent)
    work = parent / f".{target.name}.{os.getpid()}.tmp"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    out, log_path = work / "model", work / "builder.log"
    command = [
        sys.executable,
        "-c",
        _BUILDER_BOOT,
        "-i",
        str(info.path),
        "-o",
        str(out),
        "-p",
        options.precision,
        "-e",
        options.execution_provider,
        "-c",
        str(work / "cache"),
        "--extra_options",
        "hf_token=false",  # a local directory: no token, no hub
    ]
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "PYTHONUNBUFFERED": "1",
    }
    text_config = info.config.get("text_config") or {}
    layers = int(info.config.get("num_hidden_layers") or text_config.get("num_hidden_layers") or 1)
    started = time.monotonic()
    log.info(
        "converting %s to ONNX (%s, %s) into %s",
        model_id,
        options.precision,
        options.execution_provider,
        target,
    )
    try:
        with log_path.open("wb") as sink:
            proc = subprocess.Popen(  # noqa: S603 - our own interpreter and the builder's module
                command, stdin=subprocess.DEVNULL, stdout=sink, stderr=subprocess.STDOUT, cwd=work, env=env
            )
        try:
            watch = _BuilderWatch(log_path, layers)
            progress(0.01)
            while proc.poll() is None:
                should_stop()
                fraction = watch.fraction(proc.pid)
                if fraction is not None:
                    progress(fraction)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(POLL_S)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
                log.warning("stopped converting %s: the model builder was killed", model_id)
        output = log_path.read_text(errors="replace")
        if proc.returncode != 0:
            log.warning("the model builder failed on %s; its last lines:\n%s", model_id, _tail(output, 20))
            raise builder_failure(model_id, info, options, proc.returncode, output)
        if not (out / GENAI_CONFIG).is_file():
            raise LoadFailedError(
                f"{model_id}: the ONNX Runtime GenAI model builder wrote no {GENAI_CONFIG}: "
                f"{_tail(output, 3)}"
            )
        try:
            out.rename(target)
        except OSError:
            if not (target / GENAI_CONFIG).is_file():  # not another instance's copy, renamed meanwhile
                raise
        log.info("converted %s in %.1f s", model_id, time.monotonic() - started)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _tail(text: str, lines: int) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


# -- the backend ---------------------------------------------------------------------------------


def require_provider(og: Any, options: OnnxOptions) -> None:
    """UNSUPPORTED, with the package to install, for a provider this build of the library lacks."""
    provider = options.execution_provider
    available = {"cpu": True, "cuda": og.is_cuda_available(), "dml": og.is_dml_available()}[provider]
    if not available:
        raise UnsupportedError(
            f"execution provider {provider!r} is not in this onnxruntime-genai build: "
            f"install {PROVIDER_PACKAGES[provider]} in its place",
            param="options.execution_provider",
        )


class OnnxBackend(HfTokenizerText):
    name = "onnx"

    def __init__(self, model_dir: Path, tokenizer_dir: Path, options: OnnxOptions, n_ctx: int) -> None:
        import onnxruntime_genai as og
        import transformers

        self.og = og
        config = og.Config(str(model_dir))
        config.clear_providers()
        if options.execution_provider != "cpu":
            config.append_provider(options.execution_provider)
        threads = {"intra_op_num_threads": options.n_threads, "inter_op_num_threads": 1}
        config.overlay(json.dumps({"model": {"decoder": {"session_options": threads}}}))
        self.model = og.Model(config)
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
        model = _read_genai_config(model_dir)["model"]
        self.n_ctx = min(n_ctx, int(model.get("context_length") or n_ctx))
        eos = model.get("eos_token_id")
        self.eos = set(eos if isinstance(eos, list) else [eos]) - {None}
        if not self.eos and self.tokenizer.eos_token_id is not None:
            self.eos = {self.tokenizer.eos_token_id}
        # One token through the graph now: a model ONNX Runtime cannot run (an attention shape
        # its kernels refuse) fails its load, by name, instead of every request later.
        probe = og.GeneratorParams(self.model)
        probe.set_search_options(max_length=2)
        og.Generator(self.model, probe).append_tokens([int(model.get("bos_token_id") or 0)])

    def tokens(self, prompt: list[int], picker: TokenPicker) -> Iterator[int]:
        og = self.og
        params = og.GeneratorParams(self.model)
        params.set_search_options(max_length=self.n_ctx)
        generator = og.Generator(self.model, params)
        generator.append_tokens(prompt)
        while True:
            token = picker.pick(np.asarray(generator.get_logits())[0, -1].astype(np.float32))
            yield token
            generator.append_tokens([token])


def load(
    model_id: str,
    info: DirectoryInfo,
    raw_options: Mapping[str, Any],
    target: Path | None,
    *,
    progress: Callable[[float], None],
    should_stop: Callable[[], None],
) -> SafetensorsEngine:
    """Convert if needed (``target``: where a safetensors directory converts to), then load.

    ``target`` None: ``info`` is an ONNX GenAI directory, served as it is.
    """
    import onnxruntime_genai as og

    options = OnnxOptions.from_settings(model_id, raw_options)
    require_provider(og, options)
    if target is None:
        model_dir = tokenizer_dir = info.path
        check_onnx_files(model_dir)
        read_ahead(info.files, progress)
    else:
        tokenizer_dir = info.path  # the source's tokenizer: the transformers backend's very files
        model_dir = target
        if (target / GENAI_CONFIG).is_file():
            try:
                check_onnx_files(target)
            except (ModelCorruptError, LoadFailedError) as exc:
                log.warning("the converted copy of %s is damaged (%s): converting again", model_id, exc)
                shutil.rmtree(target, ignore_errors=True)
        if not (target / GENAI_CONFIG).is_file():
            convert(model_id, info, options, target, progress=progress, should_stop=should_stop)
            check_onnx_files(target)
        progress(0.9)
    n_ctx = context_of(info, raw_options)
    return SafetensorsEngine(
        model_id,
        info,
        raw_options,
        progress,
        backend=lambda: OnnxBackend(model_dir, tokenizer_dir, options, n_ctx),
    )
