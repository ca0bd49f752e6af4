"""GET /openapi.json: the HTTP API as an OpenAPI 3.1 document, from the definitions the edge checks with.

The request bodies and path parameters come from each API's room
(allm/gateway/<api>/schema.py), the very nodes the handlers validate with, so
the document cannot drift from what is enforced. Like /health, the document
needs no key: it holds nothing but the API's shape and the catalog's model ids.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import re

from sanic import Blueprint, HTTPResponse, Request
from sanic import json as json_response

from allm.gateway.anthropic import schema as anthropic
from allm.gateway.audio import schema as audio
from allm.gateway.chat import schema as chat
from allm.gateway.config import Config
from allm.gateway.errors import ANTHROPIC, OLLAMA, api_of
from allm.gateway.images import schema as images
from allm.gateway.models import schema as model_routes
from allm.gateway.ollama import pulls as ollama_pulls
from allm.gateway.ollama import schema as ollama
from allm.gateway.responses import schema as responses
from allm.gateway.spec import Node, Obj, Schema

bp = Blueprint("openapi")

PATH = "/openapi.json"

ERROR: Schema = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}
#: an error of the Anthropic endpoints (/v1/messages…), in Anthropic's shape
ANTHROPIC_ERROR: Schema = {
    "type": "object",
    "required": ["type", "error"],
    "properties": {
        "type": {"const": "error"},
        "error": {
            "type": "object",
            "required": ["type", "message"],
            "properties": {"type": {"type": "string"}, "message": {"type": "string"}},
        },
    },
}
#: an error of the Ollama endpoints (/api/…), in Ollama's shape
OLLAMA_ERROR: Schema = {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}}
#: the error component and the shape's name, by the API a path belongs to (errors.api_of)
ERRORS = {ANTHROPIC: ("AnthropicError", "Anthropic's shape"), OLLAMA: ("OllamaError", "Ollama's shape")}


def _object(kind: str | None, required: list[str], **props: Schema) -> Schema:
    """A response body's outline: its ``object`` name and the fields every client reads."""
    if kind is not None:
        props = {"object": {"const": kind}, **props}
        required = ["object", *required]
    return {"type": "object", "required": required, "properties": props}


