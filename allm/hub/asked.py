"""What ``allm pull``'s command line asks for: SOURCE and its flags, over a description file.

An image model made of parts (allm/hub/parts.py) is given by ``--part NAME=FILE`` flags, by
a TOML file (``--parts FILE``), or both, the flags winning::

    source = "leejet/FLUX.1-schnell-gguf"    # where bare file names are; SOURCE wins
    id = "flux-schnell"                      # --id wins
    [parts]
    diffusion_model = "flux1-schnell-q4_0.gguf"
    clip_l = "comfyanonymous/flux_text_encoders:clip_l.safetensors"
    t5xxl = "comfyanonymous/flux_text_encoders:t5xxl_fp16.safetensors"
    vae = "black-forest-labs/FLUX.1-schnell:ae.safetensors"
    [options]
    steps = 4
    cfg_scale = 1.0

The file holds what POST /v1/models's body holds (``revision`` too), in TOML.
"""

from __future__ import annotations

import dataclasses
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from allm.hub.errors import PullError
from allm.hub.parts import PARTS

DESCRIPTION_KEYS = ("source", "id", "revision", "parts", "options")


@dataclasses.dataclass(frozen=True, slots=True)
class Asked:
    """What ``allm pull`` is asked for, from its arguments and a description file (the arguments win)."""

    source: str | None
    model_id: str | None
    revision: str | None
    parts: dict[str, Any] | None  # None: a plain pull
    options: dict[str, Any] | None


def asked(
    source: str | None,
    model_id: str | None,
    revision: str | None,
    description: Path | None,
    flags: Sequence[str],
) -> Asked:
    """The pull the command line asks for: ``--parts FILE`` read, ``--part NAME=FILE`` flags over it."""
    described = read_description(description) if description is not None else {}
    parts = {**described.get("parts", {}), **from_flags(flags)}
    options = described.get("options")
    return Asked(
        source or described.get("source"),
        model_id or described.get("id"),
        revision or described.get("revision"),
        parts if parts or options is not None else None,
        options,
    )


def from_flags(flags: Sequence[str]) -> dict[str, str]:
    """``--part NAME=FILE`` flags, by part name."""
    parts: dict[str, str] = {}
    for flag in flags:
        name, equals, file = flag.partition("=")
        name = name.strip()
        if not equals or not name or not file.strip():
            raise PullError(
                f"--part {flag!r}: give NAME=FILE, such as vae=ae.safetensors or "
                "clip_l=OWNER/REPO:clip_l.safetensors",
                status=400,
            )
        if name in parts:
            raise PullError(f"--part {name} is given twice", status=400)
        parts[name] = file.strip()
    return parts


def read_description(path: Path) -> dict[str, Any]:
    """A description file: TOML with ``source``, ``id`` and ``revision``, and the tables ``[parts]``
    and ``[options]``."""
    try:
        raw = tomllib.loads(path.expanduser().read_text(encoding="utf-8"))
    except OSError as exc:
        raise PullError(f"cannot read the description {path}: {exc.strerror}", status=400) from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise PullError(f"{path} is no TOML description: {exc}", status=400) from None
    unknown = [key for key in raw if key not in DESCRIPTION_KEYS]
    if unknown:
        hint = " (the files go under [parts])" if unknown[0] in PARTS else ""
        raise PullError(
            f"{path}: unknown key {unknown[0]!r}{hint}; a description holds {', '.join(DESCRIPTION_KEYS)}",
            status=400,
        )
    for key in ("source", "id", "revision"):
        if key in raw and not isinstance(raw[key], str):
            raise PullError(f"{path}: {key} must be a string, got {raw[key]!r}", status=400)
    for key in ("parts", "options"):
        if key in raw and not isinstance(raw[key], dict):
            raise PullError(f"{path}: {key} must be a table ([{key}])", status=400)
    return raw
