"""Reading an OpenAI request body: JSON, typed fields, the model, sampling options.

Each check raises ``ApiError`` 400 naming the field in ``param``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from sanic import Request

from gateway.config import Config, ModelConfig
from gateway.errors import ApiError, bad_field


def json_body(request: Request) -> dict[str, Any]:
    try:
        payload = json.loads(request.body or b"")
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(payload, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    return payload


def model_for(config: Config, payload: Mapping[str, Any], modality: str) -> ModelConfig:
    """The catalog entry the request names; never a silent fallback to another model."""
    model_id = payload.get("model")
    if not isinstance(model_id, str) or not model_id:
        raise bad_field("model", "'model' is required: a model id from GET /v1/models")
    model = config.model(model_id)
    if model is None:
        raise ApiError(
            404,
            f"the model {model_id!r} does not exist; GET /v1/models lists the models served here",
            code="model_not_found",
            param="model",
        )
    if model.modality != modality:
        raise bad_field(
            "model", f"the model {model_id!r} is a {model.modality} model, not a {modality} model"
        )
    return model


def optional(payload: Mapping[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    value = payload.get(key)
    if value is None:
        return None
    bad_bool = isinstance(value, bool) and kind in (int, float, (int, float))
    if not isinstance(value, kind) or bad_bool:
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise bad_field(key, f"'{key}' must be {_article(names)}, got {type(value).__name__}")
    return value


def _article(name: str) -> str:
    plain = {
        "str": "a string",
        "int": "an integer",
        "float": "a number",
        "bool": "a boolean",
        "dict": "an object",
    }
    return plain.get(name, "a " + name.replace("int or float", "number"))


def sampling(payload: Mapping[str, Any], *, max_tokens_keys: tuple[str, ...]) -> dict[str, Any]:
    """The sampling options every generation API shares, in the manager's names."""
    params: dict[str, Any] = {}
    for key in max_tokens_keys:
        value = optional(payload, key, int)
        if value is not None:
            if value < 1:
                raise bad_field(key, f"'{key}' must be at least 1, got {value}")
            params["max_tokens"] = value
    for key, top in (("temperature", 2.0), ("top_p", 1.0)):
        value = optional(payload, key, (int, float))
        if value is not None:
            if not 0 <= value <= top:
                raise bad_field(key, f"'{key}' must be between 0 and {top:g}, got {value}")
            params[key] = value
    seed = optional(payload, "seed", int)
    if seed is not None:
        params["seed"] = seed
    stop = payload.get("stop")
    if stop is not None:
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop) or len(stop) > 4:
            raise bad_field("stop", "'stop' must be a string or a list of up to 4 strings")
        params["stop"] = stop
    n = payload.get("n")
    if n not in (None, 1):
        raise bad_field("n", "only n=1 is supported")
    return params


def text_of(content: Any, param: str) -> str:
    """Message content as text: a string, or a list of text parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for i, part in enumerate(content):
            if not isinstance(part, dict):
                raise bad_field(f"{param}[{i}]", "each content part must be an object")
            kind = part.get("type")
            if kind in ("text", "input_text", "output_text") and isinstance(part.get("text"), str):
                texts.append(part["text"])
            else:
                raise bad_field(f"{param}[{i}]", f"content part type {kind!r} is not supported (text only)")
        return "".join(texts)
    raise bad_field(param, "content must be a string or a list of text parts")


def tools_of(payload: Mapping[str, Any]) -> dict[str, Any]:
    """Chat-style function tools and tool_choice, checked."""
    tools = payload.get("tools")
    if tools is None:
        return {}
    if not isinstance(tools, list):
        raise bad_field("tools", "'tools' must be a list")
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(fn, dict):
            raise bad_field(
                f"tools[{i}]", "only function tools are supported: {'type': 'function', 'function': {...}}"
            )
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            raise bad_field(f"tools[{i}].function.name", "each function needs a name")
    out: dict[str, Any] = {"tools": tools}
    if payload.get("tool_choice") is not None:
        out["tool_choice"] = payload["tool_choice"]
    return out