STRING: Schema = {"type": "string"}
#: one server-sent event (OpenAPI 3.1: the schema of an event stream describes each event)
EVENT: Schema = {
    "type": "object",
    "required": ["data"],
    "properties": {
        "event": {"type": "string"},
        "data": {"type": "string", "description": "a JSON chunk, or [DONE] at the end of a chat stream"},
    },
}
INTEGER: Schema = {"type": "integer"}
LIST: Schema = {"type": "array"}
RESPONSE = _object(
    "response",
    ["id", "created_at", "status", "model", "output"],
    id=STRING,
    created_at=INTEGER,
    status={"enum": ["completed", "incomplete", "failed", "in_progress"]},
    model=STRING,
    output=LIST,
)
CHAT_COMPLETION = _object(
    "chat.completion", ["id", "created", "model", "choices", "usage"], id=STRING, model=STRING, choices=LIST
)
TEXT_COMPLETION = _object(
    "text_completion", ["id", "created", "model", "choices", "usage"], id=STRING, model=STRING, choices=LIST
)
EMBEDDINGS = _object("list", ["data", "model", "usage"], data=LIST, model=STRING)
ITEMS = _object(
    "list",
    ["data", "first_id", "last_id", "has_more"],
    data=LIST,
    first_id={"type": ["string", "null"]},
    last_id={"type": ["string", "null"]},
    has_more={"type": "boolean"},
)
DELETED = _object("response", ["id", "deleted"], id=STRING, deleted={"const": True})
MODELS = _object("list", ["data"], data=LIST)
#: one model as GET /v1/models lists it (allm/gateway/models/listing.py says each field)
MODEL = _object(
    "model",
    ["id", "created", "owned_by", "state"],
    id=STRING,
    created=INTEGER,
    owned_by=STRING,
    state={"enum": ["available", "downloading", "loading", "loaded", "unavailable"]},
    pinned={"type": "boolean"},
)
MODEL_DELETED = _object("model", ["id", "deleted"], id=STRING, deleted={"const": True})
#: json and verbose_json: text is all they share (verbose_json adds language, duration, segments, words)
TRANSCRIPTION = _object(None, ["text"], text=STRING)
#: OpenAI's ImagesResponse (openai-python's types/images_response.py): each data item has b64_json or url
IMAGES = _object(
    None,
    ["created", "data"],
    created=INTEGER,
    data={
        "type": "array",
        "items": {
            "type": "object",
            "properties": {"b64_json": STRING, "url": STRING, "seed": INTEGER},
        },
    },
    output_format={"enum": list(images.IMAGE_FORMATS)},
    size=STRING,
)
#: an image's bytes, in the format it was made in
IMAGE_TYPES = tuple(f"image/{fmt}" for fmt in images.IMAGE_FORMATS)
#: Anthropic's Message (anthropic-sdk-python's types/message.py)
MESSAGE = _object(
    None,
    ["id", "type", "role", "model", "content", "stop_reason", "usage"],
    id=STRING,
    type={"const": "message"},
    role={"const": "assistant"},
    model=STRING,
    content=LIST,
    stop_reason={"enum": ["end_turn", "max_tokens", "stop_sequence", "tool_use"]},
    stop_sequence={"type": ["string", "null"]},
    usage={"type": "object", "required": ["input_tokens", "output_tokens"]},
)
TOKENS_COUNT = _object(None, ["input_tokens"], input_tokens=INTEGER)
#: Ollama's answers (ollama/ollama's api/types.go); a stream's lines have the same outline, done false
#: until the last, which has done_reason and the counts and durations (in nanoseconds)
OLLAMA_DONE: dict[str, Schema] = {
    "done": {"type": "boolean"},
    "done_reason": {"enum": ["stop", "length", "load", "unload"]},
}
OLLAMA_CHAT = _object(
    None, ["model", "created_at", "message", "done"], model=STRING, message={"type": "object"}, **OLLAMA_DONE
)
OLLAMA_GENERATE = _object(
    None, ["model", "created_at", "response", "done"], model=STRING, response=STRING, **OLLAMA_DONE
)
OLLAMA_EMBED = _object(None, ["model", "embeddings"], model=STRING, embeddings=LIST)
OLLAMA_EMBEDDING = _object(None, ["embedding"], embedding=LIST)
OLLAMA_MODELS = _object(None, ["models"], models=LIST)
OLLAMA_SHOW = _object(
    None,
    ["details", "model_info"],
    details={"type": "object"},
    model_info={"type": "object"},
    capabilities=LIST,
)
OLLAMA_VERSION = _object(None, ["version"], version=STRING)
STATUS = _object(None, ["status"], status=STRING)
MANAGERS = _object(
    None, ["server", "managers", "models"], server={"type": "object"}, managers=LIST, models=LIST
)


@dataclasses.dataclass(frozen=True)
class Route:
    method: str
    path: str
    summary: str
    ok: Schema
    body: Node | None = None
    query: Obj | None = None
    streams: bool = False
    ndjson: bool = False  # streams JSON lines (application/x-ndjson), each line outlined by ok
    form: bool = False  # the body is multipart/form-data, not JSON
    plain: bool = False  # may also answer text/plain (a transcript's text, srt or vtt)
    binary: tuple[str, ...] = ()  # answers these content types, as bytes, instead of JSON
    modality: str = "text"  # whose models the model field names
    open: bool = False  # no API key needed
    other: dict[str, Schema] = dataclasses.field(default_factory=dict)  # more statuses and their bodies


