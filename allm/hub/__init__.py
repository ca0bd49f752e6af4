"""Models by name from the Hugging Face Hub or a mirror: ``allm pull``, and the store of pulled models.

``pull`` fetches, checks and registers one model and returns it (``Pulled``), telling its
progress (``Progress``) to a callback; ``Store`` lists, gets and removes the pulled models
of a data directory; every refusal is a ``PullError`` carrying the HTTP status it maps to.
docs/models.md ("Pulling models") says what is fetched, what is checked and where it goes.
"""

from allm.hub.errors import PullError
from allm.hub.pull import Progress, Pulled, pull
from allm.hub.select import DEFAULT_QUANTS
from allm.hub.store import PulledModel, Store, StoredFile

__all__ = ["DEFAULT_QUANTS", "Progress", "PullError", "Pulled", "PulledModel", "Store", "StoredFile", "pull"]
