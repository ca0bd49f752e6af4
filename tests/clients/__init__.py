"""Real client libraries (Agents SDK, LangChain, instructor) against `allm serve`, from .venv-clients."""
