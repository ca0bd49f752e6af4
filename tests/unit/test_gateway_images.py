"""The image endpoints' edge: each body read or refused by name, every answer in OpenAI's shape.

The kernel client is a stand-in here (``Kernel``) that answers as the image manager's
contract says (docs/design.md); the gateway's routes run in-process, in Sanic's ASGI mode,
under the openai SDK, so both directions are the SDK's own bytes and its own parsing.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import itertools
import json
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx2
import jsonschema
import openai
import pytest
from openai import AsyncOpenAI
from openai.types import ImageGenCompletedEvent, ImageGenPartialImageEvent, ImagesResponse
from sanic import Sanic

from allm.gateway import errors, openapi
from allm.gateway.config import Config, ImageLimits, ModelConfig
from allm.gateway.config_read import load
from allm.gateway.errors import ApiError
from allm.gateway.images import handlers as images
from allm.gateway.images import schema as api
from allm.gateway.images.files import FILE_NAME, ImageFiles
from allm.gateway.images.handlers import (
    ImageEvents,
    b64_items,
    base_url,
    generated,
    image_size,
    images_response,
    manager_params,
)
from allm.image_names import SAMPLERS
from allm.kernel.codes import AllmError, InternalError, OomRamError, UnsupportedError
from allm.kernel.protocol import Chunk, Result
from tests.clock import Clock
from tests.waits import until

MODEL = "sd"
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256))  # the gateway never looks inside: any bytes will do


def config_with(**limits: Any) -> Config:
    base = load(environ={})
    return dataclasses.replace(
        base,
        models=(*base.models, ModelConfig(MODEL, "/m/sd.gguf", "image")),
        images=dataclasses.replace(ImageLimits(), **limits),
    )


CONFIG = config_with()


def checked(**body: Any) -> dict[str, Any]:
    result: dict[str, Any] = api.IMAGES.check({"prompt": "a red fox", "model": MODEL, **body}, "")
    return result


def refused(**body: Any) -> ApiError:
    with pytest.raises(ApiError) as info:
        payload = checked(**body)
        image_size(payload, CONFIG.images)
    assert (info.value.status, info.value.code) == (400, "invalid_value")
    return info.value


# -- reading the body ----------------------------------------------------------------------------


def test_the_least_a_body_holds_is_a_prompt_and_a_model_and_the_rest_takes_its_defaults():
    payload = checked()
    assert manager_params(payload, image_size(payload, CONFIG.images)) == {
        "prompt": "a red fox",
        "negative_prompt": "",
        "n": 1,
        "width": 512,
        "height": 512,
        "steps": None,
        "cfg_scale": None,
        "seed": None,
        "sampler": None,
        "output_format": "png",
        "output_compression": None,
        "stream": False,
    }


def test_every_field_reaches_the_manager_as_its_contract_names_it():
    payload = checked(
        negative_prompt="blurry",
        n=3,
        size="768x512",
        steps=30,
        cfg_scale=7,
        seed=42,
        sampler="dpm++2m",
        output_format="webp",
        output_compression=80,
        stream=True,
    )
    params = manager_params(payload, image_size(payload, CONFIG.images))
    assert params == {
        "prompt": "a red fox",
        "negative_prompt": "blurry",
        "n": 3,
        "width": 768,
        "height": 512,
        "steps": 30,
        "cfg_scale": 7.0,
        "seed": 42,
        "sampler": "dpm++2m",
        "output_format": "webp",
        "output_compression": 80,
        "stream": True,
    }
    assert isinstance(params["cfg_scale"], float)


@pytest.mark.parametrize(
    ("size", "expected"),
    [("512x768", (512, 768)), ("512X768", (512, 768)), ("64x64", (64, 64)), ("1024x1024", (1024, 1024)),
     ("auto", (512, 512)), ("AUTO", (512, 512)), ("Auto", (512, 512)), (None, (512, 512))],
)  # fmt: skip
def test_a_size_is_width_x_height_in_either_case_or_auto(size, expected):
    assert image_size(checked(size=size), CONFIG.images) == expected


def test_auto_is_the_configured_default_size():
    limits = dataclasses.replace(ImageLimits(), default_size=(768, 384))
    assert image_size(checked(size="auto"), limits) == (768, 384)
    assert image_size(checked(), limits) == (768, 384)


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [("n", 2.0, 2), ("seed", 42.0, 42), ("steps", 25.0, 25), ("output_compression", 90.0, 90)],
)
def test_an_integer_written_as_a_json_number_with_a_point_is_that_integer(field, value, expected):
    extra = {"output_format": "jpeg"} if field == "output_compression" else {}
    payload = checked(**{field: value}, **extra)
    assert payload[field] == expected
    assert type(payload[field]) is int


@pytest.mark.parametrize("seed", [-1, -(2**63)])
def test_a_negative_seed_asks_the_manager_to_draw_one_as_stable_diffusion_uis_mean_it(seed):
    payload = checked(seed=seed)
    assert manager_params(payload, (64, 64))["seed"] is None


@pytest.mark.parametrize(
    "body",
    [
        # what clients of OpenAI's image API send as a matter of course, changing nothing here
        {"quality": "standard", "style": "vivid"},
        {"quality": "hd", "style": "natural"},
        {"quality": "high", "moderation": "low", "background": "opaque"},
        {"quality": "auto", "background": "auto", "moderation": "auto", "complexity": "medium"},
        {"user": "u-1", "safety_identifier": "hash"},
        {"partial_images": 0},
        {"partial_images": 0.0},
        {"response_format": "b64_json"},
        {"response_format": "url"},
        {"output_format": "jpeg", "output_compression": 0},
        {"output_format": "webp", "output_compression": 100},
        {"stream": True, "partial_images": 0, "response_format": "b64_json"},
        {"cfg_scale": 0}, {"cfg_scale": 30}, {"cfg_scale": 4.5},
        {"steps": 1}, {"steps": 150}, {"n": 10},
        {"seed": 2**63 - 1},
        # null is absent, as in OpenAI's APIs
        {"n": None, "size": None, "quality": None, "partial_images": None, "output_compression": None},
        *({"sampler": s} for s in SAMPLERS),
    ],
)  # fmt: skip
def test_a_body_openai_or_stable_diffusion_cpp_would_take_is_taken(body):
    payload = checked(**body)
    image_size(payload, CONFIG.images)


@pytest.mark.parametrize(
    ("body", "param", "says"),
    [
        ({"prompt": None}, "prompt", "'prompt' is required"),
        ({"prompt": ""}, "prompt", "1 to 32000 characters"),
        ({"prompt": "p" * 32001}, "prompt", "1 to 32000 characters"),
        ({"prompt": ["a fox"]}, "prompt", "must be a string"),
        ({"model": None}, "model", "'model' is required"),
        ({"n": 0}, "n", "from 1 to 10, got 0"),
        ({"n": 11}, "n", "from 1 to 10, got 11"),
        ({"n": 2.5}, "n", "must be an integer, got a number"),
        ({"n": "2"}, "n", "must be an integer, got a string"),
        ({"n": True}, "n", "must be an integer, got a boolean"),
        ({"size": "512"}, "size", "must match"),
        ({"size": "512x512x2"}, "size", "must match"),
        ({"size": "512*512"}, "size", "must match"),
        ({"size": " 512x512"}, "size", "must match"),
        ({"size": ""}, "size", "must match"),
        ({"size": "large"}, "size", "must match"),
        ({"size": 512}, "size", "must be a string"),
        ({"size": "1004x512"}, "size", "the width must be a multiple of 8 from 64 to 1024, got 1004"),
        ({"size": "512x1028"}, "size", "the height must be a multiple of 8 from 64 to 1024, got 1028"),
        ({"size": "56x512"}, "size", "the width must be a multiple of 8 from 64 to 1024, got 56"),
        ({"size": "1032x512"}, "size", "from 64 to 1024, got 1032"),
        ({"size": "0x0"}, "size", "got 0"),
        ({"size": "99999x8"}, "size", "got 99999"),
        ({"size": "1792x1024"}, "size", "got 1792"),
        ({"response_format": "png"}, "response_format", "must be one of ['b64_json', 'url']"),
        ({"output_format": "gif"}, "output_format", "must be one of ['png', 'jpeg', 'webp']"),
        ({"output_format": "svg"}, "output_format", "must be one of"),
        ({"output_format": "jpg"}, "output_format", "must be one of"),
        ({"output_compression": 50}, "output_compression", "for output_format jpeg or webp, not 'png'"),
        ({"output_format": "png", "output_compression": 50}, "output_compression", "not 'png'"),
        ({"output_format": "jpeg", "output_compression": 101}, "output_compression", "from 0 to 100"),
        ({"output_format": "jpeg", "output_compression": -1}, "output_compression", "from 0 to 100"),
        ({"stream": True, "response_format": "url"}, "stream", "response_format url cannot stream"),
        ({"stream": "true"}, "stream", "must be a boolean"),
        ({"partial_images": 1}, "partial_images", "only supported as 0, got 1"),
        ({"partial_images": 3}, "partial_images", "only supported as 0"),
        ({"background": "transparent"}, "background", "must be one of ['auto', 'opaque']"),
        ({"quality": "ultra"}, "quality", "must be one of"),
        ({"style": "anime"}, "style", "must be one of"),
        ({"moderation": "none"}, "moderation", "must be one of"),
        ({"seed": 2**63}, "seed", "got 9223372036854775808"),
        ({"seed": 1e19}, "seed", "from -9223372036854775808 to 9223372036854775807"),
        ({"seed": 1e300}, "seed", "to 9223372036854775807, got 1e+300"),
        ({"seed": 0.5}, "seed", "must be an integer, got a number"),
        ({"seed": "42"}, "seed", "must be an integer, got a string"),
        ({"steps": 0}, "steps", "from 1 to 150, got 0"),
        ({"steps": 151}, "steps", "from 1 to 150, got 151"),
        ({"cfg_scale": -0.5}, "cfg_scale", "from 0 to 30, got -0.5"),
        ({"cfg_scale": 31}, "cfg_scale", "from 0 to 30, got 31"),
        ({"cfg_scale": "7"}, "cfg_scale", "must be a number"),
        ({"sampler": "dpm++3m"}, "sampler", "must be one of ['euler', 'euler_a'"),
        ({"sampler": "Euler"}, "sampler", "must be one of"),
        ({"negative_prompt": 1}, "negative_prompt", "must be a string"),
        # OpenAI's gif and svg options: unknown here, as their formats are
    ],
)  # fmt: skip
def test_each_bad_field_is_refused_naming_it(body, param, says):
    error = refused(**body)
    assert error.param == param
    assert says in error.message


def test_the_size_limits_are_the_configs():
    limits = dataclasses.replace(ImageLimits(), max_width=2048, max_height=512)
    assert image_size(checked(size="2048x512"), limits) == (2048, 512)
    with pytest.raises(ApiError) as info:
        image_size(checked(size="512x520"), limits)
    assert info.value.param == "size"
    assert "the height must be a multiple of 8 from 64 to 512, got 520" in info.value.message


# -- the answer ----------------------------------------------------------------------------------


def reply(n: int = 1, fmt: str = "png", width: int = 512, height: int = 768) -> Result:
    data = {
        "created": 1_790_000_000,
        "seeds": [7 + i for i in range(n)],
        "width": width,
        "height": height,
        "output_format": fmt,
        "steps": 20,
    }
    return Result(rid=1, data=data, blobs=tuple(PNG + bytes([i]) for i in range(n)))


def test_a_b64_answer_is_openais_images_response_with_allms_seed_per_image():
    result = reply(n=2)
    body = images_response(result.data, b64_items(generated(result, 2)))
    assert body == {
        "created": 1_790_000_000,
        "background": "opaque",
        "data": [
            {"b64_json": base64.b64encode(PNG + b"\x00").decode(), "seed": 7},
            {"b64_json": base64.b64encode(PNG + b"\x01").decode(), "seed": 8},
        ],
        "output_format": "png",
        "size": "512x768",
    }
    parsed = ImagesResponse.model_validate(body)
    assert base64.b64decode(parsed.data[1].b64_json) == PNG + b"\x01"
    assert (parsed.usage, parsed.data[0].revised_prompt, parsed.data[0].url) == (None, None, None)


@pytest.mark.parametrize(
    ("result", "says"),
    [
        (dataclasses.replace(reply(n=2), blobs=(PNG,)), "sent 1 images for the 2 asked for"),
        (Result(1, {**reply(n=2).data, "seeds": [1]}, reply(n=2).blobs), "a seed per image"),
        (Result(1, {**reply(n=2).data, "output_format": "bmp"}, reply(n=2).blobs), "output_format: 'bmp'"),
        (Result(1, {**reply(n=2).data, "width": None}, reply(n=2).blobs), "an integer 'width'"),
        (Result(1, {**reply(n=2).data, "created": 1.5}, reply(n=2).blobs), "an integer 'created'"),
        (Result(1, {**reply(n=2).data, "seeds": [1, "2"]}, reply(n=2).blobs), "a seed per image"),
    ],
)
def test_a_result_unlike_the_managers_contract_is_an_internal_error(result, says):
    with pytest.raises(InternalError, match=says):
        generated(result, 2)


def events_of(text: str) -> list[tuple[str, dict]]:
    out = []
    for block in text.split("\n\n"):
        if block:
            name, data = block.split("\n")
            out.append((name.removeprefix("event: "), json.loads(data.removeprefix("data: "))))
    return out


def test_progress_chunks_are_allms_progress_events_and_anything_else_is_dropped():
    events = ImageEvents()
    assert events_of(events.feed({"progress": {"image": 1, "step": 3, "steps": 20}})) == [
        (
            "image_generation.progress",
            {"type": "image_generation.progress", "image_index": 1, "step": 3, "steps": 20},
        )
    ]
    dropped = [
        {},
        {"progress": 3},
        {"progress": {"image": 0, "step": "1", "steps": 2}},
        {"progress": {"image": 0, "step": True, "steps": 2}},
        {"progress": {"step": 1}},
    ]
    assert [events.feed(data) for data in dropped] == [""] * len(dropped)


def test_each_image_ends_as_a_completed_event_with_every_field_the_sdks_type_requires():
    result = reply(n=2, fmt="webp", width=64, height=128)
    sent = events_of(ImageEvents().finish(result.data, generated(result, 2)))
    assert [name for name, _ in sent] == ["image_generation.completed"] * 2
    first = sent[0][1]
    assert first == {
        "type": "image_generation.completed",
        "b64_json": base64.b64encode(PNG + b"\x00").decode(),
        "background": "opaque",
        "created_at": 1_790_000_000,
        "output_format": "webp",
        "quality": "auto",
        "size": "64x128",
        "usage": {
            "input_tokens": 0,
            "input_tokens_details": {"image_tokens": 0, "text_tokens": 0},
            "output_tokens": 0,
            "total_tokens": 0,
        },
    }
    ImageGenCompletedEvent.model_validate(first)  # strict: every required field, each of its type
    assert base64.b64decode(sent[1][1]["b64_json"]) == PNG + b"\x01"


# -- the images kept for URLs --------------------------------------------------------------------


def files(tmp_path: Path, clock: Callable[[], float], **caps: Any) -> ImageFiles:
    bounds = {"ttl_s": 60.0, "max_files": 100, "max_bytes": 10**9, **caps}
    return ImageFiles(tmp_path / "images", clock=clock, **bounds)


def test_a_stored_image_is_read_back_with_its_type_until_its_time_passes_then_its_file_is_gone(tmp_path):
    clock = Clock()
    store = files(tmp_path, clock)
    [png] = store._store([PNG], "png")
    [jpeg] = store._store([b"jpeg bytes"], "jpeg")
    [webp] = store._store([b"webp bytes"], "webp")
    assert store._read(png) == (PNG, "image/png", 60)
    assert store._read(jpeg) == (b"jpeg bytes", "image/jpeg", 60)
    assert store._read(webp) == (b"webp bytes", "image/webp", 60)
    clock.now += 59.5
    assert store._read(png) == (PNG, "image/png", 0)
    clock.now += 1
    assert store._read(png) is None
    assert not (tmp_path / "images" / png).exists()
    assert store.names() == []


def test_names_are_random_and_each_one_a_name_the_route_accepts(tmp_path):
    store = files(tmp_path, Clock())
    names = store._store([PNG] * 10, "png")
    assert len(set(names)) == 10
    assert all(FILE_NAME.fullmatch(name) for name in names)
    assert all(api.IMAGE_FILE.check(name, "name") == name for name in names)


def test_past_the_count_cap_the_oldest_go_first(tmp_path):
    clock = Clock()
    store = files(tmp_path, clock, max_files=2)
    first = store._store([PNG], "png")
    clock.now += 1
    second = store._store([PNG], "png")
    clock.now += 1
    third = store._store([PNG], "png")
    assert store.names() == second + third
    assert sorted(os.listdir(tmp_path / "images")) == sorted(second + third)
    assert store._read(first[0]) is None


def test_past_the_byte_cap_the_oldest_go_first(tmp_path):
    store = files(tmp_path, Clock(), max_bytes=250)
    first = store._store([b"a" * 100], "png")
    second = store._store([b"b" * 100], "png")
    third = store._store([b"c" * 100], "png")
    assert store.names() == second + third
    assert store._bytes == 200
    assert store._read(first[0]) is None


def test_the_images_of_one_answer_are_never_swept_by_their_own_store(tmp_path):
    store = files(tmp_path, Clock(), max_files=2, max_bytes=150)
    old = store._store([b"x"], "png")
    names = store._store([b"a" * 100, b"b" * 100, b"c" * 100], "png")  # over both caps alone
    assert store.names() == names
    assert store._read(old[0]) is None
    [last] = store._store([b"d"], "png")  # the next store sweeps them as usual, oldest first
    assert store.names() == [names[2], last]


def test_files_of_an_earlier_run_are_indexed_by_age_and_its_unfinished_writes_deleted(tmp_path):
    directory = tmp_path / "images"
    directory.mkdir()
    clock = Clock()
    names = {"old": "a" * 32 + ".png", "new": "b" * 32 + ".jpeg", "newer": "c" * 32 + ".webp"}
    for age, name in zip((120, 30, 10), names.values(), strict=True):
        (directory / name).write_bytes(b"img")
        os.utime(directory / name, (clock.now - age, clock.now - age))
    (directory / ("." + "d" * 32 + ".png.part")).write_bytes(b"half")
    (directory / "notes.txt").write_bytes(b"someone else's")
    (directory / ("e" * 32 + ".png")).symlink_to(tmp_path / "elsewhere")
    store = files(tmp_path, clock)
    assert store.names() == [names["new"], names["newer"]]
    assert sorted(os.listdir(directory)) == sorted(
        [names["new"], names["newer"], "notes.txt", "e" * 32 + ".png"]
    )
    assert store._read(names["new"]) == (b"img", "image/jpeg", 30)


@pytest.mark.parametrize(
    "spelling",
    [
        "../images/{name}",
        "./{name}",
        "{images}/{name}",
        "{name}/",
        "{name}\x00",
        "{upper}",
        "..",
        "/etc/passwd",
        "notes.txt",
        ".{name}.part",
    ],
)
def test_a_name_the_store_never_made_reads_as_nothing_even_where_it_leads_to_a_kept_file(tmp_path, spelling):
    store = files(tmp_path, Clock())
    [name] = store._store([PNG], "png")
    (tmp_path / "images" / "notes.txt").write_bytes(b"notes")
    (tmp_path / "images" / f".{name}.part").write_bytes(b"half")
    other = spelling.format(name=name, images=tmp_path / "images", upper=name.replace(".png", ".PNG"))
    assert store._read(other) is None
    assert store._read(name) is not None


def test_a_file_placed_beside_the_stores_own_is_not_served(tmp_path):
    store = files(tmp_path, Clock())
    store._store([PNG], "png")
    planted = "f" * 32 + ".png"
    (tmp_path / "images" / planted).write_bytes(b"planted")
    assert store._read(planted) is None


async def test_the_timer_sweeps_even_when_no_request_comes(tmp_path):
    clock = Clock()
    store = files(tmp_path, clock)
    [name] = await store.store([PNG], "png")
    clock.now += 61
    sweeps = asyncio.create_task(store.sweep_every(0.01))
    try:
        await until(lambda: not (tmp_path / "images" / name).exists(), 5, "the sweep to remove the file")
    finally:
        sweeps.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sweeps
    assert store.names() == []
    assert not (tmp_path / "images" / name).exists()


# -- the routes, under the openai SDK ------------------------------------------------------------


class Kernel:
    """A stand-in for the kernel client: the image manager's contract, or the error it is given.

    ``fail_at`` is the number of progress chunks sent before ``error`` is raised (0: before
    the stream opens, as a manager refusing the request does).
    """

    def __init__(self, error: AllmError | None = None, fail_at: int = 0, steps: int = 2) -> None:
        self.error = error
        self.fail_at = fail_at
        self.steps = steps
        self.params: list[dict[str, Any]] = []

    def _result(self, params: dict[str, Any]) -> Result:
        n, fmt = params["n"], params["output_format"]
        data = {"created": 1_790_000_000, "seeds": [100 + i for i in range(n)], "width": params["width"],
                "height": params["height"], "output_format": fmt, "steps": self.steps}  # fmt: skip
        return Result(rid=1, data=data, blobs=tuple(f"{fmt}-{i}".encode() for i in range(n)))

    async def call(self, modality: str, op: str, *, model: str, params: dict, timeout_s: float) -> Result:
        assert (modality, op, model) == ("image", "generate", MODEL)
        self.params.append(params)
        if self.error is not None:
            raise self.error
        return self._result(params)

    def stream(self, modality: str, op: str, *, model: str, params: dict, timeout_s: float) -> Any:
        assert (modality, op, model) == ("image", "generate", MODEL)
        self.params.append(params)
        kernel = self

        class Stream:
            result: Result | None = None

            async def __aenter__(self) -> Stream:
                return self

            async def __aexit__(self, *exc: object) -> None:
                return None

            async def __aiter__(self) -> AsyncIterator[Chunk]:
                seq = 0
                for image in range(params["n"]):
                    for step in range(1, kernel.steps + 1):
                        if kernel.error is not None and seq == kernel.fail_at:
                            raise kernel.error
                        yield Chunk(
                            1, seq, {"progress": {"image": image, "step": step, "steps": kernel.steps}}
                        )
                        seq += 1
                self.result = kernel._result(params)

        return Stream()


_apps = itertools.count()


@contextlib.asynccontextmanager
async def served(
    tmp_path: Path, kernel: Kernel, base_url: str = "http://allm.test/v1", config: Config = CONFIG
) -> AsyncIterator[tuple[AsyncOpenAI, httpx2.AsyncClient, ImageFiles]]:
    """The images blueprint and the one error handler, in Sanic's ASGI mode, around ``kernel``."""
    app = Sanic(f"allm-images-{next(_apps)}", configure_logging=False, request_class=errors.EdgeRequest)
    app.config.TOUCHUP = False  # Sanic rewrites its own methods once per process: a second app breaks
    app.blueprint(images.bp)
    app.error_handler.add(Exception, errors.handle)
    app.ctx.config = config
    app.ctx.client = kernel
    app.ctx.images = store = ImageFiles(tmp_path / "images", ttl_s=60, max_files=10, max_bytes=10**6)
    inbox: asyncio.Queue[dict] = asyncio.Queue()
    outbox: asyncio.Queue[dict] = asyncio.Queue()
    lifespan = asyncio.create_task(
        app({"type": "lifespan", "asgi": {"version": "3.0"}}, inbox.get, outbox.put)
    )
    await inbox.put({"type": "lifespan.startup"})
    assert (await outbox.get())["type"] == "lifespan.startup.complete"
    http = httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app))
    sdk = AsyncOpenAI(base_url=base_url, api_key="k", http_client=http, max_retries=0)
    try:
        yield sdk, http, store
    finally:
        await http.aclose()
        await inbox.put({"type": "lifespan.shutdown"})
        await outbox.get()
        await lifespan


