"""Check a stable-diffusion.cpp model's files before stable-diffusion-cpp-python ever sees them.

The binding does not notice a failed load: stable-diffusion.cpp logs the reason and hands back
a NULL context, the constructor returns, the first generation raises "NULL pointer access" and
the process segfaults at exit freeing it. Worse, some bad files load: a text encoder that is
not one (an HTML page, a foreign format) is only warned about, and Flux without a text encoder
segfaults while sampling; a Flux whose attention norms are missing divides by zero while the
context is made (SIGFPE); one whose head size is not 128 aborts while sampling. So each file is
read here first, headers and tensor tables only (the data is never read, only the file size),
and each cause is told apart as its code:

    relative path, not there, a directory, unreadable          LOAD_FAILED
    neither GGUF nor safetensors (what it looks like is said)  FORMAT_MISMATCH
    a GGUF version, tensor type or safetensors dtype that      UNSUPPORTED
    stable-diffusion.cpp cannot read, an unknown part, no
    model family it knows, a part the family needs left out
    (Flux without clip_l, no VAE), a TAESD with only its
    decoder unless decode-only
    a damaged header or tensor table, data past the end of     MODEL_CORRUPT
    the file, a tensor missing or misshapen

What is checked tensor by tensor, as stable-diffusion.cpp would build the model:

    flux (diffusion_model,  every tensor of the blocks, sized from the file as FluxRunner does
    or inside model)        (hidden size from txt_in.weight, depth from the block indices,
                            guidance_in if present) with stable-diffusion.cpp's head size 128
    clip_l                  CLIP-L's 196 tensors (the Hugging Face ``text_model.`` names)
    taesd                   decoder and encoder (decoder only when decode-only), 16 latent
                            channels for flux and sd3, 4 for sd1, sd2 and sdxl

Every other part and family (the unets, sd3, Chroma, Flux 2, clip_g, t5xxl, vae, the rest
of a single-file model) gets the header checks, the data-bounds check, family detection and the rules on
needed parts only: its tensor set is left to stable-diffusion.cpp, which refuses a missing or
misshapen tensor with a NULL context (the engine checks that pointer). The rules are
stable-diffusion.cpp's (``ModelLoader::get_sd_version``, ``FluxRunner``, ``TinyEncoder`` and
``TinyDecoder``, ``read_safetensors_file``) and ggml's ``gguf_init_from_file``.
"""

from __future__ import annotations

import dataclasses
import json
import re
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import BinaryIO

from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from allm.kernel.codes import FormatMismatchError, LoadFailedError, ModelCorruptError, UnsupportedError

PARTS = ("model", "diffusion_model", "clip_l", "clip_g", "t5xxl", "vae", "taesd")
# the prefixes stable-diffusion.cpp's loader puts before each part's names (a file may carry them)
PREFIXES: dict[str, tuple[str, ...]] = {
    "model": (),
    "diffusion_model": ("model.diffusion_model.",),
    "clip_l": ("text_encoders.clip_l.transformer.", "cond_stage_model.transformer.", "transformer."),
    "clip_g": ("text_encoders.clip_g.transformer.", "cond_stage_model.1.transformer."),
    "t5xxl": ("text_encoders.t5xxl.transformer.",),
    "vae": ("first_stage_model.", "vae."),
    "taesd": ("tae.",),
}

GGUF_MAGIC = b"GGUF"
GGUF_VERSIONS = (2, 3)
GGUF_DEFAULT_ALIGNMENT = 32
GGML_TYPE_COUNT = 41  # in the ggml stable-diffusion-cpp-python 0.4.7 builds (gguf-py knows newer ones)
MAX_TENSORS = 1 << 20  # Flux dev has 780, SD 3.5 large under 1200
MAX_KEYS = 1 << 20
MAX_NAME_BYTES = 4096  # stable-diffusion.cpp's fallback GGUF reader aborts on a huge name
MAX_DIMS = 4
SAFETENSORS_MAX_HEADER = 100 * 1024 * 1024
# dtypes read_safetensors_file takes (U8 tensors it skips), and their sizes
SAFETENSORS_DTYPES = {
    "F16": 2,
    "BF16": 2,
    "F32": 4,
    "F64": 8,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I32": 4,
    "I64": 8,
    "U8": 1,
}
FLUX_HEAD_DIM = 128  # the sum of Flux's rope axes: any other head size aborts while sampling
TAE_CHANNELS = 64

