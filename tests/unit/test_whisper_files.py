"""whisper.cpp's file format, the CTranslate2 converter and the pre-load checker, on files written here."""

from __future__ import annotations

import dataclasses
import struct
from pathlib import Path

import numpy as np
import pytest

from allm.kernel.codes import FormatMismatchError, LoadFailedError, ModelCorruptError, UnsupportedError
from allm.managers.audio.ct2_convert import convert
from allm.managers.audio.model_check import check_model
from allm.managers.files import ggml
from allm.managers.files.ggml import GGMLType, Hparams
from tests.model_files import write_gguf
from tests.whisper_files import (
    ct2_variables,
    damaged_models,
    read_ggml_tensors,
    section_offsets,
    tiny_hparams,
    tiny_vocab,
    truncated_copy,
    with_hparams,
    write_ct2_model_bin,
    write_ct2_whisper,
    write_tiny_whisper,
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_tiny_whisper(tmp_path_factory.mktemp("whisper") / "tiny.bin")


@pytest.fixture(scope="module")
def damaged(tiny, tmp_path_factory) -> dict[str, Path]:
    return damaged_models(tiny, tmp_path_factory.mktemp("damaged"))


# -- the format ------------------------------------------------------------------------------


def test_hparams_pack_in_file_order():
    hparams = tiny_hparams()
    raw = hparams.pack()
    assert struct.unpack("<11i", raw) == (51864, 1500, 64, 4, 1, 448, 64, 4, 1, 80, 1)
    assert Hparams.unpack(raw) == hparams
    assert not hparams.multilingual
    assert tiny_hparams(multilingual=True).multilingual


def test_written_file_has_whisper_cpp_layout(tiny):
    """Magic, header, filterbank, vocabulary and a tensor record, byte for byte as whisper.cpp reads them."""
    data = tiny.read_bytes()
    assert data[:4] == b"lmgg"
    assert struct.unpack_from("<I", data, 0)[0] == 0x67676D6C
    assert struct.unpack_from("<11i", data, 4) == struct.unpack("<11i", tiny_hparams().pack())
    assert struct.unpack_from("<2i", data, 48) == (80, 201)
    filters = np.frombuffer(data, dtype="<f4", count=80 * 201, offset=56).reshape(80, 201)
    np.testing.assert_array_equal(filters, ggml.mel_filters(80))
    vocab_at = 56 + 80 * 201 * 4
    assert struct.unpack_from("<i", data, vocab_at)[0] == 50256  # the ordinary tokens, specials left out
    assert struct.unpack_from("<I", data, vocab_at + 4)[0] == 1
    assert data[vocab_at + 8] == 0  # token 0 is the byte 0x00
    at = section_offsets(tiny)["tensors"]
    n_dims, name_len, ttype = struct.unpack_from("<3i", data, at)
    assert (n_dims, ttype) == (2, GGMLType.F32)
    assert struct.unpack_from("<2i", data, at + 12) == (64, 1500)  # fastest-varying first
    assert data[at + 20 : at + 20 + name_len] == b"encoder.positional_embedding"


def test_tensor_shapes_and_types_are_whisper_cpps():
    hparams = tiny_hparams(n_layer=4)
    shapes = ggml.tensor_shapes(hparams)
    types = ggml.tensor_types(hparams)
    # whisper_model_load: 7 encoder tensors + 15 per encoder block, 4 decoder + 24 per decoder block
    assert len(shapes) == 7 + 15 * 4 + 4 + 24 * 4
    assert shapes["encoder.conv1.weight"] == (64, 80, 3)
    assert types["encoder.conv1.weight"] is GGMLType.F16
    assert shapes["encoder.conv1.bias"] == (64, 1)
    assert types["encoder.conv1.bias"] is GGMLType.F32
    assert shapes["encoder.positional_embedding"] == (1500, 64)
    assert types["decoder.positional_embedding"] is GGMLType.F32
    assert shapes["decoder.token_embedding.weight"] == (51864, 64)
    assert types["decoder.token_embedding.weight"] is GGMLType.F16
    assert shapes["encoder.blocks.3.mlp.0.weight"] == (256, 64)
    assert shapes["decoder.blocks.3.mlp.2.weight"] == (64, 256)
    assert types["decoder.blocks.0.cross_attn_ln.bias"] is GGMLType.F32
    assert "decoder.blocks.0.cross_attn.key.weight" in shapes
    assert not any(name.endswith("key.bias") for name in shapes)  # whisper has no key biases
    q8 = ggml.tensor_types(dataclasses.replace(hparams, ftype=2007))
    assert q8["decoder.token_embedding.weight"] is GGMLType.Q8_0
    assert q8["encoder.conv2.weight"] is GGMLType.F16  # convolutions stay f16 in a quantized model
    assert q8["encoder.positional_embedding"] is GGMLType.F32


def test_type_sizes_agree_with_ggml():
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    for ggml_type, size in ggml.TYPE_SIZES.items():
        assert GGML_QUANT_SIZES[GGMLQuantizationType(int(ggml_type))] == size, ggml_type.name


def test_mel_filters_are_whispers_slaney_filterbank():
    """librosa.filters.mel(sr=16000, n_fft=400, n_mels=80), which whisper's mel_filters.npz holds."""
    filters = ggml.mel_filters(80)
    assert filters.shape == (80, 201)
    assert filters.dtype == np.float32
    assert (filters >= 0).all()
    assert ((filters > 0).sum(axis=1) >= 1).all()
    peaks = filters.argmax(axis=1)
    assert (np.diff(peaks) >= 0).all()  # the triangles climb the spectrum
    # the values librosa (and transformers' independent mel_filter_bank) give
    assert filters[0, 1] == pytest.approx(0.02486259, rel=1e-6)
    assert filters.sum() == pytest.approx(1.9990242, rel=1e-6)
    assert filters.max() == pytest.approx(0.025880685, rel=1e-6)
    assert ggml.mel_filters(128).shape == (128, 201)
    assert ggml.mel_filters(128).sum() == pytest.approx(3.1909857, rel=1e-6)


def test_mel_filters_match_transformers_whisper_feature_extractor():
    from transformers.audio_utils import mel_filter_bank

    for n_mels in (80, 128):
        reference = mel_filter_bank(
            num_frequency_bins=201,
            num_mel_filters=n_mels,
            min_frequency=0.0,
            max_frequency=8000.0,
            sampling_rate=16000,
            norm="slaney",
            mel_scale="slaney",
        ).T
        np.testing.assert_allclose(ggml.mel_filters(n_mels), reference, atol=1e-8)


def test_write_ggml_refuses_other_dtypes(tmp_path):
    with pytest.raises(ValueError, match="float32 nor float16"):
        ggml.write_ggml(
            tmp_path / "x.bin",
            tiny_hparams(),
            ggml.mel_filters(80),
            [],
            [("t", np.zeros(3, np.int32))],
        )


# -- the checker -------------------------------------------------------------------------------


def test_check_model_accepts_the_tiny_model(tiny):
    info = check_model(tiny)
    assert info.hparams == tiny_hparams()
    assert info.path == tiny
    assert not info.multilingual
    assert info.n_tensors == 50
    assert info.size_bytes == tiny.stat().st_size
    types = ggml.tensor_types(info.hparams)
    expected = sum(
        ggml.tensor_nbytes(shape, types[name]) for name, shape in ggml.tensor_shapes(info.hparams).items()
    )
    assert info.weights_bytes == expected
    assert info.size_bytes - info.weights_bytes < 1_000_000  # the rest: headers, filters, vocabulary


def test_check_model_accepts_a_multilingual_four_layer_model(tmp_path):
    info = check_model(write_tiny_whisper(tmp_path / "ml.bin", multilingual=True, n_layer=4, seed=3))
    assert info.multilingual
    assert info.hparams.n_vocab == 51865
    assert info.n_tensors == 7 + 15 * 4 + 4 + 24 * 4


def test_relative_path_is_load_failed(tiny, monkeypatch):
    monkeypatch.chdir(tiny.parent)
    with pytest.raises(LoadFailedError, match="absolute"):
        check_model(Path(tiny.name))
    with pytest.raises(LoadFailedError, match="absolute"):
        check_model(Path("tiny.en"))  # what pywhispercpp would download


def test_missing_file_and_directory_are_load_failed(tmp_path):
    with pytest.raises(LoadFailedError, match="not found"):
        check_model(tmp_path / "nothing.bin")
    with pytest.raises(LoadFailedError, match="directory"):
        check_model(tmp_path)


EXPECTED_DAMAGE = {
    "empty": (FormatMismatchError, "empty"),
    "cut_in_header": (ModelCorruptError, "truncated in the hyper-parameters: needs 48 bytes, file has 30"),
    "cut_in_filters": (ModelCorruptError, "truncated in the mel filters"),
    "cut_in_vocab": (ModelCorruptError, "truncated in the vocabulary"),
    "cut_before_tensors": (ModelCorruptError, "no tensors"),
    "cut_in_tensor_record": (ModelCorruptError, "truncated in the tensor table"),
    "cut_in_first_tensor": (ModelCorruptError, "truncated in tensor 'encoder.positional_embedding'"),
    "cut_in_last_tensor": (ModelCorruptError, "truncated in tensor 'decoder.blocks.0.mlp.2.bias'"),
    "half": (ModelCorruptError, "truncated in tensor"),
    "state_mismatch": (ModelCorruptError, "n_audio_state 64 differs from n_text_state 32"),
    "unknown_ftype": (ModelCorruptError, "ftype 5"),
    "zero_layers": (ModelCorruptError, "n_audio_layer is 0"),
    "huge_vocab": (ModelCorruptError, "n_vocab is 1073741824"),
    "negative_ctx": (ModelCorruptError, "n_text_ctx is -448"),
    "missing_tensor": (ModelCorruptError, r"1 of 50 tensors are missing \('decoder.blocks.0.mlp.0.weight'\)"),
    "wrong_shape": (ModelCorruptError, r"'encoder.conv1.bias' has shape \[64\], .* make it \[64, 1\]"),
}


@pytest.mark.parametrize("kind", sorted(EXPECTED_DAMAGE))
def test_check_model_names_each_damage(damaged, kind):
    error, message = EXPECTED_DAMAGE[kind]
    with pytest.raises(error, match=message):
        check_model(damaged[kind])


def test_every_damage_kind_is_covered(damaged):
    assert set(damaged) == set(EXPECTED_DAMAGE)


def test_truncation_reports_needed_and_actual_size(tiny, tmp_path):
    size = tiny.stat().st_size
    cut = truncated_copy(tiny, tmp_path / "cut.bin", size - 1)
    with pytest.raises(ModelCorruptError, match=f"needs {size} bytes, file has {size - 1}"):
        check_model(cut)


def test_foreign_files_are_format_mismatch_and_say_what_they_look_like(tmp_path):
    gguf = write_gguf(tmp_path / "model.gguf").absolute()
    with pytest.raises(FormatMismatchError, match="GGUF"):
        check_model(gguf)
    ct2 = write_ct2_model_bin(tmp_path / "model.bin", {"encoder/num_heads": np.array(6, np.int16)})
    with pytest.raises(FormatMismatchError, match=r"CTranslate2 model\.bin .*ct2_convert"):
        check_model(ct2.absolute())
    html = tmp_path / "page.bin"
    html.write_bytes(b"<!DOCTYPE html><html>rate limited</html>")
    with pytest.raises(FormatMismatchError, match="HTML"):
        check_model(html)
    noise = tmp_path / "noise.bin"
    noise.write_bytes(bytes(range(7, 107)))
    with pytest.raises(FormatMismatchError, match="starts with 0708090a"):
        check_model(noise)


@pytest.mark.parametrize(
    ("changes", "error", "message"),
    [
        ({"n_vocab": 50000}, ModelCorruptError, "n_vocab is 50000"),
        ({"n_mels": 40}, ModelCorruptError, "n_mels is 40"),
        ({"n_audio_head": 3}, ModelCorruptError, "n_audio_head 3 does not divide"),
        ({"n_text_head": 0}, ModelCorruptError, "n_text_head 0"),
        ({"n_text_layer": 100_000}, ModelCorruptError, "n_text_layer is 100000"),
        ({"n_audio_ctx": 0}, ModelCorruptError, "n_audio_ctx is 0"),
        ({"n_audio_state": -64, "n_text_state": -64}, ModelCorruptError, "n_audio_state is -64"),
        ({"ftype": -1}, ModelCorruptError, "ftype is -1"),
        ({"ftype": 4}, ModelCorruptError, "ftype 4 is no ggml file type"),
        ({"ftype": 5_000_001}, ModelCorruptError, "ftype is 5000001"),
        ({"ftype": 2016}, UnsupportedError, "ftype 16"),
        ({"ftype": 0}, UnsupportedError, "all-f32"),
        ({"ftype": 2}, UnsupportedError, "quantization version 0"),
        ({"ftype": 2002}, ModelCorruptError, "is f16, whisper.cpp expects q4_0"),
        ({"n_vocab": 51866}, ModelCorruptError, r"'decoder.token_embedding.weight' has shape \[51864, 64\]"),
    ],
)
def test_insane_hyper_parameters_are_refused(tiny, tmp_path, changes, error, message):
    with pytest.raises(error, match=message):
        check_model(with_hparams(tiny, tmp_path / "h.bin", **changes))


def test_mismatched_filterbank_is_corrupt(tiny, tmp_path):
    bad = tmp_path / "filters.bin"
    data = bytearray(tiny.read_bytes())
    data[48:56] = struct.pack("<2i", 80, 200)
    bad.write_bytes(bytes(data))
    with pytest.raises(ModelCorruptError, match=r"mel filters are 80 × 200"):
        check_model(bad)


def test_duplicate_and_unknown_tensors_are_corrupt(tmp_path):
    hparams = tiny_hparams()
    filters, vocab = ggml.mel_filters(80), tiny_vocab(hparams)
    bias = np.zeros(64, np.float32)
    ggml.write_ggml(tmp_path / "dup.bin", hparams, filters, vocab, [("decoder.ln.bias", bias)] * 2)
    with pytest.raises(ModelCorruptError, match=r"'decoder\.ln\.bias' appears twice"):
        check_model(tmp_path / "dup.bin")
    ggml.write_ggml(tmp_path / "unk.bin", hparams, filters, vocab, [("decoder.blocks.1.mlp_ln.bias", bias)])
    with pytest.raises(ModelCorruptError, match=r"unknown tensor 'decoder\.blocks\.1\.mlp_ln\.bias'"):
        check_model(tmp_path / "unk.bin")


def test_wrong_tensor_type_is_corrupt(tmp_path):
    hparams = tiny_hparams()
    tensors = [("encoder.conv1.bias", np.zeros((64, 1), np.float16))]  # whisper.cpp reads it as f32
    ggml.write_ggml(tmp_path / "t.bin", hparams, ggml.mel_filters(80), tiny_vocab(hparams), tensors)
    with pytest.raises(ModelCorruptError, match=r"'encoder\.conv1\.bias' is f16, whisper\.cpp expects f32"):
        check_model(tmp_path / "t.bin")


def _write_q8_0(path: Path) -> Path:
    """A Q8_0 tiny model: the f16 file's layout, its matrices as Q8_0 blocks (zero scales)."""
    hparams = dataclasses.replace(tiny_hparams(), ftype=ggml.QNT_VERSION * 1000 + 7)
    ggml.write_ggml(path, hparams, ggml.mel_filters(80), tiny_vocab(hparams), [])
    with path.open("ab") as f:
        for name, shape in ggml.tensor_shapes(hparams).items():
            ggml_type = ggml.tensor_type(name, shape, hparams)
            raw = name.encode()
            f.write(struct.pack("<3i", len(shape), len(raw), ggml_type))
            f.write(struct.pack(f"<{len(shape)}i", *reversed(shape)) + raw)
            f.write(bytes(ggml.tensor_nbytes(shape, ggml_type)))
    return path.absolute()


def test_quantized_model_is_checked_by_block_sizes(tmp_path):
    info = check_model(_write_q8_0(tmp_path / "q8.bin"))
    assert info.hparams.weight_type is GGMLType.Q8_0
    # the token embedding: 51864 rows of 64 values, 2 blocks of 34 bytes each
    assert info.weights_bytes < check_model(write_tiny_whisper(tmp_path / "f16.bin")).weights_bytes
    cut = truncated_copy(info.path, tmp_path / "q8-cut.bin", info.size_bytes - 10)
    with pytest.raises(ModelCorruptError, match="truncated"):
        check_model(cut)


class _CountingFile:
    """A file that counts the bytes read through it."""

    def __init__(self, f) -> None:
        self.f = f
        self.read_bytes = 0

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.read_bytes += len(data)
        return data

    def seek(self, *args: int) -> int:
        return self.f.seek(*args)

    def tell(self) -> int:
        return self.f.tell()

    def close(self) -> None:
        self.f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def test_reading_never_touches_tensor_data(tiny, monkeypatch):
    """A 3 GB large-v3 must check in milliseconds: reads stay in the headers."""
    headers_end = section_offsets(tiny)["tensors"]
    opened: list[_CountingFile] = []
    real_open = Path.open

    def counting_open(self, *args, **kwargs):
        opened.append(_CountingFile(real_open(self, *args, **kwargs)))
        return opened[-1]

    monkeypatch.setattr(Path, "open", counting_open)
    check_model(tiny)
    assert len(opened) == 1
    # the headers, filters and vocabulary, then 50 tensor records of a few dozen bytes each
    assert opened[0].read_bytes < headers_end + 50 * 64


# -- the CTranslate2 converter ----------------------------------------------------------------


@pytest.fixture(scope="module")
def ct2_dir(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    directory = tmp_path_factory.mktemp("ct2") / "tiny-ct2"
    return directory, write_ct2_whisper(directory)


def test_convert_maps_every_ctranslate2_variable(ct2_dir, tmp_path):
    source, v = ct2_dir
    target = convert(source, tmp_path / "out.bin")
    info = check_model(target)
    assert info.hparams == tiny_hparams()
    g = read_ggml_tensors(target)
    assert set(g) == set(ggml.tensor_shapes(info.hparams))
    n = 64
    qkv = v["encoder/layer_0/self_attention/linear_0/weight"]
    np.testing.assert_array_equal(g["encoder.blocks.0.attn.query.weight"], qkv[:n])
    np.testing.assert_array_equal(g["encoder.blocks.0.attn.key.weight"], qkv[n : 2 * n])
    np.testing.assert_array_equal(g["encoder.blocks.0.attn.value.weight"], qkv[2 * n :])
    qkv_b = v["decoder/layer_0/self_attention/linear_0/bias"]
    np.testing.assert_array_equal(g["decoder.blocks.0.attn.query.bias"], qkv_b[:n].astype(np.float32))
    np.testing.assert_array_equal(g["decoder.blocks.0.attn.value.bias"], qkv_b[2 * n :].astype(np.float32))
    kv = v["decoder/layer_0/attention/linear_1/weight"]
    np.testing.assert_array_equal(g["decoder.blocks.0.cross_attn.key.weight"], kv[:n])
    np.testing.assert_array_equal(g["decoder.blocks.0.cross_attn.value.weight"], kv[n:])
    np.testing.assert_array_equal(
        g["decoder.blocks.0.cross_attn.query.weight"], v["decoder/layer_0/attention/linear_0/weight"]
    )
    np.testing.assert_array_equal(
        g["decoder.blocks.0.cross_attn.out.bias"],
        v["decoder/layer_0/attention/linear_2/bias"].astype(np.float32),
    )
    np.testing.assert_array_equal(
        g["encoder.blocks.0.mlp.2.weight"], v["encoder/layer_0/ffn/linear_1/weight"]
    )
    np.testing.assert_array_equal(
        g["decoder.blocks.0.mlp_ln.weight"], v["decoder/layer_0/ffn/layer_norm/gamma"]
    )
    np.testing.assert_array_equal(g["encoder.ln_post.bias"], v["encoder/layer_norm/beta"].astype(np.float32))
    np.testing.assert_array_equal(g["encoder.conv1.bias"][:, 0], v["encoder/conv1/bias"].astype(np.float32))
    assert g["encoder.conv1.bias"].dtype == np.float32
    np.testing.assert_array_equal(g["encoder.conv2.weight"], v["encoder/conv2/weight"])
    np.testing.assert_array_equal(g["decoder.token_embedding.weight"], v["decoder/embeddings/weight"])
    assert g["decoder.positional_embedding"].dtype == np.float32


def test_convert_writes_the_vocabulary_as_raw_bytes(ct2_dir, tmp_path):
    source, _ = ct2_dir
    target = convert(source, tmp_path / "out.bin")
    data = target.read_bytes()
    at = section_offsets(target)["vocab"]
    assert struct.unpack_from("<i", data, at)[0] == 50256
    pos, tokens = at + 4, []
    for _ in range(300):
        (length,) = struct.unpack_from("<I", data, pos)
        tokens.append(data[pos + 4 : pos + 4 + length])
        pos += 4 + length
    assert tokens[:256] == [bytes([i]) for i in range(256)]  # Ġ (U+0120) became b" ", and so on
    assert tokens[256:300] == tiny_vocab(tiny_hparams())[256:300]


def test_convert_leaves_no_file_behind_on_failure(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    variables = ct2_variables(tiny_hparams())
    del variables["decoder/num_heads"]
    write_ct2_model_bin(source / "model.bin", variables)
    with pytest.raises(ModelCorruptError, match="'decoder/num_heads' is missing"):
        convert(source, tmp_path / "out.bin")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_convert_refuses_a_missing_fused_weight_and_names_it(tmp_path):
    variables = ct2_variables(tiny_hparams())
    del variables["decoder/layer_0/attention/linear_1/weight"]
    (tmp_path / "src").mkdir()
    write_ct2_model_bin(tmp_path / "src" / "model.bin", variables)
    (tmp_path / "src" / "vocabulary.txt").write_text("\n".join(["x"] * 50256 + ["<|endoftext|>"]))
    with pytest.raises(ModelCorruptError, match="'decoder/layer_0/attention/linear_1/weight' is missing"):
        convert(tmp_path / "src", tmp_path / "out.bin")
    assert not (tmp_path / "out.bin").exists()


def test_convert_errors_name_the_cause(ct2_dir, tmp_path):
    good = (ct2_dir[0] / "model.bin").read_bytes()

    def source_with(model_bin: bytes) -> Path:
        directory = tmp_path / f"s{len(list(tmp_path.iterdir()))}"
        directory.mkdir()
        (directory / "model.bin").write_bytes(model_bin)
        (directory / "vocabulary.txt").write_bytes((ct2_dir[0] / "vocabulary.txt").read_bytes())
        return directory

    with pytest.raises(LoadFailedError, match=r"no model\.bin"):
        convert(tmp_path, tmp_path / "out.bin")
    with pytest.raises(FormatMismatchError, match="not a CTranslate2 model"):
        convert(source_with(b"lmgg" + good[4:]), tmp_path / "out.bin")
    with pytest.raises(FormatMismatchError, match="not a CTranslate2 model"):
        convert(source_with(b""), tmp_path / "out.bin")
    with pytest.raises(UnsupportedError, match="binary version 5"):
        convert(source_with((5).to_bytes(4, "little") + good[4:]), tmp_path / "out.bin")
    spec = tmp_path / "spec"
    spec.mkdir()
    write_ct2_model_bin(spec / "model.bin", {"x": np.zeros(2, np.float16)}, spec="TransformerSpec")
    with pytest.raises(FormatMismatchError, match="CTranslate2 TransformerSpec model, not a whisper one"):
        convert(spec, tmp_path / "out.bin")
    for keep in (10, 200, len(good) // 2, len(good) - 30):
        with pytest.raises(ModelCorruptError, match=r"truncated in .*: needs \d+ bytes, file has"):
            convert(source_with(good[:keep]), tmp_path / "out.bin")
    assert not (tmp_path / "out.bin").exists()


def test_convert_takes_float32_and_bfloat16_exports(ct2_dir, tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    variables = ct2_variables(tiny_hparams())
    conv2 = np.random.default_rng(5).standard_normal((64, 64, 3)).astype(np.float32)
    variables["encoder/conv2/weight"] = conv2
    bias = np.linspace(-2, 2, 64, dtype=np.float32)
    variables["encoder/conv1/bias"] = (bias.view(np.uint32) >> 16).astype(np.uint16)
    write_ct2_model_bin(source / "model.bin", variables)
    (source / "vocabulary.txt").write_bytes((ct2_dir[0] / "vocabulary.txt").read_bytes())
    g = read_ggml_tensors(convert(source, tmp_path / "out.bin"))
    np.testing.assert_array_equal(g["encoder.conv2.weight"], conv2.astype(np.float16))
    np.testing.assert_allclose(g["encoder.conv1.bias"][:, 0], bias, rtol=1 / 128)


def test_convert_refuses_quantized_ctranslate2_weights(tmp_path):
    variables = ct2_variables(tiny_hparams())
    variables["encoder/conv1/weight"] = np.ones((64, 80, 3), np.int8)
    write_ct2_model_bin(tmp_path / "model.bin", variables)
    (tmp_path / "vocabulary.txt").write_text("\n".join(["x"] * 50256 + ["<|endoftext|>"]))
    with pytest.raises(UnsupportedError, match="'encoder/conv1/weight' is int8"):
        convert(tmp_path, tmp_path / "out.bin")


def test_convert_refuses_a_vocabulary_that_does_not_fit(ct2_dir, tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    (source / "model.bin").write_bytes((ct2_dir[0] / "model.bin").read_bytes())
    (source / "vocabulary.txt").write_text("\n".join(["a"] * 100))
    with pytest.raises(
        ModelCorruptError, match=r"vocabulary \(100 tokens\) does not have <\|endoftext\|> at id 50256"
    ):
        convert(source, tmp_path / "out.bin")


def test_command_line_converts_and_reports_errors(ct2_dir, tmp_path, capsys):
    from allm.managers.audio.ct2_convert import main

    assert main([str(ct2_dir[0]), str(tmp_path / "out.bin")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "out.bin")
    assert check_model(tmp_path / "out.bin").n_tensors == 50
    assert main([str(tmp_path), str(tmp_path / "again.bin")]) == 1
    assert "ct2_convert: no model.bin in" in capsys.readouterr().err


def test_convert_reports_its_progress_tensor_by_tensor_up_to_done(ct2_dir, tmp_path):
    seen: list[float] = []
    source, _variables = ct2_dir
    convert(source, tmp_path / "ggml.bin", seen.append)
    assert len(seen) > 10  # one a tensor: a long conversion keeps the watchdog informed
    assert seen == sorted(seen)
    assert 0 < seen[0] < 0.5
    assert seen[-1] > 0.9
