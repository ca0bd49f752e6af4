"""The Chat Completions room, with the legacy Completions and Embeddings beside it: schema.py, handlers.py."""
