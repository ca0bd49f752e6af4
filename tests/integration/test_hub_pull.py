"""`allm pull` against a Hub-compatible server on loopback (tests/hub_server.py): what is fetched,
what is checked, what is refused, and what is registered. No test reaches the real Hub: every
pull is pointed at the local server, with no token from this machine's environment or cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from allm.gateway.config import HubConfig
from allm.hub import Progress, Pulled, PullError, Store, pull
from tests.hub_server import (
    FLUX_CHECKPOINT,
    FLUX_ENCODERS,
    FLUX_REPO,
    FLUX_VAES,
    TOKEN,
    HubServer,
    add_tiny_flux,
)
from tests.image_files import write_tiny_flux, write_tiny_flux_checkpoint
from tests.model_files import smollm2_path, write_gguf, write_hf_model
from tests.whisper_files import tiny_en_source, write_tiny_whisper

ALLM = Path(sys.executable).parent / "allm"
GGUF_REPO = "bartowski/SmolLM2-135M-Instruct-GGUF"
QUANTS = ("Q4_0", "Q4_K_M", "Q8_0", "IQ4_XS")
#: the tiny Flux by parts, from the three repositories add_tiny_flux fills
CLIP_L = f"{FLUX_ENCODERS}:text_encoders/clip-l-random.gguf"
TAESD = f"{FLUX_VAES}:taesd-dit16-random.gguf"
FLUX = {"diffusion_model": "flux-tiny.gguf", "clip_l": CLIP_L, "taesd": TAESD}


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubServer]:
    files = tmp_path_factory.mktemp("hub-files")
    smollm2 = smollm2_path()
    with HubServer() as server:
        server.add(
            GGUF_REPO,
            {
                **{f"SmolLM2-135M-Instruct-{q}.gguf": smollm2 for q in QUANTS},
                "mmproj-SmolLM2-135M-Instruct-f16.gguf": write_gguf(files / "mmproj.gguf"),
                "README.md": b"# SmolLM2 GGUF\n",
            },
        )
        for repo in ("test/cut", "test/interrupted", "test/flipped", "test/concurrent"):
            server.add(repo, {"SmolLM2-Q4_K_M.gguf": smollm2})
        server.add("test/gated", {"tiny-Q8_0.gguf": write_gguf(files / "tiny.gguf")}, gated=True)
        server.add("test/escape", {"../SmolLM2-Q4_K_M.gguf": write_gguf(files / "escape.gguf")})
        llama = write_hf_model(files / "llama", "llama")
        server.add(
            "test/tiny-llama",
            {
                **{p.name: p for p in llama.iterdir() if p.is_file()},
                "pytorch_model.bin": b"\x80\x04pickled weights",
                "README.md": b"# tiny llama\n",
            },
        )
        server.add("test/pickles", {"config.json": b"{}", "pytorch_model.bin": b"\x80\x04pickled weights"})
        server.add("Systran/faster-whisper-tiny.en", {p.name: p for p in tiny_en_source().iterdir()})
        server.add(
            "ggerganov/whisper.cpp",
            {
                "ggml-tiny.en.bin": write_tiny_whisper(files / "ggml-tiny.en.bin"),
                "ggml-base-q5_1.bin": write_tiny_whisper(files / "ggml-base.bin", seed=1),
            },
        )
        yield server


@pytest.fixture(scope="module")
def flux(hub: HubServer, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    files = tmp_path_factory.mktemp("flux-files")
    checkpoint = write_tiny_flux_checkpoint(files / "flux-tiny-checkpoint.gguf")
    described = add_tiny_flux(hub, write_tiny_flux(files / "parts"), checkpoint)
    assert described == FLUX
    return described


def env_for(hub: HubServer, tmp_path: Path) -> dict[str, str]:
    """The CLI's environment: the local Hub, this test's data directory, no token, no config."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("HF_", "HUGGING_FACE_", "TRANSFORMERS_", "ALLM_"))
    }
    return env | {
        "HF_ENDPOINT": hub.url,
        "HF_HOME": str(tmp_path / "hf-home"),
        "ALLM_DATA_DIR": str(tmp_path),
    }


