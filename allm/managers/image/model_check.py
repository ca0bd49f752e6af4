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
misshapen tensor with a NULL context (the engine checks that pointer). The headers are read
by ``allm/managers/files`` (ggml's ``gguf_init_from_file`` checks, the safetensors layout), the
tables come from ``sd_tensors``; the rules here are stable-diffusion.cpp's
(``ModelLoader::get_sd_version``, ``FluxRunner``, ``TinyEncoder`` and ``TinyDecoder``,
``read_safetensors_file``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path

from allm.kernel.codes import FormatMismatchError, LoadFailedError, ModelCorruptError, UnsupportedError
from allm.managers.files.gguf import GGUFHeader, read_gguf
from allm.managers.files.safetensors import TensorEntry, read_safetensors
from allm.managers.files.sniff import GGUF_MAGIC, Reader, looks_like, open_model, safetensors_header_length
from allm.managers.image.sd_tensors import Ne, Tensor, clip_l_table, flux_size, flux_table, taesd_table

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

GGML_TYPE_COUNT = 41  # in the ggml stable-diffusion-cpp-python 0.4.7 builds (gguf-py knows newer ones)
MAX_DIMS = 4
# dtypes read_safetensors_file takes (U8 tensors it skips)
SAFETENSORS_DTYPES = frozenset({"F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2", "I32", "I64", "U8"})


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


# -- reading a part --------------------------------------------------------------------------

# What to do with a file that is neither GGUF nor safetensors, by what it looks like.
_ADVICE = {
    "zip": "a PyTorch .ckpt/.pt checkpoint? convert it to GGUF or safetensors",
    "pickle": "an old PyTorch checkpoint? convert it to GGUF or safetensors",
}


def _ne(dims: list[int]) -> Ne:
    ne = (*dims, *[1] * (MAX_DIMS - len(dims)))
    return (ne[0], ne[1], ne[2], ne[3])


def _gguf_tensors(header: GGUFHeader, r: Reader) -> dict[str, Tensor]:
    """The tensors, each of a type stable-diffusion.cpp's ggml knows."""
    tensors: dict[str, Tensor] = {}
    for t in header.tensors:
        if t.type >= GGML_TYPE_COUNT:
            raise UnsupportedError(
                f"{r.label}: tensor {t.name!r} has type {t.type_name}, newer than stable-diffusion.cpp's ggml"
            )
        tensors[t.name] = Tensor(_ne(list(t.shape)), t.type_name.lower(), t.size_bytes)
    return tensors


def _safetensors_tensors(entries: Mapping[str, TensorEntry], r: Reader) -> dict[str, Tensor]:
    """The tensors as read_safetensors_file keeps them: its dtypes only, U8 skipped, 5-D folded."""
    tensors: dict[str, Tensor] = {}
    for name, entry in entries.items():
        if entry.dtype not in SAFETENSORS_DTYPES:
            raise UnsupportedError(
                f"{r.label}: tensor {name!r} has dtype {entry.dtype}, which stable-diffusion.cpp cannot read"
            )
        if len(entry.shape) > MAX_DIMS + 1:
            raise r.corrupt(f"tensor {name!r} has {len(entry.shape)} dimensions")
        if entry.dtype == "U8":
            continue  # the library skips these
        dims = list(reversed(entry.shape)) or [1]
        if len(dims) == 5:  # folded as the library does
            dims = [dims[0] * dims[1], *dims[2:]]
        tensors[name] = Tensor(_ne(dims), entry.dtype.lower(), entry.size_bytes)
    return tensors


def _strip(name: str, prefixes: tuple[str, ...]) -> str:
    for prefix in prefixes:
        if name.startswith(prefix):
            return name[len(prefix) :]
    return name


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
    if not path.is_absolute():
        raise LoadFailedError(f"{label}: the path must be absolute, not {str(path)!r}")
    with open_model(path, label) as r:
        head = r.opening(32)
        if not head:
            raise FormatMismatchError(f"{label} is empty (0 bytes): not a GGUF or safetensors model")
        if head.startswith(GGUF_MAGIC):
            fmt, tensors = "gguf", _gguf_tensors(read_gguf(r, "stable-diffusion.cpp"), r)
        elif safetensors_header_length(head) is not None:
            fmt, tensors = "safetensors", _safetensors_tensors(read_safetensors(r), r)
        else:
            raise FormatMismatchError(
                f"{label} is neither GGUF nor safetensors: it looks like {looks_like(head, _ADVICE)}"
            )
    stripped = {_strip(name, PREFIXES[part]): tensor for name, tensor in tensors.items()}
    weights = sum(t.nbytes for t in tensors.values())
    return _Part(PartInfo(part, path, fmt, r.size, weights, len(tensors), False), stripped)


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
