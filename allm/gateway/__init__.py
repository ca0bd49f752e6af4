"""The Sanic gateway: OpenAI HTTP APIs translated into kernel requests."""
