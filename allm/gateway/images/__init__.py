"""The images room, text to image: schema.py, files.py (images kept for their URLs), handlers.py."""
