"""The model catalog over HTTP: list, pull, load, unload, pin, unpin and delete (``/v1/models``)."""
