"""What `allm pull` chooses from a repository's file list, which sources it takes, and how an image
model's parts are described: pure, no network."""

from __future__ import annotations

import re

import pytest

from allm.hub import parts
from allm.hub.asked import asked, from_flags, read_description
from allm.hub.errors import PullError
from allm.hub.parts import PartFile, chosen_main, describe, home
from allm.hub.select import RemoteFile, quant_of, select
from allm.hub.source import Source, parse_source
from allm.hub.store import relative_path
from allm.managers.image import manager, model_check

HOME = Source("city96/FLUX.1-schnell-gguf", None)


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


def test_the_part_and_option_names_are_the_image_managers():
    assert set(parts.PARTS) == set(model_check.PARTS)
    assert {*parts.TEXT_ENCODERS, *parts.VAES} == set(manager.PARTS)
    assert set(parts.OPTIONS) == manager.OPTIONS - set(manager.PARTS)


def test_a_part_is_a_file_of_source_or_owner_repo_file():
    described = describe(
        {
            "diffusion_model": "flux1-schnell-Q4_0.gguf",
            "clip_l": "hf.co/comfyanonymous/flux_text_encoders:clip_l.safetensors",
            "t5xxl": "comfyanonymous/flux_text_encoders:t5xxl_fp8_e4m3fn.safetensors",
            "vae": "hf://black-forest-labs/FLUX.1-schnell:vae/diffusion_pytorch_model.safetensors",
        },
        {"steps": 4, "cfg_scale": 1},
        HOME,
    )
    assert described.main == "diffusion_model"
    assert described.files == {
        "diffusion_model": PartFile(None, "flux1-schnell-Q4_0.gguf"),
        "clip_l": PartFile("comfyanonymous/flux_text_encoders", "clip_l.safetensors"),
        "t5xxl": PartFile("comfyanonymous/flux_text_encoders", "t5xxl_fp8_e4m3fn.safetensors"),
        "vae": PartFile("black-forest-labs/FLUX.1-schnell", "vae/diffusion_pytorch_model.safetensors"),
    }
    assert described.options == {"steps": 4, "cfg_scale": 1.0}


def test_the_main_file_left_out_is_sources_as_the_diffusion_model_or_a_checkpoint():
    assert (
        describe({"clip_l": "clip_l.safetensors", "vae": "ae.safetensors"}, None, HOME).main
        == "diffusion_model"
    )
    assert describe({"vae": "sdxl_vae.safetensors"}, None, HOME).main == "model"
    assert describe({}, {"steps": 1}, HOME).main == "model"
    assert home(None, {"diffusion_model": "hf://o/r:flux.gguf"}) == "hf://o/r"
    assert home(" o/r:Q4_0 ", None) == "o/r:Q4_0"


@pytest.mark.parametrize(
    ("described", "source", "param", "message"),
    [
        ({"vae": "ae.safetensors"}, None, "parts.vae", "'ae.safetensors' names no repository"),
        ({"clip_l": "o/r:c.gguf", "vae": "o/r:v.gguf"}, None, "parts.diffusion_model", "no diffusion model"),
        ({"model": "m.safetensors", "clip_l": "c.gguf"}, HOME, "parts.clip_l", "holds its text encoders"),
        ({"diffusion_model": "d.gguf", "vae": "v.gguf"}, HOME, "parts.clip_l", "needs its text encoder"),
        ({"diffusion_model": "d.gguf", "clip_l": "c.gguf"}, HOME, "parts.vae", "needs a VAE"),
        (
            {"diffusion_model": "d.gguf"},
            Source("o/r", "Q4_0"),
            "parts.diffusion_model",
            "the tag of o/r:Q4_0",
        ),
        ({"clip_l": "o:c.gguf"}, HOME, "parts.clip_l", "is no OWNER/REPO:FILE"),
        ({"clip_l": "o/r/x:c.gguf"}, HOME, "parts.clip_l", "is not a model on the Hub"),
        ({"vae": "/etc/passwd"}, HOME, "parts.vae", "is no file name in a repository"),
        ({"vae": "a\\b.gguf"}, HOME, "parts.vae", "is no file name in a repository"),
        ({"vae": ""}, HOME, "parts.vae", "give a file name"),
        ({"unet": "u.gguf"}, HOME, "parts.unet", "unknown part 'unet'"),
    ],
)
def test_a_description_is_refused_naming_the_part(described, source, param, message):
    with pytest.raises(PullError) as caught:
        describe(described, None, source)
    assert (caught.value.status, caught.value.param) == (400, param)
    assert message in caught.value.message


