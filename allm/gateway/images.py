"""Text to image: OpenAI's image generations, and the files of images answered as URLs.

POST /v1/images/generations   ImagesResponse (openai-python's types/images_response.py): each image
                              as b64_json (the default) or as a url; with stream, allm's
                              image_generation.progress after each sampling step, then OpenAI's
                              image_generation.completed for each image, in order
GET /v1/images/files/{name}   an image answered as a url, until [image] url_ttl_s has passed

The body is checked with api_schema's ``IMAGES`` (the node GET /openapi.json publishes),
then the size against the server's [image] limits. The image manager encodes every image
in the asked format and sends it as a blob: the gateway never decodes or re-encodes
pixels. Images answered as URLs are files under ``<data_dir>/images/`` with random names
(``ImageFiles``); they expire, and past a count or a byte total the oldest go first.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import re
import secrets
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from sanic import Blueprint, HTTPResponse, Request
from sanic import json as json_response
from sanic import raw as raw_response

from allm.gateway import api_schema
from allm.gateway.chat import open_stream, stream_error
from allm.gateway.config import Config, ImageLimits, parse_size
from allm.gateway.errors import ApiError, bad_field
from allm.gateway.fields import json_body, model_for
from allm.kernel.codes import AllmError, InternalError
from allm.kernel.protocol import Result

log = logging.getLogger("allm.gateway")
bp = Blueprint("images", url_prefix="/v1/images")

FILES_PATH = "/v1/images/files"
CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
#: a stored image's name: 24 random bytes in URL-safe base64, then its format; nothing else is looked up
FILE_NAME = re.compile(r"[A-Za-z0-9_-]{32}\.(?:png|jpeg|webp)")
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
SWEEP_INTERVAL_S = 60.0


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
    payload = {"type": kind, **fields}
    return f"event: {kind}\ndata: {json.dumps(payload, separators=(',', ':'))}\n\n"


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


# -- images kept for their URLs ------------------------------------------------------------------


class ImageFiles:
    """Images answered as URLs: one file each under ``directory``, kept ``ttl_s``, within the caps.

    The index (name → when stored, bytes) lives in memory, oldest first, and is rebuilt
    from the directory at start, so files of an earlier run still expire. Expiry runs on
    wall-clock time: the files outlive the process. A sweep runs on every store and read
    and on a timer (``sweep_every``); it deletes what has expired, then the oldest while
    the count or the bytes are over their caps, but never the images of the store that
    runs it. A name is looked up only if it is one this class makes (``FILE_NAME``), so
    no request reaches a path outside the directory. Calls run in a thread.
    """

    def __init__(
        self,
        directory: Path,
        *,
        ttl_s: float,
        max_files: int,
        max_bytes: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.directory = directory
        self.ttl_s = ttl_s
        self.max_files = max_files
        self.max_bytes = max_bytes
        self._clock = clock
        self._kept: dict[str, tuple[float, int]] = {}
        self._bytes = 0
        self._lock = threading.Lock()
        with self._lock:
            self._scan()
            self._sweep()

    def _scan(self) -> None:
        """The files of an earlier run, oldest first; its unfinished writes are deleted."""
        if not self.directory.is_dir():
            return
        found = []
        with os.scandir(self.directory) as entries:
            for entry in entries:
                if not entry.is_file(follow_symlinks=False):
                    continue
                if FILE_NAME.fullmatch(entry.name):
                    stat = entry.stat(follow_symlinks=False)
                    found.append((stat.st_mtime, entry.name, stat.st_size))
                elif entry.name.startswith(".") and entry.name.endswith(".part"):
                    Path(entry.path).unlink(missing_ok=True)
        for stored_at, name, size in sorted(found):
            self._kept[name] = (stored_at, size)
            self._bytes += size

    def _drop(self, name: str) -> None:
        _stored_at, size = self._kept.pop(name)
        self._bytes -= size
        (self.directory / name).unlink(missing_ok=True)

    def _sweep(self, keep: frozenset[str] = frozenset()) -> None:
        """Delete the expired, then the oldest past the caps (the caller holds the lock)."""
        oldest = self._clock() - self.ttl_s
        for name, (stored_at, _size) in list(self._kept.items()):
            over = len(self._kept) > self.max_files or self._bytes > self.max_bytes
            if name not in keep and (over or stored_at < oldest):
                self._drop(name)

    def _store(self, images: Sequence[bytes], fmt: str) -> list[str]:
        names = [f"{secrets.token_urlsafe(24)}.{fmt}" for _ in images]
        with self._lock:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            now = self._clock()
            for name, image in zip(names, images, strict=True):
                part = self.directory / f".{name}.part"  # never a FILE_NAME: unseen until whole
                part.write_bytes(image)
                part.replace(self.directory / name)
                self._kept[name] = (now, len(image))
                self._bytes += len(image)
            self._sweep(keep=frozenset(names))
        return names

    def _read(self, name: str) -> tuple[bytes, str, int] | None:
        if not FILE_NAME.fullmatch(name):
            return None
        with self._lock:
            self._sweep()
            kept = self._kept.get(name)
        if kept is None:
            return None
        try:
            data = (self.directory / name).read_bytes()
        except FileNotFoundError:  # swept since, or deleted by hand
            return None
        left_s = max(0, int(kept[0] + self.ttl_s - self._clock()))
        return data, CONTENT_TYPES[name.rpartition(".")[2]], left_s

    def sweep(self) -> None:
        with self._lock:
            self._sweep()

    def names(self) -> list[str]:
        """The names kept, oldest first."""
        with self._lock:
            return list(self._kept)

    async def store(self, images: Sequence[bytes], fmt: str) -> list[str]:
        """Keep these images (encoded as ``fmt``); their names, in order."""
        return await asyncio.to_thread(self._store, images, fmt)

    async def read(self, name: str) -> tuple[bytes, str, int] | None:
        """An image's bytes, content type and seconds left; None when unknown, expired or dropped."""
        return await asyncio.to_thread(self._read, name)

    async def sweep_every(self, interval_s: float) -> None:
        """Sweep on a timer, so expired files go even when no request comes; runs until cancelled."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                await asyncio.to_thread(self.sweep)
            except OSError as exc:  # a file it may not delete: said, and tried again next time
                log.warning("sweeping %s: %s", self.directory, exc)


def image_files(config: Config) -> ImageFiles:
    """The store of images answered as URLs, as the config bounds it."""
    limits = config.images
    return ImageFiles(
        config.data_dir.expanduser() / "images",
        ttl_s=limits.url_ttl_s,
        max_files=limits.url_max_files,
        max_bytes=limits.url_max_bytes,
    )


# -- routes --------------------------------------------------------------------------------------


@bp.post("/generations")
async def generations(request: Request) -> HTTPResponse | None:
    config, client = request.app.ctx.config, request.app.ctx.client
    payload = api_schema.IMAGES.check(json_body(request), "")
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
    async with client.stream(
        "image", "generate", model=model.id, params=params, timeout_s=config.request_timeout_s
    ) as stream:
        response, opening, pieces = await open_stream(request, stream)
        if opening is not None and (first := events.feed(opening.data)):
            await response.send(first)
        try:
            async for piece in pieces:
                if progress := events.feed(piece.data):
                    await response.send(progress)
            assert stream.result is not None
            tail = events.finish(stream.result.data, generated(stream.result, n))
        except AllmError as exc:
            await stream_error(response, exc)
        else:
            await response.send(tail)
        await response.eof()
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
