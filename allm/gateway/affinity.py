"""Which conversation a text request continues, so that it goes where its prefix is cached.

An agent resends its whole conversation every turn. With several instances of the text
manager, a turn that lands on another instance than the last computes the whole prefix
again; the kernel client sends a request to the instance that last took its affinity key
when that one is no busier than the others (``KernelClient.stream(affinity=...)``).

The key is the client's ``prompt_cache_key`` where it gives one (Responses, Chat
Completions), else a digest of the model and the conversation's opening: its system and
developer messages and its first user message, which every later turn resends unchanged.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any


def conversation(model: str, params: Mapping[str, Any], cache_key: str | None = None) -> str | None:
    """The affinity key of a chat request's manager ``params`` (None: nothing to continue)."""
    if cache_key:
        return f"key:{model}:{cache_key}"
    messages = params.get("messages")
    if not messages:
        return None
    opening = _opening(messages)
    digest = hashlib.sha256(json.dumps([model, opening], sort_keys=True, default=str).encode())
    return f"chat:{digest.hexdigest()[:32]}"


def _opening(messages: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The messages up to and with the first user message."""
    for i, message in enumerate(messages):
        if message.get("role") == "user":
            return list(messages[: i + 1])
    return list(messages[:1])
