"""The text manager: GGUF through llama.cpp, safetensors directories through their own engine."""
