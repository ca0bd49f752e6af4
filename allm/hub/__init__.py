"""Models by name from the Hugging Face Hub or a mirror: ``allm pull``, and the store of pulled models.

``pull`` fetches, checks and registers one model and returns it (``Pulled``), telling its
progress (``Progress``) to a callback; an image model made of parts is described by part
name (``parts``, allm/hub/parts.py); ``Store`` lists, gets and removes the pulled models of
a data directory; every refusal is a ``PullError`` carrying the HTTP status it maps to.
docs/models.md ("Pulling models") says what is fetched, what is checked and where it goes.
"""

from allm.hub.errors import PullError
from allm.hub.fetching import Progress
from allm.hub.parts import PARTS, checked, home
from allm.hub.pull import Pulled, pull
from allm.hub.select import DEFAULT_QUANTS
from allm.hub.store import PulledModel, Store, StoredFile

__all__ = [
    "DEFAULT_QUANTS",
    "PARTS",
    "Progress",
    "PullError",
    "Pulled",
    "PulledModel",
    "Store",
    "StoredFile",
    "checked",
    "home",
    "pull",
]