async def test_the_sdk_reads_a_b64_answer_and_the_manager_got_its_contract(tmp_path):
    kernel = Kernel()
    async with served(tmp_path, kernel) as (sdk, _http, _store):
        answer = await sdk.images.generate(
            prompt="a red fox", model=MODEL, n=2, size="256X128", quality="hd", style="vivid", user="u"
        )
    assert isinstance(answer, ImagesResponse)
    assert [base64.b64decode(image.b64_json) for image in answer.data] == [b"png-0", b"png-1"]
    assert [image.seed for image in answer.data] == [100, 101]  # allm's extension, kept by the SDK
    assert (answer.created, answer.size, answer.output_format, answer.background) == (
        1_790_000_000, "256x128", "png", "opaque",
    )  # fmt: skip
    assert kernel.params[0]["width"] == 256
    assert kernel.params[0]["stream"] is False


@pytest.mark.parametrize(
    ("base_url", "origin"),
    [("http://allm.test/v1", "http://allm.test"), ("http://127.0.0.1:8443/v1", "http://127.0.0.1:8443"),
     ("http://[::1]:9000/v1", "http://[::1]:9000")],
)  # fmt: skip
async def test_a_url_answer_links_each_image_at_this_server_as_the_client_reached_it(
    tmp_path, base_url, origin
):
    async with served(tmp_path, Kernel(), base_url=base_url) as (sdk, http, store):
        answer = await sdk.images.generate(
            prompt="p", model=MODEL, n=2, response_format="url", output_format="jpeg", output_compression=70
        )
        urls = [image.url for image in answer.data]
        assert [url.rpartition("/")[0] for url in urls] == [f"{origin}/v1/images/files"] * 2, urls
        assert all(url.endswith(".jpeg") for url in urls)
        assert [url.rpartition("/")[2] for url in urls] == store.names()
        assert all(image.b64_json is None for image in answer.data)
        fetched = [await http.get(url) for url in urls]
    assert [(r.status_code, r.headers["content-type"], r.content) for r in fetched] == [
        (200, "image/jpeg", b"jpeg-0"),
        (200, "image/jpeg", b"jpeg-1"),
    ]
    assert fetched[0].headers["cache-control"] in ("private, max-age=60", "private, max-age=59")


