"""The Responses room: schema.py, turn.py (the request), items.py, events.py (the stream), handlers.py."""
