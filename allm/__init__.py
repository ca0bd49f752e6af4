"""allm: a local inference server for text, speech and images behind the OpenAI HTTP APIs.

The layout and the protocol are in docs/design.md; ``allm.cli`` is the command line.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("allm")
except PackageNotFoundError:  # a checkout that was never installed
    __version__ = "0+unknown"