@pytest.mark.parametrize(
    ("scheme", "host", "expected"),
    [
        ("https", "example.com", "https://example.com"),
        ("http", "example.com:8080", "http://example.com:8080"),
        ("http", "[fe80::1]:80", "http://[fe80::1]:80"),
        # a Host header no URL can be built from: the configured address instead
        ("http", "", "http://127.0.0.1:8080"),
        ("http", "evil.com/path?", "http://127.0.0.1:8080"),
        ("http", "a b", "http://127.0.0.1:8080"),
        ("ftp", "example.com", "http://example.com"),
    ],
)
def test_the_base_of_a_url_is_the_requests_own_scheme_and_host(scheme, host, expected):
    assert base_url(SimpleNamespace(scheme=scheme, host=host), CONFIG) == expected


@pytest.mark.parametrize(
    "path",
    ["a" * 32 + ".png", "..%2F..%2Fetc%2Fpasswd", "..%2F" + "a" * 32 + ".png", "%2Fetc%2Fpasswd", "x.png"],
)
async def test_an_image_that_is_not_kept_is_a_404_in_openais_shape(tmp_path, path):
    (tmp_path / "passwd").write_bytes(b"secret")
    async with served(tmp_path, Kernel()) as (_sdk, http, _store):
        response = await http.get(f"http://allm.test/v1/images/files/{path}")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"


