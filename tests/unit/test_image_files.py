"""The tiny stable-diffusion.cpp set the tests write, and the pre-load checker, on files written here."""

from __future__ import annotations

import hashlib
import json
import re
import struct
from pathlib import Path

import gguf
import numpy as np
import pytest

from allm.kernel.codes import Code, FormatMismatchError, LoadFailedError, ModelCorruptError, UnsupportedError
from allm.managers.image import model_check, sd_tensors
from allm.managers.image.model_check import check_parts, detect_family
from allm.managers.image.sd_tensors import FluxSize, Tensor
from tests.image_files import (
    DAMAGED_PART,
    FLUX_NORMS,
    MISSING_TENSOR,
    WRONG_SHAPE,
    damaged_image_models,
    part_table,
    read_table,
    tae_encoder_table,
    write_gguf_part,
    write_safetensors,
    write_taesd_safetensors,
    write_tiny_flux,
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    return write_tiny_flux(tmp_path_factory.mktemp("flux"))


@pytest.fixture(scope="module")
def damaged(tiny, tmp_path_factory) -> dict[str, dict[str, Path]]:
    return damaged_image_models(tiny, tmp_path_factory.mktemp("damaged"))


def _ne_table(part: str, **kwargs) -> dict[str, tuple[int, ...]]:
    return {spec.name: spec.ne for spec in part_table(part, **kwargs)}


# -- the tables: model_check's, built in code, against what stable-diffusion.cpp recorded ----------


def test_clip_l_table_is_the_recorded_one():
    assert sd_tensors.clip_l_table() == _ne_table("clip_l")
    assert len(sd_tensors.clip_l_table()) == 196  # 4 + 16 per layer of 12


def test_taesd_decoder_table_is_the_recorded_one():
    assert sd_tensors.taesd_table(16, encoder=False) == _ne_table("taesd", with_encoder=False)


def test_taesd_encoder_tables_agree():
    """The fixture's encoder (written from tae.hpp by hand) and the checker's are the same."""
    checker = sd_tensors.taesd_table(16)
    encoder = {name: ne for name, ne in checker.items() if name.startswith("encoder.")}
    assert encoder == {spec.name: spec.ne for spec in tae_encoder_table(16)}
    assert len(encoder) == 67  # 2 convolutions with bias, 3 without, 10 blocks of 3 with bias
    assert encoder["encoder.layers.14.weight"] == (3, 3, 64, 16)
    assert sd_tensors.taesd_table(4)["decoder.layers.0.weight"] == (3, 3, 4, 64)


def test_flux_table_is_the_recorded_one():
    recorded = _ne_table("diffusion_model")
    assert sd_tensors.flux_table(FluxSize(hidden=128, depth=1, depth_single=1, guidance=False)) == recorded


def test_flux_table_scales_like_flux_dev():
    """Flux dev's 19 double and 38 single blocks of 3072, with guidance: 780 tensors."""
    table = sd_tensors.flux_table(FluxSize(hidden=3072, depth=19, depth_single=38, guidance=True))
    assert len(table) == 780
    assert table["single_blocks.37.linear1.weight"] == (3072, 3 * 3072 + 4 * 3072, 1, 1)
    assert table["double_blocks.18.img_attn.norm.key_norm.scale"] == (128, 1, 1, 1)
    assert table["guidance_in.in_layer.weight"] == (256, 3072, 1, 1)


def test_table_rows_read_in_ggml_order():
    (embedding,) = (s for s in read_table("clip_l") if s.name.endswith("token_embedding.weight"))
    assert embedding.ne == (768, 49408, 1, 1)
    assert embedding.shape == (49408, 768)
    (conv,) = (s for s in read_table("taesd") if s.name == "decoder.layers.0.weight")
    assert conv.shape == (64, 16, 3, 3)


# -- the writer ------------------------------------------------------------------------------------


def test_tiny_flux_passes_the_checks(tiny):
    info = check_parts(tiny)
    assert info.family == "flux"
    assert set(info.parts) == {"diffusion_model", "clip_l", "taesd"}
    for part, path in tiny.items():
        assert path.is_absolute()
        checked = info.parts[part]
        assert (checked.format, checked.size_bytes, checked.verified) == ("gguf", path.stat().st_size, True)
        assert checked.n_tensors == len(part_table(part))
        assert 0.9 * checked.size_bytes < checked.weights_bytes <= checked.size_bytes
    assert info.weights_bytes == sum(p.weights_bytes for p in info.parts.values())
    assert 70e6 < info.weights_bytes < 80e6  # q4_0: CLIP-L is most of it


def test_writer_stores_the_documented_types(tiny):
    types = {}
    for path in tiny.values():
        types |= {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    assert types["txt_in.weight"] == "Q4_0"  # linear weights: rows of 4096
    assert types["text_model.embeddings.token_embedding.weight"] == "Q4_0"
    assert types["text_model.embeddings.position_embedding.weight"] == "F32"
    assert types["decoder.layers.0.weight"] == "F16"  # convolution kernels
    assert types["encoder.layers.14.weight"] == "F16"
    assert types["txt_in.bias"] == types["single_blocks.0.norm.key_norm.scale"] == "F32"


def test_random_weights_have_the_intended_spread(tiny):
    tensors = {t.name: t for t in gguf.GGUFReader(tiny["clip_l"]).tensors}
    fc1 = tensors["text_model.encoder.layers.0.mlp.fc1.weight"]
    values = gguf.quants.dequantize(fc1.data, fc1.tensor_type)
    assert values.shape == (3072, 768)
    assert abs(float(values.mean())) < 1e-3
    assert float(values.std()) == pytest.approx(1 / np.sqrt(768), rel=0.05)
    bias = tensors["text_model.encoder.layers.0.mlp.fc1.bias"]
    assert not np.asarray(bias.data).any()
    norm = tensors["text_model.final_layer_norm.weight"]
    assert (np.asarray(norm.data) == 1).all()


def test_writer_is_repeatable(tmp_path, tiny):
    again = write_tiny_flux(tmp_path / "again")
    other = write_tiny_flux(tmp_path / "other", seed=1)

    def digest(path: Path) -> str:
        return hashlib.sha256(path.read_bytes()).hexdigest()

    assert all(digest(again[p]) == digest(tiny[p]) for p in tiny)
    assert all(digest(other[p]) != digest(tiny[p]) for p in tiny)


def test_q8_0_set_passes(tmp_path):
    parts = write_tiny_flux(tmp_path, quant="q8_0")
    info = check_parts(parts)
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(parts["diffusion_model"]).tensors}
    assert types["txt_in.weight"] == "Q8_0"
    assert 130e6 < info.weights_bytes < 140e6


def test_safetensors_taesd_passes(tmp_path, tiny):
    taesd = write_taesd_safetensors(tmp_path / "taesd.safetensors")
    info = check_parts({**tiny, "taesd": taesd})
    assert (info.parts["taesd"].format, info.parts["taesd"].verified) == ("safetensors", True)
    assert info.parts["taesd"].n_tensors == 134


def test_decode_only_takes_a_decoder_only_taesd(damaged):
    parts = damaged["decoder_only_taesd"]
    info = check_parts(parts, decode_only=True)
    assert info.decode_only
    assert info.parts["taesd"].verified


def test_prefixed_names_are_stripped(tmp_path, tiny):
    """Files written by stable-diffusion.cpp's converter carry the loader's prefixes."""
    specs = [
        spec.__class__(f"model.diffusion_model.{spec.name}", spec.type, spec.ne)
        for spec in part_table("diffusion_model")
    ]
    flux = write_gguf_part(tmp_path / "prefixed.gguf", specs)
    assert check_parts({**tiny, "diffusion_model": flux}).parts["diffusion_model"].verified


# -- each damage: its code, and a message naming the part and the cause ------------------------

EXPECTED = {
    "cut_in_header": (ModelCorruptError, r"truncated in the tensor table.*: needs \d+ bytes, file has \d+"),
    "cut_in_data": (ModelCorruptError, r"truncated in tensor data: needs 69858048 bytes, file has 69853952"),
    "wrong_magic": (FormatMismatchError, r"neither GGUF nor safetensors: it looks like .* 00000000"),
    "html_page": (FormatMismatchError, r"neither GGUF nor safetensors: it looks like an HTML"),
    "empty": (FormatMismatchError, r"is empty \(0 bytes\)"),
    "missing_tensor": (ModelCorruptError, re.escape(f"tensor '{MISSING_TENSOR}' missing")),
    "wrong_shape": (
        ModelCorruptError,
        re.escape(
            f"tensor '{WRONG_SHAPE[0]}' has shape [3072, 768, 1, 1], stable-diffusion.cpp expects [768, 3072"
        ),
    ),
    "no_attention_norms": (
        ModelCorruptError,
        re.escape(f"tensors '{FLUX_NORMS[0]}'") + ".* and 3 more missing",
    ),
    "head_dim_64": (
        ModelCorruptError,
        r"norm.scale' has shape \[64, 1, 1, 1\], stable-diffusion.cpp expects \[128",
    ),
    "decoder_only_taesd": (UnsupportedError, r"holds only the decoder.*vae_decode_only"),
    "bad_safetensors_header": (ModelCorruptError, r"the safetensors header is not JSON"),
    "no_clip_l": (UnsupportedError, r"a Flux model needs its text encoder, part clip_l"),
}


def test_every_damage_has_an_expectation(damaged):
    assert set(EXPECTED) == set(damaged) == set(DAMAGED_PART)


@pytest.mark.parametrize("damage", sorted(EXPECTED))
def test_damage_is_refused_with_its_code_naming_the_part(damaged, damage):
    error, pattern = EXPECTED[damage]
    parts = damaged[damage]
    with pytest.raises(error) as caught:
        check_parts(parts)
    message = caught.value.message
    assert re.search(pattern, message), message
    part = DAMAGED_PART[damage]
    if part in parts:
        assert message.startswith(f"{part} ({parts[part].name})"), message
    else:
        assert part in message


def test_codes_of_the_causes(damaged):
    codes = set()
    for damage, parts in damaged.items():
        with pytest.raises((ModelCorruptError, FormatMismatchError, UnsupportedError)) as caught:
            check_parts(parts)
        codes.add(caught.value.code)
        assert caught.value.code is EXPECTED[damage][0].code
    assert codes == {Code.MODEL_CORRUPT, Code.FORMAT_MISMATCH, Code.UNSUPPORTED}


# -- paths and sets ------------------------------------------------------------------------------


def test_paths_that_cannot_load(tmp_path, tiny):
    cases = {
        "relative": (Path("flux.gguf"), "must be absolute"),
        "missing": (tmp_path / "nowhere.gguf", "not found"),
        "directory": (tmp_path, "is a directory"),
    }
    for path, words in cases.values():
        with pytest.raises(LoadFailedError, match=words) as caught:
            check_parts({**tiny, "clip_l": path})
        assert caught.value.message.startswith("clip_l ")


def test_sets_that_cannot_load(tiny):
    with pytest.raises(UnsupportedError, match="unknown model part 'lora'"):
        check_parts({**tiny, "lora": tiny["taesd"]})
    with pytest.raises(UnsupportedError, match="needs a model or a diffusion_model"):
        check_parts({"clip_l": tiny["clip_l"], "taesd": tiny["taesd"]})
    with pytest.raises(UnsupportedError, match="needs a VAE: part vae or taesd"):
        check_parts({"diffusion_model": tiny["diffusion_model"], "clip_l": tiny["clip_l"]})
    with pytest.raises(UnsupportedError, match="no model family"):
        check_parts({"diffusion_model": tiny["taesd"], "clip_l": tiny["clip_l"]})


def test_a_taesd_for_other_latents_is_refused(tmp_path, tiny):
    """SD1's TAESD (4 latent channels) handed to a Flux: the first convolution says so."""
    sd1 = write_gguf_part(
        tmp_path / "taesd-sd1.gguf", part_table("taesd"), reshape={"decoder.layers.0.weight": (3, 3, 4, 64)}
    )
    with pytest.raises(ModelCorruptError, match=r"\[3, 3, 4, 64\].*expects \[3, 3, 16, 64\].*flux's latents"):
        check_parts({**tiny, "taesd": sd1})


# -- the GGUF and safetensors readers, on files made byte by byte -------------------------------


def _gguf(
    tensors: list[tuple[str, tuple[int, ...], int, int]],
    *,
    version: int = 3,
    kv: bytes = b"",
    n_kv: int = 0,
    data_bytes: int = 0,
) -> bytes:
    """A GGUF file: (name, dims, type, offset) records, then ``data_bytes`` of zeros after alignment."""
    out = b"GGUF" + struct.pack("<IQQ", version, len(tensors), n_kv) + kv
    for name, dims, ttype, offset in tensors:
        raw = name.encode()
        out += struct.pack("<Q", len(raw)) + raw + struct.pack("<I", len(dims))
        out += struct.pack(f"<{len(dims)}Q", *dims) + struct.pack("<IQ", ttype, offset)
    out += bytes(-len(out) % 32)
    return out + bytes(data_bytes)


def _read(tmp_path: Path, data: bytes, name: str = "part.gguf"):
    path = tmp_path / name
    path.write_bytes(data)
    return model_check.read_part("vae", path)


F32, Q4_0 = 0, 2


def test_gguf_reader_reads_sizes_and_types(tmp_path):
    part = _read(tmp_path, _gguf([("a", (32, 2), Q4_0, 0), ("b", (3,), F32, 64)], data_bytes=76))
    assert part.tensors == {"a": Tensor((32, 2, 1, 1), "q4_0", 36), "b": Tensor((3, 1, 1, 1), "f32", 12)}
    assert part.info.weights_bytes == 48


@pytest.mark.parametrize(
    ("data", "error", "words"),
    [
        (_gguf([], version=1), UnsupportedError, "GGUF version 1"),
        (_gguf([("a", (4,), F32, 0)], data_bytes=8), ModelCorruptError, "needs 80 bytes, file has 72"),
        (_gguf([("a", (4,), 99, 0)], data_bytes=16), ModelCorruptError, "unknown type 99"),
        (_gguf([("a", (1, 1, 1, 1, 1), F32, 0)]), ModelCorruptError, "claims 5 dimensions"),
        (
            _gguf([("a", (4,), F32, 0), ("a", (4,), F32, 32)], data_bytes=48),
            ModelCorruptError,
            "appears twice",
        ),
        (_gguf([("a", (4,), F32, 0), ("b", (4,), F32, 16)], data_bytes=48), ModelCorruptError, "expected 32"),
        (_gguf([("a", (16,), Q4_0, 0)], data_bytes=32), ModelCorruptError, "not a multiple of 32"),
        (_gguf([], n_kv=1 << 40), ModelCorruptError, "claims 0 tensors and 1099511627776"),
        (
            _gguf([], n_kv=1, kv=struct.pack("<Q", 17) + b"general.alignment" + struct.pack("<IQ", 10, 32)),
            ModelCorruptError,
            "general.alignment has type 10",
        ),
        (
            _gguf([], n_kv=1, kv=struct.pack("<Q", 17) + b"general.alignment" + struct.pack("<II", 4, 48)),
            ModelCorruptError,
            "not a power of 2",
        ),
        (_gguf([], n_kv=1, kv=struct.pack("<Q", 1 << 40)), ModelCorruptError, "claims 1099511627776 bytes"),
    ],
    ids=[
        "version_1",
        "data_cut",
        "unknown_type",
        "five_dims",
        "duplicate",
        "gap",
        "partial_block",
        "huge_key_count",
        "alignment_u64",
        "alignment_48",
        "huge_key",
    ],
)
def test_gguf_reader_refuses_what_ggml_refuses(tmp_path, data, error, words):
    with pytest.raises(error, match=words):
        _read(tmp_path, data)


def test_safetensors_reader(tmp_path):
    path = write_safetensors(tmp_path / "a.safetensors", {"w": np.zeros((2, 3), np.float16)})
    part = model_check.read_part("vae", path)
    assert part.info.format == "safetensors"
    assert part.tensors == {"w": Tensor((3, 2, 1, 1), "f16", 12)}


def _safetensors(header: dict, data_bytes: int) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + bytes(data_bytes)


@pytest.mark.parametrize(
    ("header", "data_bytes", "error", "words"),
    [
        ({"w": {"dtype": "F16", "shape": [4], "data_offsets": [0, 8]}}, 4, ModelCorruptError, "needs"),
        ({"w": {"dtype": "F16", "shape": [4], "data_offsets": [0, 6]}}, 8, ModelCorruptError, "not 4 F16"),
        ({"w": {"shape": [4], "data_offsets": [0, 8]}}, 8, ModelCorruptError, "no dtype"),
        (
            {"w": {"dtype": "F16", "shape": "4", "data_offsets": [0, 8]}},
            8,
            ModelCorruptError,
            "no valid shape",
        ),
        ({"w": {"dtype": "I8", "shape": [4], "data_offsets": [0, 4]}}, 4, UnsupportedError, "dtype I8"),
        ({"w": [1, 2]}, 0, ModelCorruptError, "no description"),
    ],
)
def test_safetensors_reader_refuses(tmp_path, header, data_bytes, error, words):
    with pytest.raises(error, match=words):
        _read(tmp_path, _safetensors(header, data_bytes), "part.safetensors")


def test_a_safetensors_header_longer_than_the_file_is_truncation(tmp_path):
    data = _safetensors({"w": {"dtype": "F16", "shape": [4], "data_offsets": [0, 8]}}, 8)
    with pytest.raises(ModelCorruptError, match=r"truncated in the safetensors header: needs \d+ bytes"):
        _read(tmp_path, data[:40], "part.safetensors")


@pytest.mark.parametrize(
    ("head", "words"),
    [
        (b"PK\x03\x04rest", "zip archive"),
        (b"\x80\x02}q\x00", "pickle"),
        (b"version https://git-lfs.github.com/spec/v1\n", "Git LFS pointer"),
        (b"lmgg" + bytes(40), "whisper.cpp"),
        (b"\x00\x01\x02\x03", "starts with 00010203"),
    ],
)
def test_foreign_files_say_what_they_look_like(tmp_path, head, words):
    with pytest.raises(FormatMismatchError, match=words):
        _read(tmp_path, head)


# -- families ------------------------------------------------------------------------------------


def _t(*dims: int) -> Tensor:
    ne = (*dims, 1, 1, 1, 1)
    return Tensor((ne[0], ne[1], ne[2], ne[3]), "f16", 0)


@pytest.mark.parametrize(
    ("names", "family"),
    [
        ({"double_blocks.0.img_mod.lin.weight": _t(1)}, "flux"),
        ({"double_blocks.0.x": _t(1), "distilled_guidance_layer.in_proj.weight": _t(1)}, "chroma"),
        ({"double_stream_modulation_img.lin.weight": _t(1), "double_blocks.0.x": _t(1)}, "flux2"),
        ({"joint_blocks.0.x": _t(1)}, "sd3"),
        ({"input_blocks.0.0.weight": _t(3, 3, 4, 320), "label_emb.0.0.weight": _t(1)}, "sdxl"),
        ({"input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": _t(768, 320)}, "sd1"),
        ({"input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": _t(1024, 320)}, "sd2"),
        ({"input_blocks.0.0.weight": _t(3, 3, 4, 320)}, "sd1/sd2"),
        ({"decoder.layers.0.weight": _t(1)}, None),
    ],
)
def test_family_from_tensor_names(names, family):
    assert detect_family(names) == family
