"""The static table of modality managers: modality → the module that implements it.

No discovery, no plugins: this table is the whole list.  Tests may hand the
supervisor a table of their own (a fault-injection manager); production code
never builds one from the file system.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Final

MANAGERS: Final = MappingProxyType(
    {
        "text": "allm.managers.text.manager",
        "audio": "allm.managers.audio.manager",
        "image": "allm.managers.image.manager",
    }
)


def module_for(modality: str) -> str:
    try:
        return MANAGERS[modality]
    except KeyError:
        known = ", ".join(MANAGERS)
        raise ValueError(f"unknown modality {modality!r}; known: {known}") from None