async def test_a_stream_is_progress_after_each_step_then_each_image_completed_in_order(tmp_path):
    kernel = Kernel(steps=3)
    async with served(tmp_path, kernel) as (sdk, _http, _store):
        stream = await sdk.images.generate(prompt="p", model=MODEL, n=2, size="64x64", stream=True)
        received = [event async for event in stream]
    progress, completed = received[:6], received[6:]
    # The SDK knows no progress event: it builds its first variant, the partial image, with
    # allm's type and fields as they came, and None for the fields that type names.
    assert all(type(e) is ImageGenPartialImageEvent for e in progress)
    assert [(e.type, e.image_index, e.step, e.steps) for e in progress] == [
        ("image_generation.progress", image, step, 3) for image in (0, 1) for step in (1, 2, 3)
    ]
    assert progress[0].b64_json is None
    assert [type(e) for e in completed] == [ImageGenCompletedEvent] * 2
    assert [base64.b64decode(e.b64_json) for e in completed] == [b"png-0", b"png-1"]
    assert {(e.size, e.output_format, e.background, e.quality, e.usage.total_tokens) for e in completed} == {
        ("64x64", "png", "opaque", "auto", 0)
    }
    assert kernel.params[0]["stream"] is True


async def test_an_error_after_the_stream_opened_is_an_error_event_the_sdk_raises(tmp_path):
    kernel = Kernel(error=OomRamError("a 1024x1024 image needs about 2112 MiB; 900 MiB is free"), fail_at=1)
    async with served(tmp_path, kernel) as (sdk, _http, _store):
        stream = await sdk.images.generate(prompt="p", model=MODEL, stream=True)
        received = []
        with pytest.raises(openai.APIError) as info:
            async for event in stream:
                received.append(event)
    assert [e.type for e in received] == ["image_generation.progress"]
    assert info.value.body == {
        "message": "a 1024x1024 image needs about 2112 MiB; 900 MiB is free",
        "type": "server_error",
        "param": None,
        "code": "oom_ram",
    }


