"""The image manager on a real stable-diffusion.cpp through the kernel: a tiny random Flux the fixtures write.

The model's pictures are noise, but real noise: stable-diffusion.cpp loads the three files,
samples, decodes with TAESD and hands back pixels; the tests check sizes, formats, seeds,
progress, cancel, deadline, memory and every refusal.
"""

from __future__ import annotations

import asyncio
import io
import signal

import psutil
import pytest
import pytest_asyncio
from PIL import Image

from allm.kernel.client import KernelClient
from allm.kernel.codes import AllmError, Code
from tests.image_files import write_tiny_flux
from tests.waits import until, wait_idle

from .conftest import manager

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.slow]

MIB = 1024 * 1024


def entry(model_id: str, parts: dict, **options) -> dict:
    extra = {name: str(path) for name, path in parts.items() if name != "diffusion_model"}
    return {"id": model_id, "path": str(parts["diffusion_model"]), "options": {**extra, **options}}


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def image(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("image-models")
    parts = write_tiny_flux(tmp / "flux")
    no_clip = {k: v for k, v in parts.items() if k != "clip_l"}
    settings = {
        "models": [
            entry("flux", parts, steps=2, cfg_scale=1.0),
            {
                "id": "flux-alone",
                "path": str(parts["diffusion_model"]),
                "options": {"taesd": str(parts["taesd"])},
            },
            entry("flux-no-clip", no_clip),
        ],
        "memory_budget_bytes": 2048 * MIB,
    }
    async with manager("image", settings) as (client, supervisor):
        yield client, supervisor


async def generate(client: KernelClient, model: str = "flux", **params):
    params = {"prompt": "a red cube", "width": 64, "height": 64, "n": 1, "output_format": "png", **params}
    return await client.call("image", "generate", model=model, params=params)


def picture(blob: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(blob))
    img.load()
    return img


async def test_an_image_of_the_size_and_format_asked(image):
    client, _ = image
    for fmt, pil in (("png", "PNG"), ("jpeg", "JPEG"), ("webp", "WEBP")):
        reply = await generate(client, width=64, height=96, output_format=fmt, seed=7)
        [blob] = reply.blobs
        img = picture(blob)
        assert (img.format, img.size) == (pil, (64, 96))
        assert reply.data["seeds"] == [7]
        assert (reply.data["width"], reply.data["height"], reply.data["output_format"]) == (64, 96, fmt)


async def test_the_same_seed_gives_the_same_image_and_another_seed_another(image):
    client, _ = image
    a = picture((await generate(client, seed=42)).blobs[0])
    b = picture((await generate(client, seed=42)).blobs[0])
    c = picture((await generate(client, seed=43)).blobs[0])
    assert a.tobytes() == b.tobytes()
    assert a.tobytes() != c.tobytes()


async def test_several_images_get_consecutive_seeds(image):
    client, _ = image
    reply = await generate(client, n=2, seed=100)
    assert reply.data["seeds"] == [100, 101]
    assert len(reply.blobs) == 2
    single = picture((await generate(client, seed=101)).blobs[0])
    assert picture(reply.blobs[1]).tobytes() == single.tobytes()


async def test_a_seed_left_out_is_drawn_and_reported(image):
    client, _ = image
    reply = await generate(client)
    [seed] = reply.data["seeds"]
    again = await generate(client, seed=seed)
    assert picture(again.blobs[0]).tobytes() == picture(reply.blobs[0]).tobytes()


async def test_steps_stream_as_progress(image):
    client, _ = image
    params = {
        "prompt": "x",
        "width": 64,
        "height": 64,
        "n": 2,
        "steps": 3,
        "output_format": "png",
        "stream": True,
    }
    async with client.stream("image", "generate", model="flux", params=params) as s:
        steps = [chunk.data["progress"] async for chunk in s]
        final = s.result
    assert [(p["image"], p["step"]) for p in steps if p["step"] == p["steps"]] == [(0, 3), (1, 3)]
    assert all(p["steps"] == 3 for p in steps)
    assert len(final.blobs) == 2


async def test_bad_values_are_refused_naming_the_field(image):
    client, _ = image
    for params, param in (
        ({"sampler": "warp"}, "sampler"),
        ({"output_format": "gif"}, "output_format"),
        ({"width": 60}, "size"),
        ({"height": 32}, "size"),
    ):
        with pytest.raises(AllmError) as info:
            await generate(client, **params)
        assert (info.value.code, info.value.param) == (Code.UNSUPPORTED, param)


async def test_a_size_that_cannot_fit_is_oom_ram_with_the_figures_before_it_starts(image):
    client, supervisor = image
    pid = supervisor.pid_of("image#0")
    with pytest.raises(AllmError) as info:
        await generate(client, width=16384, height=16384)
    assert info.value.code is Code.OOM_RAM
    assert "16384x16384 image needs about" in info.value.message
    assert "MiB of host memory is free" in info.value.message
    assert supervisor.pid_of("image#0") == pid
    assert len((await generate(client)).blobs) == 1


async def test_a_flux_without_its_text_encoder_is_refused_before_it_can_crash(image):
    client, supervisor = image
    pid = supervisor.pid_of("image#0")
    for model in ("flux-alone", "flux-no-clip"):
        with pytest.raises(AllmError) as info:
            await generate(client, model=model)
        assert info.value.code is Code.UNSUPPORTED, info.value
        assert "clip_l" in info.value.message
    assert supervisor.pid_of("image#0") == pid


def steps_shown(client: KernelClient) -> list[dict]:
    """What the manager's latest heartbeat shows of a generation under way (its step)."""
    hb = client.instances()[0].heartbeat
    running = (hb.extra.get("running") or []) if hb is not None else []
    return [r for r in running if r["activity"].startswith("generating image")]


async def test_a_running_generation_shows_its_step_in_the_status(image):
    client, _ = image
    pending = asyncio.create_task(generate(client, **LONG))
    seen = await until(lambda: steps_shown(client), 60, "a step in the heartbeat")
    await pending
    assert all(0 <= r["fraction"] <= 1 for r in seen)
    assert seen[0]["activity"].startswith("generating image 1 of 1, step ")
    assert seen[0]["model"] == "flux"


async def test_the_memory_budget_applies_to_image_models(tmp_path):
    parts = write_tiny_flux(tmp_path / "flux")
    settings = {"models": [entry("flux", parts, steps=2)], "memory_budget_bytes": 32 * MIB}
    async with manager("image", settings) as (client, _):
        with pytest.raises(AllmError) as info:
            await generate(client)
        assert info.value.code is Code.OOM_RAM
        assert "image memory budget of 32 MiB" in info.value.message


def worker_of(supervisor) -> psutil.Process:
    """The manager's generating child (multiprocessing also starts its resource tracker)."""
    children = psutil.Process(supervisor.pid_of("image#0")).children()
    [worker] = [c for c in children if "spawn_main" in " ".join(c.cmdline())]
    return worker


LONG = {"width": 256, "height": 256, "steps": 40}  # many seconds of sampling, a step at a time


async def test_a_cancelled_generation_stops_between_steps_and_the_manager_is_idle_at_once(image):
    client, supervisor = image
    await generate(client)
    worker = worker_of(supervisor)
    params = {"prompt": "x", "n": 1, "output_format": "png", "stream": True, **LONG}
    async with client.stream("image", "generate", model="flux", params=params) as s:
        async for _chunk in s:
            break  # leaving the block cancels the request
    await wait_idle(client)
    assert not worker.is_running()  # the generation is stopped, not left to finish
    assert len((await generate(client)).blobs) == 1  # a new worker, the model loaded again


async def test_a_generation_past_its_deadline_is_a_timeout(image):
    client, _ = image
    with pytest.raises(AllmError) as info:
        await client.call(
            "image",
            "generate",
            model="flux",
            params={"prompt": "x", "n": 1, "output_format": "png", **LONG},
            timeout_s=2.0,
        )
    assert info.value.code is Code.TIMEOUT
    await wait_idle(client)
    assert len((await generate(client)).blobs) == 1


async def test_a_worker_killed_mid_generation_is_internal_naming_the_signal_and_the_next_one_works(image):
    client, supervisor = image
    await generate(client)
    worker = worker_of(supervisor)
    pending = asyncio.create_task(generate(client, **LONG))
    await until(lambda: steps_shown(client), 60, "a step in the heartbeat")  # mid-generation
    worker.send_signal(signal.SIGKILL)
    with pytest.raises(AllmError) as info:
        await pending
    assert info.value.code is Code.INTERNAL
    assert "SIGKILL" in info.value.message
    assert len((await generate(client)).blobs) == 1


async def test_the_memory_cap_counts_the_worker(tmp_path):
    parts = write_tiny_flux(tmp_path / "flux")
    settings = {"models": [entry("flux", parts, steps=2)]}
    async with manager("image", settings, memory_cap_bytes=128 * MIB) as (client, _):
        with pytest.raises(AllmError) as info:
            await client.call(
                "image",
                "generate",
                model="flux",
                params={"prompt": "x", "n": 1, "output_format": "png", **LONG},
            )
        assert info.value.code is Code.OOM_RAM
