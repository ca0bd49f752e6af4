"""stable-diffusion.cpp on the tiny Flux set, and what the binding does with damaged sets unchecked.

Every binding call runs in a subprocess: several of these sets crash the process that loads them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from allm.kernel.codes import AllmError, Code
from allm.managers.image.model_check import check_parts
from tests.image_files import MISSING_TENSOR, damaged_image_models, write_tiny_flux

pytestmark = pytest.mark.slow

# Loads the parts given, says whether the context is there, then makes one 64x64 image per seed.
# The context pointer is the binding's own ctypes pointer: NULL (falsy) when the load failed.
RUNNER = r"""
import ctypes, hashlib, json, os, resource, sys, time

import stable_diffusion_cpp
from stable_diffusion_cpp import stable_diffusion_cpp as sd_cpp

messages = []


@sd_cpp.sd_log_callback
def on_log(level, text, data):
    if level >= 2:  # warnings and errors: the reasons a load fails
        messages.append(text.decode("utf-8", "replace").strip())


sd_cpp.sd_set_log_callback(on_log, ctypes.c_void_p(0))


def say(**event):
    print(json.dumps(event), flush=True)


args = json.loads(sys.argv[1])
started = time.monotonic()
sd = stable_diffusion_cpp.StableDiffusion(
    **{f"{part}_path": path for part, path in args["parts"].items()},
    vae_decode_only=args["decode_only"],
    n_threads=2,
    verbose=False,
)
loaded = bool(sd._model.model)
say(event="loaded", loaded=loaded, messages=messages[:], load_s=time.monotonic() - started)
if not loaded and args["release"]:
    sd._model.model = None  # else closing calls free_sd_ctx(NULL), which segfaults
    sd.close()
    say(event="released")
    sys.exit(0)
for seed in args["seeds"]:
    del messages[:]
    started = time.monotonic()
    try:
        images = sd.generate_image(
            prompt="a red cube", width=64, height=64, sample_steps=2, cfg_scale=1.0, seed=seed
        )
    except Exception as exc:
        say(event="raised", type=type(exc).__name__, message=str(exc))
        continue
    image = images[0]
    say(
        event="image",
        seed=seed,
        size=list(image.size),
        mode=image.mode,
        sha256=hashlib.sha256(image.tobytes()).hexdigest(),
        extrema=[list(band) for band in image.getextrema()],
        generate_s=time.monotonic() - started,
    )
say(event="done", max_rss_kib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def run_binding(
    parts: Mapping[str, Path],
    *,
    seeds: Sequence[int] = (),
    decode_only: bool = False,
    release: bool = False,
    timeout_s: float = 90,
) -> tuple[int, list[dict[str, Any]]]:
    """The runner's exit status (negative: the signal that killed it) and its events."""
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "GGML_NO_BACKTRACE": "1"}
    args = {
        "parts": {part: str(path) for part, path in parts.items()},
        "seeds": list(seeds),
        "decode_only": decode_only,
        "release": release,
    }
    proc = subprocess.run(
        [sys.executable, "-c", RUNNER, json.dumps(args)],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env=env,
        check=False,
    )
    events = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return proc.returncode, events