class ShortKernel(Kernel):
    """A manager that breaks its contract: one image fewer than asked for."""

    def _result(self, params: dict[str, Any]) -> Result:
        result = super()._result(params)
        return dataclasses.replace(result, blobs=result.blobs[1:])


async def test_a_result_that_breaks_the_contract_after_the_stream_opened_is_an_internal_error_event(tmp_path):
    async with served(tmp_path, ShortKernel()) as (sdk, _http, _store):
        stream = await sdk.images.generate(prompt="p", model=MODEL, n=2, stream=True)
        with pytest.raises(openai.APIError) as info:
            _ = [event async for event in stream]
        with pytest.raises(openai.InternalServerError) as plain:
            await sdk.images.generate(prompt="p", model=MODEL, n=2)
    assert info.value.body["code"] == plain.value.body["code"] == "internal"
    assert "sent 1 images for the 2 asked for" in info.value.body["message"]


@pytest.mark.parametrize("stream", [False, True])
async def test_an_error_before_any_image_is_the_http_error_of_its_code(tmp_path, stream):
    refusal = UnsupportedError("sampler 'x' is not one", reason="invalid_request", param="sampler")
    async with served(tmp_path, Kernel(error=refusal)) as (sdk, _http, _store):
        with pytest.raises(openai.BadRequestError) as info:
            await sdk.images.generate(prompt="p", model=MODEL, stream=stream)
    assert (info.value.body["code"], info.value.body["param"]) == ("invalid_request", "sampler")