def allm(env: dict[str, str], *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([ALLM, *argv], env=env, capture_output=True, text=True, timeout=300)


def pull_here(server: HubServer, tmp_path: Path, source: str, **kwargs: Any) -> Pulled:
    """A pull through the package, from the local server, with no token but the one given."""
    return pull(source, tmp_path, environ={"HF_ENDPOINT": server.url}, **kwargs)


def test_pull_takes_the_default_quant_and_projector_lists_and_removes_it(hub, tmp_path):
    env = env_for(hub, tmp_path)
    sent_before = hub.sent.copy()
    done = allm(env, "pull", GGUF_REPO)
    assert done.returncode == 0, done.stderr
    fetched = {name for (repo, name), n in (hub.sent - sent_before).items() if repo == GGUF_REPO and n}
    assert fetched == {"SmolLM2-135M-Instruct-Q4_K_M.gguf", "mmproj-SmolLM2-135M-Instruct-f16.gguf"}
    lines = done.stdout.splitlines()  # not a terminal: one line per file, then the summary
    assert [line.split()[1] for line in lines[:2]] == sorted(fetched, key=lambda n: "mmproj" in n)
    assert all("checked" in line for line in lines[:2])
    assert lines[2].startswith(f"pulled {GGUF_REPO} as {GGUF_REPO}: text, gguf, 93.8 MiB in ")

    listed = {row["id"]: row for row in json.loads(allm(env, "models", "--json").stdout)}
    row = listed[GGUF_REPO]
    assert (row["modality"], row["format"], row["engine"], row["source"]) == (
        "text",
        "gguf",
        "llama.cpp",
        f"hf.co/{GGUF_REPO}",
    )
    assert row["problems"] == []
    record = Store(tmp_path).directory(GGUF_REPO) / "allm-pull.json"
    assert row["size_bytes"] == smollm2_path().stat().st_size + 8832 + record.stat().st_size

    sent_once = hub.sent_bytes(GGUF_REPO)
    again = allm(env, "pull", GGUF_REPO)
    assert again.returncode == 0
    assert "is already pulled" in again.stdout
    assert "nothing to do" in again.stdout
    assert hub.sent_bytes(GGUF_REPO) == sent_once
    directory = Store(tmp_path).directory(GGUF_REPO)
    removed = allm(env, "rm", GGUF_REPO)
    assert removed.returncode == 0
    assert removed.stdout.startswith(f"removed {GGUF_REPO}")
    assert not directory.exists()
    assert GGUF_REPO not in {row["id"] for row in json.loads(allm(env, "models", "--json").stdout)}


def test_a_tag_chooses_its_quant_and_nothing_else(hub, tmp_path):
    before = hub.sent.copy()
    done = pull_here(hub, tmp_path, f"hf.co/{GGUF_REPO}:iq4_xs")
    fetched = {name for (_, name), n in (hub.sent - before).items() if n}
    assert fetched == {"SmolLM2-135M-Instruct-IQ4_XS.gguf", "mmproj-SmolLM2-135M-Instruct-f16.gguf"}
    assert done.model.id == f"hf.co/{GGUF_REPO}:iq4_xs"
    assert Path(done.model.path).name == "SmolLM2-135M-Instruct-IQ4_XS.gguf"


def test_an_unknown_tag_lists_the_tags_there_are(hub, tmp_path):
    with pytest.raises(PullError) as caught:
        pull_here(hub, tmp_path, f"{GGUF_REPO}:Q3_K_S")
    assert caught.value.status == 404
    tags = "IQ4_XS, Q4_0, Q4_K_M, Q8_0"
    assert caught.value.message == f"{GGUF_REPO} has no files tagged 'Q3_K_S': it has {tags}"


def test_safetensors_pull_takes_config_tokenizer_and_weights_never_the_pickle(hub, tmp_path):
    before = hub.sent.copy()
    done = pull_here(hub, tmp_path, "test/tiny-llama")
    fetched = {name for (_, name), n in (hub.sent - before).items() if n}
    assert "pytorch_model.bin" not in fetched
    assert "README.md" not in fetched
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= fetched
    assert (done.model.modality, done.model.format) == ("text", "safetensors")
    assert Path(done.model.path) == Store(tmp_path).directory("test/tiny-llama").absolute()


def test_a_repository_of_pickles_only_is_refused_before_any_download(hub, tmp_path):
    with pytest.raises(PullError) as caught:
        pull_here(hub, tmp_path, "test/pickles")
    assert caught.value.status == 422
    assert "only as PyTorch pickles (pytorch_model.bin)" in caught.value.message
    assert hub.sent_bytes("test/pickles") == 0


def test_whisper_in_ctranslate2_form_is_a_speech_model(hub, tmp_path):
    done = pull_here(hub, tmp_path, "Systran/faster-whisper-tiny.en")
    assert (done.model.modality, done.model.format) == ("audio", "ctranslate2")
    assert sorted(f.name for f in done.model.files) == [
        "config.json",
        "model.bin",
        "tokenizer.json",
        "vocabulary.txt",
    ]


def test_a_tag_chooses_among_whisper_cpp_files(hub, tmp_path):
    done = pull_here(hub, tmp_path, "ggerganov/whisper.cpp:tiny.en")
    assert (done.model.modality, done.model.format) == ("audio", "ggml")
    assert [f.name for f in done.model.files] == ["ggml-tiny.en.bin"]
    assert hub.sent[("ggerganov/whisper.cpp", "ggml-base-q5_1.bin")] == 0


def test_a_connection_cut_at_40_percent_resumes_where_it_stopped(hub, tmp_path):
    size = smollm2_path().stat().st_size
    hub.cut_once[("test/cut", "SmolLM2-Q4_K_M.gguf")] = 0.4
    done = pull_here(hub, tmp_path, "test/cut")
    assert hub.gets[("test/cut", "SmolLM2-Q4_K_M.gguf")] == 2
    # the second request sends the 60 % left, and what was in flight when the link broke
    assert hub.sent_bytes("test/cut") - int(0.4 * size) < 0.7 * size
    assert done.model.files[0].sha256 == hub.repos["test/cut"].files["SmolLM2-Q4_K_M.gguf"].digests()[0]


class Stop(Exception):
    """The pull is stopped from outside (a person's Ctrl-C, a process killed)."""


def test_an_interrupted_pull_registers_nothing_and_the_next_resumes(hub, tmp_path):
    size = smollm2_path().stat().st_size

    def stop_at_40_percent(step: Progress) -> None:
        if step.done_bytes >= 0.4 * size and not step.finished:
            raise Stop

    with pytest.raises(Stop):
        pull_here(hub, tmp_path, "test/interrupted", progress=stop_at_40_percent)
    store = Store(tmp_path)
    assert store.get("test/interrupted") is None
    assert (store.partial_dir("test/interrupted") / "SmolLM2-Q4_K_M.gguf").stat().st_size >= 0.4 * size
    first = hub.sent_bytes("test/interrupted")

    steps: list[Progress] = []
    pull_here(hub, tmp_path, "test/interrupted", progress=steps.append)
    assert hub.sent_bytes("test/interrupted") - first < 0.61 * size
    assert steps[0].done_bytes >= 0.4 * size  # the progress starts from what was here
    assert store.get("test/interrupted") is not None
    assert not store.partial_dir("test/interrupted").exists()


def test_one_flipped_byte_is_refused_and_nothing_is_registered(hub, tmp_path):
    hub.flip[("test/flipped", "SmolLM2-Q4_K_M.gguf")] = 12_345_678
    with pytest.raises(PullError) as caught:
        pull_here(hub, tmp_path, "test/flipped")
    assert caught.value.status == 502
    assert caught.value.message.startswith("SmolLM2-Q4_K_M.gguf arrived damaged: its sha256 is ")
    store = Store(tmp_path)
    assert store.list() == []
    assert [p for p in store.directory("test/flipped").rglob("*") if p.is_file()] == []


def test_a_missing_repository_says_so(hub, tmp_path):
    with pytest.raises(PullError) as caught:
        pull_here(hub, tmp_path, "nobody/nothing-GGUF:Q4_K_M")
    assert caught.value.status == 404
    assert caught.value.message.startswith(f"no repository nobody/nothing-GGUF on {hub.url}")


def test_a_gated_repository_wants_a_token_and_takes_one_from_the_token_file(hub, tmp_path):
    with pytest.raises(PullError) as caught:
        pull_here(hub, tmp_path, "test/gated")
    assert caught.value.status == 401
    assert "test/gated is gated or private" in caught.value.message
    assert "HF_TOKEN" in caught.value.message
    assert "token_file" in caught.value.message
    assert Store(tmp_path).list() == []

    token_file = tmp_path / "hf-token"
    token_file.write_text(TOKEN + "\n")
    done = pull_here(hub, tmp_path, "test/gated", hub=HubConfig(token_file=token_file))
    assert (done.model.modality, done.model.format) == ("text", "gguf")


def test_a_model_over_the_limit_or_the_free_space_is_refused_before_downloading(hub, tmp_path):
    with pytest.raises(PullError) as caught:
        pull_here(hub, tmp_path, GGUF_REPO, hub=HubConfig(max_model_bytes=10 * 2**20))
    assert caught.value.status == 507
    assert "over the [hub] max_model_gib limit of 0.01 GiB" in caught.value.message

    before = hub.sent_bytes(GGUF_REPO)
    with pytest.raises(PullError) as caught:
        pull_here(hub, tmp_path, GGUF_REPO, free_bytes=lambda _: 2**20)
    assert caught.value.status == 507
    assert caught.value.message.startswith(f"not enough disk space for {GGUF_REPO}: it needs 0.09 GiB more")
    assert hub.sent_bytes(GGUF_REPO) == before


def test_a_hub_file_name_that_climbs_out_is_refused(hub, tmp_path):
    with pytest.raises(PullError) as caught:
        pull_here(hub, tmp_path / "data", "test/escape")
    assert "'../SmolLM2-Q4_K_M.gguf', which would be written outside" in caught.value.message
    assert hub.sent_bytes("test/escape") == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_bad_source_is_no_path(tmp_path):
    for source in (
        "../etc/passwd",
        "owner/../x",
        "/abs/path",
        "owner/.hidden",
        "a/b/c",
        "owner/repo:bad tag",
    ):
        with pytest.raises(PullError) as caught:
            pull(source, tmp_path, environ={"HF_ENDPOINT": "http://127.0.0.1:9"})
        assert caught.value.status == 400, source


def test_two_pulls_at_once_make_one_download(hub, tmp_path):
    env = env_for(hub, tmp_path)
    command = [ALLM, "pull", "test/concurrent"]
    both = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in both]
    assert [p.returncode for p in both] == [0, 0]
    assert hub.sent_bytes("test/concurrent") == smollm2_path().stat().st_size
    assert sum("already pulled" in out for out in outs) == 1


