"""Format detection and the GGUF header check, case by case, on files written here."""

from __future__ import annotations

import struct

import pytest

from allm.kernel.codes import AllmError, Code
from allm.managers.text.detect import Format, detect, read_header
from tests.model_files import smollm2_path, truncated_copy, with_bytes, write_gguf


def _code(exc_info: pytest.ExceptionInfo) -> Code:
    return exc_info.value.code


def _safetensors_dir(path):
    path.mkdir()
    (path / "config.json").write_text('{"model_type": "llama"}')
    (path / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    return path


def test_a_gguf_file_goes_to_llama_cpp(tmp_path):
    f = write_gguf(tmp_path / "m.gguf")
    assert detect(f) == detect(f, Format.GGUF)
    assert detect(f).format is Format.GGUF


def test_a_gguf_file_without_the_suffix_is_recognised_by_its_magic(tmp_path):
    f = write_gguf(tmp_path / "model.bin")
    assert detect(f).format is Format.GGUF


def test_a_directory_holding_one_gguf_goes_to_llama_cpp(tmp_path):
    write_gguf(tmp_path / "m.gguf")
    found = detect(tmp_path)
    assert (found.format, found.path.name) == (Format.GGUF, "m.gguf")


def test_a_directory_with_safetensors_and_config_goes_to_the_safetensors_engine(tmp_path):
    d = _safetensors_dir(tmp_path / "st")
    assert detect(d).format is Format.SAFETENSORS


def test_both_formats_follow_registration_and_default_to_safetensors(tmp_path):
    d = _safetensors_dir(tmp_path / "both")
    write_gguf(d / "m.gguf")
    assert detect(d).format is Format.SAFETENSORS
    assert detect(d, Format.SAFETENSORS).format is Format.SAFETENSORS
    gguf = detect(d, Format.GGUF)
    assert (gguf.format, gguf.path.name) == (Format.GGUF, "m.gguf")


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (lambda d: (d / "notes.txt").write_text("hi"), "holds no model"),
        (lambda d: None, "it is empty"),
        (lambda d: (d / "w.safetensors").write_bytes(b"x"), "no config.json"),
        (lambda d: (write_gguf(d / "a.gguf"), write_gguf(d / "b.gguf")), "several GGUF files"),
    ],
)
def test_a_directory_without_one_clear_model_is_format_mismatch(tmp_path, make, needle):
    d = tmp_path / "d"
    d.mkdir()
    make(d)
    with pytest.raises(AllmError) as info:
        detect(d)
    assert _code(info) is Code.FORMAT_MISMATCH
    assert needle in str(info.value)


def test_a_file_that_is_not_a_model_is_format_mismatch(tmp_path):
    f = tmp_path / "readme.txt"
    f.write_text("not a model")
    with pytest.raises(AllmError) as info:
        detect(f)
    assert _code(info) is Code.FORMAT_MISMATCH
    assert "readme.txt is not a model" in str(info.value)


def test_registered_format_that_is_not_there_is_format_mismatch(tmp_path):
    f = write_gguf(tmp_path / "m.gguf")
    with pytest.raises(AllmError) as info:
        detect(f, Format.SAFETENSORS)
    assert _code(info) is Code.FORMAT_MISMATCH
    assert "registered as safetensors" in str(info.value)


def test_a_missing_path_is_load_failed(tmp_path):
    with pytest.raises(AllmError) as info:
        detect(tmp_path / "nope.gguf")
    assert _code(info) is Code.LOAD_FAILED
    assert "not found" in str(info.value)


# -- the GGUF header check -------------------------------------------------------


def test_a_good_header_reads_its_architecture_and_tensors(tmp_path):
    header = read_header(write_gguf(tmp_path / "m.gguf"))
    assert header.architecture == "llama"
    assert header.version == 3
    assert [t.name for t in header.tensors] == ["token_embd.weight", "output_norm.weight"]
    assert header.arch_int("embedding_length") == 64


def test_the_real_default_model_passes_the_header_check():
    header = read_header(smollm2_path())
    assert header.architecture == "llama"
    assert "tokenizer.chat_template" in header.metadata
    assert len(header.tensors) > 100


@pytest.mark.parametrize(
    ("damage", "code", "needle"),
    [
        (lambda src, dst: truncated_copy(src, dst, 4000), Code.MODEL_CORRUPT, "truncated in tensor data"),
        (lambda src, dst: truncated_copy(src, dst, 20), Code.MODEL_CORRUPT, "truncated"),
        (lambda src, dst: with_bytes(src, dst, 0, b"GGML"), Code.FORMAT_MISMATCH, "not a GGUF file"),
        (lambda src, dst: with_bytes(src, dst, 4, struct.pack("<I", 99)), Code.UNSUPPORTED, "version 99"),
        (lambda src, dst: with_bytes(src, dst, 8, struct.pack("<Q", 1 << 40)), Code.MODEL_CORRUPT, "damaged"),
        (lambda src, dst: truncated_copy(src, dst, 0), Code.FORMAT_MISMATCH, "empty file"),
    ],
)
def test_damaged_gguf_files_get_the_code_that_names_the_cause(tmp_path, damage, code, needle):
    good = write_gguf(tmp_path / "good.gguf")
    bad = damage(good, tmp_path / "bad.gguf")
    with pytest.raises(AllmError) as info:
        read_header(bad)
    assert _code(info) is code
    assert needle in str(info.value)


def test_a_truncated_real_model_is_model_corrupt(tmp_path):
    bad = truncated_copy(smollm2_path(), tmp_path / "cut.gguf", 40 * 1024 * 1024)
    with pytest.raises(AllmError) as info:
        read_header(bad)
    assert _code(info) is Code.MODEL_CORRUPT
    assert "truncated" in str(info.value)


def test_an_unknown_architecture_is_unsupported(tmp_path):
    with pytest.raises(AllmError) as info:
        read_header(write_gguf(tmp_path / "m.gguf", arch="frobnicator"))
    assert _code(info) is Code.UNSUPPORTED
    assert "'frobnicator'" in str(info.value)


def test_a_missing_file_is_load_failed(tmp_path):
    with pytest.raises(AllmError) as info:
        read_header(tmp_path / "gone.gguf")
    assert _code(info) is Code.LOAD_FAILED