async def test_the_model_must_be_an_image_model_of_the_catalog(tmp_path):
    kernel = Kernel()
    async with served(tmp_path, kernel) as (sdk, _http, _store):
        with pytest.raises(openai.NotFoundError) as missing:
            await sdk.images.generate(prompt="p", model="dall-e-3")
        with pytest.raises(openai.BadRequestError) as other:
            await sdk.images.generate(prompt="p", model=CONFIG.models[0].id)
        with pytest.raises(openai.BadRequestError) as size:
            await sdk.images.generate(prompt="p", model=MODEL, size="1536x1024")
    assert (missing.value.body["code"], missing.value.body["param"]) == ("model_not_found", "model")
    assert other.value.body["param"] == "model"
    assert "serves text, not image" in other.value.body["message"]
    assert (size.value.body["param"], size.value.body["code"]) == ("size", "invalid_value")
    assert kernel.params == []


# -- the published document ----------------------------------------------------------------------


def test_both_routes_are_published_with_their_answers_content_types():
    doc = openapi.document(CONFIG)
    generate = doc["paths"]["/v1/images/generations"]["post"]
    assert set(generate["responses"]["200"]["content"]) == {"application/json", "text/event-stream"}
    body = generate["requestBody"]["content"]["application/json"]["schema"]
    assert body["required"] == ["prompt", "model"]
    assert body["properties"]["model"]["examples"] == [MODEL]
    file = doc["paths"]["/v1/images/files/{name}"]["get"]
    assert set(file["responses"]["200"]["content"]) == {"image/png", "image/jpeg", "image/webp"}
    assert file["parameters"] == [
        {"name": "name", "in": "path", "required": True, "schema": api.IMAGE_FILE.schema()}
    ]
    assert "security" not in file


