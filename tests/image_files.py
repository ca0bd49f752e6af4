"""stable-diffusion.cpp files the tests make themselves: a tiny random Flux set, the same Flux as one
checkpoint, and damaged copies."""

from __future__ import annotations

import dataclasses
import json
import struct
from collections.abc import Iterable, Mapping
from pathlib import Path

import gguf
import numpy as np

FIXTURES = Path(__file__).parent / "fixtures" / "sd-tensors"

# part → (the TSV of what stable-diffusion.cpp expects, the prefix its loader puts before the names)
TABLES = {
    "diffusion_model": ("flux_h128_d1_s1.tsv", "model.diffusion_model."),
    "clip_l": ("clip_l_flux.tsv", "text_encoders.clip_l.transformer."),
    "taesd": ("tae_dit16.tsv", "tae."),
}
FILE_NAMES = {
    "diffusion_model": "flux-tiny.gguf",
    "clip_l": "clip-l-random.gguf",
    "taesd": "taesd-dit16-random.gguf",
}
QUANTS = {
    "q4_0": gguf.GGMLQuantizationType.Q4_0,
    "q8_0": gguf.GGMLQuantizationType.Q8_0,
    "f16": gguf.GGMLQuantizationType.F16,
    "f32": gguf.GGMLQuantizationType.F32,
}
TAE_CHANNELS = 64


@dataclasses.dataclass(frozen=True, slots=True)
class TensorSpec:
    name: str  # without the loader's prefix
    type: str  # "f32" or "f16": what stable-diffusion.cpp would make it
    ne: tuple[int, int, int, int]  # ggml order, fastest-varying first

    @property
    def shape(self) -> tuple[int, ...]:
        """The numpy shape: ``ne`` reversed, trailing 1s dropped."""
        dims = list(self.ne)
        while len(dims) > 1 and dims[-1] == 1:
            dims.pop()
        return tuple(reversed(dims))


def read_table(part: str) -> list[TensorSpec]:
    """Every tensor stable-diffusion.cpp expects in ``part``'s file (the TAESD decoder only)."""
    tsv, prefix = TABLES[part]
    specs = []
    for line in (FIXTURES / tsv).read_text(encoding="utf-8").splitlines():
        name, ttype, *ne = line.split("\t")
        if not name.startswith(prefix):
            raise ValueError(f"{tsv}: {name!r} does not start with {prefix!r}")
        specs.append(
            TensorSpec(name.removeprefix(prefix), ttype, (int(ne[0]), int(ne[1]), int(ne[2]), int(ne[3])))
        )
    return specs


def tae_encoder_table(z_channels: int = 16) -> list[TensorSpec]:
    """The TAESD encoder, as ``TinyEncoder`` in stable-diffusion.cpp's tae.hpp builds it.

    Layer 0 is a convolution from RGB, then three groups of a strided convolution (no bias)
    and three blocks, one block first (layer 1), and a last convolution to the latent channels.
    """
    c = TAE_CHANNELS
    specs: list[TensorSpec] = []

    def conv(name: str, n_in: int, n_out: int, bias: bool = True) -> None:
        specs.append(TensorSpec(f"{name}.weight", "f16", (3, 3, n_in, n_out)))
        if bias:
            specs.append(TensorSpec(f"{name}.bias", "f32", (n_out, 1, 1, 1)))

    def block(index: int) -> None:
        for k in (0, 2, 4):
            conv(f"encoder.layers.{index}.conv.{k}", c, c)

    conv("encoder.layers.0", 3, c)
    block(1)
    for group in range(3):
        first = 2 + 4 * group
        conv(f"encoder.layers.{first}", c, c, bias=False)
        for i in range(3):
            block(first + 1 + i)
    conv("encoder.layers.14", c, z_channels)
    return specs


