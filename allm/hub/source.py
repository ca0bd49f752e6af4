"""What ``allm pull`` is asked for: a Hub repository id and a tag, checked before anything is fetched.

SOURCE is ``OWNER/REPO`` or ``OWNER/REPO:TAG``, optionally after ``hf.co/``,
``huggingface.co/`` or ``hf://``. A repository id takes the Hub's own characters only
(letters, digits, ``-``, ``_``, ``.``; no ``..`` or ``--``; no part starting or ending
with ``.`` or ``-``),
so it can never be a path; the tag (a GGUF quant such as ``Q4_K_M``, a whisper.cpp
model such as ``tiny.en``) takes the same characters.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re

from allm.hub.errors import PullError

PREFIXES = ("hf://", "https://huggingface.co/", "https://hf.co/", "huggingface.co/", "hf.co/")
_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
_TAG = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
MAX_ID_CHARS = 200


@dataclasses.dataclass(frozen=True, slots=True)
class Source:
    repo_id: str  # OWNER/NAME
    tag: str | None  # the quant or the file chosen among several, as written

    def __str__(self) -> str:
        return f"{self.repo_id}:{self.tag}" if self.tag else self.repo_id


def _check_part(part: str, what: str, source: str) -> None:
    if not _PART.fullmatch(part) or ".." in part or "--" in part or part.endswith((".", "-")):
        raise PullError(
            f"{source!r}: the {what} {part!r} is not a Hugging Face name (letters, digits, '-', '_' "
            "and '.', not starting or ending with '.' or '-', no '..' or '--')",
            status=400,
        )


def parse_source(text: str) -> Source:
    """The repository and tag SOURCE names; PullError (400) saying what is wrong with it."""
    raw = text.strip()
    for prefix in PREFIXES:
        if raw.lower().startswith(prefix):
            raw = raw[len(prefix) :]
            break
    name, colon, tag = raw.partition(":")
    parts = name.split("/")
    if len(parts) != 2:
        raise PullError(
            f"{text!r} is not a model on the Hub: give OWNER/REPO or OWNER/REPO:QUANT "
            "(optionally after hf.co/ or hf://)",
            status=400,
        )
    _check_part(parts[0], "owner", text)
    _check_part(parts[1], "repository name", text)
    if colon and not _TAG.fullmatch(tag):
        raise PullError(
            f"{text!r}: the tag {tag!r} is not a quant or file name (letters, digits, '-', '_', '.')",
            status=400,
        )
    return Source(name, tag or None)


def check_model_id(model_id: str) -> str:
    """An id to register a pulled model under: printable, without spaces, not too long."""
    if not model_id or len(model_id) > MAX_ID_CHARS or not model_id.isprintable() or " " in model_id:
        raise PullError(
            f"model id {model_id!r} must be 1 to {MAX_ID_CHARS} printable characters without spaces",
            status=400,
        )
    return model_id


def safe_name(model_id: str) -> str:
    """The directory name of a model id: its own characters where they are safe, and a hash of it."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", model_id).strip(".-")[:80] or "model"
    return f"{slug}-{hashlib.sha256(model_id.encode()).hexdigest()[:10]}"
