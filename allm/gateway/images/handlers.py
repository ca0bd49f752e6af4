"""Text to image: OpenAI's image generations, and the files of images answered as URLs.

POST /v1/images/generations   ImagesResponse (openai-python's types/images_response.py): each image
                              as b64_json (the default) or as a url; with stream, allm's
                              image_generation.progress after each sampling step, then OpenAI's
                              image_generation.completed for each image, in order
GET /v1/images/files/{name}   an image answered as a url, until [image] url_ttl_s has passed

The body is checked with the room's ``IMAGES`` (allm/gateway/images/schema.py, the node GET
/openapi.json publishes), then the size against the server's [image] limits. The image
manager encodes every image in the asked format and sends it as a blob: the gateway never
decodes or re-encodes pixels. Images answered as URLs are files under ``<data_dir>/images/``
with random names (``ImageFiles``, allm/gateway/images/files.py); they expire, and past a
count or a byte total the oldest go first.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Mapping, Sequence
from typing import Any

from sanic import Blueprint, HTTPResponse, Request
from sanic import json as json_response
from sanic import raw as raw_response

from allm.gateway.config import Config, ImageLimits, parse_size
from allm.gateway.errors import ApiError, bad_field
from allm.gateway.fields import json_body, model_for
from allm.gateway.images import schema
from allm.gateway.images.files import CONTENT_TYPES
from allm.gateway.streaming import pump, sse
from allm.kernel.codes import InternalError
from allm.kernel.protocol import Result

bp = Blueprint("images", url_prefix="/v1/images")

FILES_PATH = "/v1/images/files"
#: a Host header fit to build a URL from: a name or IPv4 address, or a bracketed IPv6 one, and a port
HOST = re.compile(r"(?:[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?")
#: stable-diffusion.cpp's images have no alpha channel
BACKGROUND = "opaque"
#: the completed event's usage is required; a diffusion model has no tokens to count
NO_USAGE = {
    "input_tokens": 0,
    "input_tokens_details": {"image_tokens": 0, "text_tokens": 0},
    "output_tokens": 0,
    "total_tokens": 0,
}


# -- the request ---------------------------------------------------------------------------------


def image_size(payload: Mapping[str, Any], limits: ImageLimits) -> tuple[int, int]:
    """The checked body's size as (width, height): "auto" or none is the default; the limits name size."""
    text = payload.get("size", "auto")
    if text.lower() == "auto":
        return limits.default_size
    size = parse_size(text)
    if size is None:  # the node's pattern already refused it; this keeps the function whole
        raise bad_field("size", f"'size' must be WIDTHxHEIGHT or auto, got {text[:16]!r}")
    problem = limits.size_problem(*size)
    if problem is not None:
        raise bad_field("size", f"'size' {text!r}: {problem}")
    return size


def manager_params(payload: Mapping[str, Any], size: tuple[int, int]) -> dict[str, Any]:
    """A checked body as the image manager's params (the generate op in allm/managers/image/manager.py).

    A negative seed means "draw one", as in stable-diffusion.cpp and the UIs around it; the
    manager is told None, draws one and reports it.
    """
    fmt = payload.get("output_format", "png")
    seed = payload.get("seed")
    return {
        "prompt": payload["prompt"],
        "negative_prompt": payload.get("negative_prompt", ""),
        "n": payload.get("n", 1),
        "width": size[0],
        "height": size[1],
        "steps": payload.get("steps"),
        "cfg_scale": None if payload.get("cfg_scale") is None else float(payload["cfg_scale"]),
        "seed": None if seed is None or seed < 0 else seed,
        "sampler": payload.get("sampler"),
        "output_format": fmt,
        "output_compression": payload.get("output_compression") if fmt != "png" else None,
        "stream": bool(payload.get("stream")),
    }


# -- the answer ----------------------------------------------------------------------------------


def generated(result: Result, n: int) -> list[bytes]:
    """The images of the manager's result, one per image asked for; anything else is its fault."""
    data = result.data
    if len(result.blobs) != n:
        raise InternalError(f"the image manager sent {len(result.blobs)} images for the {n} asked for")
    if data.get("output_format") not in CONTENT_TYPES:
        raise InternalError(
            f"the image manager's result has no known output_format: {data.get('output_format')!r}"
        )
    for key in ("created", "width", "height"):
        if not isinstance(data.get(key), int) or isinstance(data.get(key), bool):
            raise InternalError(f"the image manager's result lacks an integer {key!r}")
    seeds = data.get("seeds")
    if not isinstance(seeds, list) or len(seeds) != n or not all(isinstance(s, int) for s in seeds):
        raise InternalError("the image manager's result lacks a seed per image")
    return list(result.blobs)