def vae_decoder_table(z_channels: int = 16) -> list[TensorSpec]:
    """A checkpoint's full VAE decoder, as ``AutoencoderKL`` in stable-diffusion.cpp's vae.hpp builds
    it decode-only for Flux's latents: 138 tensors, 94.6 MB in f16, names and shapes as the library
    asked for them when a checkpoint left them out or misshaped.

    A convolution to 512 channels, a middle of two blocks around an attention (1x1 convolutions),
    four levels of three blocks (512, 512, 256 and 128 channels, from the top; an upsampling
    convolution after each but the last) and a convolution to RGB.
    """
    specs: list[TensorSpec] = []

    def conv(name: str, n_in: int, n_out: int, k: int = 3) -> None:
        specs.append(TensorSpec(f"{name}.weight", "f16", (k, k, n_in, n_out)))
        specs.append(TensorSpec(f"{name}.bias", "f32", (n_out, 1, 1, 1)))

    def norm(name: str, c: int) -> None:
        specs.extend(TensorSpec(f"{name}.{w}", "f32", (c, 1, 1, 1)) for w in ("weight", "bias"))

    def block(name: str, n_in: int, n_out: int) -> None:
        norm(f"{name}.norm1", n_in)
        conv(f"{name}.conv1", n_in, n_out)
        norm(f"{name}.norm2", n_out)
        conv(f"{name}.conv2", n_out, n_out)
        if n_in != n_out:
            conv(f"{name}.nin_shortcut", n_in, n_out, k=1)

    d = "first_stage_model.decoder."
    conv(d + "conv_in", z_channels, 512)
    block(d + "mid.block_1", 512, 512)
    norm(d + "mid.attn_1.norm", 512)
    for w in ("q", "k", "v", "proj_out"):
        conv(d + f"mid.attn_1.{w}", 512, 512, k=1)
    block(d + "mid.block_2", 512, 512)
    channels = 512
    for level, wanted in ((3, 512), (2, 512), (1, 256), (0, 128)):
        for j in range(3):
            block(d + f"up.{level}.block.{j}", channels, wanted)
            channels = wanted
        if level:
            conv(d + f"up.{level}.upsample.conv", channels, channels)
    norm(d + "norm_out", 128)
    conv(d + "conv_out", 128, 3)
    return specs


def part_table(part: str, *, with_encoder: bool = True) -> list[TensorSpec]:
    """``part``'s table from its TSV, and for the TAESD the encoder too (unless ``with_encoder`` is off)."""
    specs = read_table(part)
    if part == "taesd" and with_encoder:
        (first_conv,) = (s for s in specs if s.name == "decoder.layers.0.weight")
        specs += tae_encoder_table(z_channels=first_conv.ne[2])
    return specs


# -- values ----------------------------------------------------------------------------------


def _stored_type(spec: TensorSpec, quant: str) -> gguf.GGMLQuantizationType:
    """Linear and embedding weights take ``quant`` (rows of 32); convolutions stay f16, the rest f32."""
    two_d = spec.ne[1] > 1 and spec.ne[2] == spec.ne[3] == 1
    if two_d and spec.name.endswith(".weight") and "position_embedding" not in spec.name:
        qtype = QUANTS[quant]
        block, _ = gguf.GGML_QUANT_SIZES[qtype]
        if spec.ne[0] % block == 0:
            return qtype
    return gguf.GGMLQuantizationType.F16 if spec.type == "f16" else gguf.GGMLQuantizationType.F32


def _sigma(spec: TensorSpec) -> float:
    if "embedding" in spec.name:
        return 0.02
    fan_in = int(np.prod(spec.shape[1:]))
    return 1.0 / float(np.sqrt(fan_in))