def test_an_image_model_pulls_by_its_parts_from_three_repositories(hub, flux, tmp_path):
    """A description file, a --part flag over it: each file fetched and checked as any other, stored
    under its part's name, and the record carries the catalog options that serve it."""
    description = tmp_path / "flux.toml"
    description.write_text(
        f'source = "{FLUX_REPO}"\nid = "flux-tiny"\n\n[parts]\n'
        f'diffusion_model = "flux-tiny.gguf"\nclip_l = "{CLIP_L}"\ntaesd = "nobody/nothing:x.gguf"\n\n'
        "[options]\nsteps = 2\ncfg_scale = 1\n"
    )
    env = env_for(hub, tmp_path)
    done = allm(env, "pull", "--parts", str(description), "--part", f"taesd={TAESD}")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    stored = ["diffusion_model/flux-tiny.gguf", "clip_l/clip-l-random.gguf", "taesd/taesd-dit16-random.gguf"]
    assert [line.split()[1] for line in lines[:3]] == stored
    assert all("checked" in line for line in lines[:3])
    assert lines[3].startswith(f"pulled {FLUX_REPO} as flux-tiny: image, flux, 72.2 MiB in ")

    store = Store(tmp_path)
    model = store.get("flux-tiny")
    directory = store.directory("flux-tiny").absolute()
    assert model.path == str(directory / stored[0])
    assert model.options == {
        "clip_l": str(directory / stored[1]),
        "taesd": str(directory / stored[2]),
        "steps": 2,
        "cfg_scale": 1.0,
    }
    origins = {(FLUX_REPO, "flux-tiny.gguf"), tuple(CLIP_L.split(":")), tuple(TAESD.split(":"))}
    assert {(p["source"], p["file"]) for p in model.parts.values()} == origins
    for part in model.parts.values():
        repo = hub.repos[part["source"]]
        assert part["commit"] == repo.commit
        stored_file = next(f for f in model.files if f.name.endswith(Path(part["file"]).name))
        assert stored_file.sha256 == repo.files[part["file"]].digests()[0]
    row = {r["id"]: r for r in json.loads(allm(env, "models", "--json").stdout)}["flux-tiny"]
    assert (row["modality"], row["format"], row["engine"], row["problems"]) == (
        "image",
        "flux",
        "stable-diffusion.cpp",
        [],
    )

    sent = sum(hub.sent.values())
    again = allm(env, "pull", "--parts", str(description), "--part", f"taesd={TAESD}")
    assert (again.returncode, "is already pulled" in again.stdout) == (0, True)
    assert sum(hub.sent.values()) == sent