def size_of(data: Mapping[str, Any]) -> str:
    return f"{data['width']}x{data['height']}"


def images_response(data: Mapping[str, Any], items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """OpenAI's ImagesResponse, in its field order; each item gets allm's ``seed`` (what reproduces it).

    No usage: a diffusion model counts no tokens, and the type lets it be left out; no quality,
    which the request cannot change here.
    """
    return {
        "created": data["created"],
        "background": BACKGROUND,
        "data": [{**item, "seed": seed} for item, seed in zip(items, data["seeds"], strict=True)],
        "output_format": data["output_format"],
        "size": size_of(data),
    }


def b64_items(images: Sequence[bytes]) -> list[dict[str, Any]]:
    return [{"b64_json": base64.b64encode(image).decode("ascii")} for image in images]


def base_url(request: Request, config: Config) -> str:
    """This server as the client reached it: its scheme and Host header (else the configured address)."""
    scheme = request.scheme if request.scheme in ("http", "https") else "http"
    host = request.host
    if not HOST.fullmatch(host):
        host = f"[{config.host}]" if ":" in config.host else config.host
        host = f"{host}:{config.port}"
    return f"{scheme}://{host}"


def event(kind: str, **fields: Any) -> str:
    """One server-sent event, named as OpenAI names its image events."""
    return sse({"type": kind, **fields}, event=kind)


class ImageEvents:
    """The manager's progress chunks, then its images, as one generation's event stream."""

    def feed(self, data: Mapping[str, Any]) -> str:
        """A chunk ({"progress": {"image", "step", "steps"}}) as allm's progress event; else nothing."""
        progress = data.get("progress")
        if not isinstance(progress, Mapping):
            return ""
        fields = {"image_index": progress.get("image"), "step": progress.get("step")}
        fields["steps"] = progress.get("steps")
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in fields.values()):
            return ""
        return event("image_generation.progress", **fields)

    def finish(self, data: Mapping[str, Any], images: Sequence[bytes]) -> str:
        """One image_generation.completed per image, with every field openai-python's type requires."""
        return "".join(
            event(
                "image_generation.completed",
                b64_json=item["b64_json"],
                background=BACKGROUND,
                created_at=data["created"],
                output_format=data["output_format"],
                quality="auto",
                size=size_of(data),
                usage=NO_USAGE,
            )
            for item in b64_items(images)
        )


# -- routes --------------------------------------------------------------------------------------


@bp.post("/generations")
async def generations(request: Request) -> HTTPResponse | None:
    config, client = request.app.ctx.config, request.app.ctx.client
    payload = schema.IMAGES.check(json_body(request), "")
    model = model_for(config, payload, "image")
    params = manager_params(payload, image_size(payload, config.images))
    n = params["n"]
    if not params["stream"]:
        result = await client.call(
            "image", "generate", model=model.id, params=params, timeout_s=config.request_timeout_s
        )
        images = generated(result, n)
        if payload.get("response_format") == "url":
            names = await request.app.ctx.images.store(images, result.data["output_format"])
            base = base_url(request, config)
            items = [{"url": f"{base}{FILES_PATH}/{name}"} for name in names]
        else:
            items = b64_items(images)
        return json_response(images_response(result.data, items))

    events = ImageEvents()
    await pump(
        request,
        client.stream("image", "generate", model=model.id, params=params, timeout_s=config.request_timeout_s),
        feed=events.feed,
        # generated() checks the result inside the pump: a broken one ends the stream with its error
        finish=lambda result: events.finish(result.data, generated(result, n)),
    )
    return None


@bp.get("/files/<name:str>")
async def image_file(request: Request, name: str) -> HTTPResponse:
    found = await request.app.ctx.images.read(name)
    if found is None:
        raise ApiError(404, "no such image: it never existed, or its time has passed", code="not_found")
    data, content_type, left_s = found
    return raw_response(
        data, content_type=content_type, headers={"Cache-Control": f"private, max-age={left_s}"}
    )