def _random_quantized(
    rng: np.random.Generator, spec: TensorSpec, qtype: gguf.GGMLQuantizationType
) -> np.ndarray:
    """Blocks of random quants written directly (quantizing 100 M floats would take seconds).

    Each block's scale takes a random sign, so the weights have mean 0 and deviation ``_sigma``.
    """
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    rows = int(np.prod(spec.shape[:-1]))
    n_blocks = rows * spec.ne[0] // block
    if qtype is gguf.GGMLQuantizationType.Q4_0:
        spread = np.sqrt((16 * 16 - 1) / 12)  # nibbles 0..15, less 8
        quants = rng.integers(0, 256, size=(n_blocks, 16), dtype=np.uint8)
    else:  # Q8_0
        spread = np.sqrt(((2 * 127 + 1) ** 2 - 1) / 12)
        quants = rng.integers(-127, 128, size=(n_blocks, 32), dtype=np.int8).view(np.uint8)
    scale = np.float16(_sigma(spec) / spread)
    signs = rng.choice(np.array([scale, -scale], dtype=np.float16), size=n_blocks)
    blocks = np.concatenate([signs.view(np.uint8).reshape(n_blocks, 2), quants], axis=1)
    return blocks.reshape(*spec.shape[:-1], spec.ne[0] // block * type_size)


def tensor_values(
    spec: TensorSpec, rng: np.random.Generator, quant: str
) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    """Random values that keep activations sane: biases 0, 1-D weights 1, N(0, 1/sqrt(fan_in)) else."""
    qtype = _stored_type(spec, quant)
    if qtype in (gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.Q8_0):
        return _random_quantized(rng, spec, qtype), qtype
    dtype = np.float16 if qtype is gguf.GGMLQuantizationType.F16 else np.float32
    if spec.name.endswith(".bias"):
        return np.zeros(spec.shape, dtype=dtype), qtype
    if len(spec.shape) == 1:
        return np.ones(spec.shape, dtype=dtype), qtype
    data = rng.standard_normal(spec.shape, dtype=np.float32) * np.float32(_sigma(spec))
    return data.astype(dtype, copy=False), qtype


# -- writing ---------------------------------------------------------------------------------


def write_gguf_part(
    path: Path,
    specs: Iterable[TensorSpec],
    *,
    quant: str = "q4_0",
    seed: int = 0,
    drop: Iterable[str] = (),
    reshape: Mapping[str, tuple[int, int, int, int]] | None = None,
) -> Path:
    """One part as GGUF: ``drop`` leaves tensors out, ``reshape`` gives some another ``ne``."""
    dropped, reshaped = set(drop), dict(reshape or {})
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), arch="allm-test")
    for spec in specs:
        if spec.name in dropped:
            continue
        if spec.name in reshaped:
            spec = dataclasses.replace(spec, ne=reshaped[spec.name])
        data, qtype = tensor_values(spec, rng, quant)
        raw_dtype = (
            qtype if qtype in (gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.Q8_0) else None
        )
        writer.add_tensor(spec.name, data, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path.absolute()


def write_tiny_flux(directory: Path, *, quant: str = "q4_0", seed: int = 0) -> dict[str, Path]:
    """The smallest Flux set stable-diffusion.cpp loads and runs (~76 MB in q4_0, most of it CLIP-L).

    Flux reads its sizes from the file (hidden 128, one head, one block of each kind), CLIP-L
    and the TAESD (encoder and decoder, 16-channel latents) are full size with random weights.
    Returns absolute paths keyed by stable-diffusion.cpp's parameter names, without ``_path``.
    """
    directory.mkdir(parents=True, exist_ok=True)
    return {
        part: write_gguf_part(directory / FILE_NAMES[part], part_table(part), quant=quant, seed=seed + i)
        for i, part in enumerate(TABLES)
    }


def write_tiny_flux_checkpoint(path: Path, *, quant: str = "q4_0", seed: int = 0) -> Path:
    """The tiny Flux as one file, as stable-diffusion.cpp loads a checkpoint (``model``): its
    diffusion model and CLIP-L under their loader prefixes, and a random full-size VAE decoder
    (a checkpoint holds no TAESD): 170 MB in q4_0, written in about 2 s. The VAE's encoder is
    left out, so it loads decode-only, as the image manager loads every model; 64x64 in 2 steps
    then takes about a second.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    specs = [
        dataclasses.replace(spec, name=TABLES[part][1] + spec.name)
        for part in ("diffusion_model", "clip_l")
        for spec in part_table(part)
    ]
    return write_gguf_part(path, specs + vae_decoder_table(), quant=quant, seed=seed)


def write_safetensors(path: Path, tensors: Mapping[str, np.ndarray]) -> Path:
    """A safetensors file: 8-byte header length, the JSON header (space-padded to 8), the data."""
    dtypes = {np.dtype(np.float16): "F16", np.dtype(np.float32): "F32"}
    header: dict[str, object] = {}
    offset = 0
    for name, data in tensors.items():
        header[name] = {
            "dtype": dtypes[data.dtype],
            "shape": list(data.shape),
            "data_offsets": [offset, offset + data.nbytes],
        }
        offset += data.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for data in tensors.values():
            f.write(np.ascontiguousarray(data).tobytes())
    return path.absolute()


def write_taesd_safetensors(path: Path, *, seed: int = 0, with_encoder: bool = True) -> Path:
    """The tiny set's TAESD as safetensors (f16 convolutions, f32 biases, as the TSV says)."""
    rng = np.random.default_rng(seed)
    tensors = {
        spec.name: tensor_values(spec, rng, "f16")[0]
        for spec in part_table("taesd", with_encoder=with_encoder)
    }
    return write_safetensors(path, tensors)


# -- damage ----------------------------------------------------------------------------------


def gguf_layout(path: Path) -> dict[str, int]:
    """Where a GGUF file's tensor table and its data start (read with gguf-py, not model_check)."""
    reader = gguf.GGUFReader(path)
    return {"tensor_table": min(t.field.offset for t in reader.tensors), "data": reader.data_offset}


def truncated_copy(src: Path, dst: Path, keep_bytes: int) -> Path:
    with src.open("rb") as f, dst.open("wb") as out:
        out.write(f.read(keep_bytes))
    return dst.absolute()


def with_magic(src: Path, dst: Path, magic: bytes) -> Path:
    data = bytearray(src.read_bytes())
    data[: len(magic)] = magic
    dst.write_bytes(bytes(data))
    return dst.absolute()


def with_broken_json(src: Path, dst: Path) -> Path:
    """A safetensors copy whose header's closing brace is gone (the length still matches)."""
    data = bytearray(src.read_bytes())
    (header_len,) = struct.unpack_from("<Q", data, 0)
    end = data.rindex(b"}", 8, 8 + header_len)
    data[end] = ord(" ")
    dst.write_bytes(bytes(data))
    return dst.absolute()


MISSING_TENSOR = "double_blocks.0.img_attn.proj.weight"
# CLIP-L's fourth MLP input weight with its two sizes swapped (a transposed tensor)
WRONG_SHAPE = ("text_model.encoder.layers.3.mlp.fc1.weight", (3072, 768, 1, 1))
# the query and key norms, from which stable-diffusion.cpp reads Flux's head size
FLUX_NORMS = [
    f"{block}.norm.{which}_norm.scale"
    for block in ("double_blocks.0.img_attn", "double_blocks.0.txt_attn", "single_blocks.0")
    for which in ("query", "key")
]

# damage → the part it hits
DAMAGED_PART = {
    "cut_in_header": "diffusion_model",  # cut inside the tensor table
    "cut_in_data": "clip_l",  # 4 KiB short: in the last tensors' data
    "wrong_magic": "taesd",  # the first 4 bytes zeroed
    "html_page": "clip_l",  # a failed download saved under the model's name
    "empty": "taesd",
    "missing_tensor": "diffusion_model",  # MISSING_TENSOR left out
    "wrong_shape": "clip_l",  # WRONG_SHAPE transposed
    "no_attention_norms": "diffusion_model",  # FLUX_NORMS left out: no head size
    "head_dim_64": "diffusion_model",  # FLUX_NORMS of 64, not 128
    "decoder_only_taesd": "taesd",
    "bad_safetensors_header": "taesd",  # a safetensors TAESD whose JSON header lost its brace
    "no_clip_l": "clip_l",  # left out of the set
}


def _html(path: Path) -> Path:
    path.write_text("<!DOCTYPE html><html><body>Sign in to download</body></html>\n", encoding="utf-8")
    return path.absolute()


def damaged_image_models(parts: Mapping[str, Path], out_dir: Path) -> dict[str, dict[str, Path]]:
    """Sets of part paths made from a good tiny set, each with one part damaged (``DAMAGED_PART``)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    flux, clip, tae = parts["diffusion_model"], parts["clip_l"], parts["taesd"]
    cut_at = gguf_layout(flux)["tensor_table"] + 40
    short = clip.stat().st_size - 4096
    assert gguf_layout(clip)["data"] < short  # the cut lands in tensor data
    flux_table, clip_table = part_table("diffusion_model"), part_table("clip_l")
    damaged = {
        "cut_in_header": truncated_copy(flux, out_dir / "flux-cut-header.gguf", cut_at),
        "cut_in_data": truncated_copy(clip, out_dir / "clip-cut-data.gguf", short),
        "wrong_magic": with_magic(tae, out_dir / "taesd-magic.gguf", bytes(4)),
        "html_page": _html(out_dir / "clip-l-html.gguf"),
        "empty": truncated_copy(tae, out_dir / "taesd-empty.gguf", 0),
        "missing_tensor": write_gguf_part(out_dir / "flux-missing.gguf", flux_table, drop=[MISSING_TENSOR]),
        "wrong_shape": write_gguf_part(out_dir / "clip-shape.gguf", clip_table, reshape=dict([WRONG_SHAPE])),
        "no_attention_norms": write_gguf_part(out_dir / "flux-no-norms.gguf", flux_table, drop=FLUX_NORMS),
        "head_dim_64": write_gguf_part(
            out_dir / "flux-head-64.gguf", flux_table, reshape=dict.fromkeys(FLUX_NORMS, (64, 1, 1, 1))
        ),
        "decoder_only_taesd": write_gguf_part(
            out_dir / "taesd-decoder-only.gguf", part_table("taesd", with_encoder=False)
        ),
        "bad_safetensors_header": with_broken_json(
            write_taesd_safetensors(out_dir / "taesd.safetensors"), out_dir / "taesd-bad-header.safetensors"
        ),
    }
    sets = {damage: {**parts, DAMAGED_PART[damage]: path} for damage, path in damaged.items()}
    sets["no_clip_l"] = {part: path for part, path in parts.items() if part != "clip_l"}
    return sets