def event(events: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [e for e in events if e["event"] == kind]
    assert found, f"no {kind!r} event in {events}"
    return found[0]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    return write_tiny_flux(tmp_path_factory.mktemp("flux"))


@pytest.fixture(scope="module")
def damaged(tiny, tmp_path_factory) -> dict[str, dict[str, Path]]:
    return damaged_image_models(tiny, tmp_path_factory.mktemp("damaged"))


def test_tiny_flux_makes_the_same_image_for_the_same_seed(tiny):
    status, events = run_binding(tiny, seeds=[42, 7])
    again_status, again = run_binding(tiny, seeds=[42])
    assert (status, again_status) == (0, 0), events
    assert event(events, "loaded")["loaded"]
    first, other = (e for e in events if e["event"] == "image")
    (repeat,) = (e for e in again if e["event"] == "image")
    for image in (first, other, repeat):
        assert image["size"] == [64, 64]
        assert image["mode"] == "RGBA"
    assert first["extrema"][3] == [255, 255]  # opaque
    assert any(low < high for low, high in first["extrema"][:3])  # not one flat colour
    assert repeat["sha256"] == first["sha256"]  # in another process, too
    assert other["sha256"] != first["sha256"]
    # a ~76 MB set in well under a gigabyte: its peak RSS is ~146 MiB run alone here, but a whole
    # suite's run once saw 618 MiB (cause not found: the same code passed 3 runs of this file right
    # after); the bound catches a model read into memory several times over, not that
    assert event(events, "done")["max_rss_kib"] < 768 * 1024


def test_decoder_only_taesd_loads_decode_only(damaged):
    parts = damaged["decoder_only_taesd"]
    assert check_parts(parts, decode_only=True).decode_only
    status, events = run_binding(parts, seeds=[42], decode_only=True)
    assert status == 0, events
    assert event(events, "image")["size"] == [64, 64]


# What the binding does with each damaged set when nothing checks it first: the context pointer
# it hands back (NULL when stable-diffusion.cpp refused), what the log said, what generating
# did, and how the process ended.
UNCHECKED = {
    # refused with a NULL context, which the constructor does not notice
    "missing_tensor": (
        False,
        f"tensor 'model.diffusion_model.{MISSING_TENSOR}' not in model file",
        -signal.SIGSEGV,
    ),
    "cut_in_data": (False, "read tensor data failed", -signal.SIGSEGV),
    "cut_in_header": (False, "get sd version from file failed", -signal.SIGSEGV),
    "decoder_only_taesd": (False, "tensor 'tae.encoder.layers.0.weight' not in model file", -signal.SIGSEGV),
    # "loaded": the bad text encoder is only warned about, and sampling a Flux without one crashes
    "html_page": (True, "unknown format", -signal.SIGSEGV),
    "no_clip_l": (True, "No text encoders provided", -signal.SIGSEGV),
    # "loaded" with a head size of 64: sampling aborts
    "head_dim_64": (True, "", -signal.SIGABRT),
}


@pytest.mark.parametrize("damage", sorted(UNCHECKED))
def test_binding_on_unchecked_damage(damaged, damage):
    loaded, said, died_of = UNCHECKED[damage]
    parts = damaged[damage]
    with pytest.raises(AllmError) as caught:
        check_parts(parts)
    assert caught.value.code in (Code.MODEL_CORRUPT, Code.FORMAT_MISMATCH, Code.UNSUPPORTED)

    status, events = run_binding(parts, seeds=[42])
    assert status == died_of, (status, events)
    load = event(events, "loaded")
    assert load["loaded"] is loaded
    assert any(said in message for message in load["messages"]), load["messages"]
    if not loaded:
        # the constructor returned; generating finds the NULL and raises, the exit frees it: SIGSEGV
        assert event(events, "raised") == {
            "event": "raised",
            "type": "ValueError",
            "message": "NULL pointer access",
        }
        assert event(events, "done")
    else:
        assert not [e for e in events if e["event"] in ("image", "raised", "done")]  # died while sampling


def test_flux_without_attention_norms_dies_while_loading(damaged):
    """Flux's head size is read from its norms: without them FluxRunner divides by zero (SIGFPE)."""
    parts = damaged["no_attention_norms"]
    with pytest.raises(AllmError) as caught:
        check_parts(parts)
    assert caught.value.code == Code.MODEL_CORRUPT
    status, events = run_binding(parts, seeds=[42])
    assert status == -signal.SIGFPE
    assert events == []


def test_null_context_is_released_without_a_crash(damaged):
    """What the engine does after a failed load: forget the NULL pointer before the binding frees it."""
    status, events = run_binding(damaged["missing_tensor"], release=True)
    assert status == 0, events
    assert [e["event"] for e in events] == ["loaded", "released"]
    assert not events[0]["loaded"]
