"""What a manager's ``describe`` tells of a catalog entry without loading it: its problems, gathered.

``allm check``, ``allm models`` and ``allm serve``'s start-up ask each manager module to
describe its entries; every problem found is reported, the first one per field of the
entry (``path``, ``format``, ``options.KEY``), so one run names them all.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

from allm.kernel.codes import AllmError
from allm.managers.engines import Engine


@dataclasses.dataclass(frozen=True, slots=True)
class Problem:
    field: str  # the catalog entry's field at fault: path, format, options.KEY
    message: str


@dataclasses.dataclass(frozen=True, slots=True)
class ModelReport:
    """What a manager can tell of a catalog entry without loading it (``allm check``, ``allm models``)."""

    format: str | None  # None where neither the catalog nor the files say
    engine: Engine | None
    size_bytes: int | None  # the weights on disk
    problems: tuple[Problem, ...] = ()


class Problems:
    """The problems found in one catalog entry, the first per field."""

    def __init__(self) -> None:
        self._by_field: dict[str, str] = {}

    def add(self, error: AllmError, field: str) -> None:
        """Keep ``error`` under the field it names (its ``param``), else under ``field``."""
        self._by_field.setdefault(error.param or field, error.message)

    @contextlib.contextmanager
    def under(self, field: str) -> Iterator[None]:
        """Run a check, keeping the coded error it raises (``add``) instead of letting it out."""
        try:
            yield
        except AllmError as exc:
            self.add(exc, field)

    def report(
        self, fmt: str | None, engine: Engine | None, size_bytes: int | None, *, strip: str = ""
    ) -> ModelReport:
        """The report, with the engine's absence under ``format``; ``strip`` leaves a prefix off messages."""
        if engine is not None and not engine.installed():
            self._by_field.setdefault("format", engine.not_installed())
        problems = tuple(Problem(f, m.removeprefix(strip)) for f, m in self._by_field.items())
        return ModelReport(fmt, engine, size_bytes, problems)