Ne = tuple[int, int, int, int]


@dataclasses.dataclass(frozen=True, slots=True)
class Tensor:
    ne: Ne  # ggml order, fastest-varying first, padded with 1s
    type: str
    nbytes: int


@dataclasses.dataclass(frozen=True, slots=True)
class PartInfo:
    """One checked file."""

    part: str
    path: Path
    format: str  # "gguf" or "safetensors"
    size_bytes: int  # the file
    weights_bytes: int  # its tensor data
    n_tensors: int
    verified: bool  # every tensor stable-diffusion.cpp needs was found, in its shape


@dataclasses.dataclass(frozen=True, slots=True)
class ImageModelInfo:
    """What a checked set of files holds: enough to estimate memory before loading it."""

    family: str  # flux, sd1, sd2, sdxl, sd3, chroma, flux2, ...
    parts: Mapping[str, PartInfo]
    decode_only: bool

    @property
    def weights_bytes(self) -> int:
        return sum(p.weights_bytes for p in self.parts.values())


# -- opening ---------------------------------------------------------------------------------

_LOOKS_LIKE = (
    (b"PK\x03\x04", "a zip archive (a PyTorch .ckpt/.pt checkpoint? convert it to GGUF or safetensors)"),
    (b"\x80", "a Python pickle (an old PyTorch checkpoint? convert it to GGUF or safetensors)"),
    (b"lmgg", "a whisper.cpp ggml model"),
    (b"tjgg", "an old llama.cpp GGJT file"),
    (b"version https://git-lfs", "a Git LFS pointer (the download fetched the pointer, not the file)"),
    (b"\x89PNG", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"<", "an HTML or XML page (a failed download?)"),
    (b"{", "a JSON file"),
)


def _looks_like(head: bytes) -> str:
    for magic, what in _LOOKS_LIKE:
        if head.startswith(magic):
            return what
    return f"a file that starts with {head[:8].hex()}"


def _open(label: str, path: Path) -> tuple[BinaryIO, int]:
    if not path.is_absolute():
        raise LoadFailedError(f"{label}: the path must be absolute, not {str(path)!r}")
    try:
        if path.is_dir():
            raise LoadFailedError(f"{label}: {path} is a directory, not a model file")
        size = path.stat().st_size
        return path.open("rb"), size
    except FileNotFoundError:
        raise LoadFailedError(f"{label}: model file not found: {path}") from None
    except OSError as exc:
        raise LoadFailedError(f"{label}: cannot read {path}: {exc.strerror}") from exc


class _Reader:
    def __init__(self, f: BinaryIO, label: str, size: int) -> None:
        self.f = f
        self.label = label
        self.size = size

    def corrupt(self, what: str) -> ModelCorruptError:
        return ModelCorruptError(f"{self.label}: {what}: damaged")

    def truncated(self, needed: int, where: str) -> ModelCorruptError:
        return ModelCorruptError(
            f"{self.label}: truncated in {where}: needs {needed} bytes, file has {self.size}"
        )

    def read(self, n: int, where: str) -> bytes:
        at = self.f.tell()
        if at + n > self.size:
            raise self.truncated(at + n, where)
        return self.f.read(n)

    def skip(self, n: int, where: str) -> None:
        at = self.f.tell()
        if at + n > self.size:
            raise self.truncated(at + n, where)
        self.f.seek(at + n)

    def u32(self, where: str) -> int:
        value: int = struct.unpack("<I", self.read(4, where))[0]
        return value

    def u64(self, where: str) -> int:
        value: int = struct.unpack("<Q", self.read(8, where))[0]
        return value

    def string(self, where: str, limit: int) -> bytes:
        n = self.u64(where)
        if n > limit:
            raise self.corrupt(f"a string in {where} claims {n} bytes")
        return self.read(n, where)


# -- GGUF ------------------------------------------------------------------------------------

_GGUF_SCALARS = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_GGUF_STRING, _GGUF_ARRAY, _GGUF_U32 = 8, 9, 4