SAMPLES = [
    {"prompt": "p", "model": MODEL},
    {"prompt": "p", "model": MODEL, "size": "512X512", "n": 2, "seed": -1, "sampler": "euler_a"},
    {"prompt": "p", "model": MODEL, "output_format": "jpeg", "output_compression": 50, "stream": True},
    {"prompt": "p", "model": MODEL, "partial_images": 0, "quality": "hd", "style": "vivid"},
    {"prompt": "p", "model": MODEL, "n": None, "background": None},
    {"prompt": "", "model": MODEL},
    {"model": MODEL},
    {"prompt": "p"},
    {"prompt": "p", "model": MODEL, "size": "512"},
    {"prompt": "p", "model": MODEL, "n": 11},
    {"prompt": "p", "model": MODEL, "partial_images": 2},
    {"prompt": "p", "model": MODEL, "background": "transparent"},
    {"prompt": "p", "model": MODEL, "output_format": "gif"},
    {"prompt": "p", "model": MODEL, "sampler": "plms"},
    {"prompt": "p", "model": MODEL, "steps": 0},
    {"prompt": "p", "model": MODEL, "svg": {"model": "x"}},
]


@pytest.mark.parametrize("sample", SAMPLES)
def test_the_published_body_schema_and_the_edge_agree(sample):
    doc = openapi.document(CONFIG)
    schema = doc["paths"]["/v1/images/generations"]["post"]["requestBody"]["content"]["application/json"]
    try:
        api.IMAGES.check(sample, "")
        accepted = True
    except ApiError:
        accepted = False
    assert jsonschema.Draft202012Validator(schema["schema"]).is_valid(sample) == accepted
