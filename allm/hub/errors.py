"""The one error a pull raises: what went wrong, said for a person, with the HTTP status it maps to."""

from __future__ import annotations


class PullError(Exception):
    """A pull that cannot go on; nothing is registered.

    ``status`` is the HTTP status the gateway answers with: 400 a bad source, id or parts
    description, 401 or 403 a gated repository, 404 no such repository, revision, tag or
    part file, 409 the id is taken, 422 files that are no model allm serves (or pickles
    only), 502 a download that failed or arrived damaged, 507 not enough room. ``param``
    names the request field at fault where it is not the source (``parts.clip_l``).
    """

    def __init__(self, message: str, *, status: int, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