def _skip_value(r: _Reader, vtype: int, key: str) -> None:
    where = f"the metadata (key {key!r})"
    if vtype in _GGUF_SCALARS:
        r.skip(_GGUF_SCALARS[vtype], where)
    elif vtype == _GGUF_STRING:
        r.skip(r.u64(where), where)
    elif vtype == _GGUF_ARRAY:
        itype, count = r.u32(where), r.u64(where)
        if itype in _GGUF_SCALARS:
            r.skip(_GGUF_SCALARS[itype] * count, where)
        elif itype == _GGUF_STRING:
            if count > r.size:
                raise r.corrupt(f"key {key!r} claims {count} strings")
            for _ in range(count):
                r.skip(r.u64(where), where)
        else:
            raise r.corrupt(f"key {key!r} is an array of type {itype}")
    else:
        raise r.corrupt(f"key {key!r} has unknown type {vtype}")


def _read_gguf(r: _Reader) -> dict[str, Tensor]:
    """The tensor table, checked as ggml's gguf_init_from_file does (and the data bounds)."""
    r.f.seek(4)
    version = r.u32("the header")
    if version not in GGUF_VERSIONS:
        raise UnsupportedError(
            f"{r.label}: GGUF version {version}: stable-diffusion.cpp reads versions 2 and 3"
        )
    n_tensors, n_kv = r.u64("the header"), r.u64("the header")
    if n_tensors > MAX_TENSORS or n_kv > MAX_KEYS:
        raise r.corrupt(f"the header claims {n_tensors} tensors and {n_kv} metadata keys")
    alignment = GGUF_DEFAULT_ALIGNMENT
    for _ in range(n_kv):
        key = r.string("the metadata", MAX_NAME_BYTES).decode("utf-8", "replace")
        vtype = r.u32("the metadata")
        if key == "general.alignment":
            if vtype != _GGUF_U32:
                # ggml reads it with gguf_get_val_u32, which aborts on any other type
                raise r.corrupt(f"general.alignment has type {vtype}, not u32")
            alignment = r.u32("the metadata")
            if alignment == 0 or alignment & (alignment - 1):
                raise r.corrupt(f"general.alignment {alignment} is not a power of 2")
        else:
            _skip_value(r, vtype, key)
    infos: list[tuple[str, Ne, int, int]] = []
    seen: set[str] = set()
    for i in range(n_tensors):
        where = f"the tensor table (tensor {i})"
        raw = r.string(where, MAX_NAME_BYTES)
        try:
            name = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise r.corrupt(f"tensor {i}'s name is not UTF-8") from None
        if name in seen:
            raise r.corrupt(f"tensor {name!r} appears twice")
        seen.add(name)
        n_dims = r.u32(where)
        if n_dims > MAX_DIMS:
            raise r.corrupt(f"tensor {name!r} claims {n_dims} dimensions")
        dims = [r.u64(where) for _ in range(n_dims)]
        ne = (*dims, *[1] * (MAX_DIMS - n_dims))
        ttype, offset = r.u32(where), r.u64(where)
        infos.append((name, (ne[0], ne[1], ne[2], ne[3]), ttype, offset))
    data_offset = -(-r.f.tell() // alignment) * alignment

    tensors: dict[str, Tensor] = {}
    expected_offset = end = 0
    for name, ne, ttype, offset in infos:
        try:
            qtype = GGMLQuantizationType(ttype)
            block, type_size = GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise r.corrupt(f"tensor {name!r} has unknown type {ttype}") from None
        if ttype >= GGML_TYPE_COUNT:
            raise UnsupportedError(
                f"{r.label}: tensor {name!r} has type {qtype.name}, newer than stable-diffusion.cpp's ggml"
            )
        elements = ne[0] * ne[1] * ne[2] * ne[3]
        if any(d >= 1 << 63 for d in ne) or elements >= 1 << 63:
            raise r.corrupt(f"tensor {name!r} claims {list(ne)} elements")
        if ne[0] % block:
            raise r.corrupt(
                f"tensor {name!r} of type {qtype.name} has rows of {ne[0]}, not a multiple of {block}"
            )
        if offset != expected_offset:
            raise r.corrupt(f"tensor {name!r} is at data offset {offset}, expected {expected_offset}")
        nbytes = elements // block * type_size
        end = data_offset + offset + nbytes
        expected_offset += -(-nbytes // alignment) * alignment
        tensors[name] = Tensor(ne, qtype.name.lower(), nbytes)
    if end > r.size:
        raise r.truncated(end, "tensor data")
    return tensors


# -- safetensors -----------------------------------------------------------------------------


def _safetensors_header_length(head: bytes) -> int | None:
    """The header length if ``head`` opens a safetensors file (a length, then a JSON object)."""
    if len(head) < 9 or head[8:9] != b"{":
        return None
    length: int = struct.unpack_from("<Q", head)[0]
    return length if length > 2 else None


def _read_safetensors(r: _Reader, header_len: int) -> dict[str, Tensor]:
    """The header, checked as read_safetensors_file reads it (and the data bounds)."""
    if header_len > SAFETENSORS_MAX_HEADER:
        raise r.corrupt(f"the safetensors header claims {header_len} bytes")
    r.f.seek(8)
    raw = r.read(header_len, "the safetensors header")
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise r.corrupt(f"the safetensors header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise r.corrupt("the safetensors header is not a JSON object")
    data_bytes = r.size - 8 - header_len
    tensors: dict[str, Tensor] = {}
    end = 0
    for name, spec in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(spec, dict):
            raise r.corrupt(f"tensor {name!r} has no description")
        dtype, shape, offsets = spec.get("dtype"), spec.get("shape"), spec.get("data_offsets")
        # a missing or mistyped field makes the library's JSON reader throw past its handler: an abort
        if not isinstance(dtype, str):
            raise r.corrupt(f"tensor {name!r} has no dtype")
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise r.corrupt(f"tensor {name!r} has no valid shape")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise r.corrupt(f"tensor {name!r} has no valid data_offsets")
        if dtype not in SAFETENSORS_DTYPES:
            raise UnsupportedError(
                f"{r.label}: tensor {name!r} has dtype {dtype}, which stable-diffusion.cpp cannot read"
            )
        if len(shape) > MAX_DIMS + 1:
            raise r.corrupt(f"tensor {name!r} has {len(shape)} dimensions")
        begin, stop = offsets
        elements = 1
        for d in shape:
            elements *= d
        if not 0 <= begin <= stop or stop - begin != elements * SAFETENSORS_DTYPES[dtype]:
            raise r.corrupt(f"tensor {name!r} spans bytes {begin}..{stop}, not {elements} {dtype} values")
        end = max(end, stop)
        if dtype == "U8":
            continue  # the library skips these
        dims = list(reversed(shape)) or [1]
        if len(dims) == 5:  # folded as the library does
            dims = [dims[0] * dims[1], *dims[2:]]
        ne = (*dims, *[1] * (MAX_DIMS - len(dims)))
        tensors[name] = Tensor((ne[0], ne[1], ne[2], ne[3]), dtype.lower(), stop - begin)
    if end > data_bytes:
        raise r.truncated(8 + header_len + end, "tensor data")
    return tensors


def _strip(name: str, prefixes: tuple[str, ...]) -> str:
    for prefix in prefixes:
        if name.startswith(prefix):
            return name[len(prefix) :]
    return name


# -- reading a part --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class _Part:
    info: PartInfo
    tensors: dict[str, Tensor]  # names with the loader's prefix stripped

    @property
    def label(self) -> str:
        return f"{self.info.part} ({self.info.path.name})"


def read_part(part: str, path: Path) -> _Part:
    """One file's tensor table; raises the AllmError that names what is wrong with it."""
    label = f"{part} ({path.name})"
    f, size = _open(label, path)
    with f:
        r = _Reader(f, label, size)
        head = f.read(32)
        if not head:
            raise FormatMismatchError(f"{label} is empty (0 bytes): not a GGUF or safetensors model")
        if head.startswith(GGUF_MAGIC):
            fmt, tensors = "gguf", _read_gguf(r)
        elif (header_len := _safetensors_header_length(head)) is not None:
            fmt, tensors = "safetensors", _read_safetensors(r, header_len)
        else:
            raise FormatMismatchError(
                f"{label} is neither GGUF nor safetensors: it looks like {_looks_like(head)}"
            )
    stripped = {_strip(name, PREFIXES[part]): tensor for name, tensor in tensors.items()}
    weights = sum(t.nbytes for t in tensors.values())
    return _Part(PartInfo(part, path, fmt, size, weights, len(tensors), False), stripped)


# -- what stable-diffusion.cpp builds --------------------------------------------------------


def _linear(table: dict[str, Ne], name: str, n_in: int, n_out: int, bias: bool = True) -> None:
    table[f"{name}.weight"] = (n_in, n_out, 1, 1)
    if bias:
        table[f"{name}.bias"] = (n_out, 1, 1, 1)


def _conv(table: dict[str, Ne], name: str, n_in: int, n_out: int, bias: bool = True) -> None:
    table[f"{name}.weight"] = (3, 3, n_in, n_out)
    if bias:
        table[f"{name}.bias"] = (n_out, 1, 1, 1)


def clip_l_table() -> dict[str, Ne]:
    """CLIP-L's text model (12 layers of 768, 49408 tokens, 77 positions), as clip.hpp builds it."""
    width, mlp = 768, 3072
    table: dict[str, Ne] = {}
    table["text_model.embeddings.position_embedding.weight"] = (width, 77, 1, 1)
    table["text_model.embeddings.token_embedding.weight"] = (width, 49408, 1, 1)
    for i in range(12):
        p = f"text_model.encoder.layers.{i}"
        for norm in ("layer_norm1", "layer_norm2"):
            table[f"{p}.{norm}.weight"] = table[f"{p}.{norm}.bias"] = (width, 1, 1, 1)
        _linear(table, f"{p}.mlp.fc1", width, mlp)
        _linear(table, f"{p}.mlp.fc2", mlp, width)
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            _linear(table, f"{p}.self_attn.{proj}", width, width)
    table["text_model.final_layer_norm.weight"] = table["text_model.final_layer_norm.bias"] = (width, 1, 1, 1)
    return table


def taesd_table(z_channels: int, *, encoder: bool = True) -> dict[str, Ne]:
    """TinyDecoder (and TinyEncoder) of tae.hpp: 64-channel blocks of three convolutions."""
    c = TAE_CHANNELS
    table: dict[str, Ne] = {}

    def block(name: str) -> None:
        for k in (0, 2, 4):
            _conv(table, f"{name}.conv.{k}", c, c)

    # the decoder: conv, relu, 3 blocks, then three times (upsample, conv, 3 blocks), conv
    _conv(table, "decoder.layers.0", z_channels, c)
    index = 2
    for _ in range(3):
        for _ in range(3):
            block(f"decoder.layers.{index}")
            index += 1
        _conv(table, f"decoder.layers.{index + 1}", c, c, bias=False)  # after the upsample
        index += 2
    block(f"decoder.layers.{index}")
    _conv(table, f"decoder.layers.{index + 1}", c, 3)
    if encoder:
        _conv(table, "encoder.layers.0", 3, c)
        block("encoder.layers.1")
        index = 2
        for _ in range(3):
            _conv(table, f"encoder.layers.{index}", c, c, bias=False)  # stride 2
            for i in range(3):
                block(f"encoder.layers.{index + 1 + i}")
            index += 4
        _conv(table, f"encoder.layers.{index}", c, z_channels)
    return table


@dataclasses.dataclass(frozen=True, slots=True)
class FluxSize:
    hidden: int
    depth: int
    depth_single: int
    guidance: bool
    in_channels: int = 64
    context_in_dim: int = 4096


def flux_size(label: str, tensors: Mapping[str, Tensor]) -> FluxSize:
    """Flux's sizes, read from the file as FluxRunner reads them."""
    txt_in = tensors.get("txt_in.weight")
    if txt_in is None:
        raise ModelCorruptError(
            f"{label}: tensor 'txt_in.weight' is missing (stable-diffusion.cpp reads Flux's size from it)"
        )
    if txt_in.ne[1] % FLUX_HEAD_DIM:
        raise ModelCorruptError(
            f"{label}: Flux's hidden size {txt_in.ne[1]} (txt_in.weight) is not a multiple of its head size "
            f"{FLUX_HEAD_DIM}: damaged"
        )
    img_in = tensors.get("img_in.weight")
    # FluxRunner takes in_channels from the variant get_sd_version sees in img_in's rows
    in_channels = img_in.ne[0] if img_in is not None and img_in.ne[0] in (384, 128, 196) else 64

    def depth(kind: str) -> int:
        pattern = re.compile(rf"^{kind}\.(\d+)\.")
        return 1 + max((int(m.group(1)) for n in tensors if (m := pattern.match(n))), default=-1)

    return FluxSize(
        hidden=txt_in.ne[1],
        depth=depth("double_blocks"),
        depth_single=depth("single_blocks"),
        guidance="guidance_in.in_layer.weight" in tensors,
        in_channels=in_channels,
        context_in_dim=txt_in.ne[0],
    )


def flux_table(size: FluxSize) -> dict[str, Ne]:
    """Every tensor of a Flux (dev or schnell, fill, controls) of this size, as flux.hpp builds it."""
    h, mlp, norm = size.hidden, size.hidden * 4, (FLUX_HEAD_DIM, 1, 1, 1)
    table: dict[str, Ne] = {}
    _linear(table, "img_in", size.in_channels, h)
    _linear(table, "txt_in", size.context_in_dim, h)
    for embedder, n_in in (("time_in", 256), ("vector_in", 768), ("guidance_in", 256)):
        if embedder == "guidance_in" and not size.guidance:
            continue
        _linear(table, f"{embedder}.in_layer", n_in, h)
        _linear(table, f"{embedder}.out_layer", h, h)
    for i in range(size.depth):
        for stream in ("img", "txt"):
            p = f"double_blocks.{i}.{stream}"
            _linear(table, f"{p}_mod.lin", h, 6 * h)
            _linear(table, f"{p}_attn.qkv", h, 3 * h)
            _linear(table, f"{p}_attn.proj", h, h)
            table[f"{p}_attn.norm.query_norm.scale"] = table[f"{p}_attn.norm.key_norm.scale"] = norm
            _linear(table, f"{p}_mlp.0", h, mlp)
            _linear(table, f"{p}_mlp.2", mlp, h)
    for i in range(size.depth_single):
        p = f"single_blocks.{i}"
        _linear(table, f"{p}.linear1", h, 3 * h + mlp)
        _linear(table, f"{p}.linear2", h + mlp, h)
        _linear(table, f"{p}.modulation.lin", h, 3 * h)
        table[f"{p}.norm.query_norm.scale"] = table[f"{p}.norm.key_norm.scale"] = norm
    _linear(table, "final_layer.adaLN_modulation.1", h, 2 * h)
    _linear(table, "final_layer.linear", h, 64)
    return table


def _verify(label: str, tensors: Mapping[str, Tensor], expected: Mapping[str, Ne], why: str = "") -> None:
    """Raise MODEL_CORRUPT naming the first missing or misshapen tensors."""
    missing = [name for name in expected if name not in tensors]
    if missing:
        shown = ", ".join(repr(n) for n in missing[:3])
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        noun = "tensor" if len(missing) == 1 else "tensors"
        raise ModelCorruptError(f"{label}: {noun} {shown}{more} missing{why}: damaged or not this part")
    for name, ne in expected.items():
        got = tensors[name].ne
        if got != ne:
            wanted = f"stable-diffusion.cpp expects {list(ne)}{why}"
            raise ModelCorruptError(f"{label}: tensor {name!r} has shape {list(got)}, {wanted}")


# -- families --------------------------------------------------------------------------------

# names that settle a family, in the order get_sd_version looks for them (diffusion names, no prefix)
_FAMILY_MARKERS = (
    ("nerf_final_layer_conv.", "chroma_radiance"),
    ("joint_blocks.", "sd3"),
    ("transformer_blocks.0.img_mod.1.weight", "qwen_image"),
    ("double_stream_modulation_img.", "flux2"),
    ("double_blocks.0.img_mlp.gate_proj.weight", "ovis_image"),
    ("cap_embedder.0.weight", "z_image"),
    ("layers.0.adaLN_sa_ln.weight", "ernie_image"),
    ("blocks.0.cross_attn.norm_k.weight", "wan"),
    ("distilled_guidance_layer.", "chroma"),
    ("double_blocks.", "flux"),
    ("single_transformer_blocks.", "flux"),  # the diffusers layout
)
_UNET_MARKERS = ("input_blocks.", "down_blocks.")
_CONTEXT_DIM_FAMILY = {768: "sd1", 1024: "sd2", 2048: "sdxl"}
# the families whose parts are known here, and their latent channels (what a TAESD decodes)
_TAE_LATENT_CHANNELS = {"flux": 16, "sd3": 16, "sd1": 4, "sd2": 4, "sdxl": 4}
_TEXT_ENCODER_PREFIXES = ("text_encoders.clip_l.", "cond_stage_model.", "conditioner.embedders.")
_VAE_PREFIXES = ("first_stage_model.", "vae.")


def detect_family(diffusion: Mapping[str, Tensor]) -> str | None:
    """The model family from the diffusion model's tensor names (and a shape or two for unets)."""
    names = diffusion.keys()
    for marker, family in _FAMILY_MARKERS:
        if any(marker in n for n in names):
            return family
    if not any(n.startswith(_UNET_MARKERS) for n in names):
        return None
    if any(n.startswith(("label_emb.", "add_embedding.")) for n in names):
        return "sdxl"
    for name, tensor in diffusion.items():
        if name.endswith("attn2.to_k.weight") and tensor.ne[0] in _CONTEXT_DIM_FAMILY:
            return _CONTEXT_DIM_FAMILY[tensor.ne[0]]
    return "sd1/sd2"


def _diffusion_tensors(read: Mapping[str, _Part]) -> dict[str, Tensor]:
    tensors: dict[str, Tensor] = {}
    if "model" in read:
        prefix = "model.diffusion_model."
        tensors |= {n[len(prefix) :]: t for n, t in read["model"].tensors.items() if n.startswith(prefix)}
    if "diffusion_model" in read:
        tensors |= read["diffusion_model"].tensors
    return tensors


def _in_model(read: Mapping[str, _Part], prefixes: tuple[str, ...]) -> bool:
    return "model" in read and any(n.startswith(prefixes) for n in read["model"].tensors)


def check_parts(parts: Mapping[str, Path], *, decode_only: bool = False) -> ImageModelInfo:
    """Check every file of a model, then the set; raises the AllmError naming the part and cause.

    ``parts`` follows stable-diffusion.cpp's parameters without ``_path``: ``model`` (a
    single-file model) or ``diffusion_model``, and any of ``clip_l``, ``clip_g``, ``t5xxl``,
    ``vae``, ``taesd``. ``decode_only`` is the context's ``vae_decode_only``.
    """
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise UnsupportedError(f"unknown model part {unknown[0]!r}: the parts are {', '.join(PARTS)}")
    if "model" not in parts and "diffusion_model" not in parts:
        raise UnsupportedError("an image model needs a model or a diffusion_model file")
    read = {part: read_part(part, Path(path)) for part, path in parts.items() if part in PARTS}

    diffusion = _diffusion_tensors(read)
    family = detect_family(diffusion)
    main = "diffusion_model" if "diffusion_model" in read else "model"
    main_label = read[main].label
    if family is None:
        raise UnsupportedError(
            f"{main_label}: no model family stable-diffusion.cpp knows (Flux, SD 1/2, SDXL, SD3, ...) "
            "in its tensor names"
        )

    if family == "flux" and "clip_l" not in read and not _in_model(read, _TEXT_ENCODER_PREFIXES):
        raise UnsupportedError(
            f"{main_label}: a Flux model needs its text encoder, part clip_l "
            "(stable-diffusion.cpp crashes sampling a Flux without one)"
        )
    has_vae = bool({"vae", "taesd"} & read.keys()) or _in_model(read, _VAE_PREFIXES)
    if family in _TAE_LATENT_CHANNELS and not has_vae:
        raise UnsupportedError(f"{main_label}: a {family} model needs a VAE: part vae or taesd")

    verified: set[str] = set()
    bfl_layout = any(n.startswith("double_blocks.") for n in diffusion)  # not the diffusers one
    if family == "flux" and bfl_layout:
        _verify(main_label, diffusion, flux_table(flux_size(main_label, diffusion)))
        verified.add(main)
    if "clip_l" in read:
        clip = read["clip_l"]
        _verify(clip.label, clip.tensors, clip_l_table(), " (clip_l must be CLIP-L's text model)")
        verified.add("clip_l")
    if "taesd" in read:
        tae = read["taesd"]
        if not decode_only and not any(n.startswith("encoder.") for n in tae.tensors):
            raise UnsupportedError(
                f"{tae.label}: this TAESD holds only the decoder: stable-diffusion.cpp loads it only "
                "decode-only (vae_decode_only); use a TAESD with its encoder"
            )
        if family in _TAE_LATENT_CHANNELS:
            expected = taesd_table(_TAE_LATENT_CHANNELS[family], encoder=not decode_only)
            _verify(tae.label, tae.tensors, expected, f" (a TAESD for {family}'s latents)")
            verified.add("taesd")

    infos = {part: dataclasses.replace(p.info, verified=part in verified) for part, p in read.items()}
    return ImageModelInfo(family, infos, decode_only)
