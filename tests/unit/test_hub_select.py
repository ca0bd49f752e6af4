"""What `allm pull` chooses from a repository's file list, and which sources it takes: pure, no network."""

from __future__ import annotations

import pytest

from allm.hub.errors import PullError
from allm.hub.select import RemoteFile, quant_of, select
from allm.hub.source import Source, parse_source
from allm.hub.store import relative_path


def files(*named: tuple[str, int]) -> list[RemoteFile]:
    return [RemoteFile(name, size, "0" * 64, None) for name, size in named]


@pytest.mark.parametrize(
    ("name", "quant"),
    [
        ("SmolLM2-135M-Instruct-Q4_K_M.gguf", "Q4_K_M"),
        ("llama-2-7b.q4_k_m.gguf", "Q4_K_M"),
        ("model_IQ4_XS.gguf", "IQ4_XS"),
        ("Qwen3-8B-UD-Q4_K_XL-00001-of-00002.gguf", "Q4_K_XL"),
        ("model-Q4_K.gguf", "Q4_K"),
        ("Q8_0/model-Q8_0-00002-of-00002.gguf", "Q8_0"),
        ("model-bf16.gguf", "BF16"),
        ("model.gguf", None),
    ],
)
def test_the_quant_is_a_whole_token_of_the_name(name, quant):
    assert quant_of(name) == quant


def test_the_default_order_then_the_smallest():
    repo = files(("m-Q8_0.gguf", 8), ("m-Q4_0.gguf", 4), ("m-Q2_K.gguf", 2))
    assert select(repo, None, "o/r").tag == "Q4_0"
    assert select(files(("m-Q6_K.gguf", 6), ("m-Q3_K_S.gguf", 3)), None, "o/r").tag == "Q3_K_S"


def test_split_parts_of_one_quant_come_together_with_the_projector():
    repo = files(
        ("m-Q4_K_M-00002-of-00002.gguf", 5),
        ("m-Q4_K_M-00001-of-00002.gguf", 5),
        ("m-Q4_K-00001-of-00001.gguf", 9),
        ("mmproj-m-f16.gguf", 1),
        ("mmproj-m-Q8_0.gguf", 1),
    )
    chosen = select(repo, "q4_k_m", "o/r")
    assert [f.name for f in chosen.files] == [
        "m-Q4_K_M-00001-of-00002.gguf",
        "m-Q4_K_M-00002-of-00002.gguf",
        "mmproj-m-f16.gguf",
    ]
    assert chosen.main == "m-Q4_K_M-00001-of-00002.gguf"


def test_an_incomplete_split_is_refused():
    with pytest.raises(PullError, match="not one model's split parts"):
        select(files(("m-Q4_0-00001-of-00003.gguf", 1), ("m-Q4_0-00002-of-00003.gguf", 1)), None, "o/r")


def test_safetensors_takes_its_files_and_leaves_pickles_and_the_consolidated_copy():
    repo = files(
        ("config.json", 1),
        ("tokenizer.json", 1),
        ("model-00001-of-00002.safetensors", 1),
        ("model-00002-of-00002.safetensors", 1),
        ("model.safetensors.index.json", 1),
        ("consolidated.safetensors", 2),
        ("pytorch_model.bin", 2),
        ("README.md", 1),
        ("original/params.json", 1),
    )
    assert [f.name for f in select(repo, None, "o/r").files] == [
        "config.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
        "tokenizer.json",
    ]


def test_whisper_cpp_files_want_a_tag_when_there_are_several():
    repo = files(("ggml-tiny.en.bin", 1), ("ggml-base-q5_1.bin", 1), ("README.md", 1))
    assert [f.name for f in select(repo, "base-q5_1", "o/r").files] == ["ggml-base-q5_1.bin"]
    with pytest.raises(PullError, match=r"name one as o/r:NAME, one of base-q5_1, tiny\.en"):
        select(repo, None, "o/r")


def test_a_lone_safetensors_file_is_an_image_model():
    chosen = select(files(("flux-schnell.safetensors", 1), ("README.md", 1)), None, "o/r")
    assert (chosen.kind, chosen.main) == ("image", "flux-schnell.safetensors")


@pytest.mark.parametrize(
    ("text", "source"),
    [
        ("bartowski/SmolLM2-GGUF", Source("bartowski/SmolLM2-GGUF", None)),
        ("hf.co/bartowski/SmolLM2-GGUF:Q4_K_M", Source("bartowski/SmolLM2-GGUF", "Q4_K_M")),
        ("hf://ggerganov/whisper.cpp:tiny.en", Source("ggerganov/whisper.cpp", "tiny.en")),
    ],
)
def test_sources(text, source):
    assert parse_source(text) == source


@pytest.mark.parametrize(
    "text", ["a", "a/b/c", "../a/b", "a/..", "a/.b", "-a/b", "a/b-", "a--b/c", "a/b:", "a/b:x y"]
)
def test_a_source_is_never_a_path(text):
    with pytest.raises(PullError):
        parse_source(text)


@pytest.mark.parametrize(
    "name", ["../x.gguf", "a/../../x.gguf", "/etc/passwd", "a\\..\\x", "allm-pull.json", ".partial/x"]
)
def test_hub_file_names_stay_inside_the_model_directory(name):
    with pytest.raises(PullError, match="outside the model's directory"):
        relative_path(name)
