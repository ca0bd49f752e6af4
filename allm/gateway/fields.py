"""Reading an OpenAI request body: bounded JSON, the model, and the sampling options in the manager's names.

A body is parsed with bounds the standard ``json`` module does not keep on
its own, each of which once answered 500 or crashed further in:

- nesting: ``json.loads`` recurses per level and raises RecursionError near
  1000; past ``MAX_DEPTH`` a body is refused (no request needs more);
- integers: Python refuses int strings over 4300 digits with a ValueError,
  and msgpack cannot carry one past 64 bits to a manager; integers are kept
  to int64 and the field is named;
- ``NaN``, ``Infinity`` and numbers that overflow a double are not JSON;
- a lone UTF-16 surrogate (``"\\ud800"``) is valid JSON text but no Unicode
  scalar value: it cannot be encoded as UTF-8 on the way to an engine.

Each refusal is an ``ApiError`` 400: ``invalid_json`` for the body as a whole,
``invalid_value`` naming the field where there is one.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any

from sanic import Request

from allm.gateway.config import SAMPLING_DEFAULTS, Config, ModelConfig
from allm.gateway.errors import ApiError, bad_field
from allm.gateway.spec import INT64_MAX, INT64_MIN

#: JSON nesting a body may have; the deepest legitimate body (a response format schema) is far below it
MAX_DEPTH = 64
#: digits an integer literal may have before it is parsed (int64 needs 19 and a sign)
MAX_INT_DIGITS = 40
SURROGATE = re.compile("[\ud800-\udfff]")


def _parse_int(text: str) -> int:
    if len(text) > MAX_INT_DIGITS:
        raise ValueError(f"an integer of {len(text)} digits is far outside 64 bits")
    return int(text)


def _parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:40]} is too large")
    return value


def _parse_constant(text: str) -> Any:
    raise ValueError(f"{text} is not JSON")


def loads(text: str) -> Any:
    """``json.loads`` with the bounds above; raises ValueError (or RecursionError) on a bad text."""
    return json.loads(text, parse_int=_parse_int, parse_float=_parse_float, parse_constant=_parse_constant)


def _path(trail: tuple[Any, ...] | None) -> str:
    parts: list[str] = []
    while trail is not None:
        trail, key = trail
        parts.append(f"[{key}]" if isinstance(key, int) else f".{key}")
    return "".join(reversed(parts)).lstrip(".")


def check_values(value: Any, path: str = "") -> None:
    """Depth, int64 and surrogates over a decoded value, without recursion; names the first bad value."""
    stack: list[tuple[Any, int, tuple[Any, ...] | None]] = [(value, 0, None)]
    while stack:
        item, depth, trail = stack.pop()
        if isinstance(item, dict | list) and depth >= MAX_DEPTH:
            raise ApiError(
                400, f"the JSON nests deeper than {MAX_DEPTH} levels", code="invalid_json", param=path or None
            )
        if isinstance(item, dict):
            for key, inner in item.items():
                if SURROGATE.search(key):
                    where = _join(path, _path(trail))
                    raise bad_field(
                        where or "body", "a key holds a lone UTF-16 surrogate, which is not Unicode text"
                    )
                stack.append((inner, depth + 1, (trail, key)))
        elif isinstance(item, list):
            stack.extend((inner, depth + 1, (trail, i)) for i, inner in enumerate(item))
        elif isinstance(item, str):
            if SURROGATE.search(item):
                where = _join(path, _path(trail))
                raise bad_field(
                    where or "body",
                    f"'{where or 'body'}' holds a lone UTF-16 surrogate, which is not Unicode text",
                )
        elif isinstance(item, int) and not isinstance(item, bool) and not INT64_MIN <= item <= INT64_MAX:
            where = _join(path, _path(trail))
            raise bad_field(where or "body", f"'{where or 'body'}' is an integer outside 64 bits")


def _join(path: str, rest: str) -> str:
    if not path:
        return rest
    if not rest:
        return path
    return path + rest if rest.startswith("[") else f"{path}.{rest}"


def parse_json_text(text: str, path: str) -> Any:
    """JSON text inside a field (tool-call arguments), held to the body's bounds."""
    try:
        value = loads(text)
    except (ValueError, RecursionError) as exc:
        message = "nests too deeply" if isinstance(exc, RecursionError) else str(exc)[:200]
        raise bad_field(path, f"'{path}' must be JSON text: {message}") from None
    check_values(value, path)
    return value


def json_body(request: Request) -> dict[str, Any]:
    """The body as a JSON object: UTF-8, bounded, every string Unicode."""
    try:
        payload = loads((request.body or b"").decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ApiError(400, f"the request body is not UTF-8: {exc}", code="invalid_json") from None
    except RecursionError:
        raise ApiError(
            400, f"the request body nests deeper than {MAX_DEPTH} levels", code="invalid_json"
        ) from None
    except ValueError as exc:  # JSONDecodeError, and the bounds of loads()
        raise ApiError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(payload, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    check_values(payload)
    return payload


def model_for(config: Config, payload: Mapping[str, Any], modality: str) -> ModelConfig:
    """The catalog entry the request names; never a silent fallback to another model."""
    model_id = payload["model"]
    model = config.model(model_id)
    if model is None:
        raise ApiError(
            404,
            f"the model {model_id[:256]!r} does not exist; GET /v1/models lists the models served here",
            code="model_not_found",
            param="model",
        )
    if model.modality != modality:
        raise bad_field("model", f"the model {model_id!r} serves {model.modality}, not {modality}")
    return model


def sampling(
    payload: Mapping[str, Any], model: ModelConfig, *, max_tokens_keys: tuple[str, ...]
) -> dict[str, Any]:
    """The sampling options of a checked body, in the manager's names, every one of them set.

    A value the request leaves out comes from the model's catalog defaults, then from
    allm's (``SAMPLING_DEFAULTS``): the engine is always told, so what a response echoes
    is what was used.
    """
    params: dict[str, Any] = {}
    for key in max_tokens_keys:
        if key in payload:
            params["max_tokens"] = payload[key]
    for key in SAMPLING_DEFAULTS:
        params[key] = payload[key] if key in payload else model.sampling_default(key)
    if "seed" in payload:
        params["seed"] = payload["seed"]
    stop = payload.get("stop")
    if stop is not None:
        params["stop"] = [stop] if isinstance(stop, str) else stop
    if payload.get("logit_bias"):
        params["logit_bias"] = payload["logit_bias"]
    return params


def text_of(content: Any) -> str:
    """Checked message content as text: a string, or the text of its parts."""
    if isinstance(content, str):
        return content
    return "".join(part["text"] for part in content or ())