ROUTES = (
    Route("post", "/v1/responses", "Create a response", RESPONSE, responses.RESPONSES, streams=True),
    Route("get", "/v1/responses/{response_id}", "Retrieve a stored response", RESPONSE),
    Route("delete", "/v1/responses/{response_id}", "Delete a stored response", DELETED),
    Route(
        "get",
        "/v1/responses/{response_id}/input_items",
        "The input items of a stored response, earlier turns' included",
        ITEMS,
        query=responses.INPUT_ITEMS_QUERY,
    ),
    Route(
        "post", "/v1/chat/completions", "Create a chat completion", CHAT_COMPLETION, chat.CHAT, streams=True
    ),
    Route(
        "post", "/v1/completions", "Create a text completion", TEXT_COMPLETION, chat.COMPLETIONS, streams=True
    ),
    Route("post", "/v1/embeddings", "Create embeddings", EMBEDDINGS, chat.EMBEDDINGS),
    Route(
        "post",
        "/v1/messages",
        "Create a message (Anthropic's Messages API)",
        MESSAGE,
        anthropic.MESSAGES_BODY,
        streams=True,
    ),
    Route(
        "post",
        "/v1/messages/count_tokens",
        "Count the input tokens of a message request, as the model counts its prompt",
        TOKENS_COUNT,
        anthropic.COUNT_TOKENS_BODY,
    ),
    Route(
        "post",
        "/v1/audio/transcriptions",
        "Transcribe audio into its own language",
        TRANSCRIPTION,
        audio.TRANSCRIPTIONS,
        streams=True,
        form=True,
        plain=True,
        modality="audio",
    ),
    Route(
        "post",
        "/v1/audio/translations",
        "Translate audio into English text",
        TRANSCRIPTION,
        audio.TRANSLATIONS,
        form=True,
        plain=True,
        modality="audio",
    ),
    Route(
        "post",
        "/v1/images/generations",
        "Create images from a prompt",
        IMAGES,
        images.IMAGES,
        streams=True,
        modality="image",
    ),
    Route(
        "get",
        "/v1/images/files/{name}",
        "An image a generation answered as a url, until it expires",
        {"type": "string", "format": "binary"},
        binary=IMAGE_TYPES,
    ),
    Route(
        "get",
        "/v1/models",
        "The models: state (available, downloading, loading, loaded), memory, context, pin, last use",
        MODELS,
    ),
    Route("get", "/v1/models/{model_id}", "One model, as the list shows it", MODEL),
    Route(
        "post",
        "/v1/models",
        "Admin: pull a model from the Hugging Face Hub (or a mirror) and serve it; stream: progress events",
        MODEL,
        model_routes.PULL,
        streams=True,
    ),
    *(
        Route("post", f"/v1/models/{{model_id}}/{action}", f"Admin: {what}", MODEL)
        for action, what in (
            ("load", "load the model now"),
            ("unload", "unload the model from every instance holding it (its pin goes too)"),
            ("pin", "load the model and keep it: never evicted, never unloaded when idle"),
            ("unpin", "let the model be evicted and unloaded when idle again"),
        )
    ),
    Route(
        "delete",
        "/v1/models/{model_id}",
        "Admin: delete a pulled model's files and record (force=true: unload it first)",
        MODEL_DELETED,
        query=model_routes.DELETE_QUERY,
    ),
    Route("get", "/api/version", "Ollama: the Ollama release whose API this follows", OLLAMA_VERSION),
    Route("get", "/api/tags", "Ollama: the text models, as ID:latest, with their details", OLLAMA_MODELS),
    Route(
        "post",
        "/api/show",
        "Ollama: one model's details, parameters and capabilities",
        OLLAMA_SHOW,
        ollama.SHOW,
    ),
    Route(
        "get", "/api/ps", "Ollama: the models loaded now, their memory and when they unload", OLLAMA_MODELS
    ),
    Route("post", "/api/chat", "Ollama: a chat turn", OLLAMA_CHAT, ollama.CHAT, streams=True, ndjson=True),
    Route(
        "post",
        "/api/generate",
        "Ollama: a completion",
        OLLAMA_GENERATE,
        ollama.GENERATE,
        streams=True,
        ndjson=True,
    ),
    Route("post", "/api/embed", "Ollama: embeddings of one input or several", OLLAMA_EMBED, ollama.EMBED),
    Route(
        "post",
        "/api/embeddings",
        "Ollama: one embedding (the older shape)",
        OLLAMA_EMBEDDING,
        ollama.EMBEDDINGS,
    ),
    Route(
        "post",
        "/api/pull",
        "Ollama: pull a Hub model (hf.co/OWNER/REPO:QUANT) and serve it under that name (admin)",
        STATUS,
        ollama_pulls.PULL,
        streams=True,
        ndjson=True,
    ),
    Route(
        "delete",
        "/api/delete",
        "Ollama: delete a pulled model, unloading it first (admin)",
        {"type": "object"},
        ollama_pulls.DELETE,
    ),
    Route("get", "/health", "Liveness: the process answers", STATUS, open=True),
    Route(
        "get",
        "/ready",
        "Readiness: each modality has a manager up and the default text model loads",
        STATUS,
        open=True,
        other={"503": _object(None, ["status", "reason"], status=STRING, reason=STRING)},
    ),
    Route(
        "get",
        "/status",
        "The server (version, uptime, draining, last reload), each manager instance (pid, state, "
        "restarts, last exit and its last log lines, models, queue, memory) and each model's traffic",
        MANAGERS,
    ),
    Route("get", "/metrics", "Prometheus metrics in the text format 0.0.4", STRING, binary=("text/plain",)),
    Route(
        "get",
        "/",
        "The status page for people: a small HTML page over /status",
        STRING,
        binary=("text/html",),
        open=True,
    ),
    Route("get", PATH, "This document", {"type": "object"}, open=True),
)
OPEN_PATHS = frozenset(r.path for r in ROUTES if r.open)
#: each path parameter a route may have, and what it must be
PATH_PARAMETERS: dict[str, Node] = {
    "response_id": responses.RESPONSE_ID,
    "name": images.IMAGE_FILE,
    "model_id": model_routes.MODEL_ID,
}