@pytest.mark.parametrize(
    ("options", "param", "message"),
    [
        ({"steps": 0}, "options.steps", "option steps must be a whole number from 1 to 150, got 0"),
        ({"steps": 2.5}, "options.steps", "whole number"),
        ({"cfg_scale": True}, "options.cfg_scale", "option cfg_scale must be a number from 0 to 30"),
        ({"sampler": "warp"}, "options.sampler", "one of stable-diffusion.cpp's: euler, euler_a"),
        ({"clip_l": "c.gguf"}, "options.clip_l", "unknown option 'clip_l' (the files are parts)"),
    ],
)
def test_options_are_the_image_models_defaults(options, param, message):
    with pytest.raises(PullError) as caught:
        describe({}, options, HOME)
    assert (caught.value.status, caught.value.param) == (400, param)
    assert message in caught.value.message


def test_the_main_file_source_chooses_is_one_file():
    assert chosen_main(
        select(files(("flux-Q4_0.gguf", 4), ("flux-Q8_0.gguf", 8)), None, "o/r"), HOME, "model"
    )
    split = files(("f-Q4_0-00001-of-00002.gguf", 1), ("f-Q4_0-00002-of-00002.gguf", 1))
    with pytest.raises(
        PullError, match="no single model file allm could take as the diffusion_model"
    ) as caught:
        chosen_main(select(split, None, "o/r"), HOME, "diffusion_model")
    assert caught.value.status == 422


def test_the_command_line_flags_go_over_the_description_file(tmp_path):
    file = tmp_path / "flux.toml"
    file.write_text(
        'source = "o/r"\nid = "flux"\n[parts]\nclip_l = "c.gguf"\nvae = "v.gguf"\n[options]\nsteps = 4\n'
    )
    got = asked(None, None, "dev", file, ["vae=o/vae:ae.safetensors"])
    assert (got.source, got.model_id, got.revision) == ("o/r", "flux", "dev")
    assert got.parts == {"clip_l": "c.gguf", "vae": "o/vae:ae.safetensors"}
    assert got.options == {"steps": 4}
    assert asked("o/r", None, None, None, []).parts is None  # a plain pull
    options_only = tmp_path / "turbo.toml"
    options_only.write_text("[options]\nsteps = 1\n")
    assert asked("o/r", None, None, options_only, []).parts == {}


@pytest.mark.parametrize(
    ("flags", "message"),
    [(["vae"], "--part 'vae': give NAME=FILE"), (["vae=a", "vae=b"], "--part vae is given twice")],
)
def test_part_flags_are_name_equals_file(flags, message):
    with pytest.raises(PullError, match=message):
        from_flags(flags)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('clip_l = "c.gguf"\n', "unknown key 'clip_l' (the files go under [parts])"),
        ('parts = "c.gguf"\n', "parts must be a table ([parts])"),
        ("id = 3\n", "id must be a string, got 3"),
        ("[parts\n", "is no TOML description"),
    ],
)
def test_a_description_file_is_checked(tmp_path, text, message):
    file = tmp_path / "bad.toml"
    file.write_text(text)
    with pytest.raises(PullError, match=re.escape(message)):
        read_description(file)
    with pytest.raises(PullError, match="cannot read the description"):
        read_description(tmp_path / "missing.toml")
