"""The audio manager: whisper.cpp speech to text (arrives with its issue)."""
