"""Fuzzing the HTTP edge of a real allm serve: generated and hand-written hostile requests."""