def test_source_chooses_the_diffusion_model_the_parts_leave_out_and_an_id_keeps_its_parts(
    hub, flux, tmp_path
):
    done = pull_here(hub, tmp_path, FLUX_REPO, parts={"clip_l": CLIP_L, "taesd": TAESD})
    assert (done.model.modality, done.model.format, done.model.id) == ("image", "flux", FLUX_REPO)
    assert done.model.parts["diffusion_model"]["file"] == "flux-tiny.gguf"
    assert done.model.model_config().options["clip_l"] == done.model.options["clip_l"]

    same = pull_here(hub, tmp_path, FLUX_REPO, parts={"taesd": TAESD, "clip_l": CLIP_L})
    assert same.fetched is False
    with pytest.raises(PullError) as caught:
        pull_here(hub, tmp_path, FLUX_REPO, parts={"clip_l": CLIP_L, "taesd": TAESD}, options={"steps": 4})
    assert caught.value.status == 409
    assert "pulled with other parts or options" in caught.value.message


@pytest.mark.parametrize(
    ("parts", "refusal"),
    [
        (
            {**FLUX, "clip": CLIP_L},
            (
                400,
                "parts.clip",
                "unknown part 'clip': the parts are diffusion_model, model, clip_l, clip_g, t5xxl, vae, "
                "taesd (stable-diffusion.cpp's names)",
            ),
        ),
        (
            {"diffusion_model": "flux-tiny.gguf", "taesd": TAESD},
            (400, "parts.clip_l", "needs its text encoder"),
        ),
        ({"diffusion_model": "flux-tiny.gguf", "clip_l": CLIP_L}, (400, "parts.vae", "needs a VAE")),
        (
            {**FLUX, "model": "flux-tiny.gguf"},
            (400, "parts.model", "or model (a single-file checkpoint), not both"),
        ),
        (
            {**FLUX, "diffusion_model": "flux-tiny-Q8_0.gguf"},
            (
                404,
                "parts.diffusion_model",
                f"part diffusion_model: {FLUX_REPO} has no file 'flux-tiny-Q8_0.gguf' (its model files: "
                "flux-tiny.gguf)",
            ),
        ),
        (
            {**FLUX, "clip_l": f"{FLUX_ENCODERS}:clip_l.safetensors"},
            (
                404,
                "parts.clip_l",
                f"part clip_l: {FLUX_ENCODERS} has no file 'clip_l.safetensors' (its model files: "
                "text_encoders/clip-l-random.gguf)",
            ),
        ),
        (
            {**FLUX, "taesd": "nobody/nothing:ae.safetensors"},
            (404, "parts.taesd", "part taesd: no repository"),
        ),
        ({**FLUX, "vae": "../ae.safetensors"}, (400, "parts.vae", "is no file name in a repository")),
    ],
)
def test_a_bad_description_is_refused_before_any_download(hub, flux, tmp_path, parts, refusal):
    status, param, message = refusal
    sent = sum(hub.sent.values())
    with pytest.raises(PullError) as caught:
        pull_here(hub, tmp_path, FLUX_REPO, parts=parts)
    assert (caught.value.status, caught.value.param) == (status, param)
    assert message in caught.value.message
    assert sum(hub.sent.values()) == sent
    assert Store(tmp_path).list() == []


def test_a_part_that_is_not_what_its_name_says_is_refused_and_its_files_deleted(hub, flux, tmp_path):
    with pytest.raises(PullError) as caught:
        pull_here(hub, tmp_path, FLUX_REPO, parts={**FLUX, "clip_l": TAESD}, model_id="flux-mixed")
    assert caught.value.status == 422
    assert caught.value.message.startswith("the parts pulled are no image model allm serves: ")
    assert "clip_l (taesd-dit16-random.gguf): " in caught.value.message
    assert "clip_l must be CLIP-L's text model" in caught.value.message
    assert Store(tmp_path).list() == []
    assert not Store(tmp_path).directory("flux-mixed").exists()


def test_a_single_file_image_model_is_pulled_as_one(hub, flux, tmp_path):
    done = pull_here(hub, tmp_path, FLUX_CHECKPOINT)
    assert (done.model.modality, done.model.format) == ("image", "flux")
    assert Path(done.model.path).name == "flux-tiny-checkpoint.gguf"
    assert (done.model.options, done.model.parts) == ({}, {})
