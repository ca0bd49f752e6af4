"""The audio room, speech to text: schema.py, form.py (multipart/form-data), handlers.py."""
