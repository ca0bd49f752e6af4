"""multipart/form-data bodies, read strictly: the parser, the ``File`` node, each field as its type.

Sanic's own form parser logs and drops what it cannot read, so a broken body would become
a misleading "file is required": the form is read here instead, and a body that breaks the
framing is a 400 saying how. A form's fields arrive as text: each is read as its node's JSON
type (a number's digits as a number, true/false as a boolean, a repeated ``name[]`` as an
array) and the form is then checked with the body's nodes, as a JSON body is checked.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any

from sanic.headers import parse_content_header

from allm.gateway.errors import ApiError, bad_field
from allm.gateway.spec import Arr, Bool, Checked, Node, Num, Obj, Schema

#: parts a form may have (a valid one has at most 9); the bound keeps a hostile body's walk short
MAX_PARTS = 64
#: bytes of one part's headers (a Content-Disposition with a long file name, a Content-Type)
MAX_HEAD_BYTES = 16 * 1024
#: a number as JSON writes it, so a field reads as a number exactly where a JSON reader says it does
NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?")


@dataclasses.dataclass(frozen=True, kw_only=True)
class File(Node):
    """A file part of a multipart/form-data body: its bytes, unread here (the manager decodes them)."""

    description: str = ""

    def kinds(self) -> frozenset[str]:
        return frozenset({"string"})

    def check(self, value: Any, path: str) -> Any:
        if not isinstance(value, bytes):
            raise bad_field(path, f"'{path}' must be a file")
        return value

    def schema(self) -> Schema:
        return self._described({"type": "string", "format": "binary"})


def form_of(node: Node) -> Obj:
    """The fields of a form body's node, under the checks that wrap them."""
    while isinstance(node, Checked):
        node = node.node
    if not isinstance(node, Obj):
        raise TypeError(f"a form body is an object of fields, not {type(node).__name__}")
    return node


@dataclasses.dataclass(frozen=True)
class Part:
    """One part of a multipart/form-data body: its field name and its bytes."""

    name: str
    data: bytes


def _malformed(message: str) -> ApiError:
    return ApiError(400, message, code="invalid_request")


def boundary_of(content_type: str | None) -> bytes:
    """The boundary of a multipart/form-data Content-Type; anything else is a 400."""
    kind, options = parse_content_header(content_type or "")
    if kind != "multipart/form-data":
        shown = repr(kind[:64]) if kind else "none"
        raise _malformed(
            f"the request body must be multipart/form-data, with the audio in its 'file' part; "
            f"the Content-Type is {shown}"
        )
    boundary = str(options.get("boundary", ""))
    if not (1 <= len(boundary) <= 70 and boundary.isascii() and boundary.isprintable()):
        raise _malformed("the multipart/form-data Content-Type needs a boundary of 1 to 70 ASCII characters")
    return boundary.encode("ascii")


def parse_multipart(body: bytes, boundary: bytes) -> list[Part]:
    """The parts of a multipart/form-data body (RFC 7578); a body that breaks the framing is a 400.

    A preamble before the first boundary and an epilogue after the last are ignored, as
    RFC 2046 says; a part without a name, a part cut short, or a body without its closing
    boundary is refused, never guessed at.
    """
    dash = b"--" + boundary
    delimiter = b"\r\n" + dash
    if body.startswith(dash):
        pos = len(dash)
    else:
        first = body.find(delimiter)
        if first < 0:
            raise _malformed("the multipart/form-data body holds no part: its boundary never appears")
        pos = first + len(delimiter)
    parts: list[Part] = []
    while True:
        if body.startswith(b"--", pos):
            return parts
        line_end = body.find(b"\r\n", pos)
        if line_end < 0 or body[pos:line_end].strip(b" \t"):
            raise _malformed(
                f"the multipart/form-data body is malformed after part {len(parts)}: "
                "a boundary must be followed by a line end, or by -- to close the body"
            )
        if len(parts) == MAX_PARTS:
            raise _malformed(f"the multipart/form-data body has more than {MAX_PARTS} parts")
        head_end = body.find(b"\r\n\r\n", line_end, line_end + MAX_HEAD_BYTES + 4)
        if head_end < 0:
            raise _malformed(
                f"part {len(parts) + 1} of the multipart/form-data body has no end to its headers "
                f"within {MAX_HEAD_BYTES} bytes"
            )
        start = head_end + 4
        end = body.find(delimiter, start)
        if end < 0:
            raise _malformed(
                f"part {len(parts) + 1} of the multipart/form-data body never ends: the body is cut "
                "short or lacks its closing boundary"
            )
        parts.append(Part(_part_name(body[line_end + 2 : head_end], len(parts) + 1), body[start:end]))
        pos = end + len(delimiter)


def _part_name(head: bytes, number: int) -> str:
    """The field name a part's headers give it (Content-Disposition: form-data; name=...)."""
    name = ""
    for line in head.split(b"\r\n") if head else ():
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            raise _malformed(f"the headers of part {number} of the form are not UTF-8") from None
        key, colon, value = text.partition(":")
        if not colon:
            raise _malformed(f"part {number} of the form has a header line without a colon")
        if key.strip().lower() == "content-disposition":
            kind, options = parse_content_header(value)
            if kind != "form-data":
                raise _malformed(f"part {number} of the form is not form-data: Content-Disposition {kind!r}")
            name = str(options.get("name", ""))
    if not name:
        raise _malformed(
            f"part {number} of the form has no field name (Content-Disposition: form-data; name=...)"
        )
    return name


def _typed(node: Node, text: str) -> Any:
    """A field's text as its node's JSON type, where it spells one; else the text (which the node refuses)."""
    if isinstance(node, Bool):
        return {"true": True, "false": False}.get(text, text)
    if isinstance(node, Num) and NUMBER.fullmatch(text):
        return float(text)  # digits past a double's range read as inf, which Num refuses by name
    return text


def form_values(parts: Sequence[Part], node: Node) -> dict[str, Any]:
    """The parts as the fields of ``node``: files as bytes, ``name[]`` repeated, the rest typed.

    A field the node does not know is kept as it came, for the node to refuse by name.
    """
    fields = form_of(node).fields
    values: dict[str, Any] = {}
    for part in parts:
        name = part.name
        field = fields.get(name)
        value: Any = part.data
        if field is not None and not isinstance(field, File):
            try:
                text = part.data.decode("utf-8")
            except UnicodeDecodeError:
                raise bad_field(name, f"'{name}' must be UTF-8 text") from None
            value = _typed(field.items if isinstance(field, Arr) else field, text)
        if isinstance(field, Arr):
            values.setdefault(name, []).append(value)
        elif name in values:
            raise bad_field(name, f"'{name}' is given more than once; it takes one value")
        else:
            values[name] = value
    return values


def read_form(body: bytes, content_type: str | None, node: Node) -> dict[str, Any]:
    """A multipart/form-data body, checked with ``node`` as a JSON body is checked."""
    values = form_values(parse_multipart(body, boundary_of(content_type)), node)
    checked: dict[str, Any] = node.check(values, "")
    return checked
