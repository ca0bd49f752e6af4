"""/v1/images/generations on `allm serve`, driven by the official SDK, on the tiny Flux the fixtures write."""

from __future__ import annotations

import base64
import io
import urllib.request

import openai
import pytest
from PIL import Image

from tests.image_files import write_tiny_flux
from tests.integration.gateway_server import running_server
from tests.model_files import smollm2_path

pytestmark = pytest.mark.slow

FAST = {"steps": 2}  # extensions go in extra_body: the SDK has no keyword for them


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("images")
    parts = write_tiny_flux(tmp / "flux")
    config = (
        f'[server]\ndata_dir = "{tmp / "data"}"\n'
        '[image]\nmax_width = 256\nmax_height = 256\ndefault_size = "64x64"\nurl_ttl_s = 600\n'
        f'[[models]]\nid = "flux"\nmodality = "image"\npath = "{parts["diffusion_model"]}"\n'
        f'options = {{ clip_l = "{parts["clip_l"]}", taesd = "{parts["taesd"]}", cfg_scale = 1.0 }}\n'
        f'[[models]]\nid = "smol"\npath = "{smollm2_path()}"\n'
    )
    with running_server(config, tmp) as server:
        yield server


@pytest.fixture(scope="module")
def sdk(served):
    return openai.OpenAI(base_url=f"{served.base_url}/v1", api_key="unused", max_retries=0)


def image_of(b64: str) -> Image.Image:
    img = Image.open(io.BytesIO(base64.b64decode(b64)))
    img.load()
    return img


def test_the_image_model_is_listed_with_its_modality(sdk):
    models = {m.id: m for m in sdk.models.list().data}
    assert models["flux"].model_extra["modality"] == "image"


def test_b64_json_png_of_the_size_asked(sdk):
    reply = sdk.images.generate(model="flux", prompt="a red cube", size="64x128", extra_body=FAST)
    [item] = reply.data
    img = image_of(item.b64_json)
    assert (img.format, img.size) == ("PNG", (64, 128))
    assert (reply.output_format, reply.size) == ("png", "64x128")


def test_the_same_seed_gives_the_same_image(sdk):
    one = sdk.images.generate(model="flux", prompt="x", extra_body={**FAST, "seed": 9}).data[0]
    two = sdk.images.generate(model="flux", prompt="x", extra_body={**FAST, "seed": 9}).data[0]
    other = sdk.images.generate(model="flux", prompt="x", extra_body={**FAST, "seed": 10}).data[0]
    assert image_of(one.b64_json).tobytes() == image_of(two.b64_json).tobytes()
    assert image_of(one.b64_json).tobytes() != image_of(other.b64_json).tobytes()


def test_several_images_each_with_its_seed(sdk):
    reply = sdk.images.generate(model="flux", prompt="x", n=2, extra_body={**FAST, "seed": 5})
    assert [d.model_extra["seed"] for d in reply.data] == [5, 6]


@pytest.mark.parametrize(("fmt", "pil"), [("jpeg", "JPEG"), ("webp", "WEBP")])
def test_a_url_serves_the_image_in_the_format_asked(sdk, fmt, pil):
    reply = sdk.images.generate(
        model="flux", prompt="x", response_format="url", output_format=fmt, extra_body=FAST
    )
    url = reply.data[0].url
    with urllib.request.urlopen(url, timeout=30) as answer:
        assert answer.headers["Content-Type"] == f"image/{fmt}"
        img = Image.open(io.BytesIO(answer.read()))
    assert (img.format, img.size) == (pil, (64, 64))


def test_a_stream_reports_progress_then_the_image(sdk):
    events = list(sdk.images.generate(model="flux", prompt="x", stream=True, extra_body={**FAST, "seed": 1}))
    kinds = [e.type for e in events]
    assert kinds[-1] == "image_generation.completed"
    assert set(kinds[:-1]) == {"image_generation.progress"}
    assert image_of(events[-1].b64_json).size == (64, 64)


@pytest.mark.parametrize(
    ("kwargs", "status", "param"),
    [
        ({"model": "nope"}, 404, "model"),
        ({"model": "smol"}, 400, "model"),
        ({"model": "flux", "size": "100x100"}, 400, "size"),
        ({"model": "flux", "size": "512x512"}, 400, "size"),
        ({"model": "flux", "extra_body": {"sampler": "warp"}}, 400, "sampler"),
        ({"model": "flux", "n": 11}, 400, "n"),
        ({"model": "flux", "prompt": ""}, 400, "prompt"),
    ],
)
def test_each_bad_request_is_refused_naming_the_field(sdk, kwargs, status, param):
    with pytest.raises(openai.APIStatusError) as info:
        sdk.images.generate(**{"prompt": "x", **kwargs})
    assert info.value.status_code == status
    body = info.value.body if isinstance(info.value.body, dict) else {}
    assert body.get("error", body).get("param") == param
    assert sdk.images.generate(model="flux", prompt="x", extra_body=FAST).data[0].b64_json