def _version() -> str:
    try:
        return importlib.metadata.version("allm")
    except importlib.metadata.PackageNotFoundError:
        return "0.0.0"


def _form_schema(node: Node) -> Schema:
    """A multipart/form-data body: the node's schema, less the null an optional JSON field may be.

    A form field has no null: it is sent or left out, and the text "null" is only text.
    """
    body = node.schema()
    for key, prop in body["properties"].items():
        options = prop.get("anyOf") if key not in body.get("required", ()) else None
        if isinstance(options, list) and len(options) == 2 and options[1] == {"type": "null"}:
            body["properties"][key] = options[0]
    return body


def _operation(route: Route, config: Config) -> Schema:
    json_ok: Schema = {"schema": route.ok}
    content: Schema = {media: json_ok for media in route.binary} or {"application/json": json_ok}
    if route.plain:
        content["text/plain"] = {"schema": STRING}
    if route.streams and route.ndjson:
        content["application/x-ndjson"] = {"schema": route.ok}
    elif route.streams:
        content["text/event-stream"] = {"schema": EVENT}
    responses: Schema = {"200": {"description": "success", "content": content}}
    for status, schema in route.other.items():
        responses[status] = {
            "description": "see the body",
            "content": {"application/json": {"schema": schema}},
        }
    error, shape = ERRORS.get(api_of(route.path), ("Error", "OpenAI's shape; code names the condition"))
    for status, what in (("4XX", "a client error"), ("5XX", "a server or engine error")):
        responses[status] = {
            "description": f"{what}, in {shape}",
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{error}"}}},
        }
    op: Schema = {
        "operationId": f"{route.method}_{route.path.strip('/').replace('/', '_').replace('.', '_')}".replace(
            "{", ""
        ).replace("}", ""),
        "summary": route.summary,
        "responses": responses,
    }
    for name in re.findall(r"\{(\w+)\}", route.path):
        op.setdefault("parameters", []).append(
            {"name": name, "in": "path", "required": True, "schema": PATH_PARAMETERS[name].schema()}
        )
    if route.query is not None:
        op.setdefault("parameters", []).extend(
            {"name": name, "in": "query", "required": False, "schema": node.schema()}
            for name, node in route.query.fields.items()
        )
    if route.body is not None:
        body = _form_schema(route.body) if route.form else route.body.schema()
        models = [m.id for m in config.models if m.modality == route.modality]
        if models and "model" in body["properties"]:
            body["properties"]["model"]["examples"] = models
        media = "multipart/form-data" if route.form else "application/json"
        op["requestBody"] = {"required": True, "content": {media: {"schema": body}}}
    if route.open:
        op["security"] = []
    return op


def document(config: Config) -> Schema:
    """The OpenAPI 3.1 document of this server, with its catalog's model ids as examples."""
    paths: Schema = {}
    for route in ROUTES:
        paths.setdefault(route.path, {})[route.method] = _operation(route, config)
    doc: Schema = {
        "openapi": "3.1.0",
        "info": {
            "title": "allm",
            "version": _version(),
            "description": "A local inference server behind the OpenAI HTTP APIs. Every request field is "
            "checked as described here; a refusal is a 400 whose error.param names the field.",
        },
        "paths": paths,
        "components": {
            "schemas": {"Error": ERROR, "AnthropicError": ANTHROPIC_ERROR, "OllamaError": OLLAMA_ERROR}
        },
    }
    if config.api_keys:
        doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        doc["security"] = [{"bearer": []}]
    return doc


@bp.get(PATH)
async def openapi(request: Request) -> HTTPResponse:
    doc = getattr(request.app.ctx, "openapi", None)
    if doc is None:
        doc = request.app.ctx.openapi = document(request.app.ctx.config)
    return json_response(doc)
