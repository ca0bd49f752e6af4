"""Ollama's API (/api/*): its request bodies, model listings and NDJSON answers over allm's text models."""
